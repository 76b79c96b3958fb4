"""grain pipelines over random-access sources: deterministic, per-process, checkpointable.

Every process shuffles the whole source with the same seed (a fresh permutation each epoch), so
all processes agree on one sequence of global batches, and reads only its own rows of each: the
global batch is the same for any number of processes (tests/test_multiprocess.py). The
iterator's position is a small state (`get_state()` / `set_state()`), saved in every
checkpoint through `grain.checkpoint.CheckpointSave(iterator)` (see sgjax.checkpoint), so a
resumed run sees exactly the batches an uninterrupted run would.
"""

from __future__ import annotations

import dataclasses
import fcntl
import os
from collections.abc import Sequence
from typing import Any

import grain
import ml_collections
import numpy as np

from sgjax import errors, files
from sgjax.data import captions, fashion_mnist, latents

DATASETS = ("fashion_mnist", "synthetic", "latents", "fashion_mnist_captions")
DEFAULT_CACHE = fashion_mnist.DEFAULT_CACHE


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


def check_config(config: ml_collections.ConfigDict) -> None:
  """The `data` section's shapes and reading (a dataset's own sizes are checked where it is
  read: `data_source`); captioned data: their caption templates (sgjax.data.captions)."""
  if config.data.name == captions.NAME:
    captions.check_config(config)


def _check_fashion_mnist(dc: ml_collections.ConfigDict) -> None:
  if dc.image_size != 28:
    raise errors.UserError(f"data.image_size = {dc.image_size}", "Fashion-MNIST images are 28")
  if dc.channels != 1:
    raise errors.UserError(f"data.channels = {dc.channels}", "Fashion-MNIST images have 1 channel")
  if dc.num_classes != 10:
    raise errors.UserError(f"data.num_classes = {dc.num_classes}", "Fashion-MNIST has 10 classes")


def data_source(dc: ml_collections.ConfigDict, split: str = "train"):
  """A random-access source of {"image": uint8 HWC, "label": int} records."""
  if dc.name == "synthetic":
    return SyntheticSource(4096 if split == "train" else 512, dc.image_size, dc.channels,
                           dc.num_classes, seed=0 if split == "train" else 1)
  if dc.name == "fashion_mnist":
    _check_fashion_mnist(dc)
    fashion_mnist.read_split(dc.dir, "test")  # Fails early, with the install hint.
    cache = dc.cache_dir or DEFAULT_CACHE
    prepare = lambda: fashion_mnist.FashionMnist(raw_dir=dc.dir, data_dir=cache,
                                                 file_format="array_record")
    # tfds writes into an `incomplete.*` folder and renames it when done, but two processes
    # preparing at once (three trainings started together) race on that rename and the loser
    # dies of FileExistsError: one preparer at a time; the others wait, then build their
    # builder (it reads what is prepared when it is made) and find the data there.
    if files.is_remote(cache):  # A bucket has no flock; prepare it from one process first.
      builder = prepare()
      builder.download_and_prepare()
    else:
      os.makedirs(cache, exist_ok=True)
      with open(os.path.join(cache, ".fashion_mnist.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        builder = prepare()
        builder.download_and_prepare()
    return builder.as_data_source()[split]
  if dc.name == "latents":
    return _latent_source(dc, split)
  if dc.name == captions.NAME:  # Text features written by sgjax.tools.encode_text.
    _check_fashion_mnist(dc)
    return captions.source(dc.cache_dir or DEFAULT_CACHE, split)
  raise errors.UserError(f"data.name = {dc.name!r}", f"allowed: {', '.join(DATASETS)}")


def _latent_source(dc: ml_collections.ConfigDict, split: str) -> latents.LatentSource:
  """The encoded SD-VAE latents in `data.dir` (sgjax.tools.encode_latents), checked against the
  data fields. Records: {"mean", "std": (H, W, C), "label"}; see `latents.sample_latent`."""
  if not dc.dir:
    raise errors.UserError("data.dir = ''", "data.name = 'latents' reads the folder that "
                           "`python -m sgjax.tools.encode_latents` wrote")
  src = latents.LatentSource(dc.dir)
  meta = src.metadata
  if split != meta["split"]:
    raise errors.UserError(f"data.dir = {dc.dir!r}",
                           f"holds the {meta['split']!r} split, not {split!r}")
  h, w, c = meta["shape"]
  for field, want, have in (("image_size", h, dc.image_size), ("channels", c, dc.channels),
                            ("num_classes", meta["num_classes"], dc.num_classes)):
    if want != have:
      raise errors.UserError(f"data.{field} = {have}", f"the latents in {dc.dir} have {want}")
  return src


def _to_model_units(record: dict[str, Any]) -> dict[str, np.ndarray]:
  image = np.asarray(record["image"])
  if image.dtype == np.uint8:  # Pixels -> [-1, 1]; latents (float) are model units already.
    image = image.astype(np.float32) / 127.5 - 1.0
  out = {"image": image.astype(np.float32), "label": np.int32(record["label"])}
  if "text" in record:  # Text-conditioned data (sgjax.data.captions).
    out.update(text=np.asarray(record["text"], np.float32),
               text_mask=np.asarray(record["text_mask"], bool))
  return out


class _RowsOfEveryBlock(grain.MapDataset):
  """The parent's records at `rows` of every block of `period` consecutive records, in order."""

  def __init__(self, parent: grain.MapDataset, period: int, rows: tuple[int, ...]):
    super().__init__(parent)
    self._period, self._rows = period, rows

  def __len__(self) -> int:
    return len(self._parent) // self._period * len(self._rows)

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    block, i = divmod(index, len(self._rows))
    return self._parent[block * self._period + self._rows[i]]


def null_condition(config: ml_collections.ConfigDict):
  """CFG's ∅ that the data provide for condition dropout: the empty prompt's recorded
  features for captioned data, None (the model's own null label) otherwise."""
  if config.data.name == captions.NAME:
    return captions.null_condition(config)
  return None


def make_train_iterator(dc: ml_collections.ConfigDict, global_batch_size: int, seed: int,
                        rows: Sequence[int] | None = None):
  """An endless iterator of this process's batches: image float32 NHWC in [-1, 1], label int32.

  `rows`: which rows of every global batch this process feeds, ascending (the order in which
  `jax.make_array_from_process_local_data` places them; `sharding.process_batch_rows`);
  default: all of them (one process).
  """
  rows = tuple(range(global_batch_size)) if rows is None else tuple(int(r) for r in rows)
  if (not rows or list(rows) != sorted(set(rows))
      or not 0 <= rows[0] <= rows[-1] < global_batch_size):
    # The rows come from sharding.process_batch_rows, not from the user: a bug if wrong.
    raise ValueError(f"rows = {rows}: must be distinct, ascending and in [0, train.batch_size = "
                     f"{global_batch_size})")
  ds = grain.MapDataset.source(data_source(dc, "train"))
  ds = ds.shuffle(seed=seed).repeat()
  if dc.name == "latents":
    # A fresh posterior sample mean + std·ε per visit, seeded by the global position: resumable
    # and the same for any number of processes.
    ds = ds.random_map(latents.sample_latent, seed=seed)
  if len(rows) < global_batch_size:
    ds = _RowsOfEveryBlock(ds, global_batch_size, rows)
  ds = ds.map(_to_model_units).batch(len(rows), drop_remainder=True).to_iter_dataset()
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
