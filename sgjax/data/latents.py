"""The encoded-latent dataset: ArrayRecord shards that grain reads with random access.

Layout of a dataset folder (written by `python -m sgjax.tools.encode_latents`):
  metadata.json                      what was encoded, how, and the record layout
  latents-00000-of-00042.array_record  ...one file per shard, renamed into place when complete

A record is the bytes of: label (int32) | mean (H, W, C) | std (H, W, C), mean and std in the
metadata's dtype, both already multiplied by the VAE scale (0.18215). Training draws a fresh
posterior sample `mean + std·ε` every time it visits a record, as encoding on the fly would
(`.latent_dist.sample()`), rather than freezing one sample per image; the std is stored for that.
With `flip`, record 2i is image i and record 2i+1 its mirror image.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import numpy as np

from sgjax import errors, readers

FORMAT = "sgjax-latents-v1"
METADATA = "metadata.json"


def shard_name(index: int, count: int) -> str:
  return f"latents-{index:05d}-of-{count:05d}.array_record"


@dataclasses.dataclass(frozen=True)
class Layout:
  """How records are laid out; stored in metadata.json."""

  shape: tuple[int, int, int]  # (H, W, C) of one latent.
  dtype: str  # float16 | float32

  @property
  def _count(self) -> int:
    return int(np.prod(self.shape))

  @property
  def record_bytes(self) -> int:
    return 4 + 2 * self._count * np.dtype(self.dtype).itemsize

  def pack(self, label: int, mean: np.ndarray, std: np.ndarray) -> bytes:
    dt = np.dtype(self.dtype)
    return (np.int32(label).tobytes() + np.asarray(mean, dt).tobytes()
            + np.asarray(std, dt).tobytes())

  def unpack(self, record: bytes) -> dict[str, Any]:
    dt, n = np.dtype(self.dtype), self._count
    label = int(np.frombuffer(record, np.int32, 1)[0])
    mean = np.frombuffer(record, dt, n, 4).reshape(self.shape)
    std = np.frombuffer(record, dt, n, 4 + n * dt.itemsize).reshape(self.shape)
    return {"mean": mean, "std": std, "label": label}


ENCODE_FIRST = "encode the images first (python -m sgjax.tools.encode_latents --config=...)"


def read_metadata(directory: str) -> dict[str, Any]:
  """metadata.json, checked: its format, and the fields that say how to read the shards."""
  path = os.path.join(directory, METADATA)
  if not os.path.exists(path):
    raise errors.UserError(f"data.dir = {directory!r}", f"no {METADATA}", ENCODE_FIRST)
  meta = readers.json_file(path, path, ENCODE_FIRST)
  if not isinstance(meta, dict) or meta.get("format") != FORMAT:
    found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
    raise errors.UserError(path, f"format {found!r}, expected {FORMAT!r}", ENCODE_FIRST)
  shape, counts = meta.get("shape"), [meta.get(k) for k in ("num_records", "num_shards")]
  if (not isinstance(shape, list) or len(shape) != 3
      or not all(isinstance(d, int) and d > 0 for d in shape)
      or meta.get("dtype") not in ("float16", "float32")
      or not all(isinstance(n, int) and n > 0 for n in counts)):
    raise errors.UserError(path, f"shape {shape!r}, dtype {meta.get('dtype')!r}, num_records "
                           f"{counts[0]!r}, num_shards {counts[1]!r}",
                           "a (H, W, C) of positive ints, float16 or float32, positive counts: "
                           "re-encode into a new folder")
  return meta


def write_metadata(directory: str, meta: dict[str, Any]) -> None:
  """Writes metadata.json, or checks that the one there describes the same encoding."""
  path = os.path.join(directory, METADATA)
  if os.path.exists(path):
    old = read_metadata(directory)
    diff = sorted(k for k in set(old) | set(meta) if old.get(k) != meta.get(k))
    if diff:
      raise errors.UserError(f"data.dir = {directory!r}",
                             f"{METADATA} was written with other settings ({', '.join(diff)} "
                             f"differ: {[(k, old.get(k), meta.get(k)) for k in diff]})",
                             "resume with the same config, or point data.dir at a new folder")
    return
  os.makedirs(directory, exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(meta, f, indent=1)
  os.replace(tmp, path)


def write_shard(path: str, records: list[bytes]) -> None:
  """Writes one shard under a temporary name and renames it: a killed run leaves no partial
  file that looks finished."""
  from array_record.python.array_record_module import ArrayRecordWriter
  tmp = path + ".tmp"
  writer = ArrayRecordWriter(tmp, "group_size:1")  # One record per chunk: fast random reads.
  for r in records:
    writer.write(r)
  writer.close()
  os.replace(tmp, path)


class LatentSource:
  """Random access to {"mean", "std": (H, W, C) float, "label": int} over all shards."""

  def __init__(self, directory: str):
    self.metadata = meta = read_metadata(directory)
    count = meta["num_shards"]
    paths = [os.path.join(directory, shard_name(i, count)) for i in range(count)]
    missing = [os.path.basename(p) for p in paths if not os.path.exists(p)]
    if missing:
      raise errors.UserError(f"data.dir = {directory!r}", f"{len(missing)} of {count} shards "
                             f"not written yet ({', '.join(missing[:3])}...)",
                             "rerun the encoder to finish them")
    self.layout = Layout(tuple(meta["shape"]), meta["dtype"])
    total = sum(check_shard(p, self.layout) for p in paths)
    if total != meta["num_records"]:
      raise errors.UserError(f"data.dir = {directory!r}", f"the shards hold {total} records, "
                             f"{METADATA} says {meta['num_records']}",
                             "shards and metadata from different encodings: re-encode into a "
                             "new folder")
    import grain  # Local: the encoder imports this module and needs no grain (or orbax).
    self._source = grain.sources.ArrayRecordDataSource(paths)

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> dict[str, Any]:
    return self.layout.unpack(self._source[index])


def check_shard(path: str, layout: Layout) -> int:
  """The number of records in one shard, after checking that its first record has the size
  metadata.json's shape and dtype give (a shard of another encoding would be read as noise:
  float32 records read as float16 are garbage, not an error)."""
  from array_record.python.array_record_module import ArrayRecordReader
  with readers.reading(path, path, "rerun the encoder into a new folder", "ArrayRecord shard"):
    reader = ArrayRecordReader(path)
    try:
      count = reader.num_records()
      size = len(reader.read([0])[0]) if count else layout.record_bytes
    finally:
      reader.close()
  if size != layout.record_bytes:
    n = int(np.prod(layout.shape))
    fits = [d for d in ("float16", "float32") if 4 + 2 * n * np.dtype(d).itemsize == size]
    raise errors.UserError(path, f"records of {size} bytes, but {METADATA}'s shape "
                           f"{list(layout.shape)} and dtype {layout.dtype} make "
                           f"{layout.record_bytes}"
                           + (f" (they fit {fits[0]})" if fits else ""),
                           "shards and metadata from different encodings: re-encode into a new "
                           "folder")
  return count


def sample_latent(record: dict[str, Any], rng: np.random.Generator) -> dict[str, np.ndarray]:
  """A posterior sample mean + std·ε in model units (float32), for grain's random_map."""
  mean = np.asarray(record["mean"], np.float32)
  eps = rng.standard_normal(mean.shape, dtype=np.float32)
  return {"image": mean + np.asarray(record["std"], np.float32) * eps,
          "label": np.int32(record["label"])}


def write_random(directory: str, *, shape: tuple[int, int, int], num_records: int,
                 num_classes: int, dtype: str = "float16", shard_size: int = 1024,
                 seed: int = 0) -> str:
  """A latent set of random records in the encoder's exact layout, for benchmarking the input
  pipeline (and tests) where no encoded dataset exists. Returns `directory`."""
  num_shards = -(-num_records // shard_size)
  write_metadata(directory, dict(
      format=FORMAT, source="random", split="train", num_images=num_records, flip=False,
      num_records=num_records, shard_size=shard_size, num_shards=num_shards, image_size=0,
      shape=list(shape), dtype=dtype, scale=1.0, num_classes=num_classes,
      class_names=[str(i) for i in range(num_classes)], vae={}))
  layout, rng = Layout(tuple(shape), dtype), np.random.default_rng(seed)
  for s in range(num_shards):
    n = min(shard_size, num_records - s * shard_size)
    write_shard(os.path.join(directory, shard_name(s, num_shards)),
                [layout.pack(int(rng.integers(num_classes)), rng.standard_normal(shape),
                             0.1 * rng.random(shape)) for _ in range(n)])
  return directory
