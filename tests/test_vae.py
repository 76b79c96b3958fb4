"""SD-VAE: the Flax model on converted diffusers weights equals a PyTorch reference computed from
the same state dict; the converter names every key it cannot place; sharded decode = plain decode.

The state dict is generated here, key by key, from the diffusers AutoencoderKL layout (not from
the converter's tables), with random values; the reference is written with torch.nn.functional.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.numpy import save_file

from sgjax import config as config_lib
from sgjax import sharding
from sgjax.convert import sd_vae
from sgjax.models import vae
from tests.builders import (
  ATTN_NEW,
  ATTN_OLD,
  TINY,
  apply,
  diffusers_shapes,
  random_state_dict,
  vae_config,
  write_weights,
)

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
  model, params = vae.from_config(vc), sd_vae.load_params(vc)

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
  model, params = vae.from_config(vc), sd_vae.load_params(vc)
  z = np.random.default_rng(3).standard_normal((16, 4, 4, 4)).astype(np.float32)
  expected = apply(model, params, z / vc.scale, vae.AutoencoderKL.decode)
  mesh = sharding.build_mesh(dict(data=2, fsdp=4, tensor=1))
  with jax.set_mesh(mesh):
    zs = jax.device_put(jnp.asarray(z), sharding.batch_sharding(mesh))
    # 2 images per device in chunks of 1: the lax.map path (a larger chunk is a plain call).
    out = vae.make_decode_fn(model, vc.scale, mesh, chunk=1)(params, zs)
  assert out.sharding.spec == sharding.batch_sharding(mesh).spec
  np.testing.assert_allclose(np.asarray(out), np.asarray(expected), rtol=1e-5, atol=1e-5)
