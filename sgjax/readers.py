"""Reading the files a user names: the one place where "cannot be read" becomes one line.

Every file a user points sgjax at (a converter's source, VAE and Inception weights, an eval
reference, a latent set's metadata and shards) is read through here. Whatever goes wrong while
reading it (no such file, a folder, an empty file, a truncated archive, another format, a
corrupt header, a pickle that would call code) is one `errors.UserError` naming the file and
what is wrong, chained to the cause (printed with --verbose).

Data never executes. `.pt` files load with `torch.load(weights_only=True)`, which refuses a
pickle naming any callable beyond torch's tensor rebuilders before calling anything; `.npz` with
`allow_pickle=False`; safetensors files are a JSON header and raw bytes, read here without any
unpickling. (Config files are Python and do run: trust them as you trust a script.)

Tensors are read lazily where the format allows (a safetensors tensor when it is asked for;
zip-format `.pt` files memory-mapped), so a converter holds one copy of the weights, not two.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import pickle
import re
import struct
import zipfile
from collections.abc import Iterator, Mapping
from typing import Any

import ml_dtypes
import numpy as np
from etils import epath

from sgjax import errors, files

# What reading a damaged or foreign file raises (numpy, zipfile, json, torch, array_record):
# inside `reading` each is the file's fault, not a bug.
READ_ERRORS = (OSError, ValueError, RuntimeError, EOFError, KeyError, IndexError, TypeError,
               struct.error, zipfile.BadZipFile, pickle.UnpicklingError)

# safetensors' dtype names -> numpy (bf16 and fp8 through ml_dtypes, as jax reads them).
SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8,
    "U64": np.uint64, "U32": np.uint32, "U16": np.uint16, "U8": np.uint8, "BOOL": np.bool_}
_MAX_HEADER = 100 << 20  # safetensors' own limit on the JSON header.
STATE_DICT_ALLOWED = ("a PyTorch state dict (torch.save of tensors, .pt/.pth) or a "
                      ".safetensors file")


def _cause(err: BaseException) -> str:
  """A short account of why reading failed, in the user's terms where the cause is known."""
  text = str(err)
  if isinstance(err, pickle.UnpicklingError):
    m = re.search(r"GLOBAL ([\w.]+)", text)
    if m:  # torch's text suggests weights_only=False, which would run it: not repeated here.
      return (f"its pickle would call {m.group(1)}, which is code, not weights; refused "
              "before anything in it ran")
  if isinstance(err, IsADirectoryError):
    return "is a folder, not a file"
  if isinstance(err, FileNotFoundError):
    return "no such file"
  if isinstance(err, EOFError | zipfile.BadZipFile) or "central directory" in text:
    return f"truncated or not a complete archive ({errors.first_line(err)})"
  return errors.first_line(err)[:300]


@contextlib.contextmanager
def reading(path: str | os.PathLike, where: str = "", allowed: str = "",
            what: str = "file") -> Iterator[None]:
  """Inside, a failure to read `path` is one UserError `<where>: not a readable <what>
  (<why>); <allowed>` (`where` defaults to the path)."""
  try:
    yield
  except errors.UserError:
    raise
  except READ_ERRORS as err:
    raise errors.UserError(where or os.fspath(path), f"not a readable {what} ({_cause(err)})",
                           allowed) from err


def check_file(path: str | os.PathLike, where: str = "", allowed: str = "") -> None:
  """Refuses a path that is missing, a folder or empty, naming it."""
  where, p = where or os.fspath(path), epath.Path(path)
  if not p.exists():
    raise errors.UserError(where, "no such file", allowed)
  if p.is_dir():
    raise errors.UserError(where, "is a folder, not a file", allowed)
  if p.stat().length == 0:
    raise errors.UserError(where, "is empty (0 bytes)", allowed)


def _head(path: str | os.PathLike, n: int = 16) -> bytes:
  with epath.Path(path).open("rb") as f:
    return f.read(n)


def file_format(path: str | os.PathLike) -> str:
  """What a weights file holds, from its first bytes (suffixes lie): "zip" (a .pt of torch>=1.6,
  or an .npz), "pickle" (a legacy .pt), "safetensors", or "unknown"."""
  head = _head(path)
  if head.startswith(b"PK\x03\x04"):
    return "zip"
  if head[:1] == b"\x80":  # pickle's PROTO opcode: torch's legacy format.
    return "pickle"
  if len(head) >= 9 and head[8:9] == b"{" and struct.unpack("<Q", head[:8])[0] < _MAX_HEADER:
    return "safetensors"
  return "unknown"


class SafetensorsFile(Mapping):
  """The tensors of a .safetensors file, each read when asked for.

  The header is checked whole on opening: JSON, known dtypes, shapes, and data offsets that tile
  the data section, so a corrupt header is refused before any tensor is used.
  """

  def __init__(self, path: str, where: str = "", allowed: str = STATE_DICT_ALLOWED):
    self.path, self.where, self.allowed = path, where or path, allowed
    check_file(path, self.where, allowed)
    size = epath.Path(path).stat().length
    with reading(path, self.where, allowed, "safetensors file"), epath.Path(path).open("rb") as f:
      (n,) = struct.unpack("<Q", f.read(8))
      if not 2 <= n <= min(_MAX_HEADER, size - 8):
        raise ValueError(f"header length {n} does not fit a {size}-byte file")
      try:
        header = json.loads(f.read(n))
      except ValueError as err:
        raise ValueError(f"corrupt header, not JSON: {err}") from err
    self.metadata = header.pop("__metadata__", None) if isinstance(header, dict) else None
    self._entries = self._checked(header, size - 8 - n)
    self._offset = 8 + n

  def _checked(self, header: Any, data_size: int) -> dict[str, tuple[np.dtype, tuple, int]]:
    def bad(what: str) -> errors.UserError:
      return errors.UserError(self.where, f"not a readable safetensors file (corrupt header: "
                              f"{what})", self.allowed)
    if not isinstance(header, dict):
      raise bad("not a JSON object")
    entries, spans = {}, []
    for name, info in header.items():
      if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
        raise bad(f"entry {name!r} is not {{dtype, shape, data_offsets}}")
      dtype, shape, span = info["dtype"], info["shape"], info["data_offsets"]
      if dtype not in SAFETENSORS_DTYPES:
        raise bad(f"{name!r} has dtype {dtype!r}")
      if (not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape)
          or not isinstance(span, list) or len(span) != 2
          or not all(isinstance(o, int) for o in span)):
        raise bad(f"{name!r} has shape {shape!r}, data_offsets {span!r}")
      dt = np.dtype(SAFETENSORS_DTYPES[dtype])
      if span[1] - span[0] != int(np.prod(shape)) * dt.itemsize or not 0 <= span[0] <= span[1]:
        raise bad(f"{name!r}: data_offsets {span} do not hold {dtype} of shape {shape}")
      entries[name] = (dt, tuple(shape), span[0])
      spans.append(span)
    end = 0
    for start, stop in sorted(spans):
      if start != end:
        raise bad(f"data_offsets leave a gap or overlap at byte {start}")
      end = stop
    if end != data_size:
      raise bad(f"tensors take {end} bytes, the file holds {data_size} after the header"
                + (" (truncated)" if end > data_size else ""))
    return entries

  def __getitem__(self, name: str) -> np.ndarray:
    """The tensor, read now into its own array (not memory-mapped: a converter that drops each
    tensor once converted then holds one tensor of the source at a time)."""
    dt, shape, start = self._entries[name]
    raw = np.empty(int(np.prod(shape)) * dt.itemsize, np.uint8)
    with reading(self.path, self.where, self.allowed, "safetensors file"):
      with epath.Path(self.path).open("rb") as f:
        f.seek(self._offset + start)
        if f.readinto(memoryview(raw)) != raw.size:
          raise EOFError(f"{name!r} ends past the end of the file")
    return raw.view(dt).reshape(shape)

  def __iter__(self) -> Iterator[str]:
    return iter(self._entries)

  def __len__(self) -> int:
    return len(self._entries)

  def dtype(self, name: str) -> np.dtype:
    return self._entries[name][0]


def torch_file(path: str, where: str = "", allowed: str = STATE_DICT_ALLOWED) -> Any:
  """What a .pt/.pth file holds (usually a dict of tensors), loaded with weights_only=True and,
  for zip-format files, memory-mapped (tensors are paged in when used)."""
  where = where or path
  check_file(path, where, allowed)
  kind = file_format(path)
  if kind not in ("zip", "pickle"):
    raise errors.UserError(where, f"is not a PyTorch file (it begins {_head(path, 12)!r})",
                           allowed)
  if kind == "zip":  # A truncated zip has lost its central directory: say so, not errno 22.
    with (reading(path, where, allowed, "PyTorch file"), epath.Path(path).open("rb") as f,
          zipfile.ZipFile(f)):
      pass
  import torch  # Local: only .pt files need torch.
  # A DiT training checkpoint also pickles its argparse.Namespace of arguments: plain data
  # (attributes set from a dict), allowed beside the tensors; nothing else is.
  with (reading(path, where, allowed, "PyTorch file"),
        torch.serialization.safe_globals([argparse.Namespace])):
    if files.is_remote(path):
      return torch.load(io.BytesIO(files.read_bytes(path)), map_location="cpu",
                        weights_only=True)
    return torch.load(path, map_location="cpu", weights_only=True, mmap=kind == "zip")


def tensor_file(path: str, where: str = "", allowed: str = STATE_DICT_ALLOWED) -> Mapping:
  """A .safetensors file (lazy `SafetensorsFile`) or a .pt file (`torch_file`), told apart by
  their bytes, not their names."""
  where = where or path
  check_file(path, where, allowed)
  if file_format(path) == "safetensors":
    return SafetensorsFile(path, where, allowed)
  loaded = torch_file(path, where, allowed)
  if not isinstance(loaded, Mapping):
    raise errors.UserError(where, f"holds a {type(loaded).__name__}, not a dict of tensors",
                           allowed)
  return loaded


def to_numpy(value: Any) -> np.ndarray:
  """A torch tensor or array-like as a numpy array of the same dtype (bf16 as ml_dtypes'),
  sharing memory where it can."""
  if hasattr(value, "detach"):
    import torch
    value = value.detach().cpu()
    if value.dtype == torch.bfloat16:  # numpy has no bf16: the same bits, seen as ml_dtypes'.
      return value.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return value.numpy()
  return np.asarray(value)


def npz(path: str, where: str = "", allowed: str = "") -> dict[str, np.ndarray]:
  """All arrays of an .npz, read into memory with allow_pickle=False: an object array (which
  could run code when loaded) is refused, naming its key."""
  where = where or path
  check_file(path, where, allowed)
  out = {}
  with reading(path, where, allowed, ".npz"), epath.Path(path).open("rb") as f:
    source = f if not files.is_remote(path) else io.BytesIO(f.read())  # np.load needs seeks.
    with np.load(source, allow_pickle=False) as z:
      for key in z.files:
        try:
          out[key] = z[key]
        except ValueError as err:
          if "allow_pickle" not in str(err):
            raise
          raise errors.UserError(where, f"array {key!r} holds Python objects (a pickle, which "
                                 "could run code; refused unread)",
                                 allowed or "numeric arrays only") from err
  return out


def npz_headers(path: str, where: str = "", allowed: str = "") -> dict[str, tuple[tuple, np.dtype]]:
  """{key: (shape, dtype)} of an .npz's arrays from their headers only (a reference batch is
  gigabytes); an object array is refused as in `npz`."""
  where = where or path
  check_file(path, where, allowed)
  out = {}
  with (reading(path, where, allowed, ".npz"), epath.Path(path).open("rb") as f,
        zipfile.ZipFile(f) as z):
    for name in z.namelist():
      if not name.endswith(".npy"):
        continue
      with z.open(name) as member:
        read_header = (np.lib.format.read_array_header_1_0
                       if np.lib.format.read_magic(member) == (1, 0)
                       else np.lib.format.read_array_header_2_0)
        shape, _, dtype = read_header(member)
      if np.dtype(dtype).hasobject:
        raise errors.UserError(where, f"array {name[:-4]!r} holds Python objects (a pickle, "
                               "which could run code; refused unread)",
                               allowed or "numeric arrays only")
      out[name[:-4]] = (tuple(shape), np.dtype(dtype))
  return out


def json_file(path: str, where: str = "", allowed: str = "") -> Any:
  """A JSON file's value."""
  where = where or path
  check_file(path, where, allowed)
  with reading(path, where, allowed or "a JSON file", "JSON file"):
    return json.loads(files.read_text(path))


def _typed(value: Any, required: Mapping[str, type | tuple[type, ...]]) -> str:
  """What is wrong with a JSON object against `required` ({key: type(s)}), or ""."""
  if not isinstance(value, dict):
    return f"holds {type(value).__name__}, not a JSON object"
  for key, kind in required.items():
    if key not in value:
      return f"has no {key!r}"
    if isinstance(value[key], bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
      return f"{key!r} is {value[key]!r}, not {getattr(kind, '__name__', kind)}"
    if not isinstance(value[key], kind):
      names = "/".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
      return f"{key!r} is {type(value[key]).__name__} {value[key]!r:.60}, not {names}"
  return ""


def json_text(text: str | bytes, where: str, what: str, allowed: str,
              required: Mapping[str, type | tuple[type, ...]] | None = None) -> Any:
  """The JSON value of `text` (e.g. metadata inside a file), or one UserError `<where>: not a
  readable <what> (<why>); <allowed>`; with `required`, an object holding those keys' types."""
  try:
    value = json.loads(text)
  except (ValueError, TypeError) as err:  # JSONDecodeError and UnicodeDecodeError too.
    raise errors.UserError(where, f"not a readable {what} ({_cause(err)})", allowed) from err
  wrong = _typed(value, required) if required is not None else ""
  if wrong:
    raise errors.UserError(where, f"not a readable {what} (it {wrong})", allowed)
  return value


def json_object(path: str | os.PathLike, what: str, allowed: str,
                required: Mapping[str, type | tuple[type, ...]] | None = None,
                where: str = "") -> dict[str, Any]:
  """A JSON file holding one object (a record, a settings file, a metrics file), checked:
  missing, a folder, empty, unreadable, truncated, not an object or without `required` keys of
  their types is one UserError naming the file, what it should be and `allowed` (what to do)."""
  where = where or os.fspath(path)
  check_file(path, where, allowed)
  with reading(path, where, allowed, what):
    text = files.read_text(path)
  return json_text(text, where, what, allowed, required or {})


def jsonl(path: str | os.PathLike, what: str, allowed: str,
          required: Mapping[str, type | tuple[type, ...]] | None = None,
          where: str = "") -> list[dict[str, Any]]:
  """The rows of a JSON-lines table (one object a line; blank lines skipped), checked as in
  `json_object`, naming the first bad line; an empty file is an empty table. A missing file is
  one line too: a caller for which "no table yet" is normal checks `files.exists` first."""
  where = where or os.fspath(path)
  p = epath.Path(path)
  if p.is_file() and p.stat().length == 0:
    return []
  check_file(path, where, allowed)
  with reading(path, where, allowed, what):
    lines = files.read_text(path).splitlines()
  return [json_text(line, f"{where}, line {i}", what + " row", allowed, required or {})
          for i, line in enumerate(lines, 1) if line.strip()]
