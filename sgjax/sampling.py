"""ODE samplers (Euler, Heun) over the guided velocity, and image grids.

Time runs from t = 0 (noise) to t = 1 (data) on the plan's grid (sgjax.flow owns the convention).
The whole sampler is one jitted program: one `fori_loop` per segment of the guidance plan (steps
that share a compiled guided step), so a 40-step constant-γ sampler is a single loop. The program
is specialised to the plan's structure (rule, γ token counts, steps), not to ω: the weights are
traced arguments (`Plan.mixes`), so an ω grid compiles once.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from sgjax import condition, errors
from sgjax import guidance as guidance_lib
from sgjax.models import dit

# (guidance, (ω, 1 − ω), x, t scalar, key) -> guided velocity of one step
StepVelocity = Callable[..., jax.Array]
SAMPLERS = ("euler", "heun")


def make_velocity_fn(model: dit.DiT) -> guidance_lib.VelocityFn:
  def velocity(params, x, t, y, sparsity, token_key):
    return model.apply({"params": params}, x, t, y, sparsity=sparsity, token_key=token_key)
  return velocity


def integrate(step_velocity: StepVelocity, x0: jax.Array, plan: guidance_lib.Plan,
              key: jax.Array, sampler: str = "euler", mixes: jax.Array | None = None
              ) -> jax.Array:
  """Integrates dx/dt = v from plan.times[0] to plan.times[-1]; traceable (call under jit).

  `mixes` (segments, 2): each segment's (ω, 1 − ω) (default: `plan.mixes()`, constants).
  Step i uses key fold_in(key, i) whatever segment it is in, so splitting a schedule into
  segments never changes the random token draws.
  """
  if sampler not in SAMPLERS:
    raise errors.UserError(f"sampler = {sampler!r}", f"allowed {SAMPLERS}")
  times = jnp.asarray(plan.times, jnp.float32)
  mixes = plan.mixes() if mixes is None else mixes

  def body_for(g: guidance_lib.Guidance, mix):
    def body(i, x):
      t, t_next = times[i], times[i + 1]
      dt = t_next - t
      k = jax.random.fold_in(key, i)
      v = step_velocity(g, mix, x, t, k)
      if sampler == "euler":
        return x + dt * v
      # Heun: average the slopes at both ends of the step.
      v_next = step_velocity(g, mix, x + dt * v, t_next, jax.random.fold_in(k, 1))
      return x + 0.5 * dt * (v + v_next)
    return body

  x = x0
  for j, seg in enumerate(plan.segments):
    mix = (mixes[j, 0], mixes[j, 1])
    x = jax.lax.fori_loop(seg.start, seg.stop, body_for(seg.guidance, mix), x)
  return x


def sample(model: dit.DiT, params: Mapping[str, object], labels: condition.Condition,
           key: jax.Array, *, plan: guidance_lib.Plan, sampler: str = "euler",
           null: condition.Null = None) -> jax.Array:
  """Draws images for `labels` (B,) from noise; returns (B, H, W, C) float32 in model units.

  `params` maps weight names to params: {"main": ...} and, for AG+SG, {"guide": ...}. `labels`
  may be any condition pytree (text: {"text", "text_mask"}); `null` is its null condition
  (default: the model's own, DiT's null label; text: the empty prompt's features). Compiled
  once per plan structure, sampler, model and input shapes (jit's cache); ω is traced.
  """
  return _sample(model, params, labels, key, plan.mixes(), plan=plan.structure(),
                 sampler=sampler, null=null)


def compile_sample(model: dit.DiT, params: Mapping[str, object], labels: condition.Condition,
                   key: jax.Array, *, plan: guidance_lib.Plan, sampler: str = "euler",
                   null: condition.Null = None) -> Callable[..., jax.Array]:
  """`sample` compiled ahead of time for these inputs' shapes and shardings:
  (params, labels, key, plan, null=None) -> samples, for any plan of the same structure."""
  exe = _sample.lower(model, params, labels, key, plan.mixes(), plan=plan.structure(),
                      sampler=sampler, null=null).compile()
  return lambda params, labels, key, plan, null=None: exe(params, labels, key, plan.mixes(),
                                                          null=null)


@functools.partial(jax.jit, static_argnames=("model", "plan", "sampler"))
def _sample(model: dit.DiT, params: Mapping[str, object], labels: condition.Condition,
            key: jax.Array, mixes: jax.Array, *, plan: guidance_lib.Plan, sampler: str,
            null: condition.Null) -> jax.Array:
  b = condition.batch_size(labels)
  null = condition.default_null(model) if null is None else null
  n, c = model.image_size, model.channels
  k_noise, k_steps = jax.random.split(key)
  x0 = jax.random.normal(k_noise, (b, n, n, c), jnp.float32)
  # token_draw "trajectory": one weak-branch key for every step, so each sample keeps its
  # subsets (per route layer) along the whole path.
  k_weak_path = jax.random.fold_in(key, 1) if plan.token_draw == "trajectory" else None
  velocity = make_velocity_fn(model)
  # Cast the (fp32 master) weights to the compute dtype once, not at every step's matmuls.
  params = jax.tree.map(lambda a: a.astype(model.dtype), params)

  def step_velocity(g, mix, x, t_scalar, k):
    t = jnp.full((b,), t_scalar, jnp.float32)
    k_strong, k_weak = jax.random.split(k)
    keys = (k_strong, k_weak if k_weak_path is None else k_weak_path)
    return guidance_lib.guided_velocity(velocity, params, x, t, labels, null, g, keys, mix)

  return integrate(step_velocity, x0, plan, k_steps, sampler, mixes)


def guided_step(model: dit.DiT, null: condition.Null, g: guidance_lib.Guidance):
  """(weights, x, y, key) -> the guided velocity at t = 0.5: one sampling step's model work,
  as `sample` runs it per step (benchmarks and the TPU pre-flight compile this)."""
  velocity = make_velocity_fn(model)

  def step(weights, x, y, key):
    t = jnp.full((x.shape[0],), 0.5)
    return guidance_lib.guided_velocity(velocity, weights, x, t, y, null, g,
                                        tuple(jax.random.split(key)))
  return step


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
  from sgjax import files  # The workdir may be in a bucket.
  with files.atomic_open(path) as f:
    pil.save(f, format="PNG")
