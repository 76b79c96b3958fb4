"""Guidance rules: ω=1 is the strong branch, SG keeps the label in both branches, CFG+SG's weak
branch is unconditional, and sampling is deterministic across device counts."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from sgjax import guidance as gl
from sgjax import sampling, sharding
from sgjax.sparsity import Sparsity
from tests.test_model import _inputs, _model, _random_params

ROUTES = Sparsity.from_routes([(1, 2, 0.0)])
NULL = 5


def _cfg(rule, omega=2.0, gs=0.25, gw=0.75):
  return ml_collections.ConfigDict(dict(rule=rule, omega=omega, gamma_strong=gs, gamma_weak=gw))


def _label_probe(params, x, t, y, sparsity, key):
  """A 'model' whose velocity is its label plus its γ: shows what each branch received."""
  del params, t, key
  gamma = sparsity.routes[0].gamma if sparsity.routes else 0.0
  return jnp.broadcast_to((y.astype(jnp.float32) + 100 * gamma)[:, None, None, None], x.shape)


@pytest.mark.parametrize("rule, expect_weak_label, expect_weak_gamma", [
    ("sg", "cond", 0.75), ("cfg_sg", "null", 0.75), ("cfg", "null", 0.0)])
def test_branches_receive_the_right_labels_and_sparsity(rule, expect_weak_label,
                                                        expect_weak_gamma):
  g = gl.from_config(_cfg(rule, omega=3.0), ROUTES)
  y = jnp.array([0, 1, 4])
  x = jnp.zeros((3, 2, 2, 1))
  keys = tuple(jax.random.split(jax.random.key(0)))
  v = gl.guided_velocity(_label_probe, None, x, jnp.zeros(3), y, NULL, g, keys)[:, 0, 0, 0]
  strong_gamma = 0.0 if rule == "cfg" else 0.25
  v_strong = y + 100 * strong_gamma
  v_weak = (y if expect_weak_label == "cond" else NULL) + 100 * expect_weak_gamma
  np.testing.assert_allclose(np.asarray(v), 3.0 * v_strong - 2.0 * v_weak, rtol=1e-6)


def test_sg_keeps_class_label_in_both_branches():
  # The public reference drops the label in both SG branches; with that bug the weak (and
  # strong) branch would see NULL and this combination would not cancel to the label.
  g = gl.from_config(_cfg("sg", omega=2.0, gs=0.5, gw=0.5 + 1e-9), ROUTES)
  y = jnp.array([0, 3])
  v = gl.guided_velocity(lambda p, x, t, yy, s, k: _label_probe(p, x, t, yy, Sparsity(), k),
                         None, jnp.zeros((2, 1, 1, 1)), jnp.zeros(2), y, NULL, g,
                         (jax.random.key(0),) * 2)
  np.testing.assert_array_equal(np.asarray(v)[:, 0, 0, 0], [0.0, 3.0])


@pytest.mark.parametrize("rule", ["none", "cfg", "sg", "cfg_sg"])
def test_omega_one_is_the_strong_branch(rule):
  model = _model()
  params = _random_params(model)
  x, t, y = _inputs(model)
  y = y % model.num_classes
  velocity = sampling.make_velocity_fn(model)
  routes = Sparsity.from_routes([(1, 2, 0.5)])
  g = gl.from_config(_cfg(rule, omega=1.0, gs=0.25, gw=0.5), routes)
  keys = tuple(jax.random.split(jax.random.key(7)))
  guided = gl.guided_velocity(velocity, params, x, t, y, model.num_classes, g, keys)
  strong = velocity(params, x, t, y, g.strong.sparsity, keys[0])
  # CFG's strong branch runs inside a 2B batch: equal up to float rounding of the batch size.
  np.testing.assert_allclose(np.asarray(guided), np.asarray(strong), rtol=1e-5, atol=1e-6)
  assert float(jnp.abs(strong).mean()) > 1e-3


def test_sg_with_equal_gamma_and_keys_is_the_unguided_model():
  model = _model()
  params = _random_params(model)
  x, t, y = _inputs(model)
  velocity = sampling.make_velocity_fn(model)
  s = Sparsity.from_routes([(1, 2, 0.5)])
  g = gl.Guidance("sg", 1.7, gl.Branch(True, s), gl.Branch(True, s))
  k = jax.random.key(3)
  guided = gl.guided_velocity(velocity, params, x, t, y, model.num_classes, g, (k, k))
  plain = velocity(params, x, t, y, s, k)
  np.testing.assert_allclose(np.asarray(guided), np.asarray(plain), rtol=1e-5, atol=1e-6)


def test_sg_rejects_gamma_order():
  with pytest.raises(ValueError, match="gamma_strong < gamma_weak"):
    gl.from_config(_cfg("sg", gs=0.5, gw=0.5), ROUTES)


def test_sampling_is_deterministic_and_device_count_independent():
  model = _model(depth=3)
  params = _random_params(model)
  g = gl.from_config(_cfg("sg", omega=1.5, gs=0.0, gw=0.5),
                     Sparsity.from_routes([(1, 1, 0.0)]))
  labels = jnp.arange(8) % model.num_classes
  key = jax.random.key(11)
  run = lambda: sampling.sample(model, params, labels, key, guidance=g, steps=4)
  one = np.asarray(run())
  np.testing.assert_array_equal(one, np.asarray(run()))
  mesh = sharding.build_mesh(dict(data=-1, fsdp=1, tensor=1))
  assert mesh.devices.size == 8
  with jax.set_mesh(mesh):
    y8 = jax.device_put(labels, sharding.batch_sharding(mesh))
    eight = np.asarray(sampling.sample(model, params, y8, key, guidance=g, steps=4))
  np.testing.assert_allclose(eight, one, rtol=1e-5, atol=1e-5)
  assert np.isfinite(one).all() and one.std() > 0.1

