"""Text conditioning through the shared code: SG keeps the text in both branches, CFG+SG's weak
branch gets the empty prompt, text dropout, the train step on the 8-device mesh, and sampling."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sgjax import condition, flow, models, sampling, sharding, train, validation
from sgjax import config as config_lib
from sgjax import guidance as gl
from sgjax import state as state_lib
from sgjax.sparsity import Sparsity
from tests.builders import (
  CROP,
  VAE,
  WordEncoder,
  tiny_t2i_config,
  trdit_inputs,
  trdit_model,
  trdit_random_params,
  write_weights,
)

L, D = 4, 3
NULL_VALUE = -50.0  # Every entry of the "empty prompt" features in the probes below.


def _text(values):
  """A condition whose text features of sample i are all values[i] (mask: all tokens)."""
  v = jnp.asarray(values, jnp.float32)
  return {"text": jnp.broadcast_to(v[:, None, None], (len(values), L, D)),
          "text_mask": jnp.ones((len(values), L), bool)}


NULL = {"text": jnp.full((L, D), NULL_VALUE), "text_mask": jnp.ones((L,), bool)}


def _text_probe(params, x, t, cond, sparsity, key):
  """A 'model' whose velocity is params + (text value) + 100·γ: shows what each branch got."""
  del t, key
  gamma = sparsity.routes[0].gamma if sparsity.routes else 0.0
  value = cond["text"][:, 0, 0]
  return jnp.broadcast_to((params + value + 100 * gamma)[:, None, None, None], x.shape)


@pytest.mark.parametrize("rule, weak_text, weak_gamma, weak_weights", [
    ("sg", "cond", 0.75, 0.0), ("cfg_sg", "null", 0.75, 0.0), ("cfg", "null", 0.0, 0.0),
    ("ag_sg", "cond", 0.75, 1000.0)])
def test_branches_receive_the_right_text(rule, weak_text, weak_gamma, weak_weights):
  g_cfg = config_lib.base_config().sample.guidance
  g_cfg.update(rule=rule, omega=3.0, gamma_strong=0.25, gamma_weak=0.75, guide_step=0)
  g = gl.from_config(g_cfg, Sparsity.from_routes([(1, 2, 0.0)]), 100)
  values = np.array([1.0, 2.0, 7.0])
  v = gl.guided_velocity(_text_probe, {gl.MAIN: 0.0, gl.GUIDE: 1000.0}, jnp.zeros((3, 2, 2, 1)),
                         jnp.zeros(3), _text(values), NULL, g,
                         tuple(jax.random.split(jax.random.key(0))))[:, 0, 0, 0]
  v_strong = values + 100 * (0.0 if rule == "cfg" else 0.25)
  v_weak = weak_weights + (values if weak_text == "cond" else NULL_VALUE) + 100 * weak_gamma
  np.testing.assert_allclose(np.asarray(v), 3.0 * v_strong - 2.0 * v_weak, rtol=1e-6)


def test_drop_condition_on_text_and_labels():
  key = jax.random.key(4)
  cond = _text(np.arange(1.0, 65.0))
  cond["text_mask"] = cond["text_mask"].at[:, 3].set(False)
  dropped = flow.drop_condition(key, cond, 0.5, NULL)
  is_null = np.asarray(dropped["text"][:, 0, 0]) == NULL_VALUE
  assert 10 < is_null.sum() < 54  # About half.
  np.testing.assert_array_equal(np.asarray(dropped["text_mask"][:, 3]), is_null)  # Null's mask.
  np.testing.assert_array_equal(np.asarray(dropped["text"])[~is_null],
                                np.asarray(cond["text"])[~is_null])
  # Labels: the same draws give exactly drop_labels (the class path is unchanged).
  labels = jnp.arange(64) % 7
  np.testing.assert_array_equal(np.asarray(flow.drop_condition(key, labels, 0.5, 10)),
                                np.asarray(flow.drop_labels(key, labels, 0.5, 10)))
  np.testing.assert_array_equal(np.asarray(flow.drop_condition(key, labels, 0.5, 10) == 10),
                                is_null)


def test_trdit_sg_and_cfg_sg_branches_on_the_real_model():
  model = trdit_model()
  params = trdit_random_params(model)
  x, t, c = trdit_inputs(model)
  null = {"text": jax.random.normal(jax.random.key(9), (model.text_tokens, model.text_width)),
          "text_mask": jnp.arange(model.text_tokens) < 2}
  # Jitted (the sparsity static, as in the sampler): one compile per branch setting and batch
  # instead of an eager dispatch per op; every side of each comparison goes through it.
  velocity = jax.jit(sampling.make_velocity_fn(model), static_argnums=4)
  routes = Sparsity.from_routes([(1, 1, 0.5)])
  k0, k1 = jax.random.split(jax.random.key(7))
  strong, weak = routes.with_gamma(0.25), routes.with_gamma(0.5)
  v_c = velocity(params, x, t, c, strong, k0)
  # SG: the weak branch is conditional on the same text.
  sg = gl.Guidance("sg", 2.5, gl.Branch(True, strong), gl.Branch(True, weak))
  got = gl.guided_velocity(velocity, {gl.MAIN: params}, x, t, c, null, sg, (k0, k1))
  want = 2.5 * v_c - 1.5 * velocity(params, x, t, c, weak, k1)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
  # CFG+SG: the weak branch gets the empty prompt's features and mask.
  cfg_sg = gl.Guidance("cfg_sg", 2.5, gl.Branch(True, strong), gl.Branch(False, weak))
  got = gl.guided_velocity(velocity, {gl.MAIN: params}, x, t, c, null, cfg_sg, (k0, k1))
  null_b = condition.null_like(c, null)
  want = 2.5 * v_c - 1.5 * velocity(params, x, t, null_b, weak, k1)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
  wrong = 2.5 * v_c - 1.5 * velocity(params, x, t, c, weak, k1)
  assert float(jnp.abs(want - wrong).max()) > 1e-3  # Null and real text really differ.
  assert float(jnp.abs(v_c - velocity(params, x, t, c, Sparsity(), k0)).max()) > 1e-3  # γ acts.
  # CFG batches both dense branches: equal to two separate forwards.
  cfg = gl.Guidance("cfg", 2.0, gl.Branch(True, Sparsity()), gl.Branch(False, Sparsity()))
  got = gl.guided_velocity(velocity, {gl.MAIN: params}, x, t, c, null, cfg, (k0, k1))
  want = (2.0 * velocity(params, x, t, c, Sparsity(), k0)
          - velocity(params, x, t, null_b, Sparsity(), k0))
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


def _t2i_batch(c, seed):
  k1, k2 = jax.random.split(jax.random.key(seed))
  b, n, tx = c.train.batch_size, c.data.image_size, c.text
  return dict(image=jax.random.uniform(k1, (b, n, n, 1), minval=-1, maxval=1),
              text=jax.random.normal(k2, (b, tx.max_tokens, tx.width)),
              text_mask=jnp.arange(tx.max_tokens)[None] < (2 + jnp.arange(b)[:, None] % 4))


def test_train_step_on_the_8_device_mesh():
  c = tiny_t2i_config()
  validation.validate(c, 8)
  mesh = sharding.build_mesh(dict(data=2, fsdp=2, tensor=2))
  model = models.from_config(c)
  tx = state_lib.make_optimizer(c.train)
  _, shardings = state_lib.abstract_state_and_shardings(model, tx, c.seed, mesh)
  null = {"text": jnp.zeros((c.text.max_tokens, c.text.width)),
          "text_mask": jnp.arange(c.text.max_tokens) < 2}
  batch = _t2i_batch(c, 0)
  with jax.set_mesh(mesh):
    state = state_lib.fresh_state(model, tx, c.seed, shardings)
    step = jax.jit(train.make_train_step(c, model, tx, null),
                   in_shardings=(shardings, sharding.batch_sharding(mesh)),
                   out_shardings=(shardings, sharding.replicated(mesh)))
    p0 = jax.device_get(state["params"])
    losses = []
    for _ in range(3):
      state, m = step(state, jax.device_put(batch, sharding.batch_sharding(mesh)))
      losses.append(float(m["loss"]))
  assert all(np.isfinite(losses)) and losses[-1] < losses[0], losses
  w = state["params"]["block0"]["mlp"]["w13"]["kernel"]
  assert w.sharding.shard_shape(w.shape) == (32, w.shape[1] // 2)  # fsdp × tensor split.
  # The text path is trained: the cross-attention's key/value projection moved.
  kv0 = p0["block1"]["cross"]["kv"]["kernel"]
  kv = jax.device_get(state["params"]["block1"]["cross"]["kv"]["kernel"])
  assert float(np.abs(kv - kv0).max()) > 1e-5


def test_sampling_with_text_is_deterministic_and_uses_the_null():
  c = tiny_t2i_config()
  validation.validate(c, 8)
  model = models.from_config(c)
  params = {gl.MAIN: trdit_random_params(model)}
  batch = _t2i_batch(c, 1)
  cond = {"text": batch["text"][:8], "text_mask": batch["text_mask"][:8]}
  null = {"text": jnp.zeros((c.text.max_tokens, c.text.width)),
          "text_mask": jnp.arange(c.text.max_tokens) < 2}
  plan = gl.config_plan(c)
  key = jax.random.key(0)
  a = sampling.sample(model, params, cond, key, plan=plan, null=null)
  b = sampling.sample(model, params, cond, key, plan=plan, null=null)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert a.shape == (8, 16, 16, 1) and np.all(np.isfinite(np.asarray(a)))
  other = dict(null, text=null["text"] + 1.0)
  d = sampling.sample(model, params, cond, key, plan=plan, null=other)
  assert float(jnp.abs(a - d).max()) > 1e-4  # CFG+SG's weak branch reads the null text.


def test_sample_mode_draws_each_prompt_through_the_encoder(tmp_path, monkeypatch):
  from sgjax import checkpoint
  from sgjax.jobs import sample as sample_job
  from sgjax.text import encoder as encoder_lib
  monkeypatch.setitem(encoder_lib.ENCODERS, "words", WordEncoder)
  c = tiny_t2i_config()
  c.text.encoder = "words"
  c.sample.update(prompts=("a pullover", "an ankle boot"), per_class=3)  # 6 images, batch 8.
  c.mesh.update(data=-1, fsdp=1, tensor=1)
  model = models.from_config(c)
  weights = trdit_random_params(model)  # Non-zero adaLN: the text changes the images.
  mesh = sharding.build_mesh(c.mesh)
  state = state_lib.fresh_state(model, state_lib.make_optimizer(c.train), 0)
  state = dict(state, params=weights, ema=weights, step=jnp.asarray(4, jnp.int32))
  mngr = checkpoint.manager(str(tmp_path / "checkpoints"), async_save=False)
  checkpoint.save(mngr, 4, state, None)
  mngr.close()

  png = sample_job.run(c, str(tmp_path))
  out = np.load(str(tmp_path / "samples_cfg_sg.npz"))
  assert png.endswith("samples_cfg_sg.png") and os.path.exists(png)
  assert list(out["prompts"]) == ["a pullover"] * 3 + ["an ankle boot"] * 3
  assert int(out["step"]) == 4

  # The same images as sampling the encoder's features directly, with ∅ = the empty prompt.
  text, mask = WordEncoder().encode(["a pullover"] * 3 + ["an ankle boot"] * 3 + [""] * 3, 6)
  cond = {"text": text[:8], "text_mask": mask[:8]}
  cond["text"][6:], cond["text_mask"][6:] = text[5], mask[5]  # Padding repeats the last row.
  with jax.set_mesh(mesh):
    x = sampling.sample(model, {gl.MAIN: weights}, cond,
                        jax.random.fold_in(jax.random.key(c.sample.seed), 0),
                        plan=gl.config_plan(c),
                        null={"text": text[-1], "text_mask": mask[-1]})
  np.testing.assert_array_equal(out["arr_0"], sampling.to_uint8(np.asarray(x))[:6])
  assert not np.array_equal(out["arr_0"][0], out["arr_0"][3])  # The prompt matters.

  c.sample.prompts = ()
  with pytest.raises(ValueError, match=r"sample.prompts = \(\)"):
    sample_job.run(c, str(tmp_path))


def test_a_latent_text_model_samples_pixels_through_the_generation_path(tmp_path, monkeypatch):
  """Prompts -> guided sampler -> SD-VAE decode -> uint8: a text model on latents writes
  images, not latents (the text path once skipped the decode)."""
  from sgjax import checkpoint
  from sgjax.convert import sd_vae
  from sgjax.jobs import sample as sample_job
  from sgjax.text import encoder as encoder_lib
  monkeypatch.setitem(encoder_lib.ENCODERS, "words", WordEncoder)
  c = tiny_t2i_config()
  c.text.encoder = "words"
  c.data.update(name="latents", image_size=CROP // 2, channels=VAE["latent_channels"])
  c.vae.update(VAE, weights=write_weights(tmp_path / "vae.safetensors", **VAE), chunk=4)
  c.encode.image_size = CROP
  c.sample.update(prompts=("a pullover", "an ankle boot"), per_class=3)
  validation.validate(c, jax.device_count())
  model = models.from_config(c)
  weights = trdit_random_params(model)
  mesh = sharding.build_mesh(c.mesh)
  state = state_lib.fresh_state(model, state_lib.make_optimizer(c.train), 0)
  mngr = checkpoint.manager(str(tmp_path / "checkpoints"), async_save=False)
  checkpoint.save(mngr, 4, dict(state, params=weights, ema=weights), None)
  mngr.close()

  sample_job.run(c, str(tmp_path))
  out = np.load(str(tmp_path / "samples_cfg_sg.npz"))["arr_0"]
  assert out.shape == (6, CROP, CROP, 3) and out.dtype == np.uint8  # Pixels, RGB, 2x the latents.
  assert len(np.unique(out)) > 10 and not np.array_equal(out[0], out[3])

  # The same pixels as sampling the latents directly and decoding them with the VAE.
  text, mask = WordEncoder().encode(["a pullover"] * 3 + ["an ankle boot"] * 3 + [""], 6)
  cond = {"text": np.concatenate([text[:6], text[5:6].repeat(2, 0)]),
          "text_mask": np.concatenate([mask[:6], mask[5:6].repeat(2, 0)])}
  with jax.set_mesh(mesh):
    z = sampling.sample(model, {gl.MAIN: weights}, cond,
                        jax.random.fold_in(jax.random.key(c.sample.seed), 0),
                        plan=gl.config_plan(c),
                        null={"text": text[-1], "text_mask": mask[-1]})
    want = sd_vae.to_pixels(c, mesh, jax.device_put(z, sharding.batch_sharding(mesh)))
  np.testing.assert_array_equal(out, sampling.to_uint8(np.asarray(want))[:6])
