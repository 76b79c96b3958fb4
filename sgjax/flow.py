"""Flow matching on the straight path: the only place the time convention is defined.

Convention (the paper's): t = 0 is pure noise, t = 1 is data,
    x_t = (1 - t) * noise + t * data,        velocity v = dx_t/dt = data - noise.
Sampling integrates dx/dt = v from t = 0 to t = 1. (The public reference code uses the mirror
convention, t = 1 noise and v = noise - data; with logit-normal t, which is symmetric about 0.5,
the two train the same network up to the sign of v and t -> 1 - t. SiT's "Linear" path is ours:
x_t = t·x1 + (1 - t)·x0 with x1 data, target x1 - x0.)

Also here: the masked (MaskDiT) loss, and the map between our axis and DDPM's variance-preserving
one that lets an ε-prediction DiT checkpoint act as a velocity model (`vp_eps_inputs`,
`velocity_from_vp_eps`; docs/checkpoints.md).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from sgjax import condition


def interpolate(data: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
  t = t.reshape(t.shape + (1,) * (data.ndim - 1))
  return (1.0 - t) * noise + t * data


def target_velocity(data: jax.Array, noise: jax.Array) -> jax.Array:
  return data - noise


def sample_time(key: jax.Array, batch: int) -> jax.Array:
  """Logit-normal t = sigmoid(n), n ~ N(0, 1) (SD3 / SiT's default for flow matching)."""
  return jax.nn.sigmoid(jax.random.normal(key, (batch,)))


def drop_labels(key: jax.Array, labels: jax.Array, rate: float, null_label: int) -> jax.Array:
  """Replaces each label with the null class with probability `rate` (trains CFG's v(∅))."""
  if rate == 0.0:
    return labels
  return jnp.where(jax.random.uniform(key, labels.shape) < rate, null_label, labels)


def drop_condition(key: jax.Array, cond, rate: float, null):
  """Any condition pytree (labels, or text features + mask) replaced per example by the null
  condition with probability `rate`; for int labels this is exactly `drop_labels`."""
  if rate == 0.0:
    return cond
  drop = jax.random.uniform(key, (condition.batch_size(cond),)) < rate
  return condition.where(drop, condition.null_like(cond, null), cond)


def loss(velocity_fn, data: jax.Array, noise: jax.Array, t: jax.Array,
         labels: jax.Array) -> jax.Array:
  """Mean squared velocity error; `velocity_fn(x_t, t, y)` is the model with its sparsity bound.

  Noise and t come from the caller so that a batch split into micro-batches sees exactly the
  draws the whole batch would have.
  """
  v = velocity_fn(interpolate(data, noise, t), t, labels)
  return jnp.mean((v - target_velocity(data, noise)) ** 2)


def masked_loss(velocity_fn, data: jax.Array, noise: jax.Array, t: jax.Array,
                labels: jax.Array, recon_weight: float) -> jax.Array:
  """MaskDiT's objective: flow matching on the tokens the encoder saw, plus `recon_weight` times
  the reconstruction error of the data at the masked ones.

  `velocity_fn(x_t, t, y)` returns (v, visible), visible (B, H, W, 1) in {0, 1}. The data estimate
  is x̂ = x_t + (1 - t)·v̂, so ‖x̂ - data‖² = (1 - t)²·‖v̂ - v‖²: the paper's (1 - t)² weight, in its
  convention, which is ours (t = 0 noise). Each term is a mean over its own pixels.
  """
  v, visible = velocity_fn(interpolate(data, noise, t), t, labels)
  err = (v - target_velocity(data, noise)) ** 2
  seen = jnp.broadcast_to(visible, err.shape)
  hidden = 1.0 - seen
  weight = ((1.0 - t) ** 2).reshape(t.shape + (1,) * (data.ndim - 1))
  flow_term = jnp.sum(seen * err) / jnp.maximum(jnp.sum(seen), 1.0)
  recon_term = jnp.sum(hidden * weight * err) / jnp.maximum(jnp.sum(hidden), 1.0)
  return flow_term + recon_weight * recon_term


# DDPM's schedule (Ho et al.; official DiT checkpoints): 1000 steps, β linear 1e-4 -> 0.02.
DDPM_STEPS = 1000


def ddpm_log_snr() -> np.ndarray:
  """log(ᾱ_k / (1 - ᾱ_k)) for DDPM steps k = 0..999 (decreasing: step 999 is the noisiest)."""
  betas = np.linspace(1e-4, 0.02, DDPM_STEPS, dtype=np.float64)
  alpha_bar = np.cumprod(1.0 - betas)
  return np.log(alpha_bar) - np.log1p(-alpha_bar)


def vp_eps_inputs(x: jax.Array, t: jax.Array) -> tuple[jax.Array, jax.Array]:
  """What a DDPM ε-network needs to see for our x at our t: (scaled x, fractional DDPM step).

  Our x_t = t·data + (1 - t)·noise and DDPM's z = α·data + σ·noise (α² + σ² = 1) lie on the same
  ray when α/σ = t/(1 - t), i.e. log-SNR λ = 2·log(t/(1 - t)); then z = (α + σ)·x_t. The step is
  λ interpolated in DDPM's table; t outside the table's range (t < 0.0064 or t > 0.99) is clamped
  to its ends (steps 999 and 0), as `velocity_from_vp_eps` does.
  """
  table = ddpm_log_snr()
  lam = jnp.clip(2.0 * (jnp.log(t) - jnp.log1p(-t)), table[-1], table[0])
  step = jnp.interp(lam, table[::-1].astype(np.float32),
                    np.arange(DDPM_STEPS - 1, -1, -1, dtype=np.float32))
  scale = jnp.sqrt(jax.nn.sigmoid(lam)) + jnp.sqrt(jax.nn.sigmoid(-lam))
  return x * scale.reshape(t.shape + (1,) * (x.ndim - 1)), step


def velocity_from_vp_eps(x: jax.Array, eps: jax.Array, t: jax.Array) -> jax.Array:
  """Our velocity from a predicted ε: data estimate (x - (1 - t)·ε)/t minus ε = (x - ε)/t, with t
  clamped to the DDPM table's range like `vp_eps_inputs` (finite at t = 0)."""
  table = ddpm_log_snr()
  t_min, t_max = (float(1.0 / (1.0 + np.exp(-table[i] / 2))) for i in (-1, 0))
  t = jnp.clip(t, t_min, t_max).reshape(t.shape + (1,) * (x.ndim - 1))
  return (x - eps) / t


def time_grid(steps: int, shift: float = 1.0) -> tuple[float, ...]:
  """The sampler's `steps + 1` times from 0 (noise) to 1 (data).

  shift = 1 is the uniform grid; shift > 1 spends more steps near the noise end (SD3's time
  shift, applied to the noise level σ = 1 − t): σ' = s·σ / (1 + (s − 1)·σ).
  """
  out = []
  for i in range(steps + 1):
    sigma = 1.0 - i / steps
    sigma = shift * sigma / (1.0 + (shift - 1.0) * sigma)
    out.append(1.0 - sigma)
  return tuple(out)
