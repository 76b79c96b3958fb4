"""`--mode=sample`: a grid (and .npz) of the configured guidance from a trained workdir.

Two outputs:
  * a grid of `sample.per_class` images of every class (a text model: of every prompt in
    `sample.prompts`) as PNG + .npz, always;
  * with `sample.num_samples` > 0 (class-conditional models), that many class-balanced
    samples for FID-style evaluation as resumable shards (sgjax.generate.write_shards) merged
    into `<name>_<N>.npz`.

Both through the workdir's pipeline (sgjax.pipeline, what `sgjax.load` returns): the images a
Python call with the same settings and batch size gives.
"""

from __future__ import annotations

import os
import time

import jax
import ml_collections
import numpy as np

from sgjax import errors, generate, guidance, metrics, models, pipeline, sharding
from sgjax import workdir as workdir_lib


def prompt_conditions(config: ml_collections.ConfigDict):
  """(prompt of each image, condition with `sample.per_class` rows per prompt, ∅) of
  `sample.prompts`."""
  prompts = tuple(config.sample.prompts)
  if not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
    raise errors.UserError(f"sample.prompts = {prompts!r}", "a text model (model.kind = "
                           f"{config.model.kind!r}) samples the prompts named there",
                           "e.g. --config.sample.prompts=\"('a photo of a sneaker', 'a bag')\"")
  cond, null = generate.encode_prompts(config, list(prompts))
  rows = np.repeat(np.arange(len(prompts)), config.sample.per_class)
  return np.array(prompts)[rows], jax.tree.map(lambda a: a[rows], cond), null


def run(config: ml_collections.ConfigDict, workdir: str, *, name: str | None = None) -> str:
  """Samples the grid (and the evaluation set); returns the PNG grid's path."""
  text_model = models.conditioning(config) == "text"  # Prompts, not class labels.
  if text_model:
    prompts, cond, null = prompt_conditions(config)
  mesh = sharding.build_mesh(config.mesh)
  plan = guidance.config_plan(config)
  g = config.sample.guidance
  name = name or f"samples_{g.rule}"
  with jax.set_mesh(mesh):
    pipe = pipeline.from_workdir(workdir, config, mesh=mesh)
    model, step = pipe.model, pipe.step
    if not text_model:
      cond, null = generate.class_labels(model.num_classes, config.sample.per_class), None
    pipe.weights(config)  # AG+SG's guide checkpoint loads here, before the clock starts.
    t0 = time.perf_counter()
    images = pipe.images(config, cond, null)
    if text_model:
      rows = len(config.sample.prompts)
      what, extra = f"of {rows} prompts ", dict(prompts=prompts)
    else:
      rows, what, extra = model.num_classes, "", dict(labels=cond)
    metrics.print0(f"sampled {len(images)} images {what}({g.rule}, ω={g.omega:g}, "
                   f"{len(plan.segments)} compiled segment(s)) in "
                   f"{time.perf_counter() - t0:.1f}s")
    if config.sample.num_samples > 0 and not text_model:
      # A seed apart from the grid's, so the evaluation set is not the grid's images again.
      # Shards of other settings are never resumed into this set: it then goes beside them.
      out_dir = workdir_lib.output_dir(
          os.path.join(workdir, f"{name}_{config.sample.num_samples}"),
          generate.sample_settings(config, step, seed=config.sample.seed + 1))
      npz = pipe.write_samples(config, out_dir, config.sample.num_samples,
                               config.sample.seed + 1)
      metrics.print0(f"wrote {config.sample.num_samples} samples to {npz}")
  png = os.path.join(workdir, name + ".png")
  if jax.process_index() == 0:
    generate.save_grid(config, workdir, name, images, rows, step, images, **extra)
  return png
