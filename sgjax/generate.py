"""The one generation path: condition -> guided sampler -> decode -> uint8 -> grid / shards.

Every job that makes images (`--mode=sample`, `--mode=eval`, the demos, the sweep, the grids
while training; from Python: sgjax.pipeline, which keeps the compiled samplers) goes through
here, so a class-conditional and a text model, in pixels or in SD-VAE latents, come out the same
way: conditions (class labels (N,), or text {"text" (N, L, D), "text_mask" (N, L)}) are cut into
batches of `sample.batch_size` (the last padded by repeating its final row: one compile for all
batches), sampled with the config's guidance plan, decoded by the VAE when the model works in
latents (sgjax.convert.sd_vae.to_pixels), gathered from every host and converted to uint8 NHWC.

Batch b draws its noise and tokens from fold_in(key(seed), b) only, so a sharded, resumable
sample set (`write_shards`) restarts at its first missing shard and produces the images an
uninterrupted run would have. When all shards exist they are merged into `<name>.npz` with
`arr_0` = uint8 NHWC (the layout the ADM evaluation suite reads) and the per-sample arrays.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from sgjax import condition, errors, files, lock, metrics, readers, sampling, sharding
from sgjax import guidance as guidance_lib
from sgjax import state as state_lib
from sgjax import workdir as workdir_lib
from sgjax.convert import sd_vae
from sgjax.text import encoder as encoder_lib

Conditions = Any  # np.ndarray (N,) labels, or {"text": (N, L, D), "text_mask": (N, L)}.


def check_config(config: ml_collections.ConfigDict, num_devices: int | None = None) -> None:
  """The batches of `sample` (the sampler's own fields: sgjax.sampling, the guidance:
  sgjax.guidance). Given the device count, a batch must split over the mesh's batch axes."""
  s, check = config.sample, errors.check  # Each field's own values: its declaration.
  if num_devices is not None:
    shards = sharding.data_parallel_size(config.mesh, num_devices)
    check(s.batch_size % shards == 0, "sample.batch_size", s.batch_size,
          f"must be divisible by the data-parallel size mesh.data*mesh.fsdp = {shards}")


def class_labels(num_classes: int, per_class: int) -> np.ndarray:
  """0, 0, …, 1, 1, …: `per_class` of every class, class-major (a grid's rows)."""
  return np.repeat(np.arange(num_classes, dtype=np.int32), per_class)


def balanced_labels(num_classes: int, count: int) -> np.ndarray:
  """0, 1, …, K−1, 0, 1, …: every class equally often (to within one)."""
  return (np.arange(count) % num_classes).astype(np.int32)


def encode_prompts(config: ml_collections.ConfigDict, prompts: list[str]
                   ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
  """Prompts through the frozen encoder (`text.encoder`): their condition {"text",
  "text_mask"} and ∅ = the empty prompt's features (what training's condition dropout used)."""
  enc = encoder_lib.get(config.text.encoder)
  if enc.width != config.text.width:
    raise errors.UserError(f"text.width = {config.text.width}",
                           f"the encoder {enc.name!r} gives {enc.width}-wide features",
                           f"set text.width = {enc.width} or another text.encoder")
  text, mask = enc.encode(list(prompts) + [""], config.text.max_tokens)
  return ({"text": text[:-1], "text_mask": mask[:-1]},
          {"text": text[-1], "text_mask": mask[-1]})


def load_weights(config: ml_collections.ConfigDict, workdir: str, mesh
                 ) -> tuple[Any, dict[str, Any], int]:
  """(model, {"main": params[, "guide": params]}, step) for the configured guidance: EMA (or
  raw) params of the latest checkpoint and, for AG+SG, of the guide checkpoint."""
  use_ema = config.sample.use_ema
  model, params, step = state_lib.restore_params(config, workdir, mesh, ema=use_ema)
  weights = {guidance_lib.MAIN: params}
  g = config.sample.guidance
  if guidance_lib.uses_guide(g.rule):
    _, weights[guidance_lib.GUIDE], _ = state_lib.restore_params(
        config, g.guide_workdir or workdir, mesh, ema=use_ema, step=g.guide_step)
  return model, weights, step


def num_conditions(cond: Conditions) -> int:
  return condition.batch_size(cond)


def _rows(cond: Conditions, start: int, stop: int, size: int) -> Conditions:
  """Rows start..stop of every leaf, padded to `size` rows by repeating the last one."""
  def cut(a):
    part = a[start:stop]
    return np.concatenate([part, np.repeat(part[-1:], size - len(part), 0)])
  return jax.tree.map(cut, cond)


def _placed(config: ml_collections.ConfigDict, cond: Conditions, mesh) -> Conditions:
  """The conditions padded to one `sample.batch_size` batch, sharded over the batch axes."""
  n, bs = num_conditions(cond), config.sample.batch_size
  return jax.device_put(_rows(cond, 0, n, bs), sharding.batch_sharding(mesh))


def _pixels(config: ml_collections.ConfigDict, mesh, x: jax.Array, n: int) -> np.ndarray:
  """A sampled batch -> the first `n` images as uint8 NHWC pixels, on every host."""
  x = sd_vae.to_pixels(config, mesh, x)  # The SD-VAE decode for latent models; else identity.
  x = multihost_utils.process_allgather(x, tiled=True) if jax.process_count() > 1 else x
  return sampling.to_uint8(jax.device_get(x))[:n]


def compile_sampler(config: ml_collections.ConfigDict, model, weights, y: Conditions,
                    plan: guidance_lib.Plan, key: jax.Array, null: condition.Null = None
                    ) -> Callable[..., jax.Array]:
  """The sampler of `plan`'s structure compiled for these shapes and shardings:
  (weights, y, key, plan, null=) -> samples in model units (what sampling.sample returns for
  them), for `plan` or any plan differing from it only in ω."""
  return sampling.compile_sample(model, weights, y, key, plan=plan,
                                 sampler=config.sample.sampler, null=null)


def _signature(tree: Any) -> tuple:
  """What an executable is specialised to: the tree's structure and each leaf's shape, dtype
  and sharding (a Python int, e.g. DiT's null label, by its type)."""
  def leaf(a):
    if not hasattr(a, "shape"):
      return type(a).__name__
    return (tuple(a.shape), str(a.dtype), getattr(a, "sharding", None))
  return (str(jax.tree.structure(tree)), tuple(leaf(a) for a in jax.tree.leaves(tree)))


def batch(config: ml_collections.ConfigDict, model, weights, cond: Conditions,
          plan: guidance_lib.Plan, mesh, key: jax.Array, null: condition.Null = None,
          cache: dict | None = None) -> np.ndarray:
  """One batch of at most `sample.batch_size` conditions -> uint8 NHWC pixels, on every host.

  `cache` (a dict the caller keeps, e.g. sgjax.pipeline's): executables by (model, the plan's
  structure (ω is traced), sampler, shapes and shardings of weights, conditions and null), each
  compiled once (`compile_sampler`) and reused; the images are the same as without it.
  """
  y = _placed(config, cond, mesh)
  if cache is None:
    x = sampling.sample(model, weights, y, key, plan=plan, sampler=config.sample.sampler,
                        null=null)
  else:
    signature = (model, plan.structure(), config.sample.sampler,
                 _signature((weights, y, null)))
    if signature not in cache:
      cache[signature] = compile_sampler(config, model, weights, y, plan, key, null)
    x = cache[signature](weights, y, key, plan, null=null)
  return _pixels(config, mesh, x, num_conditions(cond))


def images(config: ml_collections.ConfigDict, model, weights, cond: Conditions,
           plan: guidance_lib.Plan, mesh, seed: int, null: condition.Null = None,
           cache: dict | None = None) -> np.ndarray:
  """uint8 NHWC samples of every condition, in batches of `sample.batch_size` (`cache`: see
  `batch`).

  Long runs (≥ 8 batches) report progress about ten times.
  """
  bs, total = config.sample.batch_size, num_conditions(cond)
  starts = range(0, total, bs)
  progress = metrics.Progress(len(starts)) if len(starts) >= 8 else None
  out = []
  for i, s in enumerate(starts):
    part = jax.tree.map(lambda a, s=s: a[s:s + bs], cond)
    out.append(batch(config, model, weights, part, plan, mesh,
                     jax.random.fold_in(jax.random.key(seed), i), null, cache))
    if progress and ((i + 1) % max(1, len(starts) // 10) == 0 or i + 1 == len(starts)):
      progress.report(i + 1, {"images": sum(len(o) for o in out)})
  return np.concatenate(out)


@lock.holding("out_dir", "sample shards")  # One writer per sample set.
def write_shards(config: ml_collections.ConfigDict, model, weights, cond: Conditions,
                 plan: guidance_lib.Plan, mesh, out_dir: str, seed: int,
                 null: condition.Null = None, cache: dict | None = None,
                 **per_sample: np.ndarray) -> str:
  """Samples of every condition as resumable shards of `sample.shard_batches` batches, merged
  into `<out_dir>.npz` (with the `per_sample` arrays, e.g. labels, cut alike); its path.
  `cache`: see `batch`."""
  bs, per_shard = config.sample.batch_size, config.sample.shard_batches
  total = num_conditions(cond)
  num_batches = -(-total // bs)
  num_shards = -(-num_batches // per_shard)
  files.makedirs(out_dir)
  # Every host decides what is left from the same files, so multi-host runs need `out_dir` on a
  # shared filesystem (GCS, NFS); all hosts sample every batch (it is sharded), host 0 writes.
  # A crash mid-write never leaves a shard that looks complete (sgjax.files).
  shard_path = lambda s: os.path.join(out_dir, f"shard_{s:05d}.npz")
  todo = [s for s in range(num_shards) if not files.exists(shard_path(s))]
  if len(todo) < num_shards:
    metrics.print0(f"resuming: {num_shards - len(todo)} of {num_shards} shards already in "
                   f"{out_dir}")
  batches_in = lambda s: min((s + 1) * per_shard, num_batches) - s * per_shard
  done = num_batches - sum(batches_in(s) for s in todo)
  progress = metrics.Progress(num_batches, done)  # Counts batches.
  for s in todo:
    shard = []
    for b in range(s * per_shard, min((s + 1) * per_shard, num_batches)):
      part = jax.tree.map(lambda a, b=b: a[b * bs:(b + 1) * bs], cond)
      shard.append(batch(config, model, weights, part, plan, mesh,
                         jax.random.fold_in(jax.random.key(seed), b), null, cache))
      done += 1
      if done % max(1, per_shard // 2) == 0 or done == num_batches:
        progress.report(done, {"images": min(done * bs, total)})
    if jax.process_index() == 0:
      lo = s * per_shard * bs
      hi = lo + sum(len(i) for i in shard)
      files.save_npz(shard_path(s), arr_0=np.concatenate(shard),
                     **{k: v[lo:hi] for k, v in per_sample.items()})
  merged = out_dir + ".npz"
  if jax.process_index() == 0:
    parts = [files.load_npz(shard_path(s)) for s in range(num_shards)]
    files.save_npz(merged, **{k: np.concatenate([p[k] for p in parts])
                              for k in ("arr_0", *per_sample)})
  return merged


def write_samples(config: ml_collections.ConfigDict, model, weights, plan: guidance_lib.Plan,
                  mesh, out_dir: str, num_samples: int, seed: int, cache: dict | None = None
                  ) -> str:
  """`num_samples` class-balanced samples as resumable shards (`write_shards`), with labels."""
  labels = balanced_labels(model.num_classes, num_samples)
  return write_shards(config, model, weights, labels, plan, mesh, out_dir, seed, cache=cache,
                      labels=labels)


def sample_settings(config: ml_collections.ConfigDict, step: int, **extra) -> dict:
  """What decides a sample set's images besides the workdir's model: the checkpoint step and
  every sample.* field."""
  flat = workdir_lib.flat_config(config)
  return dict(step=int(step), **extra,
              **{k: v for k, v in flat.items() if k.startswith("sample.")})


def save_grid(config: ml_collections.ConfigDict, workdir: str, name: str, grid: np.ndarray,
              rows: int, step: int, images: np.ndarray, **arrays) -> str:
  """`<name>.png` of `grid` and `<name>.npz` of `images` (with the settings that made them);
  replacing files of other settings is said, naming what changed. Call on process 0."""
  png, npz = os.path.join(workdir, name + ".png"), os.path.join(workdir, name + ".npz")
  settings = sample_settings(config, step)
  if files.exists(npz):
    damaged = f"move {npz} aside and rerun"
    old = readers.npz(npz, allowed=damaged).get("settings")
    old = readers.json_text(str(old), npz, "sample grid's settings", damaged, {}) \
        if old is not None else None
    if old != json.loads(json.dumps(settings, default=str)):
      changed = ([k for k in sorted(set(old) | set(settings)) if old.get(k) != settings.get(k)]
                 if old else ["settings not recorded"])
      print(f"replacing {png} and its .npz (made with other settings: "
            f"{', '.join(changed[:5])}{' …' if len(changed) > 5 else ''})", flush=True)
  sampling.save_png(png, sampling.image_grid(grid, rows=rows), scale=2)
  files.save_npz(npz, arr_0=images, step=step, settings=json.dumps(settings, default=str),
                 **arrays)
  return png


def grid_rows(images: np.ndarray, rows: int, per_row: int) -> np.ndarray:
  """The first `per_row` images of each of `rows` equal class-major blocks (a grid's cells)."""
  block = len(images) // rows
  return images[np.concatenate([np.arange(k * block, k * block + per_row)
                                for k in range(rows)])]
