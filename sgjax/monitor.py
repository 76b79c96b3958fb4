"""What a training run shows besides its loss: sample grids every `train.sample_every` steps and
a `jax.profiler` trace of the steps `train.profile_steps`.

This module owns the two fields: their checks (called from sgjax.config.validate), when they
fire, and the step profiler. It stays light (no generation code), so sgjax.config may import it;
the grids themselves are sgjax.previews'. Neither changes the training trajectory: the grids read
the live weights, the profiler only records (resume stays bit-exact).

The trace goes to `<workdir>/tensorboard/plugins/profile/<run>/` (`<host>.xplane.pb` for xprof /
tensorboard-plugin-profile, `<host>.trace.json.gz` for ui.perfetto.dev), the folder TensorBoard
already reads for the run's scalars.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import jax
import ml_collections

from sgjax import errors

AT_CHECKPOINTS = -1  # train.sample_every's default: sample whenever the run checkpoints.


def check_config(config: ml_collections.ConfigDict) -> None:
  """Refuses `train.profile_steps` whose first step is after its last (UserError: field,
  allowed); each value's type and range: its declaration."""
  tc = config.train
  window = tuple(tc.profile_steps)
  if window and window[0] > window[1]:
    raise errors.UserError(f"train.profile_steps = {tc.profile_steps!r}",
                           "not a range of train steps",
                           "allowed: (first, last) with 1 <= first <= last, e.g. "
                           "--config.train.profile_steps=\"(10, 12)\", or () = no profile")


def sample_every(tc: ml_collections.ConfigDict) -> int:
  """Steps between sample grids (0 = none); the default follows `train.checkpoint_every`."""
  return tc.checkpoint_every if tc.sample_every == AT_CHECKPOINTS else tc.sample_every


def samples_due(tc: ml_collections.ConfigDict, step: int) -> bool:
  """Whether the loop draws the grids after `step`: every `sample_every` steps and at the last."""
  every = sample_every(tc)
  return every > 0 and (step % every == 0 or step == tc.num_steps)


def tensorboard_dir(workdir: str) -> str:
  """The run's TensorBoard folder (sgjax.metrics writes its events there)."""
  return os.path.join(workdir, "tensorboard")


class StepProfiler:
  """Traces the train steps `train.profile_steps` = (first, last) of this run, both included.

  A resumed run traces the part of the window it trains. The trace starts after the step
  before `first` has finished and stops once `last` has, so it holds those steps' device work;
  each step is annotated (`StepTraceAnnotation`) for xprof's step view.
  """

  def __init__(self, tc: ml_collections.ConfigDict, workdir: str, first_step: int, log=print):
    window = tuple(tc.profile_steps)
    self.log_dir = tensorboard_dir(workdir)
    self._log = log
    self._active = False
    self._window = None
    if window:
      first, last = max(window[0], first_step + 1), min(window[1], tc.num_steps)
      if first <= last:
        self._window = (first, last)
      elif jax.process_index() == 0:
        log(f"note: train.profile_steps = {window}: this run trains steps {first_step + 1}.."
            f"{tc.num_steps}, so nothing is profiled")

  @contextlib.contextmanager
  def step(self, step: int, state) -> Iterator[None]:
    """Around one call of the train step: starts the trace at the window's first step."""
    if self._window is None or not self._window[0] <= step <= self._window[1]:
      yield
      return
    if step == self._window[0]:
      jax.block_until_ready(state)  # The trace holds the window's steps, not the ones before.
      jax.profiler.start_trace(self.log_dir)
      self._active = True
    with jax.profiler.StepTraceAnnotation("train", step_num=step):
      yield

  def after(self, step: int, state) -> None:
    """After the step: stops the trace (its steps finished) at the window's last step."""
    if self._active and step == self._window[1]:
      jax.block_until_ready(state)
      self._stop()

  def close(self) -> None:
    """Stops a trace still running (the loop ended early: an error, a SIGTERM)."""
    if self._active:
      self._stop()

  def _stop(self) -> None:
    jax.profiler.stop_trace()
    self._active = False
    first, last = self._window
    if jax.process_index() == 0:
      self._log(f"profile of steps {first}..{last} in {self.log_dir}/plugins/profile/ (view: "
                f"xprof --logdir={self.log_dir}, or tensorboard with tensorboard-plugin-profile; "
                "*.trace.json.gz opens in ui.perfetto.dev)")
