"""SD-VAE: the Flax model on converted diffusers weights equals a PyTorch reference computed from
the same state dict; the converter names every key it cannot place; sharded decode = plain decode.

The state dict is generated here, key by key, from the diffusers AutoencoderKL layout (not from
the converter's tables), with random values; the reference is written with torch.nn.functional.
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.numpy import save_file

from sgjax import config as config_lib
from sgjax import sharding
from sgjax.models import vae
from third_party import sd_vae

TINY = dict(block_out_channels=(8, 16), layers_per_block=1, latent_channels=4, in_channels=3,
            norm_groups=4)
ATTN_NEW = ("to_q", "to_k", "to_v", "to_out.0")
ATTN_OLD = ("query", "key", "value", "proj_attn")


def diffusers_shapes(block_out_channels, layers_per_block, latent_channels, in_channels,
                     old_attention=False, conv_attention=False, **_):
  """{key: shape} of a diffusers AutoencoderKL state dict (Encoder/Decoder of diffusers' vae.py)."""
  shapes = {}

  def conv(name, out, inp, k):
    shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (out, inp, k, k), (out,)

  def norm(name, c):
    shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (c,), (c,)

  def resnet(name, inp, out):
    norm(f"{name}.norm1", inp)
    conv(f"{name}.conv1", out, inp, 3)
    norm(f"{name}.norm2", out)
    conv(f"{name}.conv2", out, out, 3)
    if inp != out:
      conv(f"{name}.conv_shortcut", out, inp, 1)

  def mid(name, c):
    resnet(f"{name}.resnets.0", c, c)
    norm(f"{name}.attentions.0.group_norm", c)
    for proj in ATTN_OLD if old_attention else ATTN_NEW:
      p = f"{name}.attentions.0.{proj}"
      shapes[f"{p}.weight"] = (c, c, 1, 1) if conv_attention else (c, c)
      shapes[f"{p}.bias"] = (c,)
    resnet(f"{name}.resnets.1", c, c)

  ch, last = tuple(block_out_channels), len(block_out_channels) - 1
  conv("encoder.conv_in", ch[0], in_channels, 3)
  prev = ch[0]
  for i, c in enumerate(ch):
    for j in range(layers_per_block):
      resnet(f"encoder.down_blocks.{i}.resnets.{j}", prev, c)
      prev = c
    if i < last:
      conv(f"encoder.down_blocks.{i}.downsamplers.0.conv", c, c, 3)
  mid("encoder.mid_block", ch[-1])
  norm("encoder.conv_norm_out", ch[-1])
  conv("encoder.conv_out", 2 * latent_channels, ch[-1], 3)
  conv("quant_conv", 2 * latent_channels, 2 * latent_channels, 1)
  conv("post_quant_conv", latent_channels, latent_channels, 1)
  rev = ch[::-1]
  conv("decoder.conv_in", rev[0], latent_channels, 3)
  mid("decoder.mid_block", rev[0])
  prev = rev[0]
  for i, c in enumerate(rev):
    for j in range(layers_per_block + 1):
      resnet(f"decoder.up_blocks.{i}.resnets.{j}", prev, c)
      prev = c
    if i < last:
      conv(f"decoder.up_blocks.{i}.upsamplers.0.conv", c, c, 3)
  norm("decoder.conv_norm_out", ch[0])
  conv("decoder.conv_out", in_channels, ch[0], 3)
  return shapes


def random_state_dict(seed=0, **arch):
  rng = np.random.default_rng(seed)
  state = {}
  for name, shape in diffusers_shapes(**arch).items():
    if name.endswith(".bias"):
      v = 0.1 * rng.standard_normal(shape)
    elif len(shape) == 1:  # GroupNorm scale.
      v = 1.0 + 0.1 * rng.standard_normal(shape)
    else:  # Fan-in scaled, so activations stay O(1) through the blocks.
      v = rng.standard_normal(shape) / np.sqrt(np.prod(shape[1:]))
    state[name] = v.astype(np.float32)
  return state


def write_weights(path, seed=0, **arch) -> str:
  save_file(random_state_dict(seed, **(arch or TINY)), str(path))
  return str(path)


def apply(model, params, x, method):
  """model.apply jitted (one compile instead of an eager compile per op)."""
  return jax.jit(model.apply, static_argnames="method")({"params": params}, x, method=method)


def vae_config(weights="", **arch) -> ml_collections.ConfigDict:
  vc = config_lib.base_config().vae
  vc.update(dict(TINY, **arch), weights=weights)
  return vc


# ---- The PyTorch reference, straight from the state dict (NCHW, float64).


def torch_vae(state, groups, old_attention=False):
  sd = {k: torch.from_numpy(np.asarray(v, np.float64)) for k, v in state.items()}
  has = lambda n: f"{n}.weight" in sd
  conv = lambda x, n, stride=1, pad=1: F.conv2d(x, sd[f"{n}.weight"], sd[f"{n}.bias"], stride, pad)
  norm = lambda x, n: F.group_norm(x, groups, sd[f"{n}.weight"], sd[f"{n}.bias"], eps=1e-6)

  def resnet(x, n):
    h = conv(F.silu(norm(x, f"{n}.norm1")), f"{n}.conv1")
    h = conv(F.silu(norm(h, f"{n}.norm2")), f"{n}.conv2")
    return (conv(x, f"{n}.conv_shortcut", pad=0) if has(f"{n}.conv_shortcut") else x) + h

  def attention(x, n):
    b, c, hh, ww = x.shape
    q_, k_, v_, o_ = (f"{n}.{p}" for p in (ATTN_OLD if old_attention else ATTN_NEW))
    lin = lambda t, p: F.linear(t, sd[f"{p}.weight"].reshape(c, c), sd[f"{p}.bias"])
    t = norm(x, f"{n}.group_norm").reshape(b, c, hh * ww).transpose(1, 2)
    q, k, v = lin(t, q_), lin(t, k_), lin(t, v_)
    a = torch.softmax(q @ k.transpose(1, 2) / c ** 0.5, dim=-1)
    return x + lin(a @ v, o_).transpose(1, 2).reshape(b, c, hh, ww)

  def mid(x, n):
    return resnet(attention(resnet(x, f"{n}.resnets.0"), f"{n}.attentions.0"), f"{n}.resnets.1")

  def blocks(x, kind):
    i = 0
    while f"{kind}.{i}.resnets.0.norm1.weight" in sd:
      j = 0
      while f"{kind}.{i}.resnets.{j}.norm1.weight" in sd:
        x = resnet(x, f"{kind}.{i}.resnets.{j}")
        j += 1
      if has(f"{kind}.{i}.downsamplers.0.conv"):
        x = conv(F.pad(x, (0, 1, 0, 1)), f"{kind}.{i}.downsamplers.0.conv", stride=2, pad=0)
      if has(f"{kind}.{i}.upsamplers.0.conv"):
        x = conv(F.interpolate(x, scale_factor=2, mode="nearest"), f"{kind}.{i}.upsamplers.0.conv")
      i += 1
    return x

  def encode(x):
    h = blocks(conv(x, "encoder.conv_in"), "encoder.down_blocks")
    h = mid(h, "encoder.mid_block")
    h = conv(F.silu(norm(h, "encoder.conv_norm_out")), "encoder.conv_out")
    mean, logvar = conv(h, "quant_conv", pad=0).chunk(2, dim=1)
    return mean, logvar.clamp(-30.0, 20.0)

  def decode(z):
    h = mid(conv(conv(z, "post_quant_conv", pad=0), "decoder.conv_in"), "decoder.mid_block")
    h = blocks(h, "decoder.up_blocks")
    return conv(F.silu(norm(h, "decoder.conv_norm_out")), "decoder.conv_out")

  return encode, decode


def _nchw(x):
  return torch.from_numpy(np.asarray(x, np.float64).transpose(0, 3, 1, 2))


def _nhwc(t):
  return t.numpy().transpose(0, 2, 3, 1)


@pytest.mark.parametrize("naming", ["new", "old_linear", "old_1x1_conv"])
def test_converted_flax_vae_equals_torch_reference(tmp_path, naming):
  old, conv_attn = naming != "new", naming == "old_1x1_conv"
  arch = dict(TINY, old_attention=old, conv_attention=conv_attn)
  state = random_state_dict(1, **arch)
  path = tmp_path / "diffusion_pytorch_model.safetensors"
  save_file(state, str(path))
  vc = vae_config(str(path))
  model, params = vae.from_config(vc), vae.load_params(vc)

  rng = np.random.default_rng(2)
  x = rng.uniform(-1, 1, (2, 16, 12, 3)).astype(np.float32)  # Non-square: catches H/W swaps.
  z = rng.standard_normal((2, 8, 6, 4)).astype(np.float32)
  mean, logvar = apply(model, params, x, vae.AutoencoderKL.encode)
  pixels = apply(model, params, z, vae.AutoencoderKL.decode)

  t_encode, t_decode = torch_vae(state, TINY["norm_groups"], old_attention=old)
  with torch.no_grad():
    t_mean, t_logvar = t_encode(_nchw(x))
    t_pixels = t_decode(_nchw(z))
  assert mean.shape == (2, 8, 6, 4) and pixels.shape == (2, 16, 12, 3)
  for ours, ref in ((mean, t_mean), (logvar, t_logvar), (pixels, t_pixels)):
    ref = _nhwc(ref)
    assert np.abs(ref).max() > 0.1  # Not a degenerate all-zero comparison.
    np.testing.assert_allclose(np.asarray(ours), ref, rtol=1e-4, atol=1e-4)


def test_full_size_sd_vae_layout_is_covered():
  """The default architecture (sd-vae-ft-ema) maps onto exactly the diffusers keys and shapes."""
  vc = config_lib.base_config().vae
  abstract = vae.abstract_params(vae.from_config(vc))
  shapes = diffusers_shapes(tuple(vc.block_out_channels), vc.layers_per_block,
                            vc.latent_channels, vc.in_channels)
  assert len(shapes) == 248  # The tensor count of sd-vae-ft-ema's diffusers file.
  state = {k: np.zeros(s, np.float32) for k, s in shapes.items()}
  params = sd_vae.convert(state, abstract)
  count = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(params))
  assert count == sum(int(np.prod(s)) for s in shapes.values()) == 83_653_863


def test_converter_names_missing_unused_and_misshaped_keys():
  abstract = vae.abstract_params(vae.from_config(vae_config()))
  state = random_state_dict(0, **TINY)
  bad = dict(state)
  del bad["decoder.mid_block.attentions.0.to_k.bias"]
  bad["encoder.extra.weight"] = np.zeros(3, np.float32)
  bad["encoder.conv_in.weight"] = np.zeros((8, 3, 5, 5), np.float32)
  with pytest.raises(ValueError) as err:
    sd_vae.convert(bad, abstract)
  msg = str(err.value)
  attn = "decoder.mid_block.attentions.0"
  assert f"{attn}.to_k.bias or {attn}.key.bias" in msg  # Both names it looked for.
  assert "encoder.extra.weight" in msg
  assert "encoder.conv_in.weight: file (8, 3, 5, 5), expected (3, 3, 3, 8)" in msg
  # Another architecture's file is refused, not silently half-loaded.
  with pytest.raises(ValueError, match="read by nothing"):
    sd_vae.convert(state, vae.abstract_params(vae.from_config(vae_config(layers_per_block=0))))


def test_sharded_chunked_decode_equals_plain_decode(tmp_path):
  vc = vae_config(write_weights(tmp_path / "w.safetensors"))
  model, params = vae.from_config(vc), vae.load_params(vc)
  z = np.random.default_rng(3).standard_normal((16, 4, 4, 4)).astype(np.float32)
  expected = apply(model, params, z / vc.scale, vae.AutoencoderKL.decode)
  mesh = sharding.build_mesh(dict(data=2, fsdp=4, tensor=1))
  with jax.set_mesh(mesh):
    zs = jax.device_put(jnp.asarray(z), sharding.batch_sharding(mesh))
    # 2 images per device in chunks of 1: the lax.map path (a larger chunk is a plain call).
    out = vae.make_decode_fn(model, vc.scale, mesh, chunk=1)(params, zs)
  assert out.sharding.spec == sharding.batch_sharding(mesh).spec
  np.testing.assert_allclose(np.asarray(out), np.asarray(expected), rtol=1e-5, atol=1e-5)
