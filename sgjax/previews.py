"""Sample grids while a run trains (`train.sample_every`; sgjax.monitor says when).

One image per class (classes spread evenly, at most one `sample.batch_size` batch), or per prompt
for a text model (`sample.prompts`, else the caption data's held-out prompts, one per class),
from fixed noise (`sample.seed`): the configured guidance (`sample.guidance`) and CFG beside it
at CFG's own ω (`demo.omega_cfg`: the configured rule's ω would over-guide CFG, e.g. SG's 8),
`sample.steps` steps. Each grid goes to TensorBoard, its ω in the tag
(`samples/<rule>_omega<ω>`), and to `<workdir>/samples/step_<N>_<rule>.png`.

Through the one sampling path (a sgjax.pipeline.Pipeline without weights of its own, over
sgjax.generate): each rule's sampler is compiled at the first grid and called with the live EMA
(or raw, `sample.use_ema`) params after that. It reads the weights and draws from its own fixed
key: the training trajectory is unchanged.

AG+SG needs its guide checkpoint (`sample.guidance.guide_step`): until it exists the AG+SG grid
is skipped (said once) and CFG's is drawn alone.
"""

from __future__ import annotations

import math
import os
import sys
import time
from typing import Any

import jax
import ml_collections
import numpy as np

from sgjax import checkpoint, errors, files, generate, metrics, models, pipeline, sampling, sharding
from sgjax import config as config_lib
from sgjax import guidance as guidance_lib
from sgjax import state as state_lib
from sgjax.data import captions

BESIDE = "cfg"  # The baseline drawn beside the configured rule.


def rules(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """The configured rule, then CFG (once, if that is the configured one)."""
  rule = config.sample.guidance.rule
  return (rule,) if rule == BESIDE else (rule, BESIDE)


def omega(config: ml_collections.ConfigDict, rule: str) -> float:
  """The ω a grid of `rule` is drawn at: the configured one for the configured rule, CFG's own
  (`demo.omega_cfg`) for CFG beside it."""
  if rule == config.sample.guidance.rule:
    return float(config.sample.guidance.omega)
  return float(config.demo.omega_cfg)


def tag(rule: str, w: float) -> str:
  """The TensorBoard tag of a rule's grid at ω `w` ("samples/cfg_omega1.5")."""
  return f"samples/{rule}_omega{w:g}"


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
    # Weights come with each call: the live params of the run.
    self.pipe = pipeline.Pipeline(config, self.model, None, mesh, workdir=workdir)
    # One batch, padded only to the data-parallel size (not to sample.batch_size): cheap.
    shards = math.prod(mesh.shape[a] for a in sharding.BATCH_AXES)
    batch = -(-len(self.shows) // shards) * shards
    self.configs = {r: config_lib.replace(config, {"sample.guidance.rule": r,
                                                   "sample.guidance.omega": omega(config, r),
                                                   "sample.batch_size": batch})
                    for r in rules(config)}
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

  def _save(self, path: str, grid: np.ndarray) -> None:
    """Writes a grid's PNG; one that cannot be written (a full disk) is a warning line: a grid
    is worth less than the run, which goes on."""
    try:
      files.makedirs(self.out_dir)
      sampling.save_png(path, grid)
    except errors.UserError as err:  # sgjax.files' write failures: the OSError is the cause.
      warning = files.write_failed(path, err.__cause__ or err, "training goes on",
                                   subject="sample grid not written")
      print(f"warning: {warning}", file=sys.stderr, flush=True)

  def write(self, step: int, state) -> float:
    """Draws and writes the grids of `step`; returns the seconds it took (all processes)."""
    if not self.enabled:
      return 0.0
    t0 = time.perf_counter()
    compiled, compile_s0, drawn = self.pipe.compiled, self.pipe.compile_seconds, []
    for rule, c in self.configs.items():
      weights = self._weights(rule, state)
      if weights is None:
        continue
      # One batch: batch 0 of sample.seed, the same noise at every step.
      images = self.pipe.images(c, self.cond, self.null, weights=weights)
      drawn.append(f"{rule} ω={c.sample.guidance.omega:g}")
      if jax.process_index() == 0:
        if not self._shown:  # What the grid's cells show, read row by row; once per run.
          self._shown = True
          self.writer.text(step, "samples/conditions", ", ".join(self.shows))
        grid = sampling.image_grid(images, rows=grid_shape(len(images)))
        if grid.shape[0] <= 256:  # Small images: shown at twice their size.
          grid = grid.repeat(2, axis=0).repeat(2, axis=1)
        self._save(os.path.join(self.out_dir, f"step_{step}_{rule}.png"), grid)
        self.writer.image(step, tag(rule, c.sample.guidance.omega), grid)
    seconds = time.perf_counter() - t0
    compile_s = self.pipe.compile_seconds - compile_s0
    note = (f", {compile_s:.1f}s of it compiling the sampler" if self.pipe.compiled > compiled
            else "")
    self.log(f"samples at step {step}: {', '.join(drawn) or 'none'} ({len(self.shows)} images, "
             f"{self.config.sample.steps} steps) in {seconds:.1f}s{note} -> {self.out_dir}")
    return seconds
