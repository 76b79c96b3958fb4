"""The train loop, in big_vision's shape: one function, sectioned, same code on 1 or 1,000 devices.

Sections: config and mesh -> data -> model and abstract state -> shardings -> jitted init,
restore, or other weights (`train.init_from`, saved as step 0) -> jitted step (state donated)
-> loop (metrics fetched every `log_every` steps, NaN abort, atomic checkpoints, auto-resume
from the workdir, sample grids every `sample_every` steps, a profile of `profile_steps`).
"""

from __future__ import annotations

import os
import shutil
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from sgjax import (
  checkpoint,
  condition,
  errors,
  init_from,
  lock,
  models,
  monitor,
  objectives,
  preemption,
  previews,
  sharding,
)
from sgjax import metrics as metrics_lib
from sgjax import state as state_lib
from sgjax import workdir as workdir_lib
from sgjax.data import pipeline, prefetch

TrainState = state_lib.TrainState
OPTIMIZER_SCOPE = "optimizer"  # Named scope of the AdamW and EMA updates (profiles).
PARAMETER_LINES = 60  # Of the parameter table on the console (TensorBoard's text has all).


def ema_decay(tc: ml_collections.ConfigDict, step: jax.Array) -> jax.Array:
  """The EMA decay; with `ema_warmup` it ramps as (1+s)/(10+s) so short runs get a usable EMA."""
  if tc.ema_warmup:
    return jnp.minimum(tc.ema_decay, (1.0 + step) / (10.0 + step))
  return jnp.asarray(tc.ema_decay, jnp.float32)


def make_train_step(config: ml_collections.ConfigDict, model: nn.Module,
                    tx: optax.GradientTransformation, null: condition.Null = None):
  """(state, batch) -> (state, metrics). Pure; the caller jits it with shardings.

  The loss is `train.objective`'s (sgjax.objectives: its draws over the whole batch, then its
  loss per micro-batch); this step owns the gradients, their accumulation, the optimizer
  (clipping), the EMA and where each gradient lives. `null` is CFG's ∅ for condition dropout:
  default the model's own (DiT's null label); a text model needs the empty prompt's features
  (sgjax.data.captions.null_condition).
  """
  tc = config.train
  objective = objectives.get(config)
  null = condition.default_null(model) if null is None else null
  compute_dtype = jnp.dtype(config.dtype)
  # Where each parameter (hence its gradient) lives: the FSDP shard of the logical rules.
  param_specs = sharding.logical_specs(
      jax.eval_shape(lambda: state_lib.init_params(model, config.seed)))

  def loss_fn(params, inputs, rng):
    return objective.loss(model, params, inputs, rng, config)

  def step_fn(state: TrainState, batch: dict[str, jax.Array]):
    # Per-step randomness is a pure function of (base key, step): exact on resume.
    key = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
    inputs, loss_key = objective.draw(model, batch, key, config, null)
    accum = tc.grad_accum
    # Differentiate w.r.t. the weights cast to the compute dtype (what every layer multiplies
    # with anyway) and pin each gradient to its parameter's shard before it is cast back to
    # fp32: the partial sums over the batch then leave the matmul as a reduce-scatter onto the
    # shard, not as a full-shape all-reduce (a cast in between hides the pattern from XLA).
    compute_params = jax.tree.map(lambda p: p.astype(compute_dtype), state["params"])

    def grad_fn(inputs, rng):
      (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(compute_params, inputs,
                                                                      rng)
      grads = sharding.constrain(grads, param_specs)
      return loss, aux, jax.tree.map(lambda g: g.astype(jnp.float32), grads)

    if accum == 1:
      loss, aux, grads = grad_fn(inputs, loss_key)
    else:
      # Micro-batch j takes every accum-th example, so each device's shard splits locally.
      def split(a):
        return jnp.moveaxis(a.reshape((a.shape[0] // accum, accum) + a.shape[1:]), 1, 0)

      def body(carry, xs):
        j, micro = xs
        return jax.tree.map(jnp.add, carry, grad_fn(micro, jax.random.fold_in(loss_key, j))), None

      # The aux metrics' shapes (to sum them in): eval_shape traces one micro-batch's loss
      # and adds nothing to the step's program.
      aux_shapes = jax.eval_shape(
          lambda i: loss_fn(compute_params, jax.tree.map(lambda a: split(a)[0], i), loss_key)[1],
          inputs)
      zeros = (jnp.zeros(()), jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), aux_shapes),
               jax.tree.map(jnp.zeros_like, state["params"]))
      micro = jax.tree.map(split, inputs)
      (loss, aux, grads), _ = jax.lax.scan(body, zeros, (jnp.arange(accum), micro))
      loss, aux, grads = jax.tree.map(lambda a: a / accum, (loss, aux, grads))

    with jax.named_scope(OPTIMIZER_SCOPE):
      updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
      params = optax.apply_updates(state["params"], updates)
      d = ema_decay(tc, state["step"])
      ema = jax.tree.map(lambda e, p: d * e + (1.0 - d) * p, state["ema"], params)
    metrics = dict(loss=loss, grad_norm=optax.tree.norm(grads),
                   lr=jnp.asarray(state_lib.make_schedule(tc)(state["step"]), jnp.float32),
                   **aux)
    new_state = dict(step=state["step"] + 1, params=params, ema=ema, opt_state=opt_state,
                     rng=state["rng"])
    return new_state, metrics

  return step_fn


def global_batch(local_batch: dict[str, np.ndarray], mesh) -> dict[str, jax.Array]:
  """This process's rows of a global batch, placed as the batch-sharded global arrays."""
  shard = sharding.batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(shard, np.asarray(v))
          for k, v in local_batch.items()}


def train(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
  """Trains to `config.train.num_steps`, resuming from the latest checkpoint in `workdir`.

  `config` is validated by the caller (`sgjax.validation.validate(config, jax.device_count(),
  job="train")`: what `--mode=train` does), which also resolves `model.preset`.

  A run that fails before its first checkpoint removes the workdir if this call created it:
  no half-made workdir (metrics of a run that holds nothing) is left behind. One train run
  per workdir: a second is refused, naming the first (sgjax.lock).
  """
  created = "://" not in workdir and not os.path.exists(workdir)
  with lock.hold(workdir, "train"):
    try:
      return _train(config, workdir)
    except BaseException:
      if created and not checkpoint.saved_steps(os.path.join(workdir, "checkpoints")):
        shutil.rmtree(workdir, ignore_errors=True)
      raise


def _train(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
  # ---- Config and mesh. The config is the job's, validated once by it (sgjax.validation).
  tc = config.train
  mesh = sharding.build_mesh(config.mesh)
  if "://" not in workdir:  # gs:// and friends: orbax and the metric writer create their own.
    os.makedirs(workdir, exist_ok=True)

  # ---- Data: each process reads only the rows of every global batch its devices hold.
  # Batches are placed on the devices `data.prefetch` steps ahead; the checkpointed position is
  # the last batch a step consumed (sgjax.data.prefetch).
  data_iter = prefetch.DevicePrefetch(
      pipeline.make_train_iterator(config.data, tc.batch_size, seed=config.seed,
                                   rows=sharding.process_batch_rows(mesh, tc.batch_size)),
      lambda batch: global_batch(batch, mesh), config.data.prefetch)

  # ---- Model, optimizer, abstract state and shardings.
  model = models.from_config(config)
  tx = state_lib.make_optimizer(tc)
  abstract, state_shardings = state_lib.abstract_state_and_shardings(model, tx, config.seed, mesh)
  n_params = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(abstract["params"]))
  if jax.process_index() == 0:
    overview = metrics_lib.parameter_overview(abstract["params"])
    print(metrics_lib.parameter_overview(abstract["params"], max_lines=PARAMETER_LINES),
          flush=True)
    print(f"model: {n_params / 1e6:.2f}M params; mesh {dict(mesh.shape)}; "
          f"routes {tuple(map(tuple, config.sparsity.routes))}"
          + (f"; mask γ {config.sparsity.mask_gamma}" if config.sparsity.mask_gamma else ""),
          flush=True)

  # ---- Init or resume. A resume must train the model the workdir holds (sgjax.workdir); steps
  # its own train loop did not write (an import, steps from before records) are never deleted.
  ckpt_dir = os.path.join(workdir, "checkpoints")
  found = checkpoint.saved_steps(ckpt_dir)
  record = workdir_lib.check(workdir, config, resuming=True) if found else None
  base_step = record["base_step"] if record else max(found, default=-1)
  ckpt = checkpoint.manager(ckpt_dir, max_to_keep=tc.keep_checkpoints,
                            async_save=tc.async_checkpoint, keep_period=tc.keep_period,
                            protected_steps=[s for s in found if s <= base_step])
  with jax.set_mesh(mesh):
    if ckpt.latest_step() is not None:
      try:
        state = state_lib.restore(ckpt, abstract, data_iter)
      except BaseException:  # A damaged or foreign checkpoint: release the files, then say so.
        ckpt.close()
        raise
      if jax.process_index() == 0:
        print(f"resumed from step {int(state['step'])} in {workdir}", flush=True)
    elif tc.init_from:
      # Started from other weights (sgjax.init_from): they are saved as step 0, and the record
      # names their source, before the first step, so a resume never reads the source again.
      params, source = init_from.initial_params(config, workdir, mesh)
      state = state_lib.from_params(tx, params, config.seed, state_shardings)
      del params
      checkpoint.save(ckpt, 0, state, data_iter)
      workdir_lib.write(workdir, config, base_step=base_step, written_by="sgjax.train",
                        init_from=source)
      record = dict(base_step=base_step)
      metrics_lib.print0(f"{workdir}: {init_from.describe(source)}")
    else:
      state = state_lib.fresh_state(model, tx, config.seed, state_shardings)

    # Opened once the resume is accepted: a refused one leaves no events file behind.
    writer = metrics_lib.MetricWriter(workdir)

    # ---- The jitted step: state donated, shardings pinned on both sides.
    step_fn = jax.jit(make_train_step(config, model, tx, pipeline.null_condition(config)),
                      in_shardings=(state_shardings, sharding.batch_sharding(mesh)),
                      out_shardings=(state_shardings, sharding.replicated(mesh)),
                      donate_argnums=(0,))

    # ---- Loop.
    first_step = int(state["step"])
    profiler = monitor.StepProfiler(tc, workdir, first_step, log=metrics_lib.print0)
    watch = preemption.PreemptionWatch().start()
    failing = True  # Until the loop ends: then a failed last save is this run's error.
    try:
      # What the run shows at start: the resolved config (text, and hparams for a new run) and
      # the parameter table; then sample grids and a profile while it trains (sgjax.monitor).
      flat = workdir_lib.flat_config(config)
      writer.text(first_step, "config", metrics_lib.config_text(flat))
      if jax.process_index() == 0:
        writer.text(first_step, "parameters", f"```\n{overview}\n```")
      if first_step == 0:
        writer.hparams(metrics_lib.hparam_values(flat), ["loss"])
      grids = (previews.Previews(config, workdir, mesh, writer)
               if monitor.sample_every(tc) > 0 else None)
      if first_step >= tc.num_steps and jax.process_index() == 0:
        print(f"nothing to train: {workdir} is at step {first_step} >= train.num_steps = "
              f"{tc.num_steps} (raise it to train on)", flush=True)
      progress = metrics_lib.Progress(tc.num_steps, first_step)
      pending: list[dict[str, jax.Array]] = []
      t_last, step_last = time.perf_counter(), first_step
      for step in range(first_step + 1, tc.num_steps + 1):
        with profiler.step(step, state):
          state, step_metrics = step_fn(state, next(data_iter))
        profiler.after(step, state)
        pending.append(step_metrics)
        preempted = watch.reached(step)
        is_ckpt = step % tc.checkpoint_every == 0 or step == tc.num_steps or preempted
        if step % tc.log_every == 0 or is_ckpt:
          # The only host sync: fetch the metrics accumulated since the last report.
          fetched = jax.device_get(pending)
          pending = []
          losses = np.array([m["loss"] for m in fetched])
          if not np.all(np.isfinite(losses)):
            bad = step - len(fetched) + 1 + int(np.argmax(~np.isfinite(losses)))
            ckpt.wait_until_finished()
            good = ckpt.latest_step()
            raise errors.TrainingDiverged(
                workdir, f"non-finite loss at step {bad}",
                "there is no good checkpoint yet (it diverged before the first save): lower "
                "train.lr or set train.grad_clip, then train again" if good is None else
                f"last good checkpoint: step {good}; lower train.lr or set train.grad_clip and "
                "rerun to resume from it")
          now = time.perf_counter()
          steps_per_s = (step - step_last) / (now - t_last)
          t_last, step_last = now, step
          report = dict(loss=float(losses.mean()),
                        grad_norm=float(np.mean([m["grad_norm"] for m in fetched])),
                        lr=float(fetched[-1]["lr"]), steps_per_s=steps_per_s,
                        examples_per_s=steps_per_s * tc.batch_size)
          # The objective's own metrics (its `aux`), each a mean over the reported steps.
          report.update({k: float(np.mean([m[k] for m in fetched])) for k in fetched[-1]
                         if k not in ("loss", "grad_norm", "lr")})
          writer.write(step, report)
          progress.report(step, dict(loss=report["loss"], grad_norm=report["grad_norm"]))
        if is_ckpt:
          if record is None:  # The first save: say what the workdir holds (sgjax.workdir).
            workdir_lib.write(workdir, config, base_step=base_step, written_by="sgjax.train")
            record = dict(base_step=base_step)
          checkpoint.save(ckpt, step, state, data_iter)
        if grids is not None and monitor.samples_due(tc, step) and not preempted:
          # Reads the live weights only; its time is left out of steps/s and the ETA.
          spent = grids.write(step, state)
          t_last += spent
          progress.exclude(spent)
        if preempted:
          ckpt.wait_until_finished()
          if jax.process_index() == 0:
            print(f"SIGTERM: stopped at step {step} with a checkpoint; rerun the same command "
                  "to resume", flush=True)
          break
      failing = False
    finally:
      # Also on NaN abort or Ctrl-C: finish pending async saves, release files. The error that
      # stops a run is reported once: a save failing too does not replace it.
      profiler.close()
      watch.stop()
      try:
        checkpoint.close(ckpt, failing=failing)
      finally:
        writer.close()
  return state
