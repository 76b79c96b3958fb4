"""What a workdir holds: the config it was trained with, checked by everything that opens it.

At its first save the train loop writes `<workdir>/workdir.json` beside `checkpoints/`: the
config (flat, "model.heads": 6, ...), a fingerprint of the fields that decide the parameters and
the training trajectory, and `base_step`, the last step that was not written by this workdir's
own train loop (an imported checkpoint, or the steps of a workdir made before records existed):
those are never deleted by `train.keep_checkpoints`. A run started from other weights
(`train.init_from`, sgjax.init_from) also records where they came from (`init_from`: path,
kind, step, EMA or raw, sha256 of the weights), so its resume and readers know it without
reading the source again.

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
import re
from collections.abc import Mapping
from typing import Any

import ml_collections

from sgjax import config as config_lib
from sgjax import errors, files, readers

RECORD = "workdir.json"
DAMAGED = "restore it from a copy, or move it aside to open the workdir unchecked"
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


def _as_config_value(value: Any, reference: Any) -> Any:
  """A JSON value (lists for tuples) in the type of the base config's field."""
  if isinstance(reference, tuple) and isinstance(value, list):
    inner = reference[0] if reference else ()
    return tuple(_as_config_value(v, inner) if isinstance(v, list) else v for v in value)
  if isinstance(reference, float) and isinstance(value, int) and not isinstance(value, bool):
    return float(value)
  return value


def config_from_flat(flat: Mapping[str, Any], source: str = "",
                     allowed: str = "restore it from a copy") -> ml_collections.ConfigDict:
  """base_config() with the fields of a flat record ({"model.width": 384, …}, as workdir.json
  and an export's metadata hold it; the inverse of `flat_config`); fields this version does
  not have are left out. A value of another type is one line naming `source` (the file)."""
  c = config_lib.base_config()
  for field, value in flat.items():
    *path, leaf = field.split(".")
    node = c
    for key in path:
      node = node[key] if key in node else None
      if node is None or not hasattr(node, "keys"):
        break
    if node is None or not hasattr(node, "keys") or leaf not in node:
      continue  # Written by another version: nothing here reads it.
    try:
      node[leaf] = _as_config_value(value, node[leaf])
    except TypeError as err:  # ConfigDict refuses another type: the file is damaged.
      spec = config_lib.declarations().get(field)
      want = config_lib.describe(spec) if spec else type(node[leaf]).__name__
      raise errors.UserError(source or "config", f"holds {field} = {value!r:.80}, not {want}",
                             allowed) from err
  return c


def workdir_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a workdir was trained with: its record (workdir.json), else its config.py (an
  imported checkpoint's), else a one-line refusal asking for `config=`."""
  record = read(workdir)
  if record is not None:
    return config_from_flat(record["config"], record_path(workdir), DAMAGED)
  path = os.path.join(workdir, "config.py")
  if os.path.exists(path):
    return config_lib.load_config_file(path)
  refuse_inside_a_run(workdir)
  raise errors.UserError(workdir, f"records no config (no {RECORD}: made before "
                         "workdirs recorded theirs)",
                         "pass config= (the config file it was trained with, or a ConfigDict)")


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
  return readers.json_object(path, "workdir record", DAMAGED,
                             required={"config": dict, "base_step": int})


def write(workdir: str, config: ml_collections.ConfigDict, *, base_step: int,
          written_by: str, init_from: Mapping[str, Any] | None = None) -> None:
  """Writes the record (process 0; atomic). `base_step`: the last step not saved by this
  workdir's own train loop (-1: none). `init_from`: where a run started from weights took
  them (sgjax.init_from.read's record: path, kind, step, weights, sha256)."""
  import jax  # Local: the record module stays light for the converters' flag parsing.
  if jax.process_index() != 0:
    return
  flat = flat_config(config)
  record = dict(format=FORMAT, fingerprint=fingerprint(flat), base_step=int(base_step),
                written_by=written_by, config=flat)
  if init_from is not None:
    record["init_from"] = dict(init_from)
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
    if not files.exists(have) or readers.json_object(
        have, "settings file", f"move {base} aside (or restore {SETTINGS} from a copy) and "
        "rerun") != settings:
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


def _is_run(path: str) -> bool:
  return files.exists(os.path.join(path, RECORD)) or files.isdir(os.path.join(path, "checkpoints"))


def run_of(path: str) -> tuple[str, str] | None:
  """(the run's workdir, what `path` is in it) when `path` lies inside a training run and is
  not one itself: "checkpoint step 10", "the checkpoints folder", "the output folder
  samples/…" (a sample set, the study, a sweep, eval); None otherwise."""
  path = os.fspath(path) if files.is_remote(path) else os.path.abspath(path)
  if _is_run(path):
    return None
  parts, parent = [], path
  while True:
    up = os.path.dirname(parent)
    if up == parent or up.endswith(":/") or up.endswith(":"):
      return None
    parts.insert(0, os.path.basename(parent))
    parent = up
    if _is_run(parent):
      break
  if parts[0] == "checkpoints" and len(parts) == 1:
    return parent, "the checkpoints folder"
  if parts[0] == "checkpoints" and parts[1].isdigit():
    return parent, f"checkpoint step {int(parts[1])}" + (
        f" (its {'/'.join(parts[2:])})" if len(parts) > 2 else "")
  return parent, f"the output folder {'/'.join(parts)}"


def refuse_inside_a_run(path: str, where: str = "") -> None:
  """Refuses, naming the workdir to pass, a folder given as a workdir that lies inside one (a
  checkpoint step, `checkpoints/`, an output folder)."""
  found = run_of(path)
  if found is None:
    return
  run, what = found
  step = re.search(r"checkpoint step (\d+)", what)
  raise errors.UserError(where or path, f"is {what} of the run at {run}, not a workdir",
                         f"pass that run's workdir, {run}"
                         + (f" (and step={step.group(1)})" if step else ""))
