"""Images -> SD-VAE latents: the ArrayRecord dataset that training reads (`data.name=latents`).

  python -m sgjax.tools.encode_latents --config=configs/imagenet256.py \
      --config.vae.weights=sd-vae-ft-ema/diffusion_pytorch_model.safetensors \
      --config.encode.source_dir=/data/imagenet/train --config.data.dir=/data/imagenet256_latents

Sources: a folder `<source_dir>/<class>/*.JPEG` (the ImageNet train layout; the class index is
the sorted folder order, which is also tfds' synset order), or tfds `imagenet2012` prepared from
the tar files in `source_dir` (tfds' manual_dir). Every image gets the ADM center crop
(`center_crop`), is encoded (batch split over this process's devices) and stored as posterior
mean and std ×vae.scale (see sgjax.data.latents), optionally with its mirror image too.

Resumable: the output is written a shard at a time (`encode.shard_size` images) under a
temporary name and renamed when complete; a rerun skips the finished shards and redoes only
missing ones. With several processes, process p encodes shards p, p + P, ... on its own devices
(no cross-host traffic), so `data.dir` must be a shared filesystem.
"""

from __future__ import annotations

import concurrent.futures
import os
import time

import jax
import ml_collections
import numpy as np
from absl import flags, logging
from ml_collections import config_flags
from PIL import Image

from sgjax import errors, files, lock, metrics, sharding, validation
from sgjax.convert import sd_vae
from sgjax.data import latents
from sgjax.models import vae as vae_lib

IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")
SOURCES = ("folder", "tfds")  # encode.source: an image folder, or tfds' imagenet2012.
LATENT_DTYPES = ("float16", "float32")  # encode.dtype: how the latent mean and std are stored.


def check_config(config: ml_collections.ConfigDict) -> None:
  """The `encode` section against the VAE (its declared values: sgjax.validation; the VAE's
  own: sgjax.models.vae.check_config)."""
  e, factor = config.encode, vae_lib.downsampling(config.vae)
  errors.check(e.image_size % factor == 0, "encode.image_size", e.image_size,
               f"must be a positive multiple of the VAE's downsampling factor {factor}")


def center_crop(image: Image.Image, size: int) -> np.ndarray:
  """The ADM (guided-diffusion) crop: (size, size, 3) uint8.

  Halve with a BOX filter while the short side is at least 2·size (cheap, alias-free), then one
  BICUBIC resize to short side = size, then cut the central square.
  """
  image = image.convert("RGB")
  while min(image.size) >= 2 * size:
    image = image.resize((image.width // 2, image.height // 2), resample=Image.BOX)
  ratio = size / min(image.size)
  image = image.resize((round(image.width * ratio), round(image.height * ratio)),
                       resample=Image.BICUBIC)
  pixels = np.asarray(image)
  top, left = (pixels.shape[0] - size) // 2, (pixels.shape[1] - size) // 2
  return pixels[top:top + size, left:left + size]


class FolderSource:
  """Images in class subfolders: index -> (PIL image, class index), in sorted order."""

  def __init__(self, root: str):
    if not root or not os.path.isdir(root):
      raise errors.UserError(f"encode.source_dir = {root!r}", "not a folder",
                             "expected <source_dir>/<class_name>/*.JPEG")
    self.class_names = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    self.files: list[tuple[str, int]] = []
    for label, name in enumerate(self.class_names):
      folder = os.path.join(root, name)
      self.files += [(os.path.join(folder, f), label) for f in sorted(os.listdir(folder))
                     if f.lower().endswith(IMAGE_SUFFIXES)]
    if not self.files:
      raise errors.UserError(f"encode.source_dir = {root!r}",
                             f"no {IMAGE_SUFFIXES} files in class subfolders",
                             "expected <source_dir>/<class_name>/*.JPEG")

  def __len__(self) -> int:
    return len(self.files)

  def load(self, index: int) -> tuple[Image.Image, int]:
    path, label = self.files[index]
    with Image.open(path) as f:
      return f.convert("RGB"), label


class TfdsSource:
  """tfds `imagenet2012`, prepared once from the tar files in `manual_dir` (not run in tests)."""

  def __init__(self, ec: ml_collections.ConfigDict):
    import tensorflow_datasets as tfds  # Local: only this source needs it.
    builder = tfds.builder("imagenet2012", data_dir=ec.tfds_data_dir or None,
                           file_format="array_record")
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=ec.source_dir))
    self.class_names = list(builder.info.features["label"].names)
    self._records = builder.as_data_source()[ec.split]

  def __len__(self) -> int:
    return len(self._records)

  def load(self, index: int) -> tuple[Image.Image, int]:
    record = self._records[index]
    return Image.fromarray(np.asarray(record["image"])), int(record["label"])


def make_source(ec: ml_collections.ConfigDict):
  if ec.source == "folder":
    return FolderSource(ec.source_dir)
  return TfdsSource(ec)


def _metadata(config, source, num_shards: int) -> dict:
  e, v = config.encode, config.vae
  factor = vae_lib.downsampling(v)
  side = e.image_size // factor
  copies = 2 if e.flip else 1
  return dict(format=latents.FORMAT, source=e.source, split=e.split,
              num_images=len(source), flip=bool(e.flip), num_records=copies * len(source),
              shard_size=e.shard_size, num_shards=num_shards, image_size=e.image_size,
              shape=[side, side, v.latent_channels], dtype=e.dtype, scale=v.scale,
              num_classes=len(source.class_names), class_names=list(source.class_names),
              vae=dict(weights=os.path.basename(v.weights),
                       block_out_channels=list(v.block_out_channels),
                       layers_per_block=v.layers_per_block, norm_groups=v.norm_groups))


def encode(config: ml_collections.ConfigDict) -> str:
  """Encodes `config.encode`'s images into `config.data.dir`; returns that folder.

  Stops early after `encode.max_shards` shards when > 0 (a rerun goes on from there).
  """
  validation.validate(config, job="encode_latents")
  check_config(config)
  e, v, out_dir = config.encode, config.vae, config.data.dir
  if not out_dir:
    raise errors.UserError("data.dir = ''", "no output folder",
                           "name the folder the latents go to (training reads it)")
  if not v.weights:
    raise errors.UserError("vae.weights = ''", "no VAE weights",
                           "pass the diffusers AutoencoderKL safetensors file")
  log = (lambda m: print(m, flush=True)) if jax.process_index() == 0 else (lambda m: None)
  source = make_source(e)
  with lock.hold(out_dir, "encode_latents", log=log):  # One writer per data.dir.
    return _encode(config, source, log)


def _encode(config: ml_collections.ConfigDict, source, log) -> str:
  e, v, out_dir = config.encode, config.vae, config.data.dir
  num_shards = -(-len(source) // e.shard_size)
  meta = _metadata(config, source, num_shards)
  latents.write_metadata(out_dir, meta)  # Or check it equals the one being resumed.
  layout = latents.Layout(tuple(meta["shape"]), e.dtype)

  # Data parallel over this process's devices; the VAE (84M params) is replicated.
  devices = jax.local_devices()
  mesh = sharding.build_mesh(dict(data=-1, fsdp=1, tensor=1), devices=devices)
  copies = 2 if e.flip else 1
  if (copies * e.batch_size) % len(devices):
    raise errors.UserError(f"encode.batch_size = {e.batch_size}",
                           f"×{copies} (flip) must be divisible by this process's device count "
                           f"{len(devices)}")
  model = vae_lib.from_config(v)
  params = jax.device_put(sd_vae.load_params(v), sharding.replicated(mesh))
  encode_fn = vae_lib.make_encode_fn(model, v.scale, mesh, chunk=v.chunk)

  path = lambda s: os.path.join(out_dir, latents.shard_name(s, num_shards))
  mine = range(jax.process_index(), num_shards, jax.process_count())
  todo = [s for s in mine if not os.path.exists(path(s))]
  if e.max_shards:
    todo = todo[:e.max_shards]
  shard_images = lambda s: min((s + 1) * e.shard_size, len(source)) - s * e.shard_size
  total = sum(shard_images(s) for s in mine)
  done = total - sum(shard_images(s) for s in mine if not os.path.exists(path(s)))
  if done:
    log(f"resuming: {done} of {total} images already encoded in {out_dir}")
  progress = metrics.Progress(total, done)  # Counts images.
  t0 = time.perf_counter()

  def load_batch(indices: range) -> tuple[np.ndarray, np.ndarray]:
    loaded = list(pool.map(lambda i: source.load(i), indices))
    pixels = np.stack(list(pool.map(lambda r: center_crop(r[0], e.image_size), loaded)))
    labels = np.array([r[1] for r in loaded], np.int32)
    if e.flip:  # Record 2i: image i; 2i+1: its mirror image.
      pixels = np.stack([pixels, pixels[:, :, ::-1]], 1).reshape((-1,) + pixels.shape[1:])
      labels = np.repeat(labels, 2)
    return pixels, labels

  def run_batch(pixels: np.ndarray):
    pad = copies * e.batch_size - len(pixels)  # Static shape: one compile for every batch.
    x = np.pad(pixels, ((0, pad), (0, 0), (0, 0), (0, 0)))
    return encode_fn(params, jax.device_put(x, sharding.batch_sharding(mesh)))

  # `pool` decodes and crops images (PIL releases the GIL); `ahead` prepares the next batch.
  with (concurrent.futures.ThreadPoolExecutor(max(4, os.cpu_count() or 1)) as pool,
        concurrent.futures.ThreadPoolExecutor(1) as prefetch):
    for s in todo:
      lo, hi = s * e.shard_size, s * e.shard_size + shard_images(s)
      starts = list(range(lo, hi, e.batch_size))
      # Decode and crop the next batch on host threads while the devices encode this one.
      ahead = prefetch.submit(load_batch, range(starts[0], min(starts[0] + e.batch_size, hi)))
      records = []
      for k in range(len(starts)):
        pixels, labels = ahead.result()
        if k + 1 < len(starts):
          nxt = starts[k + 1]
          ahead = prefetch.submit(load_batch, range(nxt, min(nxt + e.batch_size, hi)))
        mean, std = jax.device_get(run_batch(pixels))
        records += [layout.pack(labels[i], mean[i], std[i]) for i in range(len(labels))]
      try:
        latents.write_shard(path(s), records)
      except Exception as err:  # ArrayRecord's writer raises its status as a RuntimeError.
        if not (isinstance(err, OSError) or files.disk_full(err)):
          raise
        if os.path.exists(path(s) + ".tmp"):  # The unfinished shard (never read): space back.
          os.remove(path(s) + ".tmp")
        complete = sum(os.path.exists(path(k)) for k in range(num_shards))
        raise files.write_failed(path(s), err, f"{complete} of {num_shards} shards are "
                                 "complete (kept): free space and rerun the same command to "
                                 "encode the rest") from err
      done += hi - lo
      progress.report(done, {"shard": s, "img/s": (hi - lo) / max(time.perf_counter() - t0,
                                                                    1e-9)})
      t0 = time.perf_counter()
  left = sum(1 for s in range(num_shards) if not os.path.exists(path(s)))
  log(f"{num_shards - left} of {num_shards} shards in {out_dir}"
      + (f"; {left} left (rerun to continue)" if left else "; complete"))
  return out_dir


def main(argv) -> None:
  del argv
  logging.set_verbosity(logging.WARNING)  # Orbax/grain INFO lines would bury the progress.
  from sgjax import distributed
  # Several processes (SGJAX_* env vars, SLURM, Open MPI) split the shards between them.
  distributed.initialize()
  encode(flags.FLAGS.config)


def cli() -> None:
  """`python -m sgjax.tools.encode_latents --config=…` (flags defined here)."""
  # Defined here, not at import: tests import this module beside sgjax.main's own --config.
  config_flags.DEFINE_config_file("config", None, "Config file (get_config()).",
                                  lock_config=True)
  flags.mark_flags_as_required(["config"])
  errors.run(main)


if __name__ == "__main__":
  cli()
