"""What a workdir holds: the config it was trained with, checked by everything that opens it.

At its first save the train loop writes `<workdir>/workdir.json` beside `checkpoints/`: the
config (flat, "model.heads": 6, ...), a fingerprint of the fields that decide the parameters and
the training trajectory, and `base_step`, the last step that was not written by this workdir's
own train loop (an imported checkpoint, or the steps of a workdir made before records existed):
those are never deleted by `train.keep_checkpoints`.

Resume (`check(..., resuming=True)`) and every reader (sampling, eval, sweep, the AG+SG guide)
compare the requested config with the record. Which fields may differ is one table, `RULES`:
  FREE      may change anywhere: run length, logging, checkpoint cadence, sampling, eval, sweeps,
            mesh sizes, file locations, kernels that compute the same thing;
  TRAINING  decide the trajectory but not what the params mean (optimizer, batch, seed, compute
            dtype): refused on resume, free for readers;
  (others)  decide the model or what the checkpoint means (model.*, data shapes and classes,
            sparsity, VAE and text architecture): refused everywhere.
The longest listed prefix of a field decides; a field not listed must match, so a new field is
safe until someone classifies it.

Outputs of one setting never overwrite another's: `output_dir` keeps a settings file in each
output folder and writes beside a folder that holds other settings.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import ml_collections

from sgjax import errors, files

RECORD = "workdir.json"
FORMAT = 1
SETTINGS = "settings.json"

FREE, TRAINING = "free", "training"
RULES: dict[str, str] = {
    "seed": TRAINING, "dtype": TRAINING,
    "model.attention": FREE, "model.remat": FREE,  # The same function, another kernel/memory.
    "data.dir": FREE, "data.cache_dir": FREE,  # Where the data lies (machines differ), not what.
    "data.worker_count": FREE, "data.prefetch": FREE,
    "vae.weights": FREE, "vae.chunk": FREE,
    "encode": FREE,  # The latent writer's settings; the latent set checks its own metadata.
    "text.templates": TRAINING, "text.eval_templates": FREE,
    "train": TRAINING,  # lr, betas, batch size, EMA, dropout, accumulation, clipping, warmup.
    "train.num_steps": FREE, "train.log_every": FREE, "train.checkpoint_every": FREE,
    "train.keep_checkpoints": FREE, "train.async_checkpoint": FREE, "train.keep_period": FREE,
    "train.sample_every": FREE, "train.profile_steps": FREE,  # What a run shows, not what it is.
    "mesh": FREE, "sample": FREE, "demo": FREE, "sweep": FREE, "eval": FREE,
    "study": FREE,
}

_noted: set[str] = set()


def rule(field: str) -> str | None:
  """FREE, TRAINING, or None (must match) for a dotted field name."""
  parts = field.split(".")
  for n in range(len(parts), 0, -1):
    if ".".join(parts[:n]) in RULES:
      return RULES[".".join(parts[:n])]
  return None


def flat_config(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """{"model.heads": 6, ...}: every leaf, tuples as lists (as JSON holds them), the model
  preset resolved (a preset and its explicit fields compare equal)."""
  from sgjax import models  # Local: the models import jax; a record needs none.
  c = config.copy_and_resolve_references()
  with c.unlocked():
    models.apply_preset(c.model)
  out: dict[str, Any] = {}

  def walk(node, path):
    for key in node.keys():
      value = node[key]
      if hasattr(value, "keys"):
        walk(value, path + [key])
      else:
        out[".".join(path + [key])] = json.loads(json.dumps(value, default=str))
  walk(c, [])
  return out


def fingerprint(flat: dict[str, Any]) -> str:
  """Digest of the fields that decide the parameters and the training trajectory."""
  kept = {k: v for k, v in flat.items() if rule(k) != FREE}
  return hashlib.sha1(json.dumps(kept, sort_keys=True).encode()).hexdigest()[:16]


def record_path(workdir: str) -> str:
  return os.path.join(workdir, RECORD)


def read(workdir: str) -> dict[str, Any] | None:
  """The workdir's record, or None for a workdir made before records (or not trained yet)."""
  path = record_path(workdir)
  if not files.exists(path):
    return None
  try:
    record = json.loads(files.read_text(path))
    if not isinstance(record.get("config"), dict) or not isinstance(record.get("base_step"), int):
      raise ValueError("no 'config' and 'base_step' in it")
  except (ValueError, AttributeError) as err:
    raise errors.UserError(path, f"not a workdir record ({errors.first_line(err)})",
                           "restore it from a copy, or move it aside to open the workdir "
                           "unchecked") from err
  return record


def write(workdir: str, config: ml_collections.ConfigDict, *, base_step: int,
          written_by: str) -> None:
  """Writes the record (process 0; atomic). `base_step`: the last step not saved by this
  workdir's own train loop (-1: none)."""
  import jax  # Local: the record module stays light for the converters' flag parsing.
  if jax.process_index() != 0:
    return
  flat = flat_config(config)
  record = dict(format=FORMAT, fingerprint=fingerprint(flat), base_step=int(base_step),
                written_by=written_by, config=flat)
  files.makedirs(workdir)
  files.write_text(record_path(workdir), json.dumps(record, indent=1, sort_keys=True) + "\n")


def note_unrecorded(workdir: str) -> None:
  """Says once per workdir that it predates records, so nothing was checked."""
  import jax
  if workdir in _noted or jax.process_index() != 0:
    return
  _noted.add(workdir)
  print(f"note: {workdir} has no {RECORD} (made before workdirs recorded their config): its "
        "checkpoints load, but the config is not checked against the one they were trained "
        "with", flush=True)


def differences(record: dict[str, Any], config: ml_collections.ConfigDict, *,
                resuming: bool) -> list[tuple[str, Any, Any]]:
  """(field, recorded, requested) for every field that may not differ here."""
  requested = flat_config(config)
  allowed = (FREE,) if resuming else (FREE, TRAINING)
  out = []
  for field, recorded in sorted(record["config"].items()):
    if field not in requested or rule(field) in allowed:
      continue  # A field this version does not have cannot be compared.
    if requested[field] != recorded:
      out.append((field, recorded, requested[field]))
  return out


def check(workdir: str, config: ml_collections.ConfigDict, *, resuming: bool) -> dict | None:
  """Refuses `config` where it differs from the record in a field that may not differ (names
  each field with both values); returns the record (None, with a note, for an old workdir)."""
  record = read(workdir)
  if record is None:
    note_unrecorded(workdir)
    return None
  diff = differences(record, config, resuming=resuming)
  if diff:
    values = "; ".join(f"{f} = {a!r} there, {b!r} requested" for f, a, b in diff[:6])
    more = f"; … {len(diff) - 6} more" if len(diff) > 6 else ""
    kind = "model, data or training recipe" if resuming else "model or data"
    raise errors.UserError(", ".join(f for f, _, _ in diff[:6]),
                           f"{workdir} holds another {kind} ({values}{more})",
                           f"use the recorded values (in {record_path(workdir)}) or another "
                           "--workdir" + ("; a resume may change only run length, logging, "
                                          "checkpoint cadence, sampling/eval settings and "
                                          "mesh sizes" if resuming else ""))
  return record


def digest(settings: Any) -> str:
  return hashlib.sha1(json.dumps(settings, sort_keys=True, default=str).encode()
                      ).hexdigest()[:10]


def output_dir(base: str, settings: dict[str, Any], log=print) -> str:
  """The folder for outputs of `settings`: `base` if it is new or holds these settings, else
  `<base>_<digest>` beside it (said), so another setting's files are never overwritten.

  The settings are written into the folder (process 0), so a rerun finds it again.
  """
  import jax
  settings = json.loads(json.dumps(settings, sort_keys=True, default=str))
  path = base
  if files.exists(base) and [n for n in files.listdir(base) if n != "writer.lock"]:
    have = os.path.join(base, SETTINGS)
    if not files.exists(have) or json.loads(files.read_text(have)) != settings:
      path = f"{base}_{digest(settings)}"
      if jax.process_index() == 0:
        log(f"{base} holds outputs of other settings: writing beside it, to {path}")
  if jax.process_count() > 1:  # Every process decides before process 0 writes anything.
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices("workdir.output_dir")
  if jax.process_index() == 0:
    files.makedirs(path)
    if not files.exists(os.path.join(path, SETTINGS)):
      files.write_text(os.path.join(path, SETTINGS), json.dumps(settings, indent=1) + "\n")
  return path
