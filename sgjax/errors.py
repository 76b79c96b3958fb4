"""One error path for every command: a problem the user can fix is one line and exit status 2.

`UserError(where, what, allowed)` reads `error: <where>: <what>; <allowed>`. It subclasses
ValueError so callers (and tests) that catch ValueError keep working. `guard(main)` wraps an
absl main: a UserError prints its line and exits 2 (the traceback only with --verbose or
SGJAX_VERBOSE=1); any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import functools
import os
import sys
import traceback
from collections.abc import Callable
from typing import Any, NoReturn

EXIT_USAGE = 2


class UserError(ValueError):
  """A bad value, file or state the user can fix; the message names it and what is allowed."""

  def __init__(self, where: str, what: str, allowed: str = ""):
    self.where, self.what, self.allowed = where, what, allowed
    super().__init__(f"{where}: {what}" + (f"; {allowed}" if allowed else ""))


def verbose() -> bool:
  return "--verbose" in sys.argv or os.environ.get("SGJAX_VERBOSE", "") not in ("", "0")


def exit_with(err: BaseException) -> NoReturn:
  """Prints `error: <message>` (first line only) on stderr and exits with status 2."""
  if verbose():
    traceback.print_exception(err)
  message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
  print(f"error: {message}", file=sys.stderr, flush=True)
  sys.exit(EXIT_USAGE)


def guard(main: Callable[..., Any]) -> Callable[..., Any]:
  """Wraps a command's main so a UserError ends it with one line and status 2."""

  @functools.wraps(main)
  def wrapped(*args, **kwargs):
    try:
      return main(*args, **kwargs)
    except UserError as err:
      exit_with(err)

  return wrapped
