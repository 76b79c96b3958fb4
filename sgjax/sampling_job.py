"""Sampling from a trained workdir: restore EMA weights, sample, write a grid and .npz files.

Two outputs:
  * a per-class grid (`sample.per_class` images of every class) as PNG + .npz, always;
  * with `sample.num_samples` > 0, that many class-balanced samples for FID-style evaluation,
    written as shards `<name>/shard_XXXXX.npz` of `sample.shard_batches` batches each. Every
    batch's noise and token draws depend only on (seed, batch index), so a killed run restarts
    at the first missing shard and produces the same images it would have uninterrupted. When
    all shards exist they are merged into `<name>.npz` with `arr_0` = uint8 NHWC (the layout
    the ADM evaluation suite reads) and `labels`.
"""

from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from sgjax import checkpoint, errors, files, metrics, models, sampling, sharding
from sgjax import config as config_lib
from sgjax import guidance as guidance_lib
from sgjax import train as train_lib
from sgjax import workdir as workdir_lib
from sgjax.models import vae


def load_params(config: ml_collections.ConfigDict, workdir: str, mesh, *, ema: bool = True,
                step: int | None = None):
  """A checkpoint's EMA (or raw) params (default: the latest), laid out by the logical rules.

  Refuses, before reading anything, a workdir without checkpoints (creating nothing) and a
  config whose model differs from the one the workdir records (sgjax.workdir).
  """
  ckpt_dir = os.path.join(workdir, "checkpoints")
  found = checkpoint.saved_steps(ckpt_dir)
  if not found:
    raise errors.UserError(ckpt_dir, "no checkpoint there",
                           "train first (--mode=train) or point --workdir at a trained run")
  if step is not None and step not in found:
    raise errors.UserError(f"sample.guidance.guide_step = {step}",
                           f"no checkpoint of step {step} under {ckpt_dir}",
                           f"there are {found}; keep guide checkpoints with train.keep_period")
  workdir_lib.check(workdir, config, resuming=False)
  model = models.from_config(config)
  tx = train_lib.make_optimizer(config.train)
  abstract, _ = train_lib.abstract_state_and_shardings(model, tx, config.seed, mesh)
  mngr = checkpoint.manager(ckpt_dir, async_save=False, read_only=True)
  try:
    state = checkpoint.restore(mngr, abstract, None, step=step)
  finally:
    mngr.close()
  return model, state["ema" if ema else "params"], int(state["step"])


def load_weights(config: ml_collections.ConfigDict, workdir: str, mesh):
  """(model, {"main": params[, "guide": params]}, step) for the configured guidance."""
  model, params, step = load_params(config, workdir, mesh, ema=config.sample.use_ema)
  weights = {guidance_lib.MAIN: params}
  g = config.sample.guidance
  if g.rule == "ag_sg":
    guide_dir = g.guide_workdir or workdir
    _, weights[guidance_lib.GUIDE], _ = load_params(config, guide_dir, mesh,
                                                    ema=config.sample.use_ema,
                                                    step=g.guide_step)
  return model, weights, step


def class_labels(num_classes: int, per_class: int) -> np.ndarray:
  return np.repeat(np.arange(num_classes, dtype=np.int32), per_class)


def balanced_labels(num_classes: int, count: int) -> np.ndarray:
  """0, 1, …, K−1, 0, 1, …: every class equally often (to within one)."""
  return (np.arange(count) % num_classes).astype(np.int32)


def _batch(config, model, weights, labels: np.ndarray, plan: guidance_lib.Plan, mesh,
           key: jax.Array) -> np.ndarray:
  """One sampling batch (labels padded to sample.batch_size); returns uint8 NHWC on every host."""
  bs = config.sample.batch_size
  padded = np.pad(labels, (0, bs - len(labels)))  # Static shape: one compile for all batches.
  y = jax.device_put(jnp.asarray(padded), sharding.batch_sharding(mesh))
  x = sampling.sample(model, weights, y, key, plan=plan, sampler=config.sample.sampler)
  x = vae.to_pixels(config, mesh, x)  # SD-VAE decode when vae.weights is set; else identity.
  x = multihost_utils.process_allgather(x, tiled=True) if jax.process_count() > 1 else x
  return sampling.to_uint8(jax.device_get(x))[:len(labels)]


def generate_conditions(config, model, weights, cond: dict[str, np.ndarray],
                        plan: guidance_lib.Plan, mesh, seed: int, null) -> np.ndarray:
  """Samples for a batch of text conditions {"text" (N, L, D), "text_mask" (N, L)}, in batches
  of config.sample.batch_size (the last padded by repeating its final row); uint8 NHWC."""
  bs = config.sample.batch_size
  total = len(cond["text"])
  out = []
  for i, s in enumerate(range(0, total, bs)):
    part = {k: v[s:s + bs] for k, v in cond.items()}
    n = len(part["text"])
    part = {k: np.concatenate([v, np.repeat(v[-1:], bs - n, 0)]) for k, v in part.items()}
    part = jax.device_put(part, sharding.batch_sharding(mesh))
    x = sampling.sample(model, weights, part, jax.random.fold_in(jax.random.key(seed), i),
                        plan=plan, sampler=config.sample.sampler, null=null)
    x = multihost_utils.process_allgather(x, tiled=True) if jax.process_count() > 1 else x
    out.append(sampling.to_uint8(jax.device_get(x))[:n])
  return np.concatenate(out)


def generate(config, model, weights, labels: np.ndarray, plan: guidance_lib.Plan, mesh,
             seed: int) -> np.ndarray:
  """Samples for `labels` in batches of config.sample.batch_size; returns uint8 NHWC.

  Long runs (≥ 8 batches) report progress about ten times.
  """
  bs = config.sample.batch_size
  starts = range(0, len(labels), bs)
  progress = metrics.Progress(len(starts)) if len(starts) >= 8 else None
  out = []
  for i, s in enumerate(starts):
    out.append(_batch(config, model, weights, labels[s:s + bs], plan, mesh,
                      jax.random.fold_in(jax.random.key(seed), i)))
    if progress and ((i + 1) % max(1, len(starts) // 10) == 0 or i + 1 == len(starts)):
      progress.report(i + 1, {"images": sum(len(o) for o in out)})
  return np.concatenate(out)


def write_samples(config, model, weights, plan: guidance_lib.Plan, mesh, out_dir: str,
                  num_samples: int, seed: int) -> str:
  """Class-balanced samples as resumable shards, merged into `<out_dir>.npz`; returns its path."""
  bs, per_shard = config.sample.batch_size, config.sample.shard_batches
  labels = balanced_labels(model.num_classes, num_samples)
  num_batches = -(-num_samples // bs)
  num_shards = -(-num_batches // per_shard)
  files.makedirs(out_dir)
  # Every host decides what is left from the same files, so multi-host runs need `out_dir` on a
  # shared filesystem (GCS, NFS); all hosts sample every batch (it is sharded), host 0 writes.
  # A crash mid-write never leaves a shard that looks complete (sgjax.files).
  shard_path = lambda s: os.path.join(out_dir, f"shard_{s:05d}.npz")
  todo = [s for s in range(num_shards) if not files.exists(shard_path(s))]
  if jax.process_index() == 0 and len(todo) < num_shards:
    print(f"resuming: {num_shards - len(todo)} of {num_shards} shards already in {out_dir}",
          flush=True)
  batches_in = lambda s: min((s + 1) * per_shard, num_batches) - s * per_shard
  done = num_batches - sum(batches_in(s) for s in todo)
  progress = metrics.Progress(num_batches, done)  # Counts batches.
  for s in todo:
    images = []
    for b in range(s * per_shard, min((s + 1) * per_shard, num_batches)):
      chunk = labels[b * bs:(b + 1) * bs]
      images.append(_batch(config, model, weights, chunk, plan, mesh,
                           jax.random.fold_in(jax.random.key(seed), b)))
      done += 1
      if done % max(1, per_shard // 2) == 0 or done == num_batches:
        progress.report(done, {"images": min(done * bs, num_samples)})
    if jax.process_index() == 0:
      lo = s * per_shard * bs
      files.save_npz(shard_path(s), arr_0=np.concatenate(images),
                     labels=labels[lo:lo + sum(len(i) for i in images)])
  merged = out_dir + ".npz"
  if jax.process_index() == 0:
    parts = [files.load_npz(shard_path(s)) for s in range(num_shards)]
    files.save_npz(merged, arr_0=np.concatenate([p["arr_0"] for p in parts]),
                   labels=np.concatenate([p["labels"] for p in parts]))
  return merged


def sample_settings(config: ml_collections.ConfigDict, step: int, **extra) -> dict:
  """What decides a sample set's images besides the workdir's model: the checkpoint step and
  every sample.* field."""
  flat = workdir_lib.flat_config(config)
  return dict(step=int(step), **extra,
              **{k: v for k, v in flat.items() if k.startswith("sample.")})


def _save_grid(config, workdir: str, name: str, grid: np.ndarray, rows: int, step: int,
               images: np.ndarray, **arrays) -> str:
  """`<name>.png` of `grid` and `<name>.npz` of `images` (with the settings that made them);
  replacing files of other settings is said, naming what changed."""
  png, npz = os.path.join(workdir, name + ".png"), os.path.join(workdir, name + ".npz")
  settings = sample_settings(config, step)
  if files.exists(npz):
    old = files.load_npz(npz).get("settings")
    old = json.loads(str(old)) if old is not None else None
    if old != json.loads(json.dumps(settings, default=str)):
      changed = ([k for k in sorted(set(old) | set(settings)) if old.get(k) != settings.get(k)]
                 if old else ["settings not recorded"])
      print(f"replacing {png} and its .npz (made with other settings: "
            f"{', '.join(changed[:5])}{' …' if len(changed) > 5 else ''})", flush=True)
  sampling.save_png(png, sampling.image_grid(grid, rows=rows), scale=2)
  files.save_npz(npz, arr_0=images, step=step, settings=json.dumps(settings, default=str),
                 **arrays)
  return png


def _encode_prompts(config: ml_collections.ConfigDict):
  """`sample.prompts` through the frozen encoder (`text.encoder`): (prompts, per-image condition
  {"text", "text_mask"} with `sample.per_class` rows per prompt, ∅ = the empty prompt's
  features, which is what training's condition dropout used)."""
  prompts = tuple(config.sample.prompts)
  if not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
    raise ValueError(f"sample.prompts = {prompts!r}: a text model (model.kind = 'trdit') "
                     "samples the prompts named there, e.g. "
                     "--config.sample.prompts=\"('a photo of a sneaker', 'a bag')\"")
  from sgjax.text import encoder as encoder_lib  # Local: loads the encoder (and torch).
  enc = encoder_lib.get(config.text.encoder)
  if enc.width != config.text.width:
    raise ValueError(f"text.width = {config.text.width}: the encoder {enc.name!r} gives "
                     f"{enc.width}-wide features")
  text, mask = enc.encode(list(prompts) + [""], config.text.max_tokens)
  rows = np.repeat(np.arange(len(prompts)), config.sample.per_class)
  return (np.array(prompts)[rows], {"text": text[rows], "text_mask": mask[rows]},
          {"text": text[-1], "text_mask": mask[-1]})


def run(config: ml_collections.ConfigDict, workdir: str, *, name: str | None = None) -> str:
  """Samples `sample.per_class` images of every class (a text model: of every prompt in
  `sample.prompts`); returns the PNG grid's path, beside it the .npz of the images.

  With `sample.num_samples` > 0 (class-conditional models) also writes the sharded evaluation
  set beside it.
  """
  text_model = config.model.get("kind", "dit") == "trdit"
  if text_model:
    prompts, cond, null = _encode_prompts(config)
  mesh = sharding.build_mesh(config.mesh)
  plan = config_lib.sampling_plan(config)
  g = config.sample.guidance
  name = name or f"samples_{g.rule}"
  with jax.set_mesh(mesh):
    model, weights, step = load_weights(config, workdir, mesh)
    t0 = time.perf_counter()
    if text_model:
      images = generate_conditions(config, model, weights, cond, plan, mesh, config.sample.seed,
                                   null)
      rows = len(config.sample.prompts)
      what, extra = f"of {rows} prompts ", dict(prompts=prompts)
    else:
      labels = class_labels(model.num_classes, config.sample.per_class)
      images = generate(config, model, weights, labels, plan, mesh, config.sample.seed)
      rows, what, extra = model.num_classes, "", dict(labels=labels)
    if jax.process_index() == 0:
      print(f"sampled {len(images)} images {what}({g.rule}, ω={g.omega:g}, "
            f"{len(plan.segments)} compiled segment(s)) in {time.perf_counter() - t0:.1f}s",
            flush=True)
    if config.sample.num_samples > 0 and not text_model:
      # A seed apart from the grid's, so the evaluation set is not the grid's images again.
      # Shards of other settings are never resumed into this set: it then goes beside them.
      out_dir = workdir_lib.output_dir(
          os.path.join(workdir, f"{name}_{config.sample.num_samples}"),
          sample_settings(config, step, seed=config.sample.seed + 1))
      npz = write_samples(config, model, weights, plan, mesh, out_dir,
                          config.sample.num_samples, config.sample.seed + 1)
      if jax.process_index() == 0:
        print(f"wrote {config.sample.num_samples} samples to {npz}", flush=True)
  png = os.path.join(workdir, name + ".png")
  if jax.process_index() == 0:
    _save_grid(config, workdir, name, images, rows, step, images, **extra)
  return png


def _rule_config(config: ml_collections.ConfigDict, rule: str) -> ml_collections.ConfigDict:
  c = config.copy_and_resolve_references()
  with c.unlocked():
    c.sample.guidance.rule = rule
    c.sample.guidance.omega = config.demo[f"omega_{rule}"]
    c.sample.num_samples = 0
  return c


def demo(config: ml_collections.ConfigDict, workdir: str) -> tuple[list[str], dict]:
  """CFG and SG from the same checkpoint and seed: grids samples_cfg.png / samples_sg.png and,
  on Fashion-MNIST, FD-FMNIST and class accuracy beside their FLOPs (demo_metrics.json).

  Each rule samples `demo.eval_per_class` images per class once; the grid shows the first
  `sample.per_class` of each class and the metrics use all of them. A text model
  (model.kind = "trdit") runs sgjax.text.demo instead: held-out prompts, CFG / SG / CFG+SG.
  """
  if config.model.get("kind", "dit") == "trdit":
    from sgjax.text import demo as t2i_demo
    results = t2i_demo.run(config, workdir)
    return [os.path.join(workdir, f"t2i_{rule}.png") for rule in results], results
  import json  # Local: only the demo needs these.

  from sgjax import flops
  from sgjax.data import pipeline
  from sgjax.eval import fmnist
  log = (lambda m: print(m, flush=True)) if jax.process_index() == 0 else (lambda m: None)
  per_class = max(config.demo.eval_per_class, config.sample.per_class)
  mesh = sharding.build_mesh(config.mesh)
  samples, paths = {}, []
  for rule in ("cfg", "sg"):
    c = _rule_config(config, rule)
    plan = config_lib.sampling_plan(c)
    with jax.set_mesh(mesh):
      model, weights, step = load_weights(c, workdir, mesh)
      labels = class_labels(model.num_classes, per_class)
      t0 = time.perf_counter()
      images = generate(c, model, weights, labels, plan, mesh, config.sample.seed)
    log(f"sampled {len(images)} images ({rule}, ω={c.sample.guidance.omega:g}) in "
        f"{time.perf_counter() - t0:.1f}s")
    samples[rule] = (images, labels, flops.plan_macs(c, plan), c.sample.guidance)
    grid_idx = np.concatenate([np.arange(k * per_class, k * per_class + config.sample.per_class)
                               for k in range(model.num_classes)])
    png = os.path.join(workdir, f"samples_{rule}.png")
    if jax.process_index() == 0:
      # The .npz holds all eval_per_class images per class; the grid the first per_class.
      _save_grid(c, workdir, f"samples_{rule}", images[grid_idx], model.num_classes, step,
                 images, labels=labels)
    paths.append(png)
  if config.data.name != "fashion_mnist":
    return paths, {}

  train_split = pipeline.load_split_arrays(config.data, "train")
  test_split = pipeline.load_split_arrays(config.data, "test")
  clf = fmnist.train_or_load(os.path.join(workdir, "fmnist_classifier.msgpack"), train_split,
                             test_split, log=log)
  ref = fmnist.reference_statistics(clf, test_split[0])
  results = {}
  for rule, (images, labels, macs, g) in samples.items():
    results[rule] = dict(fmnist.sample_metrics(clf, ref, images, labels), omega=g.omega,
                         gamma_strong=g.gamma_strong, gamma_weak=g.gamma_weak,
                         gmacs_per_image=macs.with_attention / 1e9)
  if jax.process_index() == 0:
    files.write_text(os.path.join(workdir, "demo_metrics.json"), json.dumps(results, indent=2))
    n = len(next(iter(samples.values()))[1])
    log(f"\n{'rule':5s} {'ω':>4s} {'γ s/w':>9s} {'FD-FMNIST':>10s} {'class acc':>10s} "
        f"{'GMACs/image':>12s}   ({n} samples per rule; FD-FMNIST is not FID)")
    for rule, r in results.items():
      gam = "-" if rule == "cfg" else f"{r['gamma_strong']:g}/{r['gamma_weak']:g}"
      log(f"{rule:5s} {r['omega']:4g} {gam:>9s} {r['fd_fmnist']:10.2f} "
          f"{100 * r['class_accuracy']:9.1f}% {r['gmacs_per_image']:12.3f}")
  return paths, results
