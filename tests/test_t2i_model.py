"""TR-DiT invariants: routed tokens keep their RoPE positions, RoPE is relative, text reaches the
output, and the 2.5B preset has 2.5B params (γ=0 routing is dense: test_model, both kinds)."""


import jax
import jax.numpy as jnp
import numpy as np

from sgjax import models, validation
from sgjax import sparsity as sp
from sgjax.models import trdit
from tests.builders import load_config, trdit_inputs, trdit_model, trdit_random_params


def test_positions_inside_a_route_are_the_tokens_own():
  model = trdit_model(depth=3)
  params = trdit_random_params(model)
  x, t, c = trdit_inputs(model)
  s = sp.Sparsity.from_routes([(1, 1, 0.5)])
  _, inter = model.apply({"params": params}, x, t, c, sparsity=s, token_key=jax.random.key(3),
                         mutable=["intermediates"])
  inter = inter["intermediates"]
  (_, idx), = inter["route_in1"]
  grid = model.image_size // model.patch_size
  idx = np.asarray(idx)
  own = np.stack([idx // grid, idx % grid], axis=-1)  # Raster index -> (row, column).
  for layer in (1,):
    seen, = inter[f"block{layer}"]["attn"]["positions"]
    assert seen.shape == (3, idx.shape[1], 2)
    np.testing.assert_array_equal(np.asarray(seen), own)
  for layer in (0, 2):  # Outside the route: every token, in raster order.
    seen, = inter[f"block{layer}"]["attn"]["positions"]
    np.testing.assert_array_equal(np.asarray(seen)[0], trdit.grid_positions(grid))
  assert not np.array_equal(own[0], own[1])  # Per-sample subsets: the check is not vacuous.


def test_rope_scores_depend_only_on_relative_position():
  k1, k2 = jax.random.split(jax.random.key(0))
  q = jax.random.normal(k1, (1, 1, 1, 16))
  k = jax.random.normal(k2, (1, 1, 1, 16))
  def score(pq, pk):
    rq = trdit.rope_2d(q, jnp.array([[pq]]))
    rk = trdit.rope_2d(k, jnp.array([[pk]]))
    return float(jnp.sum(rq * rk))
  assert abs(score((3, 5), (1, 2)) - score((7, 9), (5, 6))) < 1e-4
  assert abs(score((3, 5), (1, 2)) - score((3, 5), (2, 1))) > 1e-3
  # Row and column rotate different halves: swapping the axes changes the score.
  assert abs(score((0, 0), (2, 0)) - score((0, 0), (0, 2))) > 1e-3


def test_text_and_its_mask_reach_the_output():
  model = trdit_model(depth=2)
  params = trdit_random_params(model)
  x, t, c = trdit_inputs(model)
  base = model.apply({"params": params}, x, t, c)
  other = dict(c, text=c["text"].at[0, 0].add(1.0))  # A real (unmasked) token of sample 0.
  changed = model.apply({"params": params}, x, t, other)
  assert float(jnp.abs(changed[0] - base[0]).max()) > 1e-3
  np.testing.assert_allclose(np.asarray(changed[1:]), np.asarray(base[1:]), atol=1e-6)
  padded = dict(c, text=c["text"].at[0, 5].add(100.0))  # A masked-out token: ignored.
  np.testing.assert_allclose(np.asarray(model.apply({"params": params}, x, t, padded)),
                             np.asarray(base), atol=1e-5)


def test_2p5b_config_has_2p5b_params():
  c = load_config("t2i_2p5b")
  validation.validate(c)
  model = models.from_config(c)
  n = model.image_size
  shapes = jax.eval_shape(lambda: model.init(
      jax.random.key(0), jnp.zeros((1, n, n, model.channels)), jnp.zeros((1,)),
      model.example_condition(1)))
  count = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(shapes["params"]))
  print(f"TR-DiT-2.5B: {count / 1e9:.3f}B params")
  # Width 1920 or 2176, or 33/35 layers, would each fall outside this range.
  assert 2.40e9 < count < 2.55e9, count
  blocks = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(shapes["params"]["block0"]))
  assert count - 34 * blocks < 0.2e9  # The 34 blocks hold nearly all of it.
