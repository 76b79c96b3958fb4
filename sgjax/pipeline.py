"""`sgjax.load` and the pipeline: a trained model, ready to sample from Python.

  import sgjax
  pipe = sgjax.load("workdirs/fashion_mnist_demo")      # a workdir, or an exported file
  images = pipe(labels=[3, 7], rule="sg", omega=8.0, gamma=(0.0, 0.9), steps=30, seed=0)
  images.shape, images.dtype                            # (2, 28, 28, 1) uint8, NHWC
  pipe.flops(rule="sg", gamma=(0.0, 0.9), steps=30)     # GMACs per image

A `Pipeline` holds the model, its weights on the process's mesh (all devices: whatever jax
sees) and its config; a call names the sampling settings by keyword — every field of
`config.sample.guidance` (rule, omega, gamma_strong, gamma_weak, schedule, …; `gamma=(s, w)`
and `gamma_end=(s, w)` set both branches) and the sampler's steps, sampler, time_shift, seed and
batch_size — which are checked as the command line checks them (one-line `errors.UserError`s
naming the field). A text model takes `prompts=[...]` instead of labels. Latent models are
decoded by the SD-VAE (`vae.weights`, e.g. in `overrides`).

It is the one way sgjax makes images: `--mode=sample`, the demo and the grids while training
sample through it, and it samples through sgjax.generate. Each sampler is compiled once per
(plan structure, batch shape) — the rule, the γ schedule's token counts, the interval's steps
and the step count are compile-time constants of the guided step; ω is not (a traced value) —
and kept for the pipeline's life: calling again with the same settings, or another ω, runs the
compiled program. Image i of a call draws its noise from the
seed and its batch (sgjax.generate), so a call with `batch_size=config.sample.batch_size`
gives exactly the images `--mode=sample` writes for those conditions; the default batch is
the call's images rounded up to the data-parallel size (at most `sample.batch_size`).
Nothing is global: two pipelines share nothing but jax's own caches.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np

from sgjax import (
  checkpoint,
  errors,
  export,
  files,
  flops,
  generate,
  models,
  readers,
  sampling,
  sharding,
  validation,
)
from sgjax import config as config_lib
from sgjax import guidance as guidance_lib
from sgjax import state as state_lib
from sgjax import workdir as workdir_lib

# Keyword -> the config field it sets (besides every sample.guidance field by its own name).
SAMPLER_FIELDS = ("steps", "sampler", "time_shift", "seed", "batch_size")
PAIRS = {"gamma": ("gamma_strong", "gamma_weak"),
         "gamma_end": ("gamma_strong_end", "gamma_weak_end")}


def guidance_fields() -> tuple[str, ...]:
  """The fields of `sample.guidance` (read from base_config, never listed here)."""
  return tuple(config_lib.base_config().sample.guidance.keys())


def with_overrides(config: ml_collections.ConfigDict, overrides: Mapping[str, Any] | None
                   ) -> ml_collections.ConfigDict:
  """A copy with dotted fields set ({"vae.weights": …}); a field that does not exist is
  refused naming its section's fields, a value its declaration refuses naming the field."""
  return validation.replace(config, dict(overrides or {}))


class Pipeline:
  """A model and its weights on a mesh, sampled by keyword settings (see the module)."""

  def __init__(self, config: ml_collections.ConfigDict, model, params: Any, mesh, *,
               step: int = 0, workdir: str = "", source: str = ""):
    """`params`: the model's params ("main" weights; None when every call passes its own,
    as the grids while training do). `workdir`: where AG+SG's guide checkpoint is found."""
    self.config, self.model, self.params, self.mesh = config, model, params, mesh
    self.step, self.workdir, self.source = int(step), workdir, source or workdir
    self._compiled: dict = {}  # sgjax.generate's executables (see generate.batch).
    self._guides: dict[tuple[str, int], Any] = {}
    self.compile_seconds = 0.0  # Spent compiling samplers, for the logs.

  def __repr__(self) -> str:
    m = self.config.model
    return (f"Pipeline({self.source or 'weights given per call'}, step {self.step}: "
            f"{m.kind} depth {m.depth} width {m.width} patch {m.patch_size}, "
            f"{self.config.data.image_size}px x{self.config.data.channels}, "
            f"{'text' if self.text else f'{self.model.num_classes} classes'})")

  @property
  def text(self) -> bool:
    """Whether the model takes prompts (a text model) rather than class labels."""
    return models.conditioning(self.config) == "text"

  @property
  def compiled(self) -> int:
    """How many samplers this pipeline has compiled (one per plan structure and batch shape;
    ω is traced)."""
    return len(self._compiled)

  # ------------------------------------------------------------------ settings and checks
  def settings(self, **fields: Any) -> ml_collections.ConfigDict:
    """The config of a call's keyword settings, checked as `--mode=sample` checks them."""
    known = guidance_fields()
    dotted: dict[str, Any] = {}
    for name, value in fields.items():
      if name in PAIRS:
        if not (isinstance(value, Sequence) and not isinstance(value, str) and len(value) == 2):
          raise errors.UserError(f"{name} = {value!r}", "not a pair",
                                 f"({PAIRS[name][0]}, {PAIRS[name][1]}), e.g. (0.0, 0.9)")
        for sub, v in zip(PAIRS[name], value, strict=True):
          dotted[f"sample.guidance.{sub}"] = v
      elif name in known:
        value = tuple(value) if isinstance(value, list) else value
        dotted[f"sample.guidance.{name}"] = value
      elif name in SAMPLER_FIELDS:
        dotted[f"sample.{name}"] = value
      else:
        allowed = sorted((*known, *SAMPLER_FIELDS, *PAIRS))
        raise errors.UserError(f"{name}=", "no such sampling setting",
                               f"allowed: {', '.join(allowed)}"
                               + errors.did_you_mean(name, allowed))
    c = validation.replace(self.config, dotted)
    validation.validate(c, jax.device_count(), job="sample")
    return c

  def flops(self, **fields: Any) -> float:
    """GMACs per image of a setting (the DiT papers' "GFLOPs", attention included;
    sgjax.flops.report(pipe.settings(...)) gives the whole table)."""
    c = self.settings(**fields)
    return flops.plan_macs(c, guidance_lib.config_plan(c)).with_attention / 1e9

  def conditions(self, labels: Any = None, prompts: Sequence[str] | None = None
                 ) -> tuple[Any, Any]:
    """(conditions, null) of a call: class labels (checked against the model's classes), or
    prompts through the frozen text encoder."""
    if self.text:
      if labels is not None or not prompts:
        raise errors.UserError("prompts", "a text model samples prompts",
                               "pass prompts=['a photo of …', …] (not labels)")
      if not all(isinstance(p, str) for p in prompts):
        raise errors.UserError(f"prompts = {list(prompts)!r}", "not all strings",
                               "a list of prompts")
      return generate.encode_prompts(self.config, list(prompts))
    if prompts is not None or labels is None:
      raise errors.UserError("labels", "a class-conditional model samples class labels, not "
                             "prompts", f"pass labels=[…] in 0..{self.model.num_classes - 1}")
    y = np.asarray(labels)
    k = self.model.num_classes
    if (y.ndim != 1 or len(y) == 0 or not np.issubdtype(y.dtype, np.integer)
        or y.min() < 0 or y.max() >= k):
      raise errors.UserError(f"labels = {np.asarray(labels).tolist()!r}",
                             "not a non-empty list of class labels",
                             f"ints in 0..{k - 1} (the model's {k} classes)")
    return y.astype(np.int32), None

  # ------------------------------------------------------------------ sampling
  def __call__(self, labels: Any = None, *, prompts: Sequence[str] | None = None,
               **fields: Any) -> np.ndarray:
    """uint8 NHWC images, one per label (or prompt), with the keyword settings (the rest
    from the config's `sample` section)."""
    cond, null = self.conditions(labels, prompts)
    if "batch_size" not in fields:
      shards = sharding.data_parallel_size(self.config.mesh, jax.device_count())
      n = generate.num_conditions(cond)
      fields["batch_size"] = min(-(-n // shards) * shards, self.config.sample.batch_size)
    return self.images(self.settings(**fields), cond, null)

  def weights(self, config: ml_collections.ConfigDict) -> dict[str, Any]:
    """{"main": params[, "guide": AG+SG's guide checkpoint, loaded once]} for `config`."""
    weights = {guidance_lib.MAIN: self.params}
    g = config.sample.guidance
    if guidance_lib.uses_guide(g.rule):
      where = g.guide_workdir or self.workdir
      if not where:
        raise errors.UserError("sample.guidance.guide_workdir = ''", f"{self.source} is a "
                               "file, so AG+SG's guide checkpoint has no workdir",
                               "set guide_workdir= to the workdir holding the guide step")
      if (where, g.guide_step) not in self._guides:
        _, self._guides[where, g.guide_step], _ = state_lib.restore_params(
            config, where, self.mesh, ema=config.sample.use_ema, step=g.guide_step)
      weights[guidance_lib.GUIDE] = self._guides[where, g.guide_step]
    return weights

  def _timed(self, fn, *args, **kwargs):
    before, t0 = self.compiled, time.perf_counter()
    out = fn(*args, **kwargs)
    if self.compiled > before:  # The call compiled: count its time as compiling (first call).
      self.compile_seconds += time.perf_counter() - t0
    return out

  def images(self, config: ml_collections.ConfigDict, cond: Any, null: Any = None, *,
             seed: int | None = None, weights: Mapping[str, Any] | None = None) -> np.ndarray:
    """uint8 NHWC samples of every condition with `config`'s sampling settings, in batches
    of its `sample.batch_size` (seed: `sample.seed`; weights: this pipeline's, or e.g. the
    live EMA of a run that trains)."""
    plan = guidance_lib.config_plan(config)
    seed = config.sample.seed if seed is None else seed
    with jax.set_mesh(self.mesh):
      w = dict(weights) if weights is not None else self.weights(config)
      return self._timed(generate.images, config, self.model, w, cond, plan, self.mesh, seed,
                         null, self._compiled)

  def write_samples(self, config: ml_collections.ConfigDict, out_dir: str, num_samples: int,
                    seed: int) -> str:
    """`num_samples` class-balanced samples as resumable shards merged into <out_dir>.npz."""
    plan = guidance_lib.config_plan(config)
    with jax.set_mesh(self.mesh):
      return generate.write_samples(config, self.model, self.weights(config), plan, self.mesh,
                                    out_dir, num_samples, seed, self._compiled)


# ------------------------------------------------------------------------ loading
def from_workdir(workdir: str, config: ml_collections.ConfigDict, *, step: int | None = None,
                 ema: bool | None = None, mesh=None) -> Pipeline:
  """The pipeline of a workdir's checkpoint (default: the latest) under a validated `config`
  (the workdir's record must allow it); `ema` None: `sample.use_ema`."""
  mesh = mesh or sharding.build_mesh(config.mesh)
  ckpt_dir = os.path.join(workdir, "checkpoints")
  found = checkpoint.saved_steps(ckpt_dir)
  if step is not None and found and step not in found:
    raise errors.UserError(f"step = {step}", f"no checkpoint of step {step} under {ckpt_dir}",
                           f"there are {found}")
  ema = config.sample.use_ema if ema is None else ema
  with jax.set_mesh(mesh):
    model, params, restored = state_lib.restore_params(config, workdir, mesh, ema=ema,
                                                       step=step)
  return Pipeline(config, model, params, mesh, step=restored, workdir=workdir)


def from_file(path: str, overrides: Mapping[str, Any] | None = None, *,
              step: int | None = None, ema: bool = True, mesh=None) -> Pipeline:
  """The pipeline of an `sgjax`-layout export (sgjax.export), its config from the file."""
  arrays, meta = export.read(path)
  layout = meta.get("sgjax.layout")
  if layout != "sgjax":
    raise errors.UserError(path, f"holds the official {str(layout).upper()} layout",
                           "import it with sgjax-convert-dit --src=FILE --out=DIR and load DIR, "
                           "or export with --layout=sgjax")
  damaged = "re-export it with sgjax-export"
  step_text = meta.get("sgjax.step", "")
  if not step_text.isdigit():
    raise errors.UserError(path, f"not a readable sgjax export (its step is {step_text!r})",
                           damaged)
  saved = int(step_text)
  if step is not None and step != saved:
    raise errors.UserError(f"step = {step}", f"{path} holds step {saved}",
                           "load the workdir for other steps")
  if not ema:
    raise errors.UserError("ema = False", f"{path} holds the EMA weights only",
                           "load the workdir for the raw params")
  flat = readers.json_text(meta["sgjax.config"], path, "sgjax export (its config metadata)",
                           damaged, required={})
  config = with_overrides(workdir_lib.config_from_flat(flat, path, damaged), overrides)
  validation.validate(config, jax.device_count(), job="sample")
  mesh = mesh or sharding.build_mesh(config.mesh)
  model = models.from_config(config)
  abstract, shardings = state_lib.abstract_params_and_shardings(model, config.seed, mesh)
  want = {k: tuple(v.shape) for k, v in export.paths(abstract).items()}
  have = {k: tuple(v.shape) for k, v in arrays.items()}
  if want != have:
    wrong = sorted(k for k in set(want) | set(have) if want.get(k) != have.get(k))[:3]
    shapes = ", ".join(f"{k} {have.get(k)} (the model's: {want.get(k)})" for k in wrong)
    raise errors.UserError(path, f"its tensors do not fit its config's model ({shapes})",
                           "re-export it with sgjax-export")
  params = jax.device_put(jax.tree.map(np.asarray, export.unflatten(arrays)), shardings)
  return Pipeline(config, model, params, mesh, step=saved, source=path)


def load(source: str, step: int | None = None, ema: bool = True,
         overrides: Mapping[str, Any] | None = None, *,
         config: ml_collections.ConfigDict | str | None = None) -> Pipeline:
  """A pipeline of a trained workdir (its latest checkpoint, or `step`; EMA weights unless
  ema=False) or of an `sgjax`-layout export (FILE.safetensors).

  The config is the workdir's record (or `config`: a ConfigDict or config file); `overrides`
  sets dotted fields on it, e.g. {"vae.weights": ".../diffusion_pytorch_model.safetensors"}
  for a latent model, {"sample.batch_size": 16}. Every problem is one UserError line.
  """
  source = os.fspath(source)
  if files.isdir(source):
    workdir_lib.refuse_inside_a_run(source)  # A step or output folder: name the run.
  if source.endswith(".safetensors") or (files.exists(source) and not files.isdir(source)):
    if config is not None:
      raise errors.UserError("config", f"{source} carries its own config",
                             "pass overrides= to change fields of it")
    return from_file(source, overrides, step=step, ema=ema)
  if not files.isdir(source):
    raise errors.UserError(source, "no such workdir or file",
                           "pass a trained workdir or an exported .safetensors file")
  if config is None:
    c = workdir_lib.workdir_config(source)
  elif isinstance(config, str):
    c = config_lib.load_config_file(config)
  else:
    c = config
  c = with_overrides(c, overrides)
  validation.validate(c, jax.device_count(), job="sample")
  return from_workdir(source, c, step=step, ema=ema)


def grid(images: np.ndarray, rows: int | None = None) -> np.ndarray:
  """uint8 NHWC images as one HWC grid (rows: about square by default), for display."""
  rows = rows or max(r for r in range(1, math.isqrt(len(images)) + 1) if len(images) % r == 0)
  return sampling.image_grid(np.asarray(images), rows=rows)
