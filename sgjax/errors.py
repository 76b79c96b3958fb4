"""One error path for every command: a problem the user can fix is one line and exit status 2.

`UserError(where, what, allowed)` reads `error: <where>: <what>; <allowed>`. It subclasses
ValueError so callers (and tests) that catch ValueError keep working. `guard(main)` wraps an
absl main: a UserError prints its line and exits 2 (the traceback only with --verbose or
SGJAX_VERBOSE=1); any other exception is a bug and keeps its traceback. `run(main)` is
`app.run` with that guard and with flag-parsing errors (an unknown `--config.x` key, a value
that does not parse, a config file that does not load) turned into the same one line.

Every check of a user's value raises UserError (or `check`), naming the field; a ValueError
is a bug and keeps its traceback, whatever its message says.
"""

from __future__ import annotations

import difflib
import functools
import os
import re
import sys
import traceback
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NoReturn

from absl import app, flags

from sgjax import config as config_lib

EXIT_USAGE = 2
HELP_FLAGS = ("--help", "-h", "-?", "--helpshort", "--helpfull", "--helpxml")


class UserError(ValueError):
  """A bad value, file or state the user can fix; the message names it and what is allowed."""

  def __init__(self, where: str, what: str, allowed: str = ""):
    self.where, self.what, self.allowed = where, what, allowed
    super().__init__(f"{where}: {what}" + (f"; {allowed}" if allowed else ""))


def check(ok: bool, field: str, value: Any, allowed: str) -> None:
  """A config check: unless `ok`, UserError `<field> = <value!r>: <allowed>`."""
  if not ok:
    raise UserError(f"{field} = {value!r}", allowed)


class TrainingDiverged(UserError, FloatingPointError):
  """A non-finite loss: the user's settings (lr, clipping) or data, not a bug in the loop."""


def verbose() -> bool:
  if os.environ.get("SGJAX_VERBOSE", "") not in ("", "0"):
    return True
  if "verbose" in flags.FLAGS and flags.FLAGS["verbose"].present:
    return bool(flags.FLAGS.verbose)
  return any(a in ("--verbose", "--verbose=true", "--verbose=1") for a in sys.argv)


def first_line(err: BaseException | str) -> str:
  """The first non-empty line of an error's message (or its type's name)."""
  text = str(err).strip()
  if not text and isinstance(err, BaseException):
    return type(err).__name__
  return text.splitlines()[0].strip() if text else ""


def exit_with(err: BaseException) -> NoReturn:
  """Prints `error: <message>` (first line only) on stderr and exits with status 2."""
  if verbose():
    traceback.print_exception(err)
  print(f"error: {first_line(err)}", file=sys.stderr, flush=True)
  sys.exit(EXIT_USAGE)


def as_user_error(err: BaseException) -> BaseException | None:
  """`err` if the user can fix it (a UserError or a missing file); None for a bug."""
  return err if isinstance(err, UserError | FileNotFoundError) else None


def guard(main: Callable[..., Any]) -> Callable[..., Any]:
  """Wraps a command's main so a UserError ends it with one line and status 2."""

  @functools.wraps(main)
  def wrapped(*args, **kwargs):
    try:
      return main(*args, **kwargs)
    except Exception as err:  # noqa: BLE001 - sorted into the user's and bugs right here.
      if as_user_error(err) is None:
        raise
      exit_with(err)

  return wrapped


def did_you_mean(name: str, known: Iterable[str]) -> str:
  """"; did you mean X?" for the closest known name, or ""."""
  close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
  return f"; did you mean {close[0]!r}?" if close else ""


def unknown_key(path: str, known: Sequence[str], *, prefix: str = "") -> UserError:
  """The refusal of a config key that does not exist: names the key, its section's keys and
  the closest of them. `path` is dotted ("train.num_step"); `known` the section's keys."""
  section, _, leaf = path.rpartition(".")
  listing = ", ".join(sorted(known))
  close = difflib.get_close_matches(leaf, list(known), n=1, cutoff=0.6)
  hint = f"; did you mean {prefix}{section + '.' if section else ''}{close[0]}?" if close else ""
  return UserError(f"{prefix}{path}", "no such config field",
                   f"{section or 'the config'} has: {listing}{hint}")


def missing_config_key(config: Any, path: str, prefix: str = "") -> UserError | None:
  """The UserError for the first part of dotted `path` that `config` lacks, else None."""
  node, walked = config, []
  for part in path.split("."):
    keys = list(node.keys()) if hasattr(node, "keys") else None
    if keys is None:
      return UserError(f"{prefix}{path}", f"{'.'.join(walked)} is a value, not a section",
                       f"set --{prefix.strip('-.')}.{'.'.join(walked)} itself")
    if part not in keys:
      return unknown_key(".".join(walked + [part]), keys, prefix=prefix)
    node, walked = node[part], walked + [part]
  return None


def _loaded_config(value: Any) -> BaseException | None:
  """The load error of a config flag's value (ml_collections' placeholder for a file that
  failed raises OSError on any access), or None."""
  try:
    value.keys()
  except OSError as err:
    return err
  return None


def _flag_error(argv: Sequence[str], err: BaseException, flag_values) -> UserError:
  """One line for a flag-parsing failure, naming the flag (and for a config key the section's
  known keys)."""
  for arg in argv[1:]:
    m = re.match(r"^--?(\w+)\.([\w.]+)(=|$)", arg)
    if not m or m.group(1) not in flag_values:
      continue
    config = flag_values[m.group(1)].value
    if config is None or _loaded_config(config) is not None:
      config = config_lib.base_config()
    bad = missing_config_key(config, m.group(2), prefix=f"--{m.group(1)}.")
    if bad is not None:
      return bad
  text = str(err).strip()
  m = re.match(r"^flag (--[\w.]+)=(.*?): (.*)$", text.splitlines()[0] if text else "")
  if m and "Error whilst parsing config file" in m.group(3):
    # A config file whose get_config() raised: its last line is the exception.
    cause = [s for s in text.splitlines() if s.strip()][-1]
    return UserError(m.group(1), f"{m.group(2)} did not load ({cause.strip()})",
                     "fix the config file")
  if m:
    what = m.group(3)
    what = what.replace(f"Flag {m.group(1)} must have a value other than None.", "is required")
    if what != "is required" and m.group(2) not in what:
      what += f" (given {m.group(2)!r})"
    return UserError(m.group(1), what, "see --helpfull for the flags")
  unknown = re.match(r"^Unknown command line flag '([\w.-]+)'", text)
  if unknown:
    name = unknown.group(1)
    return UserError(f"--{name}", "unknown flag",
                     "see --helpfull for the flags" + did_you_mean(name, list(flag_values)))
  return UserError("flags", first_line(err), "see --helpfull for the flags")


def parse_flags(argv: list[str], flag_values: flags.FlagValues = flags.FLAGS) -> list[str]:
  """absl's flag parsing with every failure as one `error:` line and status 2; --help exits 0.

  Config files load lazily in ml_collections (a missing file only fails when read), so each
  config flag is read once here. A `--config=` that names no file where the command runs but a
  shipped config (a name, or configs/<name>.py from another directory) loads that one.
  """
  argv = [f"--config={config_lib.resolve(a.split('=', 1)[1])}" if a.startswith("--config=") else a
          for a in argv]
  try:
    rest = flag_values(argv)
  except SystemExit as stop:  # absl's --help prints the usage, then exits 1.
    if stop.code == 1 and any(a.split("=")[0] in HELP_FLAGS for a in argv[1:]):
      sys.exit(0)
    raise
  except (flags.Error, AttributeError, KeyError, TypeError, ValueError, OSError) as err:
    exit_with(_config_load_error(argv, flag_values, err) or _flag_error(argv, err, flag_values))
  load_error = _config_load_error(argv, flag_values)
  if load_error is not None:
    exit_with(load_error)
  return rest


def _config_load_error(argv: Sequence[str], flag_values,
                       raised: BaseException | None = None) -> UserError | None:
  """The one line for a config file that did not load (`raised`: what parsing raised, when an
  override read the failed config)."""
  for name in ("config",):
    if name in flag_values:
      value = flag_values[name].value
      err = _loaded_config(value) if value is not None else None
      if err is None and isinstance(raised, OSError) and "failure to load" in str(raised):
        err = raised
      if err is not None:
        # "Failed loading config file config_config" says nothing: the cause is the last line.
        lines = [s.strip() for s in str(err.__cause__ or err).splitlines() if s.strip()]
        given = next((a.split("=", 1)[1] for a in argv if a.startswith(f"--{name}=")), "")
        return UserError(f"--{name}={given}", f"cannot load the config file ({lines[-1]})",
                         "pass a config file's path, e.g. configs/fashion_mnist.py")
  return None


def run(main: Callable[[list[str]], Any]) -> None:
  """`absl.app.run(main)` with one error path: flag errors and UserErrors are one line and
  exit status 2 (the traceback with --verbose); bugs keep their traceback."""
  if "verbose" not in flags.FLAGS:
    flags.DEFINE_bool("verbose", False, "On an error, also print its traceback.")
  app.run(guard(main), flags_parser=parse_flags)
