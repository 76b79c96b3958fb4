"""A new run that starts from trained weights: `train.init_from` (docs/init_from.md).

  --config.train.init_from=PATH [--config.train.init_step=N] [--config.train.init_params=params]

PATH is told apart by what it is (a folder, then the file's bytes and metadata, not its name):
  workdir     its checkpoint `init_step` (-1: the latest), EMA weights or raw params
              (`init_params`);
  export      a file of sgjax-export in any layout (sgjax, sit, dit): the EMA weights it holds;
  state_dict  an official DiT/SiT .pt/.pth/.safetensors, through sgjax.convert.dit_checkpoint
              (a DiT training checkpoint: its `ema`, or its `model` with init_params=params).

The run keeps its own workdir and seed: step 0, a fresh optimizer state, params = EMA = the
loaded weights. The train loop saves them as its step-0 checkpoint before the first step and
writes `describe(...)` into its workdir.json, so a resume starts from the run's own checkpoints
and never reads the source again. The source is only read (a workdir through a read-only
checkpoint manager).

What may differ from the source: sparsity (routes, mask γ), the train section, the data (set,
image size, classes), the seed, the compute dtype, the VAE and text settings. The position
tables are computed from the grid (DiT's fixed sin-cos, TR-DiT's RoPE), so a new image size
needs nothing. A new class count resizes the label table (`resize_labels`). A parameter whose
shape differs (width, depth, patch, channels, MLP ratio, decoder, model kind) is refused naming
it and both shapes; a model field that changes the function but no shape (heads, time_scale,
prediction) is refused naming it wherever the source records its config (workdirs, exports: an
official state dict records neither its heads nor its time convention, so the run's config says
them).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from sgjax import checkpoint, errors, export, files, models, readers
from sgjax import state as state_lib
from sgjax import workdir as workdir_lib
from sgjax.convert import dit_checkpoint

PARAMS = ("ema", "params")
LABEL_TABLE = "y_embed/embedding"  # DiT's (classes + 1, width) table; its last row is ∅.
ALLOWED = ("a trained workdir, a file written by sgjax-export, or an official DiT/SiT state "
           "dict (.pt/.pth/.safetensors)")
KEEP = ("a run started from weights may change sparsity, the train section, the data (image "
        "size, classes), seed and dtype, not the architecture: use the source's, or "
        "train.init_from='' to start afresh")
# An official state dict's architecture, as config fields (to name what differs).
ARCH_FIELDS = {"depth": "model.depth", "width": "model.width", "patch_size": "model.patch_size",
               "mlp_ratio": "model.mlp_ratio", "channels": "data.channels"}


def check_config(config: ml_collections.ConfigDict) -> None:
  """`train.init_step` and `train.init_params` choose within `train.init_from`: set without
  it they would do nothing, which is refused (the declarations check their ranges)."""
  t = config.train
  if not t.init_from:
    errors.check(t.init_step == -1, "train.init_step", t.init_step,
                 "picks a checkpoint of train.init_from, which is '' (set it, or -1)")
    errors.check(t.init_params == "ema", "train.init_params", t.init_params,
                 "picks the weights of train.init_from, which is '' (set it, or 'ema')")


def resize_labels(table: np.ndarray, num_classes: int) -> np.ndarray:
  """A (K+1, D) label table for `num_classes` classes: class k keeps its row where both have
  it, ∅ (the last row) stays ∅, and a class the source did not have starts as ∅, so before
  any fine-tuning it samples what the unconditional model does."""
  null = table.shape[0] - 1
  return table[[min(k, null) for k in range(num_classes)] + [null]]


def weights_sha256(params: Mapping[str, Any]) -> str:
  """sha256 of the weights: each float32 array in our flattened key order (`export.paths`),
  preceded by "<path>:<shape>\\n". The same weights give the same hash from a workdir, an export
  of it in any layout, or the run started from them (before its classes are resized)."""
  h = hashlib.sha256()
  for path, a in export.flatten(params).items():
    a = np.ascontiguousarray(a, np.float32)
    h.update(f"{path}:{list(a.shape)}\n".encode())
    h.update(a.tobytes())
  return h.hexdigest()


def _host(tree: Any) -> Any:
  """Global jax arrays as full numpy arrays on every process."""
  return jax.tree.map(lambda a: np.asarray(jax.device_get(a)) if a.is_fully_addressable
                      else np.asarray(multihost_utils.process_allgather(a, tiled=True)), tree)


def _shapes(tree: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
  return {k: tuple(v.shape) for k, v in export.paths(tree).items()}


def model_shapes(config: ml_collections.ConfigDict) -> dict[str, tuple[int, ...]]:
  """{"block0/attn/qkv/kernel": shape} of the configured model's params (nothing allocated)."""
  model = models.from_config(config)
  return _shapes(nn.unbox(jax.eval_shape(lambda: state_lib.init_params(model, config.seed))))


def _arch_differences(source_flat: Mapping[str, Any] | None, config: ml_collections.ConfigDict,
                      fields: tuple[str, ...]) -> list[str]:
  if not source_flat:
    return []
  here = workdir_lib.flat_config(config)
  return [f"{f} = {source_flat[f]!r} there, {here[f]!r} here" for f in fields
          if f in source_flat and f in here and source_flat[f] != here[f]]


def check_fits(source_shapes: Mapping[str, tuple[int, ...]], config: ml_collections.ConfigDict,
               where: str, source_flat: Mapping[str, Any] | None = None) -> None:
  """Refuses (one line naming each parameter and both shapes) weights the configured model
  cannot take once its label table is resized; `source_flat`: the source's config, flat, to
  name the fields that differ too."""
  target = model_shapes(config)
  source = dict(source_shapes)
  if LABEL_TABLE in source and LABEL_TABLE in target:
    source[LABEL_TABLE] = (target[LABEL_TABLE][0],) + tuple(source[LABEL_TABLE][1:])
  diff = [f"{k} {source[k]} there, {target[k]} here" for k in sorted(set(source) & set(target))
          if source[k] != target[k]]
  diff += [f"{k} {target[k]} here, not there" for k in sorted(set(target) - set(source))]
  diff += [f"{k} {source[k]} there, not here" for k in sorted(set(source) - set(target))]
  if diff:
    fields = tuple(f for f in (source_flat or {}) if f.startswith(("model.", "text."))
                   and workdir_lib.rule(f) != workdir_lib.FREE and f != "model.preset")
    named = _arch_differences(source_flat, config, fields + ("data.channels",))
    shown = "; ".join(diff[:3]) + (f"; … {len(diff) - 3} more" if len(diff) > 3 else "")
    raise errors.UserError(where, f"its weights do not fit the configured model ({shown}"
                           + (f"; {', '.join(named)}" if named else "") + ")", KEEP)


def check_function(source_flat: Mapping[str, Any], config: ml_collections.ConfigDict,
                   path: str) -> None:
  """Refuses a `model.*` field (not a kernel choice) that differs from the source's: the weights
  fit but would compute another function (heads, time_scale, prediction)."""
  here = workdir_lib.flat_config(config)
  for f, there in sorted(source_flat.items()):
    if (f.startswith("model.") and f != "model.preset" and f in here
        and workdir_lib.rule(f) != workdir_lib.FREE and here[f] != there):
      raise errors.UserError(f"{f} = {here[f]!r}", f"the weights of {path} were trained with "
                             f"{there!r} (same shapes, another function)",
                             f"keep {f} = {there!r} in a run started from them")


def _check_finite(params: Mapping[str, Any], where: str) -> None:
  for path, a in export.paths(params).items():
    bad = int(np.size(a) - np.isfinite(a).sum())
    if bad:
      raise errors.UserError(where, f"tensor {path!r} holds {bad} non-finite values (NaN or "
                             f"inf) of {np.size(a)}", "start from weights saved before training "
                             "diverged")


def _from_workdir(config: ml_collections.ConfigDict, path: str, mesh, where: str
                  ) -> tuple[dict[str, Any], dict[str, Any]]:
  t = config.train
  inside = workdir_lib.run_of(path)  # A step or output folder of a run: name the run.
  if inside is not None:
    run, what = inside
    step = what.split()[2] if what.startswith("checkpoint step") else ""
    raise errors.UserError(where, f"is {what} of the run at {run}, not a workdir",
                           f"train.init_from={run}" + (f" with train.init_step={step}"
                                                       if step else ""))
  ckpt_dir = os.path.join(path, "checkpoints")
  found = checkpoint.saved_steps(ckpt_dir)
  if not found:
    raise errors.UserError(where, f"no checkpoint under {ckpt_dir}", ALLOWED)
  step = found[-1] if t.init_step == -1 else t.init_step
  if step not in found:
    raise errors.UserError(f"train.init_step = {t.init_step}", f"no checkpoint of step {step} "
                           f"under {ckpt_dir}", f"there are {found} (-1: the latest)")
  record = workdir_lib.read(path)
  if record is not None:
    source_config = workdir_lib.config_from_flat(record["config"])
  elif files.exists(os.path.join(path, "config.py")):
    source_config = workdir_lib.workdir_config(path)
  else:
    raise errors.UserError(where, f"records no config (no {workdir_lib.RECORD}: made before "
                           "workdirs recorded theirs)", "a workdir trained by this version (it "
                           "writes workdir.json), an export or a state dict")
  flat = workdir_lib.flat_config(source_config)
  check_fits(model_shapes(source_config), config, where, flat)
  check_function(flat, config, path)
  with jax.set_mesh(mesh):
    _, params, _ = state_lib.restore_params(source_config, path, mesh,
                                            ema=t.init_params == "ema", step=step)
  info = dict(kind="workdir", step=step, weights=t.init_params)
  return _host(params), info


def _from_export(config: ml_collections.ConfigDict, arrays: Mapping[str, np.ndarray],
                 meta: Mapping[str, str], path: str, where: str
                 ) -> tuple[dict[str, Any], dict[str, Any]]:
  t, layout = config.train, meta.get("sgjax.layout")
  damaged = "re-export it with sgjax-export"
  if not meta.get("sgjax.step", "").isdigit():
    raise errors.UserError(where, f"not a readable sgjax export (its step is "
                           f"{meta.get('sgjax.step')!r})", damaged)
  step = int(meta["sgjax.step"])
  if t.init_params != "ema":
    raise errors.UserError(f"train.init_params = {t.init_params!r}", f"{path} holds the EMA "
                           "weights only", "'ema', or start from its workdir for the raw params")
  if t.init_step not in (-1, step):
    raise errors.UserError(f"train.init_step = {t.init_step}", f"{path} holds step {step}",
                           "-1, or start from its workdir for other steps")
  flat = readers.json_text(meta["sgjax.config"], where, "sgjax export (its config metadata)",
                           damaged, required={})
  if layout == "sgjax":
    params = export.unflatten({k: np.asarray(arrays[k], np.float32) for k in arrays})
  else:  # sit / dit: the official state dict, read back by the converter (heads: no shape).
    params, _ = dit_checkpoint.convert(dit_checkpoint.load_state_dict(arrays, where=where),
                                       heads=1, where=where)
  check_fits(_shapes(params), config, where, flat)
  check_function(flat, config, path)
  return params, dict(kind="export", layout=layout, step=step, weights="ema")


def _from_state_dict(config: ml_collections.ConfigDict, loaded: Mapping[str, Any], where: str
                     ) -> tuple[dict[str, Any], dict[str, Any]]:
  t = config.train
  if t.init_step != -1:
    raise errors.UserError(f"train.init_step = {t.init_step}", "a state dict holds one set of "
                           "weights", "-1")
  training = "pos_embed" not in loaded and "ema" in loaded  # A DiT training checkpoint.
  if t.init_params == "params" and not (training and "model" in loaded):
    raise errors.UserError(f"train.init_params = {t.init_params!r}", "the state dict holds one "
                           "set of weights (only a DiT training checkpoint has raw ones, its "
                           "'model')", "'ema'")
  key = "model" if t.init_params == "params" else ""
  sd = dit_checkpoint.load_state_dict(loaded, key, where)
  params, arch = dit_checkpoint.convert(sd, heads=1, where=where)  # Heads shape nothing.
  check_fits(_shapes(params), config, where,
             {field: arch[name] for name, field in ARCH_FIELDS.items()})
  weights = "model" if key else ("ema" if training else "state dict")
  return params, dict(kind="state_dict", step=None, weights=weights)


def read(config: ml_collections.ConfigDict, workdir: str, mesh
         ) -> tuple[dict[str, Any], dict[str, Any]]:
  """(weights as float32 numpy in the source's shapes, the record of where they came from:
  path, kind, step, weights, sha256) of `config.train.init_from`, checked to fit `config`'s
  model; every refusal one line."""
  path = config.train.init_from
  where = f"train.init_from = {path!r}"
  if config.train.init_params not in PARAMS:
    raise errors.UserError(f"train.init_params = {config.train.init_params!r}", "unknown",
                           f"allowed: {', '.join(PARAMS)}")
  local = not files.is_remote(path)
  if local and os.path.abspath(path) == os.path.abspath(workdir):
    raise errors.UserError(where, "is this run's own workdir", "a run resumes from its own "
                           "checkpoints by itself: leave train.init_from '' (or start another "
                           "workdir from this one)")
  if files.isdir(path):
    params, info = _from_workdir(config, path, mesh, where)
  else:
    readers.check_file(path, where, ALLOWED)
    kind = readers.file_format(path)
    if kind == "safetensors":
      tensors = readers.SafetensorsFile(path, where, ALLOWED)
      meta = tensors.metadata or {}
      if meta.get("sgjax.format") == export.FORMAT and "sgjax.config" in meta:
        params, info = _from_export(config, tensors, meta, path, where)
      else:
        params, info = _from_state_dict(config, tensors, where)
    elif kind in ("zip", "pickle"):
      params, info = _from_state_dict(config, readers.tensor_file(path, where, ALLOWED), where)
    else:
      raise errors.UserError(where, "is not a workdir, an sgjax export or a state dict", ALLOWED)
  _check_finite(params, where)
  return params, dict(path=os.path.abspath(path) if local else path, **info,
                      sha256=weights_sha256(params))


def fit(params: Mapping[str, Any], config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The source's weights in the configured model's shapes (checked by `read`): the label table
  resized to `data.num_classes` (`resize_labels`); every other array as it is."""
  flat = {k: np.asarray(v, np.float32) for k, v in export.paths(params).items()}
  if LABEL_TABLE in flat:
    flat[LABEL_TABLE] = resize_labels(flat[LABEL_TABLE], config.data.num_classes)
  return export.unflatten(flat)


def initial_params(config: ml_collections.ConfigDict, workdir: str, mesh
                   ) -> tuple[dict[str, Any], dict[str, Any]]:
  """(the run's step-0 weights as host numpy arrays in its model's shapes, the record of their
  source for its workdir.json): `read`, then `fit`."""
  params, source = read(config, workdir, mesh)
  return fit(params, config), source


def describe(source: Mapping[str, Any]) -> str:
  """One line for the log: where a run's weights came from."""
  step = f" step {source['step']}" if source.get("step") is not None else ""
  return (f"started from {source['kind']} {source['path']}{step} ({source['weights']}; "
          f"sha256 {source['sha256'][:12]}…)")
