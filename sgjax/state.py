"""The train state under every job: optimizer, fresh init, abstract state and its shardings,
restore of a whole state, and restore of the (EMA) params alone.

The state is a plain pytree `{step, params, ema, opt_state, rng}`: fresh, or started from given
weights (`from_params`, what `train.init_from` loads). Its shapes and shardings come
from `jax.eval_shape` of the init plus the logical-axis rules (sgjax.sharding), so they exist for
any mesh without allocating anything, also a mesh of devices this process does not own (the TPU
pre-flight, sgjax.aot). Sampling restores only `ema` (or `params`) and `step`: no optimizer is
built and the optimizer state is never read.
"""

from __future__ import annotations

import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from sgjax import checkpoint, condition, errors, models, sharding
from sgjax import workdir as workdir_lib

TrainState = dict[str, Any]  # {"step", "params", "ema", "opt_state", "rng"}


def check_config(config: ml_collections.ConfigDict, num_devices: int | None = None) -> None:
  """The `train` section's checks across fields (each field's own type and range: its
  declaration, checked first): gradient accumulation splits the batch and, given the device
  count, each micro-batch splits over the mesh's batch axes (its grids and profile:
  sgjax.monitor)."""
  t, check = config.train, errors.check  # Each field's own values: its declaration.
  check(t.batch_size % t.grad_accum == 0, "train.grad_accum", t.grad_accum,
        f"must divide train.batch_size = {t.batch_size}")
  if num_devices is not None:
    shards = sharding.data_parallel_size(config.mesh, num_devices)
    micro = t.batch_size // t.grad_accum
    check(micro % shards == 0, "train.batch_size", t.batch_size,
          f"per-step micro-batch {micro} (batch_size / grad_accum) must be divisible by the "
          f"data-parallel size mesh.data*mesh.fsdp = {shards}")


def make_schedule(tc: ml_collections.ConfigDict) -> optax.Schedule:
  """The learning rate by step, as an optax schedule: the optimizer's and the logged one."""
  if tc.warmup_steps:
    return optax.linear_schedule(0.0, tc.lr, tc.warmup_steps)
  return optax.constant_schedule(tc.lr)


def make_optimizer(tc: ml_collections.ConfigDict) -> optax.GradientTransformation:
  # A constant lr goes in as the number, not its schedule: AdamW then keeps no schedule step
  # count, the state layout every checkpoint written before the schedule existed has (demo
  # workdirs, imported DiT/SiT weights). The logged lr still comes from `make_schedule`.
  lr = make_schedule(tc) if tc.warmup_steps else tc.lr
  parts = [optax.clip_by_global_norm(tc.grad_clip)] if tc.grad_clip > 0 else []
  parts.append(optax.adamw(lr, b1=tc.b1, b2=tc.b2, weight_decay=tc.weight_decay))
  return optax.chain(*parts)


def init_params(model: nn.Module, seed: int) -> Any:
  """Fresh params, boxed with their logical axis names (for the sharding lookup)."""
  n, c = model.image_size, model.channels
  variables = model.init(jax.random.fold_in(jax.random.key(seed), 0), jnp.zeros((1, n, n, c)),
                         jnp.zeros((1,)), condition.example(model, 1))
  return variables["params"]


def init_state(model: nn.Module, tx: optax.GradientTransformation, seed: int) -> TrainState:
  """Fresh train state (params boxed with logical axis names, for sharding lookup)."""
  params = init_params(model, seed)
  return dict(step=jnp.zeros((), jnp.int32), params=params, ema=params,
              opt_state=tx.init(params), rng=jax.random.key_data(jax.random.key(seed)))


def _abstract(boxed: Any, mesh) -> tuple[Any, Any]:
  shardings = sharding.logical_shardings(boxed, mesh)
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          nn.unbox(boxed), shardings)
  return abstract, shardings


def abstract_state_and_shardings(model: nn.Module, tx: optax.GradientTransformation, seed: int,
                                 mesh) -> tuple[Any, Any]:
  """Shapes of the state without allocating it, and the NamedShardings it will live in."""
  return _abstract(jax.eval_shape(lambda: init_state(model, tx, seed)), mesh)


def abstract_params_and_shardings(model: nn.Module, seed: int, mesh) -> tuple[Any, Any]:
  """The params' shapes and shardings alone (the same as the state's `params` and `ema`)."""
  return _abstract(jax.eval_shape(lambda: init_params(model, seed)), mesh)


def fresh_state(model: nn.Module, tx: optax.GradientTransformation, seed: int,
                shardings: Any = None) -> TrainState:
  """The fresh state, initialised directly in `shardings` (never whole on one device; None:
  wherever jit puts it, for single-device tests)."""
  return jax.jit(lambda: nn.unbox(init_state(model, tx, seed)), out_shardings=shardings)()


def from_params(tx: optax.GradientTransformation, params: Any, seed: int,
                shardings: Any) -> TrainState:
  """Step 0 of a run started from given weights (host arrays in the model's shapes, the same
  on every process; sgjax.init_from): params and EMA both these weights, a fresh optimizer
  state and the seed's RNG key, laid out in `shardings`. Params and EMA are separate buffers
  (the train step donates both)."""
  def place(tree, where):
    return jax.tree.map(lambda a, s: jax.make_array_from_callback(
        np.shape(a), s, lambda index, a=a: np.asarray(a)[index]), tree, where)

  weights = place(params, shardings["params"])
  return dict(step=place(np.zeros((), np.int32), shardings["step"]), params=weights,
              ema=place(params, shardings["ema"]),
              opt_state=jax.jit(tx.init, out_shardings=shardings["opt_state"])(weights),
              rng=place(np.asarray(jax.random.key_data(jax.random.key(seed))), shardings["rng"]))


def fresh_params(model: nn.Module, seed: int, mesh) -> Any:
  """Fresh params laid out by the logical rules on `mesh` (benchmarks, tests)."""
  _, shardings = abstract_params_and_shardings(model, seed, mesh)
  return jax.jit(lambda: nn.unbox(init_params(model, seed)), out_shardings=shardings)()


def restore(mngr, abstract: Any, data_iter: Any | None, step: int | None = None) -> TrainState:
  """A whole train state (and the data iterator, in place) from `mngr`; see sgjax.checkpoint."""
  return checkpoint.restore(mngr, abstract, data_iter, step=step)


def restore_params(config: ml_collections.ConfigDict, workdir: str, mesh, *, ema: bool = True,
                   step: int | None = None) -> tuple[nn.Module, Any, int]:
  """(model, EMA or raw params, step) of a workdir's checkpoint (default: the latest), laid out
  by the logical rules; reads neither the optimizer state nor builds an optimizer.

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
  params, _ = abstract_params_and_shardings(model, config.seed, mesh)
  which = "ema" if ema else "params"
  step_spec = jax.ShapeDtypeStruct((), jnp.int32, sharding=sharding.replicated(mesh))
  mngr = checkpoint.manager(ckpt_dir, async_save=False, read_only=True)
  try:
    restored = checkpoint.restore_parts(mngr, {"step": step_spec, which: params}, step=step)
  finally:
    mngr.close()
  return model, restored[which], int(restored["step"])
