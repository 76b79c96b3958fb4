"""Files on local disk or in a bucket (gs://, s3://: any `etils.epath` backend; gcsfs for GCS).

What sampling, evaluation and sweeps write goes through here, so a workdir on GCS works for
them as it does for checkpoints (orbax) and metrics. Writes are all-or-nothing: locally a
temporary file renamed into place; in a bucket the object appears only once its upload is
complete, so it is written directly.
"""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Iterator
from typing import Any

import numpy as np
from etils import epath


def is_remote(path: str | os.PathLike) -> bool:
  return "://" in os.fspath(path)


def exists(path: str | os.PathLike) -> bool:
  return epath.Path(path).exists()


def makedirs(path: str | os.PathLike) -> None:
  epath.Path(path).mkdir(parents=True, exist_ok=True)


def glob(directory: str | os.PathLike, pattern: str) -> list[str]:
  """Sorted paths in `directory` matching `pattern` (e.g. "shard_*.npz")."""
  return sorted(os.fspath(p) for p in epath.Path(directory).glob(pattern))


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb") -> Iterator[Any]:
  """A file to write that appears at `path` only if the block completes."""
  path = os.fspath(path)
  if is_remote(path):
    with epath.Path(path).open(mode) as f:
      yield f
    return
  tmp = path + ".tmp"
  try:
    with open(tmp, mode) as f:
      yield f
    os.replace(tmp, path)
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
