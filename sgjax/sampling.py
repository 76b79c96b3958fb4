"""ODE samplers (Euler, Heun) over the guided velocity, and image grids.

Time runs from t = 0 (noise) to t = 1 (data) on a uniform grid (sgjax.flow owns the convention).
The whole loop is one jitted `fori_loop`, so a 40-step sampler is one XLA program.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from sgjax import guidance as guidance_lib
from sgjax.models import dit


def make_velocity_fn(model: dit.DiT) -> guidance_lib.VelocityFn:
  def velocity(params, x, t, y, sparsity, token_key):
    return model.apply({"params": params}, x, t, y, sparsity=sparsity, token_key=token_key)
  return velocity


@functools.partial(jax.jit, static_argnames=("model", "guidance", "steps", "sampler"))
def sample(model: dit.DiT, params, labels: jax.Array, key: jax.Array, *,
           guidance: guidance_lib.Guidance, steps: int, sampler: str = "euler") -> jax.Array:
  """Draws images for `labels` (B,) from noise; returns (B, H, W, C) float32 in model units."""
  b = labels.shape[0]
  n, c = model.image_size, model.channels
  k_noise, k_steps = jax.random.split(key)
  x0 = jax.random.normal(k_noise, (b, n, n, c), jnp.float32)
  velocity = make_velocity_fn(model)
  dt = 1.0 / steps

  def v_at(x, t_scalar, k):
    t = jnp.full((b,), t_scalar, jnp.float32)
    return guidance_lib.guided_velocity(velocity, params, x, t, labels, model.num_classes,
                                        guidance, tuple(jax.random.split(k)))

  def body(i, x):
    t = i * dt
    k = jax.random.fold_in(k_steps, i)
    v = v_at(x, t, k)
    if sampler == "euler":
      return x + dt * v
    # Heun: average the slopes at both ends (the last step ends at t = 1 exactly).
    x_euler = x + dt * v
    v_next = v_at(x_euler, t + dt, jax.random.fold_in(k, 1))
    return x + 0.5 * dt * (v + v_next)

  return jax.lax.fori_loop(0, steps, body, x0)


def to_uint8(images: jax.Array | np.ndarray) -> np.ndarray:
  """Model units [-1, 1] -> uint8 [0, 255]."""
  images = np.asarray(images, np.float32)
  return np.clip(np.round((images + 1.0) * 127.5), 0, 255).astype(np.uint8)


def image_grid(images: np.ndarray, rows: int, pad: int = 2, pad_value: int = 255) -> np.ndarray:
  """(rows*cols, H, W, C) uint8 -> one (rows*(H+pad)+pad, cols*(W+pad)+pad, C) image."""
  count, h, w, c = images.shape
  cols = count // rows
  grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), pad_value, np.uint8)
  for i in range(rows * cols):
    r, q = divmod(i, cols)
    y0, x0 = pad + r * (h + pad), pad + q * (w + pad)
    grid[y0:y0 + h, x0:x0 + w] = images[i]
  return grid


def save_png(path: str, image: np.ndarray, scale: int = 1) -> None:
  from PIL import Image  # Local: only needed when writing files.
  if image.shape[-1] == 1:
    image = image[..., 0]
  pil = Image.fromarray(image)
  if scale > 1:
    pil = pil.resize((pil.width * scale, pil.height * scale), Image.NEAREST)
  pil.save(path)
