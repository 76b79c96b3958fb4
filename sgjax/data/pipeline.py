"""grain pipelines over random-access sources: deterministic, per-process, checkpointable.

Every process reads only its own slice of the source (`process_index::process_count`), shuffled
with a fresh permutation each epoch from the config seed. The iterator's position is a small
state (`get_state()` / `set_state()`), saved in every checkpoint through
`grain.checkpoint.CheckpointSave(iterator)` (see sgjax.checkpoint), so a resumed run sees
exactly the batches an uninterrupted run would.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import grain
import ml_collections
import numpy as np

from sgjax.data import fashion_mnist

DATASETS = ("fashion_mnist", "synthetic")
DEFAULT_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "sgjax", "tfds")


@dataclasses.dataclass(frozen=True)
class SyntheticSource:
  """Random images and labels computed from the index: random access, no files (tests, benches)."""

  size: int
  image_size: int
  channels: int
  num_classes: int
  seed: int = 0

  def __len__(self) -> int:
    return self.size

  def __getitem__(self, index: int) -> dict[str, Any]:
    rng = np.random.default_rng((self.seed, int(index)))
    image = rng.integers(0, 256, (self.image_size, self.image_size, self.channels), np.uint8)
    return {"image": image, "label": int(rng.integers(0, self.num_classes))}


def _check_fashion_mnist(dc: ml_collections.ConfigDict) -> None:
  if dc.image_size != 28:
    raise ValueError(f"data.image_size = {dc.image_size}: Fashion-MNIST images are 28")
  if dc.channels != 1:
    raise ValueError(f"data.channels = {dc.channels}: Fashion-MNIST images have 1 channel")
  if dc.num_classes != 10:
    raise ValueError(f"data.num_classes = {dc.num_classes}: Fashion-MNIST has 10 classes")


def data_source(dc: ml_collections.ConfigDict, split: str = "train"):
  """A random-access source of {"image": uint8 HWC, "label": int} records."""
  if dc.name == "synthetic":
    return SyntheticSource(4096 if split == "train" else 512, dc.image_size, dc.channels,
                           dc.num_classes, seed=0 if split == "train" else 1)
  if dc.name == "fashion_mnist":
    _check_fashion_mnist(dc)
    fashion_mnist.read_split(dc.dir, "test")  # Fails early, with the install hint.
    builder = fashion_mnist.FashionMnist(raw_dir=dc.dir, data_dir=dc.cache_dir or DEFAULT_CACHE,
                                         file_format="array_record")
    # Idempotent: tfds writes into an `incomplete.*` folder and renames it when done.
    builder.download_and_prepare()
    return builder.as_data_source()[split]
  raise ValueError(f"data.name = {dc.name!r}: allowed: {', '.join(DATASETS)}")


def _to_model_units(record: dict[str, Any]) -> dict[str, np.ndarray]:
  image = np.asarray(record["image"], np.float32) / 127.5 - 1.0
  return {"image": image, "label": np.int32(record["label"])}


def make_train_iterator(dc: ml_collections.ConfigDict, global_batch_size: int, seed: int,
                        process_index: int = 0, process_count: int = 1):
  """An endless iterator of this process's batches: image float32 NHWC in [-1, 1], label int32."""
  if global_batch_size % process_count:
    raise ValueError(f"train.batch_size = {global_batch_size}: must be divisible by the number "
                     f"of processes ({process_count})")
  local_batch = global_batch_size // process_count
  ds = grain.MapDataset.source(data_source(dc, "train"))
  ds = ds[process_index::process_count]
  ds = ds.shuffle(seed=seed).repeat().map(_to_model_units)
  ds = ds.batch(local_batch, drop_remainder=True).to_iter_dataset()
  if dc.worker_count > 0:
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=dc.worker_count))
  return iter(ds)


def load_split_arrays(dc: ml_collections.ConfigDict, split: str) -> tuple[np.ndarray, np.ndarray]:
  """A whole split in memory: (images uint8 NHWC, labels int32). For evaluation code."""
  if dc.name == "fashion_mnist":
    _check_fashion_mnist(dc)
    return fashion_mnist.read_split(dc.dir, split)
  src = data_source(dc, split)
  records = [src[i] for i in range(len(src))]
  return (np.stack([r["image"] for r in records]),
          np.array([r["label"] for r in records], np.int32))
