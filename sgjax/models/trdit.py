"""TR-DiT: the text-to-image routed DiT, with routing (and so SG) as a call-time argument.

Llama-style blocks: pre-RMSNorm, no biases, SwiGLU MLP, 2-D axial RoPE on image tokens, and
cross-attention to text features that a few trainable transformer layers refine on top of a frozen
encoder's outputs. Timestep modulation is PixArt-α's adaLN-single: one MLP maps t to six
(shift, scale, gate) vectors shared by all blocks, and each block adds its own learned (6, D)
table. Per-block adaLN MLPs (DiT's) would add 6·D² per block, 0.86B params at width 2048 × 34
layers, which the published 2.5B does not leave room for.

Routing is DiT's (sgjax.sparsity): at a route's start the kept tokens are gathered *together with
their RoPE positions*, so a routed token is rotated by its true (row, column) inside the route.

The condition is the pytree {"text": (B, L, D_text) float, "text_mask": (B, L) bool}; the null
condition (CFG's ∅) is the empty prompt's features, which the dataset records (sgjax.data.captions).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from einops import rearrange

from sgjax import errors, sharding
from sgjax import sparsity as sp
from sgjax.models.dit import (
    ATTENTION_SCOPE,
    EMBED,
    HEADS,
    MLP,
    NONE,
    PATCH,
    attention_impl,
    timestep_embedding,
)
from sgjax.models.macs import Macs

Dtype = Any
Condition = dict[str, jax.Array]  # {"text": (B, L, D_text), "text_mask": (B, L) bool}
CONDITIONING = "text"  # Prompt features (sgjax.models); the null is the empty prompt's.


def _dense(features, axes, *, name, dtype, zero=False):
  init = nn.initializers.zeros_init() if zero else nn.initializers.xavier_uniform()
  return nn.Dense(features, use_bias=False, dtype=dtype, param_dtype=jnp.float32, name=name,
                  kernel_init=nn.with_logical_partitioning(init, axes))


def _rms_norm(name, dtype, scale=True):
  return nn.RMSNorm(epsilon=1e-6, dtype=dtype, param_dtype=jnp.float32, use_scale=scale,
                    name=name, scale_init=nn.with_logical_partitioning(
                        nn.initializers.ones_init(), (EMBED,)))


def swiglu_hidden(width: int, ratio: float) -> int:
  """SwiGLU hidden size: ratio·width (8/3 keeps a 4× GELU MLP's params), rounded up to 256."""
  return -(-int(width * ratio) // 256) * 256


def grid_positions(grid: int) -> np.ndarray:
  """(grid², 2) int32 (row, column) of every patch token, raster order."""
  rows, cols = np.meshgrid(np.arange(grid), np.arange(grid), indexing="ij")
  return np.stack([rows.reshape(-1), cols.reshape(-1)], axis=1).astype(np.int32)


def rope_2d(x: jax.Array, positions: jax.Array, theta: float = 10000.0) -> jax.Array:
  """Axial RoPE: x (B, n, heads, hd), positions (B, n, 2); half the pairs rotate by row, half by
  column (rotate-half layout). hd must be divisible by 4."""
  hd = x.shape[-1]
  quarter = hd // 4
  freqs = 1.0 / theta ** (jnp.arange(quarter, dtype=jnp.float32) / quarter)
  angles = positions.astype(jnp.float32)[..., None] * freqs  # (B, n, 2, hd/4)
  angles = angles.reshape(angles.shape[:2] + (hd // 2,))[:, :, None]  # (B, n, 1, hd/2)
  cos, sin = jnp.cos(angles), jnp.sin(angles)
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1).astype(x.dtype)


class Attention(nn.Module):
  """Self-attention (RoPE'd when `positions` is given) or cross-attention (`context` given)."""

  heads: int
  dtype: Dtype
  impl: str = "auto"

  @nn.compact
  def __call__(self, x, *, positions=None, context=None, context_mask=None):
    d, h = x.shape[-1], self.heads
    if context is None:
      qkv = _dense(3 * d, (EMBED, HEADS), name="qkv", dtype=self.dtype)(x)
      q, k, v = rearrange(qkv, "b n (three h hd) -> three b n h hd", three=3, h=h)
    else:
      q = _dense(d, (EMBED, HEADS), name="q", dtype=self.dtype)(x)
      q = rearrange(q, "b n (h hd) -> b n h hd", h=h)
      kv = _dense(2 * d, (EMBED, HEADS), name="kv", dtype=self.dtype)(context)
      k, v = rearrange(kv, "b l (two h hd) -> two b l h hd", two=2, h=h)
    if positions is not None:
      self.sow("intermediates", "positions", positions)  # Tests compare these with the tokens'.
      q, k = rope_2d(q, positions), rope_2d(k, positions)
    mask = None if context_mask is None else context_mask[:, None, None, :]
    # cuDNN's fused kernel is for unmasked attention here; masked attention runs on XLA.
    impl = attention_impl(self.impl, self.dtype) if mask is None else "xla"
    with jax.named_scope(ATTENTION_SCOPE):
      out = jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=impl)
    out = rearrange(out, "b n h hd -> b n (h hd)")
    return _dense(d, (HEADS, EMBED), name="proj", dtype=self.dtype)(out)


class SwiGLU(nn.Module):
  hidden: int
  dtype: Dtype

  @nn.compact
  def __call__(self, x):
    d = x.shape[-1]
    gate_up = _dense(2 * self.hidden, (EMBED, MLP), name="w13", dtype=self.dtype)(x)
    gate, up = jnp.split(gate_up, 2, axis=-1)
    return _dense(d, (MLP, EMBED), name="w2", dtype=self.dtype)(nn.silu(gate) * up)


class TextBlock(nn.Module):
  """A trainable pre-RMSNorm transformer layer over the frozen encoder's token features."""

  heads: int
  hidden: int
  dtype: Dtype

  @nn.compact
  def __call__(self, h, mask):
    h = h + Attention(self.heads, self.dtype, name="attn")(
        _rms_norm("norm1", self.dtype)(h), context_mask=mask)
    return h + SwiGLU(self.hidden, self.dtype, name="mlp")(_rms_norm("norm2", self.dtype)(h))


class TRBlock(nn.Module):
  """Self-attn (adaLN-modulated, RoPE) -> cross-attn to text -> SwiGLU (adaLN-modulated)."""

  heads: int
  hidden: int
  dtype: Dtype
  attention: str = "auto"

  @nn.compact
  def __call__(self, x, mod, positions, text, text_mask):
    # mod: (B, 6, D) from the shared adaLN-single MLP; this block adds its own table.
    table = self.param("mod_table", nn.with_logical_partitioning(
        nn.initializers.normal(x.shape[-1] ** -0.5), (NONE, EMBED)), (6, x.shape[-1]))
    m = (mod + table.astype(self.dtype)).astype(self.dtype)
    shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = (m[:, i, None] for i in range(6))
    h = _rms_norm("norm1", self.dtype, scale=False)(x) * (1 + scale_a) + shift_a
    x = x + gate_a * Attention(self.heads, self.dtype, self.attention, name="attn")(
        h, positions=positions)
    x = x + Attention(self.heads, self.dtype, self.attention, name="cross")(
        _rms_norm("norm2", self.dtype)(x), context=text, context_mask=text_mask)
    h = _rms_norm("norm3", self.dtype, scale=False)(x) * (1 + scale_m) + shift_m
    return x + gate_m * SwiGLU(self.hidden, self.dtype, name="mlp")(h)


class TRDiT(nn.Module):
  """x: (B, H, W, C) noisy input, t: (B,) in [0, 1], cond: {"text", "text_mask"}."""

  image_size: int
  channels: int
  depth: int
  width: int
  heads: int
  patch_size: int
  text_width: int  # The frozen encoder's feature width.
  text_tokens: int  # Features are padded to this many tokens.
  text_layers: int = 2
  mlp_ratio: float = 8.0 / 3.0
  dtype: Dtype = jnp.float32
  attention: str = "auto"
  remat: str = "none"

  @property
  def num_tokens(self) -> int:
    return (self.image_size // self.patch_size) ** 2

  @property
  def masked(self) -> bool:
    """Never a masked model: routing is TR-DiT's only token sparsity."""
    return False

  def example_condition(self, batch: int) -> Condition:
    """Zeros of the condition's shapes (what init traces with)."""
    return {"text": jnp.zeros((batch, self.text_tokens, self.text_width), jnp.float32),
            "text_mask": jnp.ones((batch, self.text_tokens), bool)}

  def builtin_null(self) -> None:
    """None: the null is the empty prompt's features, which come with the data or encoder."""
    return None

  @nn.compact
  def __call__(self, x: jax.Array, t: jax.Array, cond: Condition, *,
               sparsity: sp.Sparsity = sp.DENSE,
               token_key: jax.Array | None = None) -> jax.Array:
    p, d = self.patch_size, self.width
    b, h, w, ch = x.shape
    grid = h // p
    hidden = swiglu_hidden(d, self.mlp_ratio)
    patches = rearrange(x.astype(self.dtype), "b (gh ph) (gw pw) c -> b gh gw ph pw c", ph=p, pw=p)
    x = nn.DenseGeneral(d, axis=(-3, -2, -1), use_bias=False, dtype=self.dtype,
                        param_dtype=jnp.float32, name="patch_embed",
                        kernel_init=nn.with_logical_partitioning(
                            nn.initializers.xavier_uniform(), (NONE, NONE, PATCH, EMBED)))(patches)
    x = rearrange(x, "b gh gw d -> b (gh gw) d")
    positions = jnp.broadcast_to(grid_positions(grid), (b, grid * grid, 2))

    # Text: project the frozen features to the width, then the trainable layers.
    mask = cond["text_mask"].astype(bool)
    text = _dense(d, (NONE, EMBED), name="text_proj", dtype=self.dtype)(
        cond["text"].astype(self.dtype))
    for i in range(self.text_layers):
      text = TextBlock(self.heads, hidden, self.dtype, name=f"text{i}")(text, mask)
    text = _rms_norm("text_norm", self.dtype)(text)

    # adaLN-single: t -> (B, 6, D), shared by every block (each adds its own table).
    temb = timestep_embedding(t, 256).astype(self.dtype)
    temb = _dense(d, (NONE, MLP), name="t_embed1", dtype=self.dtype)(temb)
    temb = _dense(d, (MLP, EMBED), name="t_embed2", dtype=self.dtype)(nn.silu(temb))
    mod = _dense(6 * d, (EMBED, MLP), name="t_mod", dtype=self.dtype, zero=True)(nn.silu(temb))
    mod = mod.reshape(b, 6, d)

    block_cls = TRBlock
    if self.remat != "none":
      policy = (None if self.remat == "full"
                else jax.checkpoint_policies.dots_with_no_batch_dims_saveable)
      block_cls = nn.remat(TRBlock, policy=policy)
    route_input = route_idx = None
    full_positions = positions
    for layer in range(self.depth):
      if (idx := sp.route_indices(sparsity, layer, token_key, x)) is not None:
        route_input, route_idx = x, idx
        self.sow("intermediates", f"route_in{layer}", (x, route_idx))
        x = sp.gather_tokens(x, route_idx)
        positions = sp.gather_tokens(full_positions, route_idx)  # Kept tokens keep their place.
      x = block_cls(self.heads, hidden, self.dtype, self.attention, name=f"block{layer}")(
          sharding.constrain_batch(x), mod, positions, text, mask)  # Batch-sharded (see DiT).
      if sparsity.route_ending_at(layer) is not None:
        x = sp.scatter_tokens(route_input, x, route_idx)
        positions = full_positions
        self.sow("intermediates", f"route_out{layer}", x)

    final = _dense(2 * d, (EMBED, MLP), name="final_mod", dtype=self.dtype, zero=True)(
        nn.silu(temb))
    shift, scale = jnp.split(final, 2, axis=-1)
    x = _rms_norm("final_norm", self.dtype, scale=False)(x) * (1 + scale[:, None]) + shift[:, None]
    x = _dense(p * p * ch, (EMBED, NONE), name="final_proj", dtype=self.dtype, zero=True)(x)
    x = rearrange(x, "b (gh gw) (ph pw c) -> b (gh ph) (gw pw) c", gh=grid, ph=p, pw=p)
    return x.astype(jnp.float32)


def check_config(config) -> None:
  """The fields only TR-DiT reads: its RoPE head width and the `text` features' shapes."""
  m = config.model
  errors.check((m.width // m.heads) % 4 == 0, "model.heads", m.heads,
               f"model.width / model.heads must be divisible by 4 (2-D RoPE), width = {m.width}")


def forward_macs(config, sparsity: sp.Sparsity = sp.DENSE) -> Macs:
  """MACs of one TR-DiT forward pass of one image at `sparsity` (the conventions: sgjax.flops).

  Per image token and block (n_l tokens at layer l): self-attention qkv + proj 4D², cross-attention
  query + output 2D², SwiGLU 3·D·H (H = swiglu_hidden), modulation multiplies 4D; attention:
  self 2·n_l²·D, cross 2·n_l·L·D. Once per forward (per_sample), whatever the routing: the text
  path on its L (= text.max_tokens, padding included: it is computed) tokens: projection
  L·D_text·D, each text layer L·(4D² + 3·D·H) + attention 2·L²·D, every block's cross-attention
  keys/values 2·L·D²; and adaLN-single's t -> 6D and final 2D² (timestep MLP left out, as for DiT).
  """
  m, d, tx = config.model, config.data, config.text
  width, p, ch, L = m.width, m.patch_size, d.channels, tx.max_tokens
  n = (d.image_size // p) ** 2
  hidden = swiglu_hidden(width, m.mlp_ratio)
  per_token_block = 6 * width * width + 3 * width * hidden + 4 * width
  linear = 2 * n * ch * p * p * width  # Patch embed and final projection.
  attention = 0.0
  for layer in range(m.depth):
    tokens = sparsity.tokens_at_layer(layer, n)
    linear += tokens * per_token_block
    attention += 2 * tokens * tokens * width + 2 * tokens * L * width
  text = L * tx.width * width + tx.layers * L * (4 * width * width + 3 * width * hidden)
  attention += tx.layers * 2 * L * L * width
  per_sample = text + m.depth * 2 * L * width * width + 6 * width * width + 2 * width * width
  return Macs(float(linear), float(per_sample), float(attention))


def from_config(config) -> TRDiT:
  """The TR-DiT a validated config describes (`model.kind = "trdit"`)."""
  m, d, tx = config.model, config.data, config.text
  return TRDiT(image_size=d.image_size, channels=d.channels, depth=m.depth, width=m.width,
               heads=m.heads, patch_size=m.patch_size, text_width=tx.width,
               text_tokens=tx.max_tokens, text_layers=tx.layers, mlp_ratio=m.mlp_ratio,
               dtype=jnp.dtype(config.dtype), attention=m.attention, remat=m.remat)
