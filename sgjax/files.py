"""Files on local disk or in a bucket (gs://, s3://: any `etils.epath` backend; gcsfs for GCS).

What sampling, evaluation and sweeps write goes through here, so a workdir on GCS works for
them as it does for checkpoints (orbax) and metrics. Writes are all-or-nothing: locally a
temporary file renamed into place; in a bucket the object appears only once its upload is
complete, so it is written directly.

A write that fails (a full disk, a quota, permissions) is one line naming the file and the
cause (`write_failed`); its temporary file is removed, so a rerun redoes exactly that file.
Every write opens its file through `_open_for_write`: tests inject OSErrors there for paths a
small tmpfs cannot stand in for (buckets).
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
from collections.abc import Iterator
from typing import Any

import numpy as np
from etils import epath

from sgjax import errors

FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
FULL_TEXTS = ("No space left on device", "Disk quota exceeded", "ENOSPC")


def is_remote(path: str | os.PathLike) -> bool:
  return "://" in os.fspath(path)


def exists(path: str | os.PathLike) -> bool:
  return epath.Path(path).exists()


def makedirs(path: str | os.PathLike) -> None:
  """Makes the folder (and its parents); refuses a path that names a file."""
  p = epath.Path(path)
  if p.exists() and not p.is_dir():
    raise errors.UserError(os.fspath(path), "is a file, not a folder",
                           "name a folder (a new one, or one this job wrote before)")
  try:
    p.mkdir(parents=True, exist_ok=True)
  except FileExistsError as err:  # A parent is a file.
    raise errors.UserError(os.fspath(path), f"cannot be made ({errors.first_line(err)})",
                           "name a folder whose parents are folders") from err
  except OSError as err:
    raise write_failed(os.fspath(path), err) from err


def remove(path: str | os.PathLike) -> None:
  epath.Path(path).unlink()


def disk_full(err: BaseException) -> bool:
  """Whether `err` (or what it was raised from) says the disk or the quota is full; orbax and
  TensorStore carry the errno in their message text only."""
  seen = set()
  while err is not None and id(err) not in seen:
    seen.add(id(err))
    if getattr(err, "errno", None) in FULL_ERRNOS or any(t in str(err) for t in FULL_TEXTS):
      return True
    err = err.__cause__ or err.__context__
  return False


def write_failed(path: str | os.PathLike, err: BaseException, action: str = "",
                 subject: str = "cannot write") -> errors.UserError:
  """The one line for a file that could not be written: names it, says whether the disk is
  full, and what to do (`action`, default: free space and rerun)."""
  what = (f"{subject}: the disk is full (no space left on device)" if disk_full(err)
          else f"{subject} ({errors.first_line(err)})")
  return errors.UserError(os.fspath(path), what, action or (
      "free space (or fix the folder) and rerun the same command: finished files are kept, "
      "this one is redone"))


def _open_for_write(path: str, mode: str):
  """The one place a file is opened for writing (tests inject OSErrors here)."""
  return epath.Path(path).open(mode) if is_remote(path) else open(path, mode)


def glob(directory: str | os.PathLike, pattern: str) -> list[str]:
  """Sorted paths in `directory` matching `pattern` (e.g. "shard_*.npz")."""
  return sorted(os.fspath(p) for p in epath.Path(directory).glob(pattern))


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb") -> Iterator[Any]:
  """A file to write that appears at `path` only if the block completes."""
  path = os.fspath(path)
  if is_remote(path):
    try:
      with _open_for_write(path, mode) as f:
        yield f
    except OSError as err:
      raise write_failed(path, err) from err
    return
  tmp = path + ".tmp"
  try:
    with _open_for_write(tmp, mode) as f:
      yield f
    os.replace(tmp, path)
  except OSError as err:
    raise write_failed(path, err) from err
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def save_npz(path: str | os.PathLike, **arrays: Any) -> None:
  with atomic_open(path) as f:
    np.savez(f, **arrays)


def load_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """All arrays of an .npz, read into memory (the file is closed on return)."""
  with epath.Path(path).open("rb") as f:
    source = f if not is_remote(path) else io.BytesIO(f.read())  # np.load needs seeks.
    with np.load(source) as z:
      return {k: z[k] for k in z.files}


def write_text(path: str | os.PathLike, text: str) -> None:
  with atomic_open(path, "w") as f:
    f.write(text)


def read_text(path: str | os.PathLike) -> str:
  return epath.Path(path).read_text()


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
  with atomic_open(path) as f:
    f.write(data)


def read_bytes(path: str | os.PathLike) -> bytes:
  return epath.Path(path).read_bytes()


def isdir(path: str | os.PathLike) -> bool:
  return epath.Path(path).is_dir()


def listdir(path: str | os.PathLike) -> list[str]:
  """Sorted names in a folder."""
  return sorted(p.name for p in epath.Path(path).iterdir())


def identity(path: str | os.PathLike) -> list:
  """What identifies a file's content cheaply (cache keys): absolute path, size, mtime; for a
  folder, those of each file in it."""
  p = epath.Path(path if is_remote(path) else os.path.abspath(path))
  if p.is_dir():
    return [os.fspath(p)] + [identity(c)[1:] + [c.name] for c in sorted(p.iterdir())]
  st = p.stat()
  return [os.fspath(p), st.length, st.mtime]
