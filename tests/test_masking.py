"""Masking (MaskDiT-style): γ=0 is the plain encoder-decoder, dropped tokens' inputs never reach
the output, token counts are static, the loss weights what it should, SG runs on mask γ, the
FLOP counter counts encoder and decoder, and bad configs are refused."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sgjax import config as config_lib
from sgjax import flops, flow, sampling, validation
from sgjax import guidance as gl
from sgjax import state as state_lib
from sgjax import train as train_lib
from sgjax.models import dit
from sgjax.sparsity import Sparsity
from tests.builders import all_shapes, guidance_config

SIZE, CH, P, WIDTH, DEC = 8, 4, 2, 64, 32
N = (SIZE // P) ** 2  # 16 tokens.


def _model(**kw):
  return dit.DiT(image_size=SIZE, channels=CH, num_classes=5, depth=2, width=WIDTH, heads=4,
                 patch_size=P, decoder_depth=1, decoder_width=DEC, decoder_heads=4, **kw)


@functools.cache  # Shared by the tests that use the same model.
def _random_params(model, seed=0):
  """Every leaf random (zero-init adaLN would make blocks identities). Shapes come from
  eval_shape and values from numpy: nothing to compile, which matters on 2 shared cores."""
  x = jnp.zeros((1, model.image_size, model.image_size, model.channels))
  shapes = jax.eval_shape(lambda: nn.unbox(model.init(jax.random.key(0), x, jnp.zeros((1,)),
                                                      jnp.zeros((1,), jnp.int32))))
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda a: jnp.asarray(0.1 * rng.standard_normal(a.shape), jnp.float32),
                      shapes["params"])


def _inputs(batch=3, seed=2):
  k1, k2 = jax.random.split(jax.random.key(seed))
  x = jax.random.normal(k1, (batch, SIZE, SIZE, CH))
  t = jax.random.uniform(k2, (batch,))
  return x, t, jnp.array([0, 4, 5][:batch])


# Jitted: op-by-op dispatch compiles every primitive separately, far slower on 2 cores.
@functools.partial(jax.jit, static_argnums=(0, 5, 6))
def _apply(model, params, x, t, y, gamma, key=0):
  return model.apply({"params": params}, x, t, y, sparsity=Sparsity(mask_gamma=gamma),
                     token_key=jax.random.key(key), mutable=["intermediates"])


def _explicit_dense(params, x, t, y):
  """The masked model at γ = 0 composed by hand from its layers: no token dropped, no mask
  token, decoder position embedding added after decoder_embed."""
  b = x.shape[0]
  dense = lambda f, name, h: nn.Dense(f).apply({"params": params[name]}, h)
  h = nn.Conv(WIDTH, (P, P), strides=(P, P), padding="VALID").apply(
      {"params": params["patch_embed"]}, x).reshape(b, N, WIDTH)
  h = h + dit.sincos_pos_embed_2d(WIDTH, SIZE // P)
  temb = dit.timestep_embedding(t, 256)
  c = (dense(WIDTH, "t_embed2", nn.silu(dense(WIDTH, "t_embed1", temb)))
       + params["y_embed"]["embedding"][y])
  for i in range(2):
    h = dit.DiTBlock(WIDTH, 4, 4.0, jnp.float32).apply({"params": params[f"block{i}"]}, h, c)
  h = dense(DEC, "decoder_embed", h) + dit.sincos_pos_embed_2d(DEC, SIZE // P)
  for i in range(1):
    h = dit.DiTBlock(DEC, 4, 4.0, jnp.float32).apply({"params": params[f"decoder_block{i}"]},
                                                      h, c)
  shift, scale = jnp.split(dense(2 * DEC, "final_adaLN", nn.silu(c)), 2, axis=-1)
  h = dit.modulate(nn.LayerNorm(use_bias=False, use_scale=False, epsilon=1e-6).apply({}, h),
                   shift, scale)
  h = dense(P * P * CH, "final_proj", h).reshape(b, SIZE // P, SIZE // P, P, P, CH)
  return h.transpose(0, 1, 3, 2, 4, 5).reshape(b, SIZE, SIZE, CH)


def test_gamma_zero_is_the_explicit_encoder_decoder():
  model = _model()
  params = _random_params(model)
  x, t, y = _inputs()
  got = jax.jit(lambda p, x, t, y: model.apply({"params": p}, x, t, y))(params, x, t, y)
  want = jax.jit(_explicit_dense)(params, x, t, y)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
  # And exactly what the masking code path gives when γ drops no token (gather/scatter of all).
  tiny, inter = _apply(model, params, x, t, y, 0.5 / N)
  np.testing.assert_array_equal(np.asarray(tiny), np.asarray(got))
  assert float(inter["intermediates"]["visible"][0].min()) == 1.0
  assert float(jnp.abs(got).mean()) > 1e-2


def test_dropped_tokens_inputs_never_reach_the_output():
  model = _model()
  params = _random_params(model)
  x, t, y = _inputs()
  out, inter = _apply(model, params, x, t, y, 0.5, key=3)
  visible = np.asarray(inter["intermediates"]["visible"][0])  # (B, H, W, 1)
  assert visible.shape == (3, SIZE, SIZE, 1)
  assert (visible.reshape(3, -1).sum(1) == (N - N // 2) * P * P).all()
  assert not np.array_equal(visible[0], visible[1])  # Per-sample subsets.
  noise = 10.0 * jax.random.normal(jax.random.key(9), x.shape)
  moved = x + noise * (1.0 - visible)  # Only the dropped tokens' pixels change.
  out2, inter2 = _apply(model, params, moved, t, y, 0.5, key=3)
  enc, enc2 = inter["intermediates"]["encoder_out"][0], inter2["intermediates"]["encoder_out"][0]
  assert enc.shape == (3, N - N // 2, WIDTH)
  np.testing.assert_array_equal(np.asarray(enc2), np.asarray(enc))
  np.testing.assert_array_equal(np.asarray(out2), np.asarray(out))
  seen = x + noise * visible  # Control: moving kept tokens' pixels does change the output.
  out3, _ = _apply(model, params, seen, t, y, 0.5, key=3)
  assert float(jnp.abs(out3 - out).max()) > 1e-2


def test_masked_shapes_are_static_under_jit():
  model = _model()
  params = _random_params(model)
  x, t, y = _inputs()
  fn = jax.jit(lambda p, x, t, y, k: model.apply({"params": p}, x, t, y,
                                                   sparsity=Sparsity(mask_gamma=0.75),
                                                   token_key=k))
  shapes = all_shapes(jax.make_jaxpr(fn)(params, x, t, y, jax.random.key(0)).jaxpr)
  keep = N - int(N * 0.75)
  assert (3, keep, WIDTH) in shapes  # The encoder runs on the kept tokens only.
  assert (3, N, DEC) in shapes  # The decoder on all of them.
  assert fn(params, x, t, y, jax.random.key(1)).shape == x.shape


def test_masked_loss_weights_visible_flow_and_masked_reconstruction():
  rng = np.random.default_rng(0)
  data, noise, v = (rng.standard_normal((2, 4, 4, 1)).astype(np.float32) for _ in range(3))
  t = np.array([0.2, 0.7], np.float32)
  visible = (rng.random((2, 4, 4, 1)) < 0.5).astype(np.float32)
  got = flow.masked_loss(lambda x_t, tt, y: (jnp.asarray(v), jnp.asarray(visible)), data,
                         noise, t, np.zeros(2, np.int32), recon_weight=0.3)
  err = (v - (data - noise)) ** 2
  x_t = t[:, None, None, None] * data + (1 - t[:, None, None, None]) * noise
  data_hat = x_t + (1 - t[:, None, None, None]) * v  # The model's data estimate.
  want = (err[visible == 1].mean()
          + 0.3 * ((data_hat - data) ** 2)[visible == 0].mean())
  np.testing.assert_allclose(float(got), want, rtol=1e-5)
  # Nothing masked: the plain flow-matching loss.
  plain = flow.loss(lambda x_t, tt, y: jnp.asarray(v), data, noise, t, None)
  ones = flow.masked_loss(lambda x_t, tt, y: (jnp.asarray(v), jnp.ones_like(v)), data, noise,
                          t, None, recon_weight=0.3)
  np.testing.assert_allclose(float(ones), float(plain), rtol=1e-6)


def _load(name):
  return config_lib.load_config_file(name)


def test_masked_train_step_reaches_mask_token_and_decoder():
  c = _load("fashion_mnist_mask")
  c.model.update(depth=1, width=32, heads=2, decoder_depth=1, decoder_width=16, decoder_heads=2)
  c.data.update(image_size=8, channels=1)
  c.train.update(batch_size=4, warmup_steps=0)
  validation.validate(c)
  model = dit.from_config(c)
  tx = state_lib.make_optimizer(c.train)
  params = _random_params(model)
  state = dict(step=jnp.zeros((), jnp.int32), params=params, ema=params,
               opt_state=jax.jit(tx.init)(params), rng=jax.random.key_data(jax.random.key(0)))
  step = jax.jit(train_lib.make_train_step(c, model, tx))
  batch = dict(image=jax.random.normal(jax.random.key(1), (4, 8, 8, 1)),
               label=jnp.arange(4) % 10)
  new, metrics = step(state, batch)
  assert np.isfinite(float(metrics["loss"])) and float(metrics["loss"]) > 0
  moved = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), new["params"], state["params"])
  assert moved["mask_token"] > 0 and moved["decoder_block0"]["fc2"]["kernel"] > 0
  assert moved["block0"]["fc2"]["kernel"] > 0


def test_sg_on_mask_gamma_runs_in_guidance_and_sampling():
  c = _load("fashion_mnist_mask")
  # with_gamma moves the mechanism the model was trained with: here the mask γ.
  template = Sparsity.from_config(c.sparsity)
  assert template.with_gamma(0.3) == Sparsity(mask_gamma=0.3)
  model = _model()
  params = {gl.MAIN: _random_params(model)}
  plan = gl.plan(guidance_config("sg", omega=2.0, gs=0.0, gw=0.5), template, N, flow.time_grid(3))
  g = plan.segments[0].guidance
  assert (g.strong.sparsity, g.weak.sparsity) == (Sparsity(), Sparsity(mask_gamma=0.5))
  x, t, y = _inputs()
  velocity = sampling.make_velocity_fn(model)
  keys = tuple(jax.random.split(jax.random.key(4)))

  @jax.jit
  def guided_and_branches(p, x, t, y, k):
    return (gl.guided_velocity(velocity, p, x, t, y, 5, g, k),
            velocity(p[gl.MAIN], x, t, y, g.strong.sparsity, k[0]),
            velocity(p[gl.MAIN], x, t, y, g.weak.sparsity, k[1]))

  guided, strong, weak = guided_and_branches(params, x, t, y, keys)
  np.testing.assert_allclose(np.asarray(guided), np.asarray(2 * strong - weak), rtol=1e-5,
                             atol=1e-5)
  assert float(jnp.abs(strong - weak).max()) > 1e-2
  labels = jnp.arange(8) % 5
  a = np.asarray(sampling.sample(model, params, labels, jax.random.key(0), plan=plan))
  assert a.shape == (8, SIZE, SIZE, CH) and np.isfinite(a).all()
  np.testing.assert_array_equal(
      a, np.asarray(sampling.sample(model, params, labels, jax.random.key(0), plan=plan)))


def test_flops_of_a_masked_model_by_hand():
  c = config_lib.base_config()
  c.model.update(depth=2, width=64, heads=4, patch_size=2, decoder_depth=2, decoder_width=32,
                 decoder_heads=4)
  c.data.update(image_size=8, channels=4, num_classes=5)
  m = flops.forward_macs(c, Sparsity(mask_gamma=0.5))
  # 16 tokens, 8 kept. Patch embed 16·16·64 + final projection 16·32·16; encoder blocks
  # 8 tokens × 2 × (4·64² + 2·64·256 + 4·64); decoder_embed 8·64·32; decoder blocks
  # 16 × 2 × (4·32² + 2·32·128 + 4·32).
  assert m.linear == 16384 + 8192 + 790528 + 16384 + 397312
  # adaLN: 6·64² per encoder block, 6·64·32 per decoder block, 2·64·32 final.
  assert m.per_sample == 49152 + 24576 + 4096
  # 2·n²·width per block: encoder at 8 tokens, decoder at 16.
  assert m.attention == 2 * (2 * 64 * 64) + 2 * (2 * 256 * 32)
  dense = flops.forward_macs(c, Sparsity())
  assert dense.linear == 16384 + 8192 + 2 * 790528 + 2 * 16384 + 397312


@pytest.mark.parametrize("field, value, message", [
    ("sparsity.mask_gamma", 1.0, r"sparsity.mask_gamma = 1.0: out of range; allowed: a finite "
                                 r"number in \[0, 1\)"),
    ("sparsity.routes", ((1, 4, 0.5),), r"sparsity.routes = .*routes and masking together"),
    ("model.decoder_width", 90, r"model.decoder_width = 90: must be a positive multiple of 4"),
    ("model.decoder_depth", -1, r"model.decoder_depth = -1: out of range; allowed: an int >= 0"),
    ("train.mask_loss_weight", -0.1, r"train.mask_loss_weight = -0.1: out of range"),
    ("train.objective", "flow", r"train.objective = 'flow': a masked model .* set "
                                r"train.objective = 'masked'"),
    ("train.objective", "mae", r"train.objective = 'mae': unknown value; allowed: one of "
                               r"'flow', 'masked'"),
])
def test_bad_masking_configs_are_rejected(field, value, message):
  c = _load("fashion_mnist_mask")
  node, leaf = field.split(".")
  c[node][leaf] = value
  with pytest.raises(ValueError, match=message):
    validation.validate(c, num_devices=8)


def test_mask_gamma_needs_a_decoder():
  c = _load("fashion_mnist")
  c.sparsity.update(routes=(), mask_gamma=0.5)
  with pytest.raises(ValueError, match=r"sparsity.mask_gamma = 0.5: masking needs a decoder"):
    validation.validate(c, num_devices=8)
  c.sparsity.mask_gamma = 0.0
  c.train.objective = "masked"  # MaskDiT's loss reads what the encoder saw: a decoder's model.
  with pytest.raises(ValueError, match=r"train.objective = 'masked': needs a masked model"):
    validation.validate(c, num_devices=8)
  with pytest.raises(ValueError, match="needs a masked model"):
    dit.DiT(image_size=8, channels=1, num_classes=2, depth=1, width=8, heads=2,
            patch_size=2).init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)), jnp.zeros(1),
                               jnp.zeros(1, jnp.int32), sparsity=Sparsity(mask_gamma=0.5),
                               token_key=jax.random.key(0))


@pytest.mark.parametrize("name", ["fashion_mnist_mask", "imagenet256_mask"])
def test_masked_configs_validate(name):
  c = _load(name)
  validation.validate(c, num_devices=8)
  assert c.model.decoder_depth > 0 and c.sparsity.mask_gamma == 0.5 and not c.sparsity.routes
  if name == "imagenet256_mask":
    assert (c.model.depth, c.model.width, c.model.decoder_depth, c.model.decoder_width,
            c.model.decoder_heads) == (28, 1152, 8, 512, 16)
