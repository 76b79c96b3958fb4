"""Model and routing invariants: γ=0 is dense, skipped tokens pass unchanged, static shapes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sgjax import sparsity as sp
from tests.builders import (
  all_shapes,
  dit_inputs,
  dit_model,
  dit_random_params,
  trdit_inputs,
  trdit_model,
  trdit_random_params,
)

# Each model kind's tiny model, its random params and inputs (x, t, condition).
KINDS = {"dit": (dit_model, dit_random_params, dit_inputs),
         "trdit": (trdit_model, trdit_random_params, trdit_inputs)}


@pytest.mark.parametrize("kind, route", [("dit", (1, 2, 0.0)), ("trdit", (1, 1, 0.0))])
def test_gamma_zero_routing_equals_dense_exactly(kind, route):
  build, init, inputs = KINDS[kind]
  model = build()
  params = init(model)
  x, t, cond = inputs(model)
  dense = model.apply({"params": params}, x, t, cond)
  routed0 = model.apply({"params": params}, x, t, cond,
                        sparsity=sp.Sparsity.from_routes([route]),
                        token_key=jax.random.key(5))
  np.testing.assert_array_equal(np.asarray(dense), np.asarray(routed0))
  assert float(jnp.abs(dense).mean()) > 1e-3  # The check above is not vacuous.


def test_routing_changes_output_and_depends_on_key():
  model = dit_model()
  params = dit_random_params(model)
  x, t, y = dit_inputs(model)
  s = sp.Sparsity.from_routes([(1, 2, 0.5)])
  dense = model.apply({"params": params}, x, t, y)
  a = model.apply({"params": params}, x, t, y, sparsity=s, token_key=jax.random.key(0))
  b = model.apply({"params": params}, x, t, y, sparsity=s, token_key=jax.random.key(1))
  a2 = model.apply({"params": params}, x, t, y, sparsity=s, token_key=jax.random.key(0))
  assert float(jnp.abs(a - dense).max()) > 1e-4
  assert float(jnp.abs(a - b).max()) > 1e-4
  np.testing.assert_array_equal(np.asarray(a), np.asarray(a2))


def test_skipped_tokens_leave_route_unchanged():
  model = dit_model(depth=5)
  params = dit_random_params(model)
  x, t, y = dit_inputs(model)
  s = sp.Sparsity.from_routes([(1, 3, 0.5)])
  _, inter = model.apply({"params": params}, x, t, y, sparsity=s, token_key=jax.random.key(3),
                         mutable=["intermediates"])
  (x_in, idx), = inter["intermediates"]["route_in1"]
  x_out, = inter["intermediates"]["route_out3"]
  n = x_in.shape[1]
  assert idx.shape == (3, n - int(n * 0.5))
  kept = np.zeros(x_in.shape[:2], bool)
  kept[np.arange(3)[:, None], np.asarray(idx)] = True
  assert kept.sum(1).tolist() == [idx.shape[1]] * 3
  np.testing.assert_array_equal(np.asarray(x_out)[~kept], np.asarray(x_in)[~kept])
  assert np.all(np.abs(np.asarray(x_out) - np.asarray(x_in))[kept].max(-1) > 0)
  # Per-sample subsets: samples do not all share one subset.
  assert not all(np.array_equal(kept[0], kept[i]) for i in range(1, 3))


def test_routed_shapes_are_static_under_jit():
  model = dit_model()
  params = dit_random_params(model)
  x, t, y = dit_inputs(model)
  s = sp.Sparsity.from_routes([(0, 3, 0.75)])
  fn = jax.jit(lambda p, x, t, y, k: model.apply({"params": p}, x, t, y, sparsity=s,
                                                   token_key=k))
  jaxpr = jax.make_jaxpr(fn)(params, x, t, y, jax.random.key(0))
  n = (16 // 2) ** 2
  keep = n - int(n * 0.75)
  shapes = all_shapes(jaxpr.jaxpr)
  assert (3, keep, 64) in shapes  # Blocks run on the kept tokens only, a static count.
  assert fn(params, x, t, y, jax.random.key(1)).shape == x.shape


def test_select_tokens_is_a_uniform_subset():
  idx = np.asarray(sp.select_tokens(jax.random.key(0), 2000, 10, 3))
  assert idx.shape == (2000, 3)
  assert np.all(np.diff(idx, axis=1) > 0)  # Sorted, distinct.
  counts = np.bincount(idx.ravel(), minlength=10) / idx.size
  np.testing.assert_allclose(counts, 0.1, atol=0.01)


def test_gather_scatter_roundtrip():
  x = jax.random.normal(jax.random.key(0), (2, 7, 4))
  idx = jnp.array([[0, 3, 6], [1, 2, 5]])
  kept = sp.gather_tokens(x, idx)
  np.testing.assert_array_equal(np.asarray(kept[1, 2]), np.asarray(x[1, 5]))
  back = sp.scatter_tokens(jnp.zeros_like(x), kept * 2, idx)
  np.testing.assert_array_equal(np.asarray(back[0, 3]), np.asarray(2 * x[0, 3]))
  assert float(jnp.abs(back[0, 1]).max()) == 0.0


@pytest.mark.parametrize("routes, depth, msg", [
    ([(0, 4, 0.5)], 4, "depth-1 = 3"),
    ([(1, 2, 1.0)], 4, "must be in [0, 1)"),
    ([(1, 2, 0.5), (2, 3, 0.5)], 4, "must not overlap"),
])
def test_bad_routes_are_rejected(routes, depth, msg):
  with pytest.raises(ValueError, match=msg.replace("[", r"\[").replace(")", r"\)")):
    sp.Sparsity.from_routes(routes).validate(depth)
