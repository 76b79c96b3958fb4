"""What goes in a checkpoint, and a restore that fails loudly.

A checkpoint holds the whole train state (step, params, EMA, optimizer state, base RNG key) and
the data iterator's position, so that a resumed run continues bit for bit. Orbax writes each
step to a temporary folder and renames it when complete, so a crash mid-save leaves the previous
checkpoint intact. A restore never falls back to training from scratch: a checkpoint that does
not fit the model names the params that differ, and one that cannot be read is named with its
step and the step to resume from instead (it is never deleted).

Only the run's own saves count against `max_to_keep`: `protected_steps` (an imported
checkpoint, steps from before the workdir was recorded) are never deleted, and readers open the
folder read-only, so they neither create it nor clean up another process's save in progress.

A save that fails for a full disk (or any OSError) stops the run with one line naming the step
folder (an async save's own step, though its failure surfaces at the next save or at close),
the cause and the last complete checkpoint; the unfinished step (orbax's temporary folder,
which no resume reads) is removed to give the space back, so a rerun after space is freed
resumes from the last complete step. What orbax's threads and event loop print about that same
failure (its error logs, asyncio's unretrieved task errors, TensorStore's "Event loop is
closed") is kept off the console: the one line says it.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import shutil
import sys
from collections.abc import Sequence
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

from sgjax import errors, files

# Orbax splits a replicated array's write across its replicas by default, slicing it with a jit
# compiled once per shape: for the many small arrays of a state that costs more than the write
# (3 s a save for a 0.26M-parameter model on 8 CPU devices, measured). Only arrays whose
# per-replica slice is at least 1 MiB are split; smaller ones are written whole by one replica.
MIN_REPLICA_SLICE_BYTES = 1 << 20


def _register_array_handler() -> None:
  absl_logger = logging.getLogger("absl")
  level = absl_logger.level
  absl_logger.setLevel(logging.ERROR)  # Orbax warns that it replaces its default handler.
  try:
    ocp.type_handlers.register_type_handler(
        jax.Array, ocp.type_handlers.ArrayHandler(
            min_slice_bytes_for_replica_parallel=MIN_REPLICA_SLICE_BYTES), override=True)
  finally:
    absl_logger.setLevel(level)


_register_array_handler()


def _orbax_disk_full(record: logging.LogRecord) -> bool:
  """Whether `record` is asyncio's "Task exception was never retrieved" or orbax's own log of a
  write that hit the full disk (from its writer threads, before the save is waited for): that
  failure is reported once, as the save's one line."""
  return bool(record.exc_info and files.disk_full(record.exc_info[1])) and (
      record.name == "asyncio" or "orbax" in record.pathname)


def _late_callback(unraisable) -> bool:
  """TensorStore's "Event loop is closed": a write finishing after orbax closed the event loop
  that awaited it, which happens only when a sibling write failed (that failure is raised and
  reported by itself). TensorStore reports it as unraisable, from its own threads."""
  err, tb = unraisable.exc_value, unraisable.exc_traceback
  while tb is not None and tb.tb_next is not None:
    tb = tb.tb_next
  return (isinstance(err, RuntimeError) and str(err) == "Event loop is closed"
          and tb is not None and tb.tb_frame.f_code.co_name == "_check_closed")


def _quiet_failed_writes() -> None:
  """Installs the two filters above, once at import: with async saves they fire in orbax's
  threads before the main thread learns that the save failed."""
  for name in ("asyncio", "absl"):
    logging.getLogger(name).addFilter(lambda r: not _orbax_disk_full(r))
  previous = sys.unraisablehook

  def hook(unraisable):
    if not _late_callback(unraisable):
      previous(unraisable)

  sys.unraisablehook = hook


_quiet_failed_writes()


def _save_failed(directory: str, step: int | None, err: BaseException) -> errors.UserError:
  """The one line for a save that failed: the step, the cause, the last complete step."""
  complete = [s for s in saved_steps(directory) if s != step]
  last = (f"the last complete checkpoint is step {max(complete)} (kept): free space and rerun "
          "the same command to resume from it" if complete else
          "there is no complete checkpoint yet: free space and rerun the same command")
  if jax.process_index() == 0 and "://" not in directory:
    # The unfinished step: orbax's temporary folder (which no resume reads), ours to remove.
    pattern = f"{step}.orbax-checkpoint-tmp*" if step is not None else "*.orbax-checkpoint-tmp*"
    for tmp in glob.glob(os.path.join(glob.escape(directory), pattern)):
      shutil.rmtree(tmp, ignore_errors=True)
  what = f"checkpoint step {step}" if step is not None else "a checkpoint"
  return files.write_failed(os.path.join(directory, str(step)) if step is not None else directory,
                            err, last, subject=f"{what} was not saved")


def _is_write_failure(err: BaseException) -> bool:
  seen = set()
  while err is not None and id(err) not in seen:
    seen.add(id(err))
    if isinstance(err, OSError) or files.disk_full(err):
      return True
    err = err.__cause__ or err.__context__
  return False


class _Manager(ocp.CheckpointManager):
  """Orbax's manager whose failed saves are one line naming the step that failed: an async
  save's error surfaces only when it is waited for (at the next save or at close), so the
  step in flight is remembered."""

  _saving: int | None = None

  def save(self, step: int, *args, **kwargs) -> bool:
    self.wait_until_finished()  # An earlier save that failed is named as itself.
    self._saving = step
    try:
      return super().save(step, *args, **kwargs)
    except Exception as err:
      if not _is_write_failure(err):
        raise
      raise _save_failed(str(self.directory), step, err) from err

  def wait_until_finished(self) -> None:
    try:
      super().wait_until_finished()
    except Exception as err:
      if not _is_write_failure(err):
        raise
      raise _save_failed(str(self.directory), self._saving, err) from err


def manager(directory: str, *, max_to_keep: int | None = 3, async_save: bool = True,
            keep_period: int = 0, read_only: bool = False,
            protected_steps: Sequence[int] = ()) -> ocp.CheckpointManager:
  """`max_to_keep` latest saves (None: all) are kept, and besides them every checkpoint whose
  step is a multiple of `keep_period` > 0 (guide checkpoints for AG+SG) and `protected_steps`.

  `read_only`: for readers; the folder must exist (see `require_steps`) and nothing is
  written, created or cleaned up.
  """
  if "://" not in directory:  # Orbax needs absolute local paths; gs:// and friends pass as is.
    directory = os.path.abspath(directory)
  keep = [policies.LatestN(n=max_to_keep)]
  if keep_period:
    keep.append(policies.EveryNSteps(interval_steps=keep_period))
  if protected_steps:
    keep.append(policies.CustomSteps(steps=list(protected_steps)))
  # Not orbax's read_only (it warns at every open): a reader never saves, so it deletes nothing.
  options = ocp.CheckpointManagerOptions(
      preservation_policy=(policies.LatestN(n=None) if read_only
                           else policies.AnyPreservationPolicy(keep)),
      create=not read_only, enable_async_checkpointing=async_save and not read_only,
      cleanup_tmp_directories=not read_only)
  return _Manager(directory, options=options, item_names=("state", "data"))


def saved_steps(directory: str) -> list[int]:
  """The complete checkpoints' steps in `directory` (orbax names them by step; a save in
  progress has a temporary name), without opening a manager."""
  from sgjax import files  # Local: etils.epath only where a path is listed.
  if not files.isdir(directory):
    return []
  return sorted(int(name) for name in files.listdir(directory) if name.isdigit())


def require_steps(directory: str, what_to_do: str) -> None:
  """Refuses a checkpoint folder that does not exist, before any manager would create it."""
  from sgjax import files  # Local: etils.epath only where a path is checked.
  if not files.isdir(directory):
    raise errors.UserError(directory, "no checkpoints there", what_to_do)


class _IteratorSnapshot:
  """The iterator's position at save time, for grain's handler: with async saving the handler
  may run after the loop has read further."""

  def __init__(self, data_iter: Any):
    state = data_iter.get_state()
    self._state = state if isinstance(state, bytes) else json.dumps(state).encode()

  def get_state(self) -> bytes:
    return self._state


def save(mngr: ocp.CheckpointManager, step: int, state: Any, data_iter: Any | None) -> None:
  """Saves `step` (async if the manager is); a save that fails is one line (`_Manager`)."""
  items = dict(state=ocp.args.StandardSave(state))
  if data_iter is not None:
    items["data"] = grain.checkpoint.CheckpointSave(_IteratorSnapshot(data_iter))
  mngr.save(step, args=ocp.args.Composite(**items), force=True)


def close(mngr: ocp.CheckpointManager, *, failing: bool = False) -> None:
  """Finishes the pending save and closes `mngr`. `failing`: the caller is already stopping
  with an error, which stays the one reported: a failed save (named already, or the same full
  disk) is not raised over it."""
  try:
    mngr.close()
  except errors.UserError:
    if not failing:
      raise


def _paths_and_shapes(tree: Any) -> dict[str, tuple]:
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {jax.tree_util.keystr(path, simple=True, separator="/"): tuple(leaf.shape)
          for path, leaf in flat}


def _unreadable(mngr: ocp.CheckpointManager, step: int, cause: BaseException) -> errors.UserError:
  earlier = [s for s in mngr.all_steps() if s < step]
  action = (f"move it aside to resume from step {max(earlier)}" if earlier else
            "it is the only checkpoint: move it aside to start afresh, or restore it from a copy")
  return errors.UserError(os.path.join(str(mngr.directory), str(step)),
                          f"checkpoint step {step} in {mngr.directory} is unreadable "
                          f"({errors.first_line(cause)})", action)


def check_fits(mngr: ocp.CheckpointManager, step: int, abstract_state: Any,
               parts: Sequence[str] | None = None) -> None:
  """Refuses a checkpoint whose arrays are not the model's (names the first differences), and
  one whose metadata cannot be read (damaged). `parts`: compare only these top-level entries
  of the state (a restore of the params alone)."""
  path = os.path.join(str(mngr.directory), str(step), "state")
  absl_logger = logging.getLogger("absl")
  level = absl_logger.level
  absl_logger.setLevel(logging.ERROR)  # Orbax warns that a step's item has no step metadata.
  try:
    saved = ocp.StandardCheckpointer().metadata(path).item_metadata
    saved = _paths_and_shapes(saved.tree if hasattr(saved, "tree") else saved)
  except Exception as err:  # whatever TensorStore/JSON raise, it is damage.
    raise _unreadable(mngr, step, err) from err
  finally:
    absl_logger.setLevel(level)
  if not saved:  # Orbax reads a step without its _METADATA as an empty tree.
    raise _unreadable(mngr, step, "its array metadata is missing")
  if parts is not None:
    saved = {k: v for k, v in saved.items() if k.split("/")[0] in parts}
  wanted = _paths_and_shapes(abstract_state)
  order = lambda keys: sorted(keys, key=lambda k: (not k.startswith("params/"), k))
  diff = [f"{k} missing" for k in order(set(wanted) - set(saved))]
  diff += [f"{k} not in the model" for k in order(set(saved) - set(wanted))]
  diff += [f"{k} {saved[k]} saved, {wanted[k]} in the model"
           for k in order(set(saved) & set(wanted)) if saved[k] != wanted[k]]
  if diff:
    shown = "; ".join(diff[:3]) + (f"; … {len(diff) - 3} more" if len(diff) > 3 else "")
    raise errors.UserError(os.path.join(str(mngr.directory), str(step)),
                           f"checkpoint step {step} does not fit the configured model ({shown})",
                           "use the model.* / data.* values it was trained with, or another "
                           "--workdir")


def restore(mngr: ocp.CheckpointManager, abstract_state: Any, data_iter: Any | None,
            step: int | None = None) -> Any:
  """Restores `step` (default: latest) into arrays laid out like `abstract_state`.

  `abstract_state` is a tree of `jax.ShapeDtypeStruct`s carrying the target shardings; the data
  iterator (if given) is restored in place.
  """
  step = mngr.latest_step() if step is None else step
  if step is None:
    raise errors.UserError(str(mngr.directory), "no checkpoint there",
                           "train first (--mode=train) or point --workdir at a trained run")
  check_fits(mngr, step, abstract_state)
  items = dict(state=ocp.args.StandardRestore(abstract_state))
  if data_iter is not None:
    items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
  try:
    restored = mngr.restore(step, args=ocp.args.Composite(**items))
  except Exception as err:  # the arrays fit (checked above): the files are bad.
    raise _unreadable(mngr, step, err) from err
  return restored["state"]


def restore_parts(mngr: ocp.CheckpointManager, abstract_parts: dict[str, Any],
                  step: int | None = None) -> dict[str, Any]:
  """Only some top-level entries of a saved state (e.g. {"step", "ema"}): the rest, the
  optimizer state above all, is neither read nor needs an abstract tree. Same checks as
  `restore`."""
  step = mngr.latest_step() if step is None else step
  if step is None:
    raise errors.UserError(str(mngr.directory), "no checkpoint there",
                           "train first (--mode=train) or point --workdir at a trained run")
  check_fits(mngr, step, abstract_parts, parts=tuple(abstract_parts))
  # The PyTree handler, not the Standard one the manager saved with: only it restores a part.
  path = mngr.directory / str(step) / "state"
  args = ocp.args.PyTreeRestore(
      item=abstract_parts, restore_args=ocp.checkpoint_utils.construct_restore_args(
          abstract_parts), partial_restore=True)
  try:
    with ocp.PyTreeCheckpointer() as reader:
      return reader.restore(path, args=args)
  except Exception as err:  # the arrays fit (checked above): the files are bad.
    raise _unreadable(mngr, step, err) from err
