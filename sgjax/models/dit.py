"""DiT/SiT with adaLN-Zero (Peebles & Xie 2023), with token sparsity as a call-time argument.

One module serves training (routing or masking at the config's γ), every guidance branch (its
own γ) and the dense model (`Sparsity()`): sparsity never changes the parameters, only which
tokens run which blocks. With `decoder_depth` > 0 the model is MaskDiT-shaped (docs/masking.md):
the blocks are an encoder that sees the kept tokens, followed by a narrower decoder that sees
all tokens, the dropped ones replaced by a learned mask token. Params carry logical axis names;
`sgjax.sharding` maps them onto the mesh.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from einops import rearrange, repeat

from sgjax import errors, flow, sharding
from sgjax import sparsity as sp
from sgjax.models.macs import Macs

Dtype = Any

# Logical axis names of params and activations (mapped to mesh axes by sgjax.sharding).
EMBED, MLP, HEADS, KV, VOCAB, PATCH, NONE = "embed", "mlp", "heads", "kv", "vocab", "patch", None


def _dense(features, axes, *, name, dtype, zero=False):
  init = nn.initializers.zeros_init() if zero else nn.initializers.xavier_uniform()
  return nn.Dense(features, dtype=dtype, param_dtype=jnp.float32, name=name,
                  kernel_init=nn.with_logical_partitioning(init, axes),
                  bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), axes[-1:]))


def sincos_pos_embed_2d(width: int, grid: int) -> np.ndarray:
  """Fixed 2-D sin-cos position embedding, (grid*grid, width); half the channels per axis."""
  assert width % 4 == 0, "width must be divisible by 4 for the 2-D sin-cos embedding"
  omega = 1.0 / 10000 ** (np.arange(width // 4, dtype=np.float64) / (width / 4.0))
  coords = np.arange(grid, dtype=np.float64)
  gy, gx = np.meshgrid(coords, coords, indexing="ij")

  def emb_1d(pos):
    out = np.einsum("n,d->nd", pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)

  # DiT's convention: the first half embeds the column (w) coordinate, the second the row.
  return np.concatenate([emb_1d(gx), emb_1d(gy)], axis=1).astype(np.float32)


def timestep_embedding(t: jax.Array, dim: int, max_period: float = 10000.0,
                       scale: float = 1000.0) -> jax.Array:
  """Sinusoidal embedding of `scale`·t. Ours: t in [0, 1] times 1000, so the frequencies match
  DiT's (which feeds DDPM step numbers 0..999); imported SiT checkpoints use scale 1."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = (t.astype(jnp.float32) * scale)[:, None] * freqs[None]
  return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


def modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
  return x * (1 + scale[:, None]) + shift[:, None]


CONDITIONING = "labels"  # Class labels (sgjax.models); the null is an extra label.
ATTENTION_IMPLS = ("auto", "xla", "cudnn")
ATTENTION_SCOPE = "attention_core"  # Named scope of the score/softmax/value part (profiles).
REMAT_POLICIES = ("none", "full", "dots")
# What the network outputs: our velocity (t = 0 noise, 1 data), or a DDPM ε (official DiT
# checkpoints), which `flow` turns into that velocity (the model then takes t on our axis).
PREDICTIONS = ("velocity", "eps_vp")


def attention_impl(choice: str, dtype) -> str | None:
  """The `implementation` for jax.nn.dot_product_attention.

  "auto": cuDNN's fused flash attention on GPU in bf16/fp16 (it never materialises the n×n
  scores), XLA elsewhere (CPU, TPU, fp32 on GPU, where cuDNN's kernel does not apply).
  """
  if choice == "auto":
    on_gpu = jax.default_backend() == "gpu"
    return "cudnn" if on_gpu and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) else "xla"
  return choice


class Attention(nn.Module):
  heads: int
  dtype: Dtype
  impl: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    d = x.shape[-1]
    qkv = _dense(3 * d, (EMBED, HEADS), name="qkv", dtype=self.dtype)(x)
    q, k, v = rearrange(qkv, "b n (three h hd) -> three b n h hd", three=3, h=self.heads)
    with jax.named_scope(ATTENTION_SCOPE):  # Profiles attribute the score/value work by it.
      out = jax.nn.dot_product_attention(q, k, v,
                                         implementation=attention_impl(self.impl, self.dtype))
    out = rearrange(out, "b n h hd -> b n (h hd)")
    return _dense(d, (HEADS, EMBED), name="proj", dtype=self.dtype)(out)


class DiTBlock(nn.Module):
  width: int
  heads: int
  mlp_ratio: float
  dtype: Dtype
  attention: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array, c: jax.Array) -> jax.Array:
    mod = _dense(6 * self.width, (EMBED, MLP), name="adaLN", dtype=self.dtype, zero=True)(
        nn.silu(c))
    shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = jnp.split(mod, 6, axis=-1)
    norm = lambda name: nn.LayerNorm(use_bias=False, use_scale=False, epsilon=1e-6,
                                     dtype=self.dtype, name=name)
    h = modulate(norm("norm1")(x), shift_a, scale_a)
    x = x + gate_a[:, None] * Attention(self.heads, self.dtype, self.attention, name="attn")(h)
    h = modulate(norm("norm2")(x), shift_m, scale_m)
    hidden = int(self.width * self.mlp_ratio)
    h = _dense(hidden, (EMBED, MLP), name="fc1", dtype=self.dtype)(h)
    h = nn.gelu(h, approximate=True)
    h = _dense(self.width, (MLP, EMBED), name="fc2", dtype=self.dtype)(h)
    return x + gate_m[:, None] * h


class DiT(nn.Module):
  """x: (B, H, W, C) noisy input, t: (B,) in [0, 1], y: (B,) labels; label `num_classes` is ∅."""

  image_size: int
  channels: int
  num_classes: int
  depth: int
  width: int
  heads: int
  patch_size: int
  mlp_ratio: float = 4.0
  dtype: Dtype = jnp.float32
  attention: str = "auto"  # See ATTENTION_IMPLS.
  remat: str = "none"  # Recompute block activations in the backward pass: see REMAT_POLICIES.
  time_scale: float = 1000.0  # Multiplies the network's time before the sinusoid.
  prediction: str = "velocity"  # See PREDICTIONS.
  # MaskDiT decoder (0 layers: no decoder, not a masked model).
  decoder_depth: int = 0
  decoder_width: int = 512
  decoder_heads: int = 16

  @property
  def num_tokens(self) -> int:
    return (self.image_size // self.patch_size) ** 2

  @property
  def masked(self) -> bool:
    return self.decoder_depth > 0

  def example_condition(self, batch: int) -> jax.Array:
    """Zeros of the condition's shapes (what init traces with): class labels."""
    return jnp.zeros((batch,), jnp.int32)

  def builtin_null(self) -> int:
    """CFG's ∅: the extra "null class" row of the label embedding."""
    return int(self.num_classes)

  @nn.compact
  def __call__(self, x: jax.Array, t: jax.Array, y: jax.Array, *,
               sparsity: sp.Sparsity = sp.DENSE,
               token_key: jax.Array | None = None) -> jax.Array:
    """The velocity at (x, t, y). A masked model also sows `("intermediates", "visible")`:
    (B, H, W, 1), 1 where the pixel's token was seen by the encoder (the loss weights)."""
    if sparsity.mask_gamma > 0 and not self.masked:
      raise errors.UserError(f"sparsity.mask_gamma = {sparsity.mask_gamma}",
                             "needs a masked model (model.decoder_depth > 0)",
                             "this model thins tokens with routes only")
    if self.masked and sparsity.routes:
      raise errors.UserError(f"sparsity.routes = {tuple(sparsity.routes)}",
                             "a masked model (model.decoder_depth > 0) takes no routes")
    x_in, t_in = x, t
    if self.prediction == "eps_vp":
      x, t = flow.vp_eps_inputs(x_in, t_in)  # DDPM input scale and step of our t.
    p, d = self.patch_size, self.width
    b, h, w, ch = x.shape
    grid = h // p
    x = x.astype(self.dtype)
    x = nn.Conv(d, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype,
                param_dtype=jnp.float32, name="patch_embed",
                kernel_init=nn.with_logical_partitioning(
                    nn.initializers.xavier_uniform(), (NONE, NONE, PATCH, EMBED)),
                bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (EMBED,)))(x)
    x = rearrange(x, "b gh gw d -> b (gh gw) d") + sincos_pos_embed_2d(d, grid).astype(self.dtype)

    temb = timestep_embedding(t, 256, scale=self.time_scale).astype(self.dtype)
    temb = _dense(d, (NONE, MLP), name="t_embed1", dtype=self.dtype)(temb)
    temb = _dense(d, (MLP, EMBED), name="t_embed2", dtype=self.dtype)(nn.silu(temb))
    # One extra row for the null label ∅ used by classifier-free guidance.
    yemb = nn.Embed(self.num_classes + 1, d, dtype=self.dtype, param_dtype=jnp.float32,
                    name="y_embed", embedding_init=nn.with_logical_partitioning(
                        nn.initializers.normal(0.02), (VOCAB, EMBED)))(y)
    c = temb + yemb

    block_cls = DiTBlock
    if self.remat != "none":
      # "full" keeps only block inputs; "dots" also keeps matmul outputs (less recompute).
      policy = (None if self.remat == "full"
                else jax.checkpoint_policies.dots_with_no_batch_dims_saveable)
      block_cls = nn.remat(DiTBlock, policy=policy)
    keep_idx = None
    if self.masked and sparsity.mask_gamma > 0:
      # MaskDiT: dropped tokens never enter the encoder (static count, per-sample subsets).
      if token_key is None:
        raise ValueError("a masked forward pass needs token_key")  # The caller's bug.
      keep_idx = sp.select_tokens(token_key, b, x.shape[1], sparsity.mask_keep(x.shape[1]))
      x = sp.gather_tokens(x, keep_idx)
    route_input = route_idx = None
    for layer in range(self.depth):
      if (idx := sp.route_indices(sparsity, layer, token_key, x)) is not None:
        route_input, route_idx = x, idx
        self.sow("intermediates", f"route_in{layer}", (x, route_idx))  # For tests/inspection.
        x = sp.gather_tokens(x, route_idx)
      # Activations stay batch-sharded (FSDP): left free, XLA may shard them along the
      # weights' sharded width and all-reduce activations instead of gathering weights.
      x = block_cls(d, self.heads, self.mlp_ratio, self.dtype, self.attention,
                    name=f"block{layer}")(sharding.constrain_batch(x), sharding.constrain_batch(c))
      if sparsity.route_ending_at(layer) is not None:
        x = sp.scatter_tokens(route_input, x, route_idx)
        self.sow("intermediates", f"route_out{layer}", x)
    if self.masked:
      x = self._decode(x, c, keep_idx, grid, block_cls)
      d = self.decoder_width

    mod = _dense(2 * d, (EMBED, MLP), name="final_adaLN", dtype=self.dtype, zero=True)(
        nn.silu(c))
    shift, scale = jnp.split(mod, 2, axis=-1)
    x = modulate(nn.LayerNorm(use_bias=False, use_scale=False, epsilon=1e-6, dtype=self.dtype,
                              name="final_norm")(x), shift, scale)
    x = _dense(p * p * ch, (EMBED, NONE), name="final_proj", dtype=self.dtype, zero=True)(x)
    # Unpatchify: token (gh, gw)'s p·p·C outputs become its p×p block of pixels.
    x = rearrange(x, "b (gh gw) (ph pw c) -> b (gh ph) (gw pw) c", gh=grid, ph=p, pw=p)
    x = x.astype(jnp.float32)
    if self.prediction == "eps_vp":
      x = flow.velocity_from_vp_eps(x_in, x, t_in)
    return x

  def _decode(self, x: jax.Array, c: jax.Array, keep_idx: jax.Array | None, grid: int,
              block_cls) -> jax.Array:
    """Encoder tokens (B, K, D) -> decoder tokens (B, N, D_dec): project, put mask tokens at the
    dropped positions (unshuffle), add the decoder position embedding, run the decoder blocks."""
    self.sow("intermediates", "encoder_out", x)  # For tests: kept tokens after the encoder.
    dd, b, n = self.decoder_width, x.shape[0], grid * grid
    x = _dense(dd, (EMBED, MLP), name="decoder_embed", dtype=self.dtype)(x)
    # Declared at γ = 0 too, so init and every γ share one parameter tree.
    mask_token = self.param("mask_token", nn.with_logical_partitioning(
        nn.initializers.normal(0.02), (NONE, NONE, EMBED)), (1, 1, dd), jnp.float32)
    visible = jnp.ones((b, n), jnp.float32)
    if keep_idx is not None:
      full = jnp.broadcast_to(mask_token.astype(self.dtype), (b, n, dd))
      x = sp.scatter_tokens(full, x, keep_idx)
      visible = sp.scatter_tokens(jnp.zeros((b, n)), jnp.ones(keep_idx.shape), keep_idx)
    p = self.patch_size
    pixels = repeat(visible, "b (gh gw) -> b (gh ph) (gw pw)", gh=grid, ph=p, pw=p)
    self.sow("intermediates", "visible", pixels[..., None])
    x = x + sincos_pos_embed_2d(dd, grid).astype(self.dtype)
    for layer in range(self.decoder_depth):
      x = block_cls(dd, self.decoder_heads, self.mlp_ratio, self.dtype, self.attention,
                    name=f"decoder_block{layer}")(sharding.constrain_batch(x),
                                                  sharding.constrain_batch(c))
    return x


def check_config(config) -> None:
  """The `model` fields only DiT reads that depend on each other (sgjax.models checks the
  shared ones; each field's own values: its declaration)."""
  m, check = config.model, errors.check
  if m.decoder_depth > 0:
    check(m.decoder_width % m.decoder_heads == 0
          and m.decoder_width % 4 == 0, "model.decoder_width", m.decoder_width,
          f"must be a positive multiple of 4 (sin-cos embedding) and of model.decoder_heads "
          f"= {m.decoder_heads}")


def forward_macs(config, sparsity: sp.Sparsity = sp.DENSE) -> Macs:
  """MACs of one forward pass of one image at `sparsity` (the conventions: sgjax.flops).

  Per token and block of width w: qkv + proj 4w², MLP 2·w·r·w, modulation multiplies 4w;
  attention 2·n²·w on the n tokens a block sees; per image the adaLN MLPs (6D² per block,
  2·D·D_out final). A masked model's encoder sees the kept tokens, its decoder all of them.
  """
  m, d = config.model, config.data
  width, p, ch = m.width, m.patch_size, d.channels
  n = (d.image_size // p) ** 2

  def per_token_block(w):
    return 4 * w * w + 2 * w * int(w * m.mlp_ratio) + 4 * w

  decoder = m.get("decoder_depth", 0)
  out_width = m.decoder_width if decoder else width  # What the final layer reads.
  linear = n * ch * p * p * (width + out_width)  # Patch embed and final projection.
  attention = 0.0
  for layer in range(m.depth):
    tokens = sparsity.tokens_at_layer(layer, n)
    linear += tokens * per_token_block(width)
    attention += 2 * tokens * tokens * width
  per_sample = 6 * width * width * m.depth + 2 * width * out_width
  if decoder:
    dd = m.decoder_width
    linear += sparsity.mask_keep(n) * width * dd + decoder * n * per_token_block(dd)
    attention += decoder * 2 * n * n * dd
    per_sample += 6 * width * dd * decoder
  return Macs(float(linear), float(per_sample), float(attention))


def from_config(config) -> DiT:
  """The model a validated config describes."""
  m, d = config.model, config.data
  return DiT(image_size=d.image_size, channels=d.channels, num_classes=d.num_classes,
             depth=m.depth, width=m.width, heads=m.heads, patch_size=m.patch_size,
             mlp_ratio=m.mlp_ratio, dtype=jnp.dtype(config.dtype), attention=m.attention,
             remat=m.remat, time_scale=m.time_scale, prediction=m.prediction,
             decoder_depth=m.decoder_depth, decoder_width=m.decoder_width,
             decoder_heads=m.decoder_heads)
