"""The SD-VAE (diffusers' AutoencoderKL: `sd-vae-ft-ema` / `sd-vae-ft-mse`) in Flax linen, NHWC.

Only what the latent models need: `encode` (pixels in [-1, 1] -> posterior mean and log-variance)
and `decode` (latents -> pixels). Module names mirror the diffusers state dict
(`down_blocks_0/resnets_1/conv1` <-> `down_blocks.0.resnets.1.conv1`), so the converter in
`sgjax/convert/sd_vae.py` is a rename plus layout transposes. Latents are stored and generated
multiplied by `scale` (0.18215), so they have roughly unit variance; the decode
(sgjax.convert.sd_vae.to_pixels) divides it out.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import PartitionSpec as P

from sgjax import errors, sharding

EPS = 1e-6  # Every GroupNorm of the SD-VAE.
LOGVAR_RANGE = (-30.0, 20.0)  # diffusers clamps the posterior log-variance to this.


def _group_norm(groups: int, name: str) -> nn.GroupNorm:
  # Two-pass variance: E[x²]−E[x]² loses digits on large activations (parity with PyTorch).
  return nn.GroupNorm(num_groups=groups, epsilon=EPS, use_fast_variance=False, name=name)


def _conv(features: int, kernel: int, name: str, dtype: Any, stride: int = 1,
          padding: Any = "SAME") -> nn.Conv:
  return nn.Conv(features, (kernel, kernel), (stride, stride), padding=padding, dtype=dtype,
                 param_dtype=jnp.float32, name=name)


class ResnetBlock(nn.Module):
  """GroupNorm-SiLU-conv twice, plus a 1x1 conv shortcut when the width changes."""

  features: int
  groups: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    h = _conv(self.features, 3, "conv1", self.dtype)(nn.silu(_group_norm(self.groups, "norm1")(x)))
    h = _conv(self.features, 3, "conv2", self.dtype)(nn.silu(_group_norm(self.groups, "norm2")(h)))
    if x.shape[-1] != self.features:
      x = _conv(self.features, 1, "conv_shortcut", self.dtype)(x)
    return x + h


class Attention(nn.Module):
  """Single-head self-attention over all positions, residual (the VAE's mid-block attention)."""

  groups: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, h, w, c = x.shape
    dense = lambda name: nn.Dense(c, dtype=self.dtype, param_dtype=jnp.float32, name=name)
    tokens = _group_norm(self.groups, "group_norm")(x).reshape(b, h * w, c)
    q, k, v = dense("to_q")(tokens), dense("to_k")(tokens), dense("to_v")(tokens)
    logits = jnp.einsum("bqc,bkc->bqk", q, k).astype(jnp.float32) / jnp.sqrt(jnp.float32(c))
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)  # diffusers upcasts the softmax.
    out = dense("to_out_0")(jnp.einsum("bqk,bkc->bqc", probs, v))
    return x + out.reshape(b, h, w, c)


class MidBlock(nn.Module):
  groups: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = x.shape[-1]
    x = ResnetBlock(c, self.groups, self.dtype, name="resnets_0")(x)
    x = Attention(self.groups, self.dtype, name="attentions_0")(x)
    return ResnetBlock(c, self.groups, self.dtype, name="resnets_1")(x)


class Downsample(nn.Module):
  features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    # diffusers pads only bottom and right by one, then a VALID stride-2 conv (not SAME padding).
    x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
    return _conv(self.features, 3, "conv", self.dtype, stride=2, padding="VALID")(x)


class Upsample(nn.Module):
  features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)  # Nearest-neighbour x2.
    return _conv(self.features, 3, "conv", self.dtype)(x)


class DownBlock(nn.Module):
  features: int
  num_layers: int
  groups: int
  downsample: bool
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    for j in range(self.num_layers):
      x = ResnetBlock(self.features, self.groups, self.dtype, name=f"resnets_{j}")(x)
    if self.downsample:
      x = Downsample(self.features, self.dtype, name="downsamplers_0")(x)
    return x


class UpBlock(nn.Module):
  features: int
  num_layers: int
  groups: int
  upsample: bool
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    for j in range(self.num_layers):
      x = ResnetBlock(self.features, self.groups, self.dtype, name=f"resnets_{j}")(x)
    if self.upsample:
      x = Upsample(self.features, self.dtype, name="upsamplers_0")(x)
    return x


class Encoder(nn.Module):
  """Pixels (B, H, W, 3) -> moments (B, H/f, W/f, 2·latent), f = 2^(len(channels) - 1)."""

  block_out_channels: Sequence[int]
  layers_per_block: int
  latent_channels: int
  groups: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    chans = self.block_out_channels
    x = _conv(chans[0], 3, "conv_in", self.dtype)(x)
    for i, c in enumerate(chans):
      x = DownBlock(c, self.layers_per_block, self.groups, downsample=i < len(chans) - 1,
                    dtype=self.dtype, name=f"down_blocks_{i}")(x)
    x = MidBlock(self.groups, self.dtype, name="mid_block")(x)
    x = nn.silu(_group_norm(self.groups, "conv_norm_out")(x))
    return _conv(2 * self.latent_channels, 3, "conv_out", self.dtype)(x)


class Decoder(nn.Module):
  """Latents (B, h, w, latent) -> pixels (B, h·f, w·f, 3), roughly in [-1, 1]."""

  block_out_channels: Sequence[int]
  layers_per_block: int
  out_channels: int
  groups: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, z: jax.Array) -> jax.Array:
    chans = tuple(reversed(self.block_out_channels))
    x = _conv(chans[0], 3, "conv_in", self.dtype)(z)
    x = MidBlock(self.groups, self.dtype, name="mid_block")(x)
    for i, c in enumerate(chans):
      # One more resnet per block than the encoder has (diffusers: layers_per_block + 1).
      x = UpBlock(c, self.layers_per_block + 1, self.groups, upsample=i < len(chans) - 1,
                  dtype=self.dtype, name=f"up_blocks_{i}")(x)
    x = nn.silu(_group_norm(self.groups, "conv_norm_out")(x))
    return _conv(self.out_channels, 3, "conv_out", self.dtype)(x)


class AutoencoderKL(nn.Module):
  """encode: pixels -> (mean, logvar), unscaled; decode: unscaled latents -> pixels."""

  block_out_channels: Sequence[int] = (128, 256, 512, 512)
  layers_per_block: int = 2
  latent_channels: int = 4
  in_channels: int = 3
  groups: int = 32
  dtype: Any = jnp.float32

  def setup(self):
    arch = dict(block_out_channels=tuple(self.block_out_channels),
                layers_per_block=self.layers_per_block, groups=self.groups, dtype=self.dtype)
    self.encoder = Encoder(latent_channels=self.latent_channels, **arch)
    self.quant_conv = _conv(2 * self.latent_channels, 1, "quant_conv", self.dtype)
    self.post_quant_conv = _conv(self.latent_channels, 1, "post_quant_conv", self.dtype)
    self.decoder = Decoder(out_channels=self.in_channels, **arch)

  @property
  def downsample_factor(self) -> int:
    return 2 ** (len(self.block_out_channels) - 1)

  def encode(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    moments = self.quant_conv(self.encoder(x)).astype(jnp.float32)
    mean, logvar = jnp.split(moments, 2, axis=-1)
    return mean, jnp.clip(logvar, *LOGVAR_RANGE)

  def decode(self, z: jax.Array) -> jax.Array:
    return self.decoder(self.post_quant_conv(z)).astype(jnp.float32)

  def __call__(self, x: jax.Array) -> jax.Array:
    """Encode then decode the posterior mean (used to create every param at init)."""
    mean, _ = self.encode(x)
    return self.decode(mean)


def downsampling(vc: ml_collections.ConfigDict) -> int:
  """How many pixels on a side one latent covers: x2 per down block after the first."""
  return 2 ** (len(vc.block_out_channels) - 1)


def check_config(config: ml_collections.ConfigDict) -> None:
  """The `vae` section, and latent data against it: `data.name = "latents"` are this VAE's
  latents of `encode.image_size` images (sgjax.tools.encode_latents checks `encode` itself)."""
  v, check = config.vae, errors.check
  chans = tuple(v.block_out_channels)
  check(all(c % v.norm_groups == 0 for c in chans), "vae.block_out_channels", chans,
        f"must be >= 1 entries, each a positive multiple of vae.norm_groups = {v.norm_groups}")
  d, size, factor = config.data, config.encode.image_size, downsampling(v)
  if d.name == "latents":
    check(d.channels == v.latent_channels, "data.channels", d.channels,
          f"latents have vae.latent_channels = {v.latent_channels} channels")
    check(d.image_size * factor == size, "data.image_size", d.image_size,
          f"latents of encode.image_size = {size} images are {size // factor} (VAE "
          f"downsampling x{factor})")


def from_config(vc: ml_collections.ConfigDict) -> AutoencoderKL:
  return AutoencoderKL(block_out_channels=tuple(vc.block_out_channels),
                       layers_per_block=vc.layers_per_block, latent_channels=vc.latent_channels,
                       in_channels=vc.in_channels, groups=vc.norm_groups)


def abstract_params(model: AutoencoderKL) -> Any:
  """The param tree's shapes (no allocation): what a converted weight file must fill."""
  size = 2 * model.downsample_factor
  x = jax.ShapeDtypeStruct((1, size, size, model.in_channels), jnp.float32)
  return jax.eval_shape(model.init, jax.random.key(0), x)["params"]


# ---- Sharded encode / decode over a mesh's batch axes.


def _per_device(fn, mesh, chunk: int):
  """fn over the batch, each device taking its own slice in chunks of `chunk` (bounds memory).

  The VAE has no cross-example ops (GroupNorm is per example), so this equals fn(whole batch).
  """
  def local(params, x):
    if x.shape[0] <= chunk:
      return fn(params, x)
    one = lambda xi: jax.tree.map(lambda a: a[0], fn(params, xi[None]))
    return jax.lax.map(one, x, batch_size=chunk)

  spec = P(sharding.BATCH_AXES)
  return jax.shard_map(local, mesh=mesh, in_specs=(P(), spec), out_specs=spec)


def make_encode_fn(model: AutoencoderKL, scale: float, mesh, chunk: int):
  """jit((params, uint8 pixels NHWC)) -> (mean, std), both ×scale, batch-sharded."""
  def encode(params, pixels):
    x = pixels.astype(jnp.float32) / 127.5 - 1.0
    mean, logvar = model.apply({"params": params}, x, method=AutoencoderKL.encode)
    return mean * scale, jnp.exp(0.5 * logvar) * scale
  batch = sharding.batch_sharding(mesh)
  return jax.jit(_per_device(encode, mesh, chunk),
                 in_shardings=(sharding.replicated(mesh), batch), out_shardings=batch)


def make_decode_fn(model: AutoencoderKL, scale: float, mesh, chunk: int):
  """jit((params, latents ×scale)) -> pixels in model units [-1, 1], batch-sharded."""
  def decode(params, z):
    return model.apply({"params": params}, z / scale, method=AutoencoderKL.decode)
  batch = sharding.batch_sharding(mesh)
  return jax.jit(_per_device(decode, mesh, chunk),
                 in_shardings=(sharding.replicated(mesh), batch), out_shardings=batch)
