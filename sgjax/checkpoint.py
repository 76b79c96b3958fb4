"""What goes in a checkpoint, and a restore that fails loudly.

A checkpoint holds the whole train state (step, params, EMA, optimizer state, base RNG key) and
the data iterator's position, so that a resumed run continues bit for bit. Orbax writes each
step to a temporary folder and renames it when complete, so a crash mid-save leaves the previous
checkpoint intact. A restore never falls back to training from scratch: if a checkpoint exists
and cannot be read (wrong model size, corrupt files), the error propagates.
"""

from __future__ import annotations

import json
import os
from typing import Any

import grain
import orbax.checkpoint as ocp


def manager(directory: str, *, max_to_keep: int = 3, async_save: bool = True,
            keep_period: int = 0) -> ocp.CheckpointManager:
  """`keep_period` > 0 keeps every checkpoint whose step is a multiple of it (guide checkpoints
  for AG+SG) besides the `max_to_keep` latest."""
  if "://" not in directory:  # Orbax needs absolute local paths; gs:// and friends pass as is.
    directory = os.path.abspath(directory)
  options = ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep, keep_period=keep_period or None, create=True,
      enable_async_checkpointing=async_save,
      cleanup_tmp_directories=True)
  return ocp.CheckpointManager(directory, options=options, item_names=("state", "data"))


class _IteratorSnapshot:
  """The iterator's position at save time, for grain's handler: with async saving the handler
  may run after the loop has read further."""

  def __init__(self, data_iter: Any):
    state = data_iter.get_state()
    self._state = state if isinstance(state, bytes) else json.dumps(state).encode()

  def get_state(self) -> bytes:
    return self._state


def save(mngr: ocp.CheckpointManager, step: int, state: Any, data_iter: Any | None) -> None:
  items = dict(state=ocp.args.StandardSave(state))
  if data_iter is not None:
    items["data"] = grain.checkpoint.CheckpointSave(_IteratorSnapshot(data_iter))
  mngr.save(step, args=ocp.args.Composite(**items), force=True)


def restore(mngr: ocp.CheckpointManager, abstract_state: Any, data_iter: Any | None,
            step: int | None = None) -> Any:
  """Restores `step` (default: latest) into arrays laid out like `abstract_state`.

  `abstract_state` is a tree of `jax.ShapeDtypeStruct`s carrying the target shardings; the data
  iterator (if given) is restored in place.
  """
  step = mngr.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"no checkpoint in {mngr.directory}")
  items = dict(state=ocp.args.StandardRestore(abstract_state))
  if data_iter is not None:
    items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
  restored = mngr.restore(step, args=ocp.args.Composite(**items))
  return restored["state"]
