"""Sampling from a trained workdir: restore EMA weights, sample every class, write grid + .npz."""

from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from sgjax import checkpoint, sampling, sharding
from sgjax import guidance as guidance_lib
from sgjax import train as train_lib
from sgjax.models import dit
from sgjax.sparsity import Sparsity


def load_params(config: ml_collections.ConfigDict, workdir: str, mesh, *, ema: bool = True):
  """The latest checkpoint's EMA (or raw) params, laid out by the logical-axis rules."""
  model = dit.from_config(config)
  tx = train_lib.make_optimizer(config.train)
  abstract, _ = train_lib.abstract_state_and_shardings(model, tx, config.seed, mesh)
  mngr = checkpoint.manager(os.path.join(workdir, "checkpoints"), async_save=False)
  if mngr.latest_step() is None:
    raise FileNotFoundError(f"no checkpoint under {workdir}/checkpoints: train first "
                            "(--mode=train) or point --workdir at a trained run")
  state = checkpoint.restore(mngr, abstract, None)
  mngr.close()
  return model, state["ema" if ema else "params"], int(state["step"])


def class_labels(num_classes: int, per_class: int) -> np.ndarray:
  return np.repeat(np.arange(num_classes, dtype=np.int32), per_class)


def generate(config, model, params, labels: np.ndarray, guidance: guidance_lib.Guidance,
             mesh, seed: int) -> np.ndarray:
  """Samples for `labels` in batches of config.sample.batch_size; returns uint8 NHWC."""
  bs = config.sample.batch_size
  shard = sharding.batch_sharding(mesh)
  out = []
  for i, start in enumerate(range(0, len(labels), bs)):
    chunk = labels[start:start + bs]
    padded = np.pad(chunk, (0, bs - len(chunk)))  # Static shape: one compile for all batches.
    y = jax.device_put(jnp.asarray(padded), shard)
    key = jax.random.fold_in(jax.random.key(seed), i)
    x = sampling.sample(model, params, y, key, guidance=guidance, steps=config.sample.steps,
                        sampler=config.sample.sampler)
    out.append(sampling.to_uint8(jax.device_get(x))[:len(chunk)])
  return np.concatenate(out)


def run(config: ml_collections.ConfigDict, workdir: str, *, name: str | None = None) -> str:
  """Samples `sample.per_class` images of every class; returns the PNG grid's path."""
  mesh = sharding.build_mesh(config.mesh)
  with jax.set_mesh(mesh):
    model, params, step = load_params(config, workdir, mesh, ema=config.sample.use_ema)
    g = guidance_lib.from_config(config.sample.guidance,
                                 Sparsity.from_routes(config.sparsity.routes))
    labels = class_labels(model.num_classes, config.sample.per_class)
    t0 = time.perf_counter()
    images = generate(config, model, params, labels, g, mesh, config.sample.seed)
    if jax.process_index() == 0:
      print(f"sampled {len(images)} images ({g.rule}, ω={g.omega:g}) in "
            f"{time.perf_counter() - t0:.1f}s", flush=True)
  name = name or f"samples_{g.rule}"
  png = os.path.join(workdir, name + ".png")
  if jax.process_index() == 0:
    grid = sampling.image_grid(images, rows=model.num_classes)
    sampling.save_png(png, grid, scale=2)
    np.savez(os.path.join(workdir, name + ".npz"), arr_0=images, labels=labels,
             step=step)
  return png


def demo_comparison(config: ml_collections.ConfigDict, workdir: str) -> list[str]:
  """CFG and SG from the same checkpoint, same seed: samples_cfg.png and samples_sg.png."""
  paths = []
  for rule in ("cfg", "sg"):
    c = config.copy_and_resolve_references()
    with c.unlocked():
      c.sample.guidance.rule = rule
      c.sample.guidance.omega = config.demo[f"omega_{rule}"]
    paths.append(run(c, workdir, name=f"samples_{rule}"))
  return paths
