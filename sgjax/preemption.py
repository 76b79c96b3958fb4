"""SIGTERM (TPU maintenance, SLURM pre-emption, `kill`) -> checkpoint at the next step, clean exit.

Single process: our own SIGTERM handler sets a flag that the train loop polls every step (a host
bool, no device sync). Multi-process: every host must stop at the same step, so we ask JAX's
preemption sync point (the coordination service catches SIGTERM on every host and agrees on a
step); it needs `jax.distributed.initialize()`, which multi-host runs call first.
"""

from __future__ import annotations

import signal
import threading

import jax
from jax.experimental import multihost_utils


class PreemptionWatch:
  """`start()`, then `reached(step)` each step (True once a stop was requested, at the same step
  on every host), then `stop()` to restore the previous handler."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def _on_sigterm(self, signum, frame) -> None:
    del signum, frame
    self.requested = True

  def start(self) -> PreemptionWatch:
    # Signal handlers can only be set from the main thread; elsewhere (e.g. a notebook worker)
    # we simply don't watch, rather than fail.
    if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
    return self

  def stop(self) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None

  def reached(self, step: int) -> bool:
    if jax.process_count() > 1:
      return multihost_utils.reached_preemption_sync_point(step)
    return self.requested
