"""One writer per output folder: a lock file that names its holder.

Every job that writes a folder holds `<folder>/writer.lock` while it writes: the train loop its
workdir, a sample or eval set its shard folder, the sweep and the study their folders,
`encode_latents` its `data.dir`. The file holds who writes (host, pid, start time, command,
what); a second writer is refused at once, in one line naming the holder. Readers (sampling
from a checkpoint while training goes on) take no lock.

Locally the file is also `flock`ed: the kernel releases that lock when its process dies (SIGKILL
included), so a lock left by a dead process is taken over, with a note naming it. Where flock is
not available (some network filesystems, buckets) the file's content decides: a holder on this
host whose pid is gone is taken over; one on another host is refused, saying how to clear it.

Multi-process runs: process 0 takes the lock, every process learns whether it did, and the
others check that they see the same lock file (one shared folder, as orbax needs).
Re-entrant within a process: a job that holds a folder may call another that takes it again.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import inspect
import json
import os
import secrets
import shlex
import socket
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

from sgjax import errors, files

LOCK = "writer.lock"
_held: dict[str, list] = {}  # key -> [depth, fd or None, token]


def path_of(directory: str) -> str:
  return os.path.join(directory, LOCK)


def _key(directory: str) -> str:
  return directory if "://" in directory else os.path.realpath(directory)


def _process_start(pid: int) -> str:
  """The process's start time in clock ticks since boot (Linux), to tell a reused pid apart."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[1].split()[19]
  except (OSError, IndexError):
    return ""


def _alive(holder: dict) -> bool:
  pid = holder.get("pid")
  if not isinstance(pid, int) or pid <= 0:
    return False
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True  # Another user's live process.
  started = holder.get("pid_start", "")
  return not started or started == _process_start(pid)


def describe(holder: dict | None) -> str:
  """'train, pid 123 on host h since 2025-01-02 10:11:12, command: python -m …'."""
  if not holder:
    return "a process that is writing its lock file right now"
  command = " ".join(str(holder.get("command", "")).split())  # One line, whatever it held.
  command = command if len(command) <= 160 else command[:157] + "..."
  return (f"{holder.get('what', '?')}, pid {holder.get('pid', '?')} on host "
          f"{holder.get('host', '?')} since {holder.get('started', '?')}, command: {command}")


def _parse(text: str) -> dict | None:
  try:
    holder = json.loads(text)
  except ValueError:
    return None
  return holder if isinstance(holder, dict) else None


def read(directory: str) -> dict | None:
  """Who holds `directory`'s lock (the file's content), or None."""
  try:
    return _parse(files.read_text(path_of(directory)))
  except (FileNotFoundError, OSError):
    return None


def _refusal(directory: str, holder: dict | None, extra: str = "") -> errors.UserError:
  pid = holder.get("pid") if holder else None
  stop = f"stop it (kill {pid}) " if pid and holder.get("host") == socket.gethostname() else ""
  return errors.UserError(directory, f"another run writes here ({describe(holder)})",
                          f"wait for it to end, {stop}or write elsewhere (another --workdir "
                          f"or output folder){extra}")


def _info(what: str) -> dict[str, Any]:
  return dict(what=what, host=socket.gethostname(), pid=os.getpid(),
              pid_start=_process_start(os.getpid()),
              started=time.strftime("%Y-%m-%d %H:%M:%S %z"),
              command=shlex.join([os.path.basename(sys.executable), *sys.orig_argv[1:]]),
              token=secrets.token_hex(8))


def _note_takeover(directory: str, holder: dict | None, log: Callable[[str], None]) -> None:
  if holder:
    log(f"note: took over the writer lock of {directory} from {describe(holder)}: that "
        "process is gone (a crash or a kill); its finished outputs are kept, unfinished ones "
        "are redone")


def _acquire_flock(path: str, directory: str, info: dict, log) -> int | None:
  """The locked file's descriptor, or None where flock is not supported here."""
  while True:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      os.close(fd)
      holder = None
      for _ in range(20):  # The holder may be between creating the file and filling it.
        holder = read(directory)
        if holder:
          break
        time.sleep(0.05)
      raise _refusal(directory, holder) from None
    except OSError as err:
      os.close(fd)
      if err.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
        return None
      raise
    try:
      same = os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
      same = False
    if not same:  # A holder unlinked it as we opened it: lock the file now at `path`.
      os.close(fd)
      continue
    previous = _parse(os.pread(fd, 1 << 16, 0).decode(errors="replace"))
    _note_takeover(directory, previous, log)
    data = (json.dumps(info, indent=1) + "\n").encode()
    try:
      os.ftruncate(fd, 0)
      os.pwrite(fd, data, 0)
    except OSError as err:  # A full disk: one line, and no empty lock file left behind.
      os.unlink(path)
      os.close(fd)
      raise files.write_failed(path, err) from err
    return fd


def _acquire_by_content(path: str, directory: str, info: dict, log) -> None:
  """Without flock (buckets, some network filesystems): the file's content decides."""
  holder = read(directory)
  if holder and holder.get("token") != info["token"]:
    if holder.get("host") != socket.gethostname():
      raise _refusal(directory, holder, f"; if that run is gone, delete {path}")
    if _alive(holder):
      raise _refusal(directory, holder)
    _note_takeover(directory, holder, log)
  files.write_text(path, json.dumps(info, indent=1) + "\n")


def _release(directory: str, fd: int | None, token: str) -> None:
  path = path_of(directory)
  if fd is not None:
    try:
      if os.fstat(fd).st_ino == os.stat(path).st_ino:
        os.unlink(path)  # Before the unlock: a waiting opener then sees a new file.
    except OSError:
      pass  # Already gone (e.g. a failed run's workdir was removed with it).
    os.close(fd)
    return
  holder = read(directory)
  if holder and holder.get("token") == token:
    with contextlib.suppress(OSError):
      files.remove(path)


def _sync_with_process_0(directory: str, token: str | None, refusal: BaseException | None
                         ) -> None:
  """Multi-process: every process learns whether process 0 took the lock; the others check
  that they see its file."""
  import jax
  import numpy as np
  from jax.experimental import multihost_utils
  mine = np.frombuffer((token or "0" * 16).encode(), np.uint8)
  theirs = bytes(np.asarray(multihost_utils.broadcast_one_to_all(mine))).decode()
  if jax.process_index() == 0:
    if refusal is not None:
      raise refusal
    return
  if theirs == "0" * 16:
    raise errors.UserError(directory, "process 0 could not take this folder's writer lock",
                           "its error line names the holder")
  holder = read(directory)
  if not holder or holder.get("token") != theirs:
    raise errors.UserError(
        path_of(directory), f"process {jax.process_index()} does not see the writer lock "
        "process 0 took", "every process must write to one shared folder (NFS, gs://): "
        "folders local to each host would get a writer each")


@contextlib.contextmanager
def hold(directory: str, what: str, log: Callable[[str], None] | None = None
         ) -> Iterator[str]:
  """Holds `<directory>/writer.lock` (made if missing, with the folder) for the block; yields
  the lock file's path. Refuses (errors.UserError naming the holder) if another live process
  holds it. `what` says who writes ("train", "sample shards", …); `log` gets the takeover note
  (default: print)."""
  # A process that has not imported jax is a single process (no distributed runtime to ask).
  jax = sys.modules.get("jax")
  processes = jax.process_count() if jax is not None else 1
  directory = os.fspath(directory)
  key = _key(directory)
  if key in _held:  # Re-entrant: this process already writes here.
    _held[key][0] += 1
    try:
      yield path_of(directory)
    finally:
      _held[key][0] -= 1
    return
  log = log or (lambda m: print(m, flush=True))
  lead = jax is None or jax.process_index() == 0
  info = _info(what)
  fd, token, refusal = None, None, None
  # The folders this lock makes (the folder and any missing parents, deepest first): a job
  # that then refuses leaves none of them.
  created = []
  if lead and not files.is_remote(directory):
    missing = os.path.abspath(directory)
    while not os.path.exists(missing) and os.path.dirname(missing) != missing:
      created.append(missing)
      missing = os.path.dirname(missing)
  if lead:
    files.makedirs(directory)
    path = path_of(directory)
    try:
      if not files.is_remote(directory):
        fd = _acquire_flock(path, directory, info, log)
      if fd is None:
        _acquire_by_content(path, directory, info, log)
      token = info["token"]
    except errors.UserError as err:
      refusal = err
  if processes > 1:
    try:
      _sync_with_process_0(directory, token, refusal)
    except BaseException:
      if token is not None:
        _release(directory, fd, token)
      raise
  elif refusal is not None:
    _remove_empty(created)
    raise refusal
  _held[key] = [1, fd, token]
  try:
    yield path_of(directory)
  finally:
    del _held[key]
    if lead and token is not None:
      _release(directory, fd, token)
    _remove_empty(created)


def _remove_empty(created: list[str]) -> None:
  """The folders made for the lock alone (deepest first; the job refused early): gone again."""
  for folder in created:
    try:
      os.rmdir(folder)
    except OSError:  # Not empty: the job wrote there.
      break


def holding(param: str, what: str, sub: str = "") -> Callable:
  """A decorator: the call holds the folder its argument `param` names (joined with `sub`), e.g.
  `@lock.holding("out_dir", "sample shards")` or `@lock.holding("workdir", "study", "study")`."""
  def wrap(fn: Callable) -> Callable:
    signature = inspect.signature(fn)

    @functools.wraps(fn)
    def locked(*args, **kwargs):
      directory = signature.bind(*args, **kwargs).arguments[param]
      with hold(os.path.join(directory, sub) if sub else directory, what):
        return fn(*args, **kwargs)
    return locked
  return wrap
