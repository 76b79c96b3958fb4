"""Sample grids while a run trains (`train.sample_every`; sgjax.monitor says when).

One image per class (classes spread evenly, at most one `sample.batch_size` batch), or per prompt
for a text model (`sample.prompts`, else the caption data's held-out prompts, one per class),
from fixed noise (`sample.seed`): the configured guidance (`sample.guidance`) and CFG beside it
at the same ω, `sample.steps` steps. Each grid goes to TensorBoard (`samples/<rule>`) and to
`<workdir>/samples/step_<N>_<rule>.png`.

Through the one generation path (sgjax.generate.compiled_batch): each rule's sampler is compiled
at the first grid and called with the live EMA (or raw, `sample.use_ema`) params after that. It
reads the weights and draws from its own fixed key: the training trajectory is unchanged.

AG+SG needs its guide checkpoint (`sample.guidance.guide_step`): until it exists the AG+SG grid
is skipped (said once) and CFG's is drawn alone.
"""

from __future__ import annotations

import math
import os
import time
from typing import Any

import jax
import ml_collections
import numpy as np

from sgjax import checkpoint, files, generate, metrics, models, sampling, sharding
from sgjax import config as config_lib
from sgjax import guidance as guidance_lib
from sgjax import state as state_lib
from sgjax.data import captions

BESIDE = "cfg"  # The baseline drawn beside the configured rule.


def rules(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """The configured rule, then CFG (once, if that is the configured one)."""
  rule = config.sample.guidance.rule
  return (rule,) if rule == BESIDE else (rule, BESIDE)


def class_conditions(num_classes: int, count: int) -> np.ndarray:
  """`count` (<= num_classes) distinct classes spread evenly from 0 to num_classes - 1."""
  if count == 1:
    return np.zeros((1,), np.int32)
  return np.round(np.linspace(0, num_classes - 1, count)).astype(np.int32)


def grid_shape(count: int) -> int:
  """Rows of a grid of `count` images: the largest divisor <= sqrt(count) (10 -> 2 x 5)."""
  return max(r for r in range(1, math.isqrt(count) + 1) if count % r == 0)


def conditions(config: ml_collections.ConfigDict) -> tuple[Any, Any, list[str]] | str:
  """(conditions, null, what each image shows) of the grids, or why there are none."""
  bs = config.sample.batch_size
  if models.conditioning(config) == "labels":
    labels = class_conditions(config.data.num_classes, min(config.data.num_classes, bs))
    return labels, None, [f"class {k}" for k in labels]
  prompts = tuple(config.sample.prompts)[:bs]
  if prompts:
    cond, null = generate.encode_prompts(config, list(prompts))
    return cond, null, list(prompts)
  if config.data.name == captions.NAME:
    held_out = captions.eval_prompts(config)
    labels = held_out["label"]
    first = np.array([int(np.flatnonzero(labels == k)[0]) for k in np.unique(labels)])[:bs]
    cond = {k: held_out[k][first] for k in ("text", "text_mask")}
    return cond, captions.null_condition(config), [str(c) for c in held_out["caption"][first]]
  return ("a text model needs prompts: set sample.prompts (or train on the caption data, whose "
          "held-out prompts are used)")


class Previews:
  """Draws the grids at a step; built once per run (inside the mesh)."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str, mesh,
               writer: metrics.MetricWriter, log=metrics.print0):
    self.config, self.workdir, self.mesh, self.writer, self.log = (config, workdir, mesh,
                                                                    writer, log)
    self.enabled = True
    found = conditions(config)
    if config.data.name == "latents" and not config.vae.weights:
      found = "a latent model's grids need vae.weights (the SD-VAE) to decode them"
    if isinstance(found, str):
      self.enabled = False
      log(f"note: no sample grids while training ({found}); train.sample_every = 0 silences "
          "this")
      return
    self.cond, self.null, self.shows = found
    self.model = models.from_config(config)
    self.key = jax.random.fold_in(jax.random.key(config.sample.seed), 0)  # Fixed noise.
    # One batch, padded only to the data-parallel size (not to sample.batch_size): cheap.
    shards = math.prod(mesh.shape[a] for a in sharding.BATCH_AXES)
    batch = -(-len(self.shows) // shards) * shards
    self.configs = {r: config_lib.replace(config, {"sample.guidance.rule": r,
                                                   "sample.batch_size": batch})
                    for r in rules(config)}
    self.plans = {r: config_lib.sampling_plan(c) for r, c in self.configs.items()}
    self._samplers: dict[str, Any] = {}
    self._guide = None
    self._waiting_noted = False
    self._shown = False
    self.out_dir = os.path.join(workdir, "samples")

  def _weights(self, rule: str, state) -> dict[str, Any] | None:
    """The weights a rule samples with, or None while AG+SG's guide checkpoint is missing."""
    main = state["ema"] if self.config.sample.use_ema else state["params"]
    if not guidance_lib.uses_guide(rule):
      return {guidance_lib.MAIN: main}
    if self._guide is None:
      g = self.config.sample.guidance
      where = g.guide_workdir or self.workdir
      if g.guide_step not in checkpoint.saved_steps(os.path.join(where, "checkpoints")):
        if not self._waiting_noted:
          self._waiting_noted = True
          self.log(f"note: no {rule} grids until its guide checkpoint exists (step "
                   f"{g.guide_step} in {where}); CFG's are drawn meanwhile")
        return None
      _, self._guide, _ = state_lib.restore_params(self.config, where, self.mesh,
                                                   ema=self.config.sample.use_ema,
                                                   step=g.guide_step)
    return {guidance_lib.MAIN: main, guidance_lib.GUIDE: self._guide}

  def write(self, step: int, state) -> float:
    """Draws and writes the grids of `step`; returns the seconds it took (all processes)."""
    if not self.enabled:
      return 0.0
    t0 = time.perf_counter()
    compile_s, drawn = None, []
    for rule, c in self.configs.items():
      weights = self._weights(rule, state)
      if weights is None:
        continue
      if rule not in self._samplers:
        t_compile = time.perf_counter()
        self._samplers[rule] = generate.compiled_batch(c, self.model, weights, self.cond,
                                                       self.plans[rule], self.mesh, self.key,
                                                       self.null)
        compile_s = (compile_s or 0.0) + time.perf_counter() - t_compile
      images = self._samplers[rule](weights)
      drawn.append(rule)
      if jax.process_index() == 0:
        if not self._shown:  # What the grid's cells show, read row by row; once per run.
          self._shown = True
          self.writer.text(step, "samples/conditions", ", ".join(self.shows))
        grid = sampling.image_grid(images, rows=grid_shape(len(images)))
        if grid.shape[0] <= 256:  # Small images: shown at twice their size.
          grid = grid.repeat(2, axis=0).repeat(2, axis=1)
        files.makedirs(self.out_dir)
        sampling.save_png(os.path.join(self.out_dir, f"step_{step}_{rule}.png"), grid)
        self.writer.image(step, f"samples/{rule}", grid)
    seconds = time.perf_counter() - t0
    g = self.config.sample.guidance
    compiled = f", {compile_s:.1f}s of it compiling the sampler" if compile_s is not None else ""
    self.log(f"samples at step {step}: {', '.join(drawn) or 'none'} (ω={g.omega:g}, "
             f"{len(self.shows)} images, {self.config.sample.steps} steps) in {seconds:.1f}s"
             f"{compiled} -> {self.out_dir}")
    return seconds
