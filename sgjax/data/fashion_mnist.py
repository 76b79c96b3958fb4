"""Fashion-MNIST: the idx reader and our tfds builder (ArrayRecord, no TensorFlow needed).

The raw files come from Debian's `dataset-fashion-mnist` package or any folder holding the four
gzipped idx files; nothing is downloaded. The builder packs them once into an ArrayRecord
dataset that grain reads with random access.
"""

from __future__ import annotations

import gzip
import os

import numpy as np
import tensorflow_datasets as tfds

from sgjax import errors

# Where packed ArrayRecord datasets go when data.cache_dir is '' (ours and the captioned set).
DEFAULT_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "sgjax", "tfds")

DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"
FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
CLASS_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
               "Sneaker", "Bag", "Ankle boot")
_IMAGES_MAGIC, _LABELS_MAGIC = 2051, 2049


def _missing(raw_dir: str, name: str) -> FileNotFoundError:
  return FileNotFoundError(
      f"Fashion-MNIST file {os.path.join(raw_dir, name)} not found. Install the data with "
      "`apt-get install -y dataset-fashion-mnist` (files land in "
      f"{DEFAULT_DIR}), or pass --config.data.dir=DIR with the four idx .gz files in DIR.")


def _read_idx(path: str, magic: int) -> np.ndarray:
  with gzip.open(path, "rb") as f:
    raw = f.read()
  head = np.frombuffer(raw, ">u4", count=1)[0]
  if head != magic:
    raise errors.UserError(path, f"idx magic {head}, expected {magic}")
  ndim = magic & 0xFF
  shape = tuple(int(d) for d in np.frombuffer(raw, ">u4", count=ndim, offset=4))
  data = np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim)
  if data.size != int(np.prod(shape)):
    raise errors.UserError(path, f"{data.size} bytes of data for shape {shape}")
  return data.reshape(shape)


def read_split(raw_dir: str, split: str) -> tuple[np.ndarray, np.ndarray]:
  """(images uint8 (N, 28, 28, 1), labels int32 (N,)) of `split` in {'train', 'test'}."""
  raw_dir = raw_dir or DEFAULT_DIR
  image_file, label_file = FILES[split]
  for name in (image_file, label_file):
    if not os.path.exists(os.path.join(raw_dir, name)):
      raise _missing(raw_dir, name)
  images = _read_idx(os.path.join(raw_dir, image_file), _IMAGES_MAGIC)
  labels = _read_idx(os.path.join(raw_dir, label_file), _LABELS_MAGIC)
  if len(images) != len(labels):
    raise errors.UserError(raw_dir, f"{len(images)} images but {len(labels)} labels in {split}")
  return images[..., None], labels.astype(np.int32)


class FashionMnist(tfds.core.GeneratorBasedBuilder):
  """Fashion-MNIST packed from local idx files. Pass `raw_dir` to the constructor."""

  VERSION = tfds.core.Version("1.0.0")

  def __init__(self, *, raw_dir: str = "", **kwargs):
    self._raw_dir = raw_dir or DEFAULT_DIR
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description="Fashion-MNIST from local idx files.",
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Tensor(shape=(28, 28, 1), dtype=np.uint8),
            "label": tfds.features.ClassLabel(names=CLASS_NAMES),
            # tfds shuffles records on write; the raw index keeps them traceable.
            "index": tfds.features.Tensor(shape=(), dtype=np.int64),
        }))

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing is downloaded.
    return {split: self._generate_examples(split) for split in FILES}

  def _generate_examples(self, split):
    images, labels = read_split(self._raw_dir, split)
    for i in range(len(images)):
      yield i, {"image": images[i], "label": int(labels[i]), "index": i}
