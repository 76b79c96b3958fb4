"""Train step: a 2x2x2 mesh (data, fsdp, tensor) computes the 1-device step; loss goes down."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from sgjax import objectives, sharding, train, validation
from sgjax import state as state_lib
from sgjax.models import dit
from tests.builders import tiny_config


def _batch(c, seed=0):
  k1, k2 = jax.random.split(jax.random.key(seed))
  n = c.data.image_size
  return dict(image=jax.random.uniform(k1, (c.train.batch_size, n, n, 1), minval=-1, maxval=1),
              label=jax.random.randint(k2, (c.train.batch_size,), 0, c.data.num_classes))


def _run_steps(c, mesh, steps=2):
  model = dit.from_config(c)
  tx = state_lib.make_optimizer(c.train)
  _, shardings = state_lib.abstract_state_and_shardings(model, tx, c.seed, mesh)
  with jax.set_mesh(mesh):
    state = state_lib.fresh_state(model, tx, c.seed, shardings)
    step = jax.jit(train.make_train_step(c, model, tx),
                   in_shardings=(shardings, sharding.batch_sharding(mesh)),
                   out_shardings=(shardings, sharding.replicated(mesh)))
    metrics = []
    for i in range(steps):
      batch = jax.device_put(_batch(c, i), sharding.batch_sharding(mesh))
      state, m = step(state, batch)
      metrics.append((float(m["loss"]), float(m["grad_norm"])))
  return state, metrics


def test_sharded_step_equals_single_device_step():
  c = tiny_config()
  validation.validate(c, 8)
  mesh8 = sharding.build_mesh(dict(data=2, fsdp=2, tensor=2))
  mesh1 = sharding.build_mesh(dict(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1])
  # One step: a second would start from params that already differ by Adam's rounding flips.
  s8, l8 = _run_steps(c, mesh8, steps=1)
  s1, l1 = _run_steps(c, mesh1, steps=1)
  # The params really are split: fsdp shards the width, tensor the MLP hidden dim.
  fc1 = s8["params"]["block0"]["fc1"]["kernel"]
  assert fc1.sharding.shard_shape(fc1.shape) == (32, 128)
  np.testing.assert_allclose(l8, l1, rtol=1e-5)
  # Adam's moments hold the gradients themselves: compared tightly.
  for a, b in zip(jax.tree.leaves(s8["opt_state"]), jax.tree.leaves(s1["opt_state"]),
                  strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-8)
  # Params: Adam's m/sqrt(v) turns rounding noise on exactly-zero gradients (zero-init adaLN
  # gates) into ±lr steps, so only those may differ, by at most one step each.
  for a, b in zip(jax.tree.leaves(s8["params"]), jax.tree.leaves(s1["params"]), strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5,
                               atol=2.2 * c.train.lr)
  # The step did move the params (the zero-init output layer gets gradient at once).
  moved = np.asarray(s1["params"]["final_proj"]["kernel"])
  assert np.abs(moved).max() > 0.5 * c.train.lr
  assert not np.allclose(moved, np.asarray(s1["ema"]["final_proj"]["kernel"]))


def test_loss_decreases_on_a_fixed_batch():
  c = tiny_config()
  c.sparsity.routes = ()
  mesh = sharding.build_mesh(dict(data=-1, fsdp=1, tensor=1))
  model = dit.from_config(c)
  tx = state_lib.make_optimizer(c.train)
  _, shardings = state_lib.abstract_state_and_shardings(model, tx, c.seed, mesh)
  with jax.set_mesh(mesh):
    state = state_lib.fresh_state(model, tx, c.seed, shardings)
    step = jax.jit(train.make_train_step(c, model, tx))
    batch = jax.device_put(_batch(c), sharding.batch_sharding(mesh))
    losses = []
    for _ in range(40):
      state, m = step(state, batch)
      losses.append(float(m["loss"]))
  assert np.mean(losses[-8:]) < 0.85 * np.mean(losses[:8])


def test_grad_accumulation_matches_full_batch_step():
  # Noise, t and label dropout are drawn for the whole batch before the split, so with a dense
  # model two accumulated halves give the full batch's mean gradient, hence the same update.
  c = tiny_config()
  c.sparsity.routes = ()
  model = dit.from_config(c)
  tx = state_lib.make_optimizer(c.train)
  state = nn.unbox(state_lib.init_state(model, tx, c.seed))
  batch = _batch(c)
  s1, m1 = jax.jit(train.make_train_step(c, model, tx))(state, batch)
  c.train.grad_accum = 4
  s4, m4 = jax.jit(train.make_train_step(c, model, tx))(state, batch)
  np.testing.assert_allclose(float(m4["loss"]), float(m1["loss"]), rtol=1e-5)
  np.testing.assert_allclose(float(m4["grad_norm"]), float(m1["grad_norm"]), rtol=1e-4)
  for a, b in zip(jax.tree.leaves(s4["params"]), jax.tree.leaves(s1["params"]), strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


def test_logged_lr_is_the_schedule_the_optimizer_steps_with():
  # Warmup over 4 steps: the step at lr 0 must not move the params (AdamW's decay is scaled by
  # the same lr), the logged values are the optax schedule's, and the optimizer's own step
  # count (what it feeds its schedule) equals the train step.
  c = tiny_config()
  c.sparsity.routes = ()
  c.train.update(warmup_steps=4, weight_decay=0.01)
  model = dit.from_config(c)
  tx = state_lib.make_optimizer(c.train)
  state = nn.unbox(state_lib.init_state(model, tx, c.seed))
  init_params = jax.device_get(state["params"])
  step = jax.jit(train.make_train_step(c, model, tx))
  lrs, params = [], []
  for i in range(3):
    state, m = step(state, _batch(c, i))
    lrs.append(float(m["lr"]))
    params.append(jax.device_get(state["params"]))
  np.testing.assert_allclose(lrs, [0.0, 2.5e-4, 5e-4], rtol=1e-6, atol=0)
  for a, b in zip(jax.tree.leaves(params[0]), jax.tree.leaves(init_params), strict=True):
    np.testing.assert_array_equal(a, b)
  kernel = lambda p: p["final_proj"]["kernel"]
  assert np.abs(kernel(params[1]) - kernel(params[0])).max() > 0.5 * 2.5e-4
  is_sched = lambda s: isinstance(s, optax.ScaleByScheduleState)
  sched = [s for s in jax.tree.leaves(state["opt_state"], is_leaf=is_sched) if is_sched(s)]
  assert [int(s.count) for s in sched] == [3]
  c.train.warmup_steps = 0
  constant = nn.unbox(state_lib.init_state(model, state_lib.make_optimizer(c.train), c.seed))
  _, m = jax.jit(train.make_train_step(c, model, state_lib.make_optimizer(c.train)))(
      constant, _batch(c))
  np.testing.assert_allclose(float(m["lr"]), c.train.lr, rtol=1e-7)
  # A constant lr keeps the optimizer state of checkpoints made before the schedule existed:
  # no schedule step count.
  assert not [s for s in jax.tree.leaves(constant["opt_state"], is_leaf=is_sched)
              if is_sched(s)]


def _probe_loss(model, params, inputs, rng, config):
  """An objective that reads no model: a loss of one bias and the batch's t, and t's mean."""
  del model, rng, config
  bias = params["final_proj"]["bias"]
  return jnp.mean((bias.sum() - inputs.t) ** 2), {"t_mean": jnp.mean(inputs.t)}


def test_an_added_objective_trains_and_reports_its_metrics(monkeypatch):
  # The seam: an objective in sgjax.objectives.OBJECTIVES is picked by train.objective; the
  # step differentiates its loss and averages its aux metrics over the micro-batches (the
  # draws are the whole batch's, made before the split).
  monkeypatch.setitem(objectives.OBJECTIVES, "probe",
                      objectives.Objective(objectives.draw_flow, _probe_loss))
  c = tiny_config()
  c.train.update(objective="probe", grad_accum=2)
  validation.validate(c, 8)
  model = dit.from_config(c)
  tx = state_lib.make_optimizer(c.train)
  state = nn.unbox(state_lib.init_state(model, tx, c.seed))
  batch = _batch(c)
  new, m = jax.jit(train.make_train_step(c, model, tx))(state, batch)
  key = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), 0)
  inputs, _ = objectives.draw_flow(model, batch, key, c, model.builtin_null())
  t = np.asarray(inputs.t, np.float64)
  np.testing.assert_allclose(float(m["t_mean"]), t.mean(), rtol=1e-6)
  np.testing.assert_allclose(float(m["loss"]), np.mean(t ** 2), rtol=1e-5)  # The bias is 0.
  moved = np.asarray(new["params"]["final_proj"]["bias"])
  np.testing.assert_allclose(moved, c.train.lr, rtol=1e-3)  # Adam's first step: +lr each.
  assert np.array_equal(np.asarray(new["params"]["block0"]["fc1"]["kernel"]),
                        np.asarray(state["params"]["block0"]["fc1"]["kernel"]))
