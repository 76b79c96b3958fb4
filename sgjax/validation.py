"""Config validation: `validate(config, num_devices, job)` runs the checks of the sections `job`
reads, once, before the job does any work.

First every field the job reads is checked against its declaration (sgjax.config: type,
tuple arity, range, finiteness, allowed values; `check_fields`). Then each section's checks of
what depends on other fields run in the module that reads them (`check_config` there:
sgjax.models and its kinds, data.pipeline, models.vae, sparsity, sharding, state, objectives,
monitor, generate, guidance, eval.metrics; the sampler's own fields need no more than their
declarations); a job's own section is checked by the job (sgjax.jobs.demo, sgjax.jobs.sweep,
sgjax.jobs.study, sgjax.tools.encode_latents). So a training run does not fail on a sweep-only
setting, and every job still fails in its first second on a bad value of a field it uses.
Errors name the field and the allowed range: `sgjax.errors.UserError`, one line, exit 2. A key
that `base_config()` does not have (a typo in a config file, where `ConfigDict.update` would add
it silently) is refused for every job. The declarations themselves are sgjax.config's (a leaf).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import ml_collections

from sgjax import config as config_lib
from sgjax import (
  errors,
  generate,
  guidance,
  init_from,
  models,
  monitor,
  objectives,
  sharding,
  sparsity,
  state,
)
from sgjax.config import base_config
from sgjax.data import pipeline
from sgjax.eval import metrics as eval_metrics
from sgjax.models import vae


def check_keys(config: ml_collections.ConfigDict) -> None:
  """Refuses a key that `base_config()` lacks, naming it, its section's keys and the closest.

  Nothing would read such a key: it is a typo or a field that does not exist (yet).
  """
  def walk(node, reference, path):
    for key in node.keys():
      if key not in reference:
        raise errors.unknown_key(".".join(path + [key]), list(reference.keys()))
      if isinstance(reference[key], ml_collections.ConfigDict) and hasattr(node[key], "keys"):
        walk(node[key], reference[key], path + [key])
  walk(config, base_config(), [])


def field_error(field: str, value: Any, spec: config_lib.Spec | None = None
                ) -> errors.UserError | None:
  """The one-line refusal of `value` for the declared `field` (or its `spec`), or None."""
  found = config_lib.problem(spec or config_lib.declarations()[field], value)
  if found is None:
    return None
  where, bad, what, broken = found
  shown = repr(bad)
  shown = shown if len(shown) <= 120 else shown[:117] + "..."
  return errors.UserError(f"{field}{where} = {shown}", what,
                          f"allowed: {config_lib.describe(broken)}")


def check_fields(config: ml_collections.ConfigDict, sections: Sequence[str]) -> None:
  """Refuses the first field of `sections` (and every top-level field) that breaks its
  declaration: a wrong type or arity, NaN/±inf, out of range, not an allowed value."""
  for field, spec in config_lib.declarations().items():
    section, _, rest = field.partition(".")
    if rest and section not in sections:
      continue
    node = config
    for key in field.split("."):
      node = node[key]
    bad = field_error(field, node, spec)
    if bad is not None:
      raise bad


def replace(config: ml_collections.ConfigDict, fields: Mapping[str, Any]
            ) -> ml_collections.ConfigDict:
  """`config_lib.replace` of a user's values (keyword settings, `overrides=`): a field that
  does not exist or a value its declaration refuses is one line (ConfigDict would raise a
  TypeError for a wrong type, or keep e.g. a float where a tuple belongs)."""
  declared = config_lib.declarations()
  for field, value in fields.items():
    bad = errors.missing_config_key(config, field)
    if bad is None and field in declared:
      bad = field_error(field, value, declared[field])
    if bad is not None:
      raise bad
  return config_lib.replace(config, dict(fields))


def _check_train(config: ml_collections.ConfigDict, num_devices: int | None) -> None:
  state.check_config(config, num_devices)
  objectives.check_config(config)  # train.objective fits the model.
  monitor.check_config(config)  # train.sample_every, train.profile_steps.
  init_from.check_config(config)  # train.init_step / init_params need train.init_from.


def _check_sample(config: ml_collections.ConfigDict, num_devices: int | None) -> None:
  generate.check_config(config, num_devices)  # The batches.
  guidance.check_config(config)  # The rule and its schedule, step by step.


# Each section's checks, from the module that reads it: (config, num_devices or None) -> None.
# `model` includes `dtype` and a text model's `text` shapes; `data` a caption set's templates;
# `vae` latent data's shapes.
CHECKS: dict[str, Callable[[ml_collections.ConfigDict, int | None], None]] = {
    "model": lambda c, n: models.check_config(c),
    "data": lambda c, n: pipeline.check_config(c),
    "vae": lambda c, n: vae.check_config(c),
    "sparsity": lambda c, n: sparsity.check_config(c),
    "mesh": sharding.check_config,
    "train": _check_train,
    "sample": _check_sample,
    "eval": eval_metrics.check_config,
}
# Training reads `sample` and `vae` too: the grids it draws while it trains.
_TRAIN = ("model", "data", "vae", "sparsity", "mesh", "train", "sample")
_SAMPLE = ("model", "data", "vae", "sparsity", "mesh", "sample")
# The declared sections each check covers (checked generically first); top-level fields
# (seed, dtype) always.
FIELDS: dict[str, tuple[str, ...]] = {
    "model": ("model", "text"), "data": ("data",), "vae": ("vae",), "sparsity": ("sparsity",),
    "mesh": ("mesh",), "train": ("train",), "sample": ("sample",), "eval": ("eval",)}
# A job's own section: its values are declared here too, its other checks are the job's.
OWN = {"demo": "demo", "sweep": "sweep", "study": "study", "encode_latents": "encode"}
# The sections each job reads. "all": every one (what a caller that names no job gets).
JOBS: dict[str, tuple[str, ...]] = {
    "all": tuple(CHECKS),
    "train": _TRAIN,
    "demo": _TRAIN,  # Trains, then samples; `demo` itself: sgjax.jobs.demo.
    "bench": _TRAIN,
    "sample": _SAMPLE,
    "eval": _SAMPLE + ("eval",),
    "sweep": _SAMPLE,  # `sweep` itself: sgjax.jobs.sweep (`study`: sgjax.jobs.study).
    "study": _SAMPLE,
    "flops": ("model", "data", "sparsity", "sample"),
    "encode_latents": ("vae",),  # `encode` itself: sgjax.tools.encode_latents.
    "encode_text": ("model", "data"),
}


def validate(config: ml_collections.ConfigDict, num_devices: int | None = None,
             job: str = "all") -> None:
  """Raises UserError naming the first bad field among those `job` reads (a key of JOBS).
  Resolves the model preset in place. num_devices: None skips what depends on the device
  count (the mesh, batches split over it)."""
  if job not in JOBS:
    raise KeyError(f"job {job!r}: not one of {tuple(JOBS)}")  # A caller's bug, not the user's.
  check_keys(config)
  own = (OWN[job],) if job in OWN else ()
  check_fields(config, sum((FIELDS[s] for s in JOBS[job]), own))
  models.apply_preset(config.model)
  for section in JOBS[job]:
    CHECKS[section](config, num_devices)
