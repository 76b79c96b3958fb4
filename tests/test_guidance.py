"""Guidance rules: ω=1 is the strong branch, SG keeps the label in both branches, CFG+SG's weak
branch is unconditional, AG+SG's weak branch uses the guide weights, intervals and schedules
compile into the planned segments, and sampling is deterministic across device counts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sgjax import config as config_lib
from sgjax import flops, flow, sampling, sharding
from sgjax import guidance as gl
from sgjax.sparsity import Sparsity
from tests.builders import dit_inputs, dit_model, dit_random_params, guidance_config

ROUTES = Sparsity.from_routes([(1, 2, 0.0)])
NULL = 5
TOKENS = 100  # γ·100 is a whole token count for every γ used here: canonical γ = γ.


def _first(g_cfg, routes=ROUTES, tokens=TOKENS):
  return gl.from_config(g_cfg, routes, tokens)


def _label_probe(params, x, t, y, sparsity, key):
  """A 'model' whose velocity is params + label + 100·γ: shows what each branch received."""
  del t, key
  gamma = sparsity.routes[0].gamma if sparsity.routes else 0.0
  return jnp.broadcast_to((params + y.astype(jnp.float32) + 100 * gamma)[:, None, None, None],
                          x.shape)


@pytest.mark.parametrize("rule, weak_label, weak_gamma, weak_weights", [
    ("sg", "cond", 0.75, 0.0), ("cfg_sg", "null", 0.75, 0.0), ("cfg", "null", 0.0, 0.0),
    ("ag_sg", "cond", 0.75, 1000.0)])
def test_branches_receive_the_right_labels_sparsity_and_weights(rule, weak_label, weak_gamma,
                                                                weak_weights):
  g = _first(guidance_config(rule, omega=3.0))
  y = jnp.array([0, 1, 4])
  x = jnp.zeros((3, 2, 2, 1))
  keys = tuple(jax.random.split(jax.random.key(0)))
  params = {gl.MAIN: 0.0, gl.GUIDE: 1000.0}
  v = gl.guided_velocity(_label_probe, params, x, jnp.zeros(3), y, NULL, g, keys)[:, 0, 0, 0]
  strong_gamma = 0.0 if rule == "cfg" else 0.25
  v_strong = y + 100 * strong_gamma
  v_weak = weak_weights + (y if weak_label == "cond" else NULL) + 100 * weak_gamma
  np.testing.assert_allclose(np.asarray(v), 3.0 * v_strong - 2.0 * v_weak, rtol=1e-6)


def test_sg_keeps_class_label_in_both_branches():
  # The public reference drops the label in both SG branches; with that bug the branches
  # would see NULL and this combination would not cancel to the label.
  g = _first(guidance_config("sg", omega=2.0, gs=0.5, gw=0.51))
  y = jnp.array([0, 3])
  v = gl.guided_velocity(lambda p, x, t, yy, s, k: _label_probe(p, x, t, yy, Sparsity(), k),
                         {gl.MAIN: 0.0}, jnp.zeros((2, 1, 1, 1)), jnp.zeros(2), y, NULL, g,
                         (jax.random.key(0),) * 2)
  np.testing.assert_array_equal(np.asarray(v)[:, 0, 0, 0], [0.0, 3.0])


@pytest.mark.parametrize("rule", ["none", "cfg", "sg", "cfg_sg", "ag_sg"])
def test_omega_one_is_the_strong_branch(rule):
  model = dit_model()
  params = {gl.MAIN: dit_random_params(model), gl.GUIDE: dit_random_params(model, seed=5)}
  x, t, y = dit_inputs(model)
  y = y % model.num_classes
  velocity = sampling.make_velocity_fn(model)
  routes = Sparsity.from_routes([(1, 2, 0.5)])
  g = _first(guidance_config(rule, omega=1.0, gs=0.25, gw=0.5), routes, model.num_tokens)
  keys = tuple(jax.random.split(jax.random.key(7)))
  guided = gl.guided_velocity(velocity, params, x, t, y, model.num_classes, g, keys)
  strong = velocity(params[gl.MAIN], x, t, y, g.strong.sparsity, keys[0])
  # CFG's strong branch runs inside a 2B batch: equal up to float rounding of the batch size.
  np.testing.assert_allclose(np.asarray(guided), np.asarray(strong), rtol=1e-5, atol=1e-6)
  assert float(jnp.abs(strong).mean()) > 1e-3


def test_ag_sg_guides_with_the_second_weights():
  model = dit_model()
  main, guide = dit_random_params(model), dit_random_params(model, seed=5)
  x, t, y = dit_inputs(model)
  velocity = sampling.make_velocity_fn(model)
  routes = Sparsity.from_routes([(1, 2, 0.5)])
  g = _first(guidance_config("ag_sg", omega=1.8, gs=0.25, gw=0.5), routes, model.num_tokens)
  k0, k1 = jax.random.split(jax.random.key(7))
  got = gl.guided_velocity(velocity, {gl.MAIN: main, gl.GUIDE: guide}, x, t, y,
                           model.num_classes, g, (k0, k1))
  want = (1.8 * velocity(main, x, t, y, g.strong.sparsity, k0)
          - 0.8 * velocity(guide, x, t, y, g.weak.sparsity, k1))
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
  same = gl.guided_velocity(velocity, {gl.MAIN: main, gl.GUIDE: main}, x, t, y,
                            model.num_classes, g, (k0, k1))
  assert float(jnp.abs(got - same).max()) > 1e-3  # The guide's weights really are used.


def test_sg_with_equal_gamma_and_keys_is_the_unguided_model():
  model = dit_model()
  params = dit_random_params(model)
  x, t, y = dit_inputs(model)
  velocity = sampling.make_velocity_fn(model)
  s = Sparsity.from_routes([(1, 2, 0.5)])
  g = gl.Guidance("sg", 1.7, gl.Branch(True, s), gl.Branch(True, s))
  k = jax.random.key(3)
  guided = gl.guided_velocity(velocity, {gl.MAIN: params}, x, t, y, model.num_classes, g, (k, k))
  plain = velocity(params, x, t, y, s, k)
  np.testing.assert_allclose(np.asarray(guided), np.asarray(plain), rtol=1e-5, atol=1e-6)


def test_sg_rejects_gamma_order():
  with pytest.raises(ValueError, match="gamma_weak = 0.5: must be > gamma_strong = 0.5"):
    _first(guidance_config("sg", gs=0.5, gw=0.5))


def _plan(g_cfg, steps=8, tokens=TOKENS, routes=ROUTES):
  return gl.plan(g_cfg, routes, tokens, flow.time_grid(steps))


def test_interval_guides_only_inside_and_spends_no_weak_flops_outside():
  p = _plan(guidance_config("sg", gs=0.25, gw=0.75, interval=(0.25, 0.5)))
  rules = [g.rule for g in p.step_guidance()]
  # t = 0, 1/8, …, 7/8: steps with t in [0.25, 0.5] are 2, 3, 4.
  assert rules == ["none", "none", "sg", "sg", "sg", "none", "none", "none"]
  assert [(s.start, s.stop) for s in p.segments] == [(0, 2), (2, 5), (5, 8)]
  assert all(g.weak is None for g in p.step_guidance() if g.rule == "none")
  c = config_lib.base_config()
  c.model.update(depth=4, width=64, heads=4, patch_size=2)
  c.data.update(image_size=20, channels=3, num_classes=5)  # 100 tokens.
  strong = flops.forward_macs(c, ROUTES.with_gamma(0.25)).with_attention
  weak = flops.forward_macs(c, ROUTES.with_gamma(0.75)).with_attention
  assert flops.plan_macs(c, p).with_attention == pytest.approx(8 * strong + 3 * weak)


def test_cfg_is_dense_at_every_step_whatever_gamma_says():
  # Outside the interval CFG runs its strong branch alone: still the dense v(c).
  p = _plan(guidance_config("cfg", gs=0.25, gw=0.75, interval=(0.25, 0.5)))
  assert {g.rule for g in p.step_guidance()} == {"cfg", "none"}
  assert all(b.sparsity.is_dense for g in p.step_guidance() for b in g.branches)


def test_cosine_schedule_runs_end_to_end_and_merges_equal_token_counts():
  g = guidance_config("ag_sg", gs=0.0, gw=0.6, schedule="cosine", gamma_strong_end=0.6,
                      gamma_weak_end=0.0)
  p = _plan(g, steps=40, tokens=16)
  gammas = [(s.guidance.strong.sparsity, s.guidance.weak.sparsity) for s in p.segments]
  assert gl.gamma_at(0.0, 0.6, "cosine", 0, 40) == 0.0
  assert gl.gamma_at(0.0, 0.6, "cosine", 39, 40) == pytest.approx(0.6)
  # 16 tokens: γ in [0, 0.6] gives at most 10 distinct drop counts per branch, so far fewer
  # compiled segments than steps, and consecutive segments always differ.
  assert 2 < len(p.segments) < 40
  assert all(a != b for a, b in zip(gammas[:-1], gammas[1:], strict=True))
  assert sum(s.stop - s.start for s in p.segments) == 40
  g.gamma_quantum = 0.2
  coarse = _plan(g, steps=40, tokens=16)
  assert len(coarse.segments) < len(p.segments)


def test_schedule_that_breaks_gamma_order_names_the_step():
  g = guidance_config("sg", gs=0.0, gw=0.6, schedule="cosine", gamma_strong_end=0.6,
                      gamma_weak_end=0.0)
  with pytest.raises(ValueError, match=r"gamma_weak = .*must be > gamma_strong = .* at step"):
    _plan(g, steps=10)


def test_heun_is_second_order_and_euler_first_order():
  # dx/dt = x from t=0 to 1: x(1) = e·x(0). Halving dt halves Euler's error and quarters Heun's.
  g = gl.Guidance("none", 1.0, gl.Branch(True, Sparsity()), None)

  def error(sampler, steps):
    plan = gl.Plan(flow.time_grid(steps), (gl.Segment(0, steps, g),))
    x = sampling.integrate(lambda g, mix, x, t, k: x, jnp.ones(()), plan, jax.random.key(0),
                           sampler)
    return abs(float(x) - np.e)

  e1, e2 = error("euler", 16), error("euler", 32)
  h1, h2 = error("heun", 16), error("heun", 32)
  assert 1.8 < e1 / e2 < 2.2, (e1, e2)
  assert 3.6 < h1 / h2 < 4.4, (h1, h2)
  assert h1 < e1 / 20


def test_splitting_a_plan_into_segments_changes_nothing():
  model = dit_model(depth=3)
  params = {gl.MAIN: dit_random_params(model)}
  g = _first(guidance_config("sg", omega=1.5, gs=0.0, gw=0.5), Sparsity.from_routes([(1, 1, 0.0)]),
             model.num_tokens)
  times = flow.time_grid(4)
  one = gl.Plan(times, (gl.Segment(0, 4, g),))
  split = gl.Plan(times, (gl.Segment(0, 1, g), gl.Segment(1, 4, g)))
  labels = jnp.arange(4) % model.num_classes
  key = jax.random.key(1)
  a = sampling.sample(model, params, labels, key, plan=one)
  b = sampling.sample(model, params, labels, key, plan=split)
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)


def test_interval_outside_all_steps_is_the_unguided_sampler():
  model = dit_model(depth=3)
  params = {gl.MAIN: dit_random_params(model)}
  routes = Sparsity.from_routes([(1, 1, 0.0)])
  labels = jnp.arange(4) % model.num_classes
  key = jax.random.key(2)
  never = _plan(guidance_config("sg", omega=3.0, gs=0.0, gw=0.5, interval=(1.0, 1.0)), 4,
                model.num_tokens, routes)
  plain = _plan(guidance_config("none", gs=0.0), 4, model.num_tokens, routes)
  assert never == plain
  a = sampling.sample(model, params, labels, key, plan=never)
  guided = _plan(guidance_config("sg", omega=3.0, gs=0.0, gw=0.5), 4, model.num_tokens, routes)
  b = sampling.sample(model, params, labels, key, plan=guided)
  assert float(jnp.abs(a - b).max()) > 1e-2


@pytest.mark.parametrize("rule", ["cfg", "sg"])
def test_omega_is_traced_one_executable_for_an_omega_grid(rule):
  """ω is an argument of the compiled sampler, not a constant: a grid of ω compiles once, and
  each ω is the one used (one Euler step is affine in ω: x(ω) = a + ω·b)."""
  model = dit_model(depth=3)
  params = {gl.MAIN: dit_random_params(model)}
  routes = Sparsity.from_routes([(1, 1, 0.0)])
  labels = jnp.arange(4) % model.num_classes
  plans = [_plan(guidance_config(rule, omega=w, gs=0.0, gw=0.5), 1, model.num_tokens, routes)
           for w in (1.5, 3.0, 6.0)]
  assert len({p.structure() for p in plans}) == 1 and len(set(plans)) == 3
  before = sampling._sample._cache_size()
  x15, x3, x6 = (np.asarray(sampling.sample(model, params, labels, jax.random.key(4), plan=p),
                            np.float64) for p in plans)
  assert sampling._sample._cache_size() == before + 1
  b = (x3 - x15) / 1.5
  assert np.abs(b).max() > 1e-2  # The branches differ, so ω matters.
  np.testing.assert_allclose(x6 - x3, 3.0 * b, atol=2e-5)


def test_sampling_is_deterministic_and_device_count_independent():
  model = dit_model(depth=3)
  params = {gl.MAIN: dit_random_params(model)}
  plan = _plan(guidance_config("sg", omega=1.5, gs=0.0, gw=0.5), 4, model.num_tokens,
               Sparsity.from_routes([(1, 1, 0.0)]))
  labels = jnp.arange(8) % model.num_classes
  key = jax.random.key(11)
  run = lambda: sampling.sample(model, params, labels, key, plan=plan)
  one = np.asarray(run())
  np.testing.assert_array_equal(one, np.asarray(run()))
  mesh = sharding.build_mesh(dict(data=-1, fsdp=1, tensor=1))
  assert mesh.devices.size == 8
  with jax.set_mesh(mesh):
    y8 = jax.device_put(labels, sharding.batch_sharding(mesh))
    eight = np.asarray(sampling.sample(model, params, y8, key, plan=plan))
  np.testing.assert_allclose(eight, one, rtol=1e-5, atol=1e-5)
  assert np.isfinite(one).all() and one.std() > 0.1


@pytest.mark.parametrize("draw", ["step", "trajectory"])
def test_token_draw_per_step_or_once_per_trajectory_equals_a_hand_written_euler_loop(draw):
  """sample.guidance.token_draw: "step" draws the weak branch's token subsets at every step
  (key split from step i's), "trajectory" once per sample for the whole path (one key for every
  step, fold_in(key, 1)); both against an Euler loop written here from guided_velocity."""
  model = dit_model(depth=3)
  params = {gl.MAIN: dit_random_params(model)}
  routes = Sparsity.from_routes([(1, 1, 0.0)])
  labels = jnp.arange(4) % model.num_classes
  key = jax.random.key(5)
  plan = _plan(guidance_config("sg", omega=3.0, gs=0.0, gw=0.5, token_draw=draw), 3,
               model.num_tokens, routes)
  assert plan.token_draw == draw and plan.structure().token_draw == draw
  got = np.asarray(sampling.sample(model, params, labels, key, plan=plan))

  velocity = sampling.make_velocity_fn(model)
  k_noise, k_steps = jax.random.split(key)
  x = jax.random.normal(k_noise, (4, model.image_size, model.image_size, model.channels))
  for i, g in enumerate(plan.step_guidance()):
    k_strong, k_weak = jax.random.split(jax.random.fold_in(k_steps, i))
    if draw == "trajectory":
      k_weak = jax.random.fold_in(key, 1)
    t = jnp.full((4,), plan.times[i], jnp.float32)
    v = gl.guided_velocity(velocity, params, x, t, labels, NULL, g, (k_strong, k_weak))
    x = x + (plan.times[i + 1] - plan.times[i]) * v
  np.testing.assert_allclose(got, np.asarray(x), rtol=1e-5, atol=1e-5)
  other = "step" if draw == "trajectory" else "trajectory"
  plan_other = _plan(guidance_config("sg", omega=3.0, gs=0.0, gw=0.5, token_draw=other), 3,
                     model.num_tokens, routes)
  assert float(np.abs(got - np.asarray(sampling.sample(model, params, labels, key,
                                                       plan=plan_other))).max()) > 1e-2
  # CFG's branches draw no tokens: the option changes nothing.
  cfg = [_plan(guidance_config("cfg", omega=3.0, token_draw=d), 3, model.num_tokens, routes)
         for d in ("step", "trajectory")]
  np.testing.assert_array_equal(*(np.asarray(sampling.sample(model, params, labels, key, plan=p))
                                  for p in cfg))
