"""Flow matching on the straight path: the only place the time convention is defined.

Convention (the paper's): t = 0 is pure noise, t = 1 is data,
    x_t = (1 - t) * noise + t * data,        velocity v = dx_t/dt = data - noise.
Sampling integrates dx/dt = v from t = 0 to t = 1. (The public reference code uses the mirror
convention, t = 1 noise and v = noise - data; with logit-normal t, which is symmetric about 0.5,
the two train the same network up to the sign of v and t -> 1 - t.)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


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


def loss(velocity_fn, data: jax.Array, noise: jax.Array, t: jax.Array,
         labels: jax.Array) -> jax.Array:
  """Mean squared velocity error; `velocity_fn(x_t, t, y)` is the model with its sparsity bound.

  Noise and t come from the caller so that a batch split into micro-batches sees exactly the
  draws the whole batch would have.
  """
  v = velocity_fn(interpolate(data, noise, t), t, labels)
  return jnp.mean((v - target_velocity(data, noise)) ** 2)


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
