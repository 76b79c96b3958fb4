"""Metric logging: JSONL and TensorBoard event files in the workdir, a console progress line, and
the parameter table printed at start.

Written only by process 0. TensorBoard events come from tensorboardX, which needs no TensorFlow
(clu's and flax's writers import it; clu's `parameter_overview` does not). Everything a run
shows goes to `<workdir>/tensorboard/`: the train scalars, the config (text and hparams) and
parameter table at start, sample grids (sgjax.previews), profiles (sgjax.monitor), and scalars
other jobs add at a checkpoint's step (`log_scalars`: eval, sweeps).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from clu import parameter_overview as clu_overview
from etils import epath


def print0(message: str) -> None:
  """A console line from process 0 only (every process runs the same job)."""
  if jax.process_index() == 0:
    print(message, flush=True)


def _fmt_duration(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def _summary_writer_class():
  """tensorboardX's SummaryWriter, imported without torch.

  tensorboardX imports torch whenever it is installed (only to accept torch tensors); with the
  torch dev dependency that cost every training process ~5 s. Unless torch is already loaded,
  its import is made to fail for that one import and torch stays importable afterwards.
  """
  if "torch" in sys.modules:
    from tensorboardX import SummaryWriter
    return SummaryWriter
  sys.modules["torch"] = None  # `import torch` raises ImportError while this is set.
  try:
    from tensorboardX import SummaryWriter
  finally:
    del sys.modules["torch"]
  return SummaryWriter


_writers = itertools.count()


def _summary_writer(workdir: str):
  """A tensorboardX writer on `<workdir>/tensorboard` with an event file of its own.

  tensorboardX names the file by the second and the host and opens it with "wb": two writers
  opened in the same second (the train loop's and a `log_scalars` call) would truncate each
  other's file without the process id and a counter in the name.
  """
  suffix = f".{os.getpid()}.{next(_writers)}"
  tb = _summary_writer_class()(os.path.join(workdir, "tensorboard"), filename_suffix=suffix)
  # Events are written in the caller's thread, not tensorboardX's: there a failed write (a full
  # disk) kills its thread silently and every later add blocks on its full queue (a hung run);
  # here it raises where MetricWriter says so and goes on.
  events = tb.file_writer.event_writer
  events._worker.stop()
  events.add_event = events._ev_writer.write_event
  return tb


def _scalars(values: Mapping[str, Any], prefix: str) -> dict[str, float]:
  """{tag: value} of the real numbers in `values` (strings, bools, None and arrays skipped)."""
  out = {}
  for k, v in values.items():
    if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
      continue
    out[f"{prefix}/{k}" if prefix else k] = float(v)
  return out


def log_scalars(workdir: str, step: int, values: Mapping[str, Any], prefix: str = ""
                ) -> dict[str, float]:
  """Adds the numbers of `values` to the workdir's TensorBoard as `<prefix>/<key>` scalars at
  `step` (a checkpoint's step: they plot beside the loss curve); returns what it wrote.

  For jobs that score a checkpoint (eval, sweep points): e.g. `log_scalars(workdir, 40000,
  {"fid": 3.1, "rule": "sg"}, "eval/sg")` writes `eval/sg/fid`; non-numbers are skipped.
  Process 0 writes; the others return the same dict and write nothing.
  """
  scalars = _scalars(values, prefix)
  if jax.process_index() == 0 and scalars:
    try:  # The scores are already printed and saved: a failed TensorBoard write is said only.
      tb = _summary_writer(workdir)
      try:
        for tag, v in scalars.items():
          tb.add_scalar(tag, v, int(step))
      finally:
        tb.close()
    except OSError as err:
      print(f"warning: TensorBoard scalars {prefix or ''} of {workdir} not written "
            f"({type(err).__name__}: {err})", file=sys.stderr, flush=True)
  return scalars


def config_text(flat: Mapping[str, Any]) -> str:
  """The resolved config as TensorBoard text (markdown): one `field = value` line each, the
  spelling of a `--config.field=value` override."""
  lines = "\n".join(f"{k} = {json.dumps(v)}" for k, v in sorted(flat.items()))
  return f"```\n{lines}\n```"


def hparam_values(flat: Mapping[str, Any]) -> dict[str, str | float | bool]:
  """The flat config as hparams: numbers and strings as they are, tuples as JSON text."""
  out = {}
  for k, v in flat.items():
    if isinstance(v, (bool, str)) or (isinstance(v, (int, float)) and math.isfinite(v)):
      out[k] = v
    else:
      out[k] = json.dumps(v)
  return out


def parameter_overview(params: Mapping[str, Any], *, max_lines: int | None = None) -> str:
  """clu's table of every parameter (name, shape, dtype, size, partition spec) and the total.

  Takes real or abstract params (`jax.ShapeDtypeStruct`s, e.g. from `jax.eval_shape`): no
  statistics are computed, so nothing is fetched from the devices and no process waits on
  another. The spec column is the leaf's `sharding.spec` (`None` where a leaf has no sharding).
  """
  return clu_overview.get_parameter_overview(dict(params), include_stats="sharding",
                                             max_lines=max_lines)


class MetricWriter:
  """Appends `{"step": s, **metrics}` lines to metrics.jsonl and scalars to TensorBoard.

  `workdir` may be a gs:// path (etils.epath with gcsfs; tensorboardX's own GCS writer).
  A write that fails (a full disk, a lost mount) never stops the run: it is said once, on
  stderr, and later writes are tried again.
  """

  def __init__(self, workdir: str, *, enabled: bool | None = None):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self._tb = None
    self._jsonl = None
    self._remote = None
    self._warned = False
    self._path = os.path.join(workdir, "metrics.jsonl")
    if self.enabled:
      with self._guarded("metrics.jsonl"):
        path = epath.Path(workdir) / "metrics.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        if "://" in workdir:  # Object stores cannot append: the file is rewritten at each write.
          self._remote = (path, path.read_text() if path.exists() else "")
        else:
          self._jsonl = open(path, "a")
      with self._guarded("TensorBoard"):
        self._tb = _summary_writer(workdir)

  def _warn(self, what: str, err: BaseException) -> None:
    if not self._warned:
      self._warned = True
      print(f"warning: {what} of {os.path.dirname(self._path)} not written "
            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); training "
            "goes on (said once: later metric writes are tried again)",
            file=sys.stderr, flush=True)

  @contextlib.contextmanager
  def _guarded(self, what: str):
    try:
      yield
    except OSError as err:
      self._warn(what, err)

  def write(self, step: int, metrics: Mapping[str, float]) -> None:
    if not self.enabled:
      return
    line = json.dumps({"step": step, **{k: float(v) for k, v in metrics.items()}}) + "\n"
    with self._guarded("metrics.jsonl"):
      if self._remote is not None:
        path, text = self._remote
        self._remote = (path, text + line)
        path.write_text(text + line)
      elif self._jsonl is not None:
        self._jsonl.write(line)
        self._jsonl.flush()
    with self._guarded("TensorBoard"):
      if (tb := self._tb) is not None:
        for k, v in metrics.items():
          tb.add_scalar(k, float(v), step)
        tb.flush()

  def image(self, step: int, tag: str, image: np.ndarray) -> None:
    """A uint8 HWC image (e.g. a sample grid) at `step`."""
    with self._guarded("TensorBoard"):
      if self.enabled and (tb := self._tb) is not None:
        tb.add_image(tag, np.asarray(image), step, dataformats="HWC")
        tb.flush()

  def text(self, step: int, tag: str, text: str) -> None:
    """Markdown text at `step` (TensorBoard's Text tab)."""
    with self._guarded("TensorBoard"):
      if self.enabled and (tb := self._tb) is not None:
        tb.add_text(tag, text, step)
        tb.flush()

  def hparams(self, values: Mapping[str, Any], metrics: Sequence[str]) -> None:
    """The run's hyperparameters (HParams tab), linked to the scalar tags `metrics`.

    Written into this run's own event file: tensorboardX's `add_hparams` would open a new run
    folder beside it.
    """
    if not self.enabled:
      return
    # Local: tensorboardX is imported once, by _summary_writer_class (without torch).
    from tensorboardX.summary import hparams
    with self._guarded("TensorBoard"):
      if (tb := self._tb) is not None:
        for summary in hparams(dict(values), {m: None for m in metrics}):
          tb.file_writer.add_summary(summary)
        tb.flush()

  def close(self) -> None:
    if self.enabled:
      with self._guarded("metrics.jsonl"):
        if self._jsonl is not None:
          self._jsonl.close()
      with self._guarded("TensorBoard"):
        if (tb := self._tb) is not None:
          tb.close()


class Progress:
  """One console line per report: step, percent, chosen metrics, rate and ETA."""

  def __init__(self, total: int, start: int = 0, *, enabled: bool | None = None, stream=None):
    self.total, self.start = total, start
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self.stream = stream or sys.stderr
    self._t0 = time.perf_counter()
    self._last = (start, self._t0)

  def exclude(self, seconds: float) -> None:
    """Leaves `seconds` of other work (sample grids) out of the next rate and ETA."""
    step, t = self._last
    self._last = (step, t + seconds)

  def report(self, step: int, metrics: Mapping[str, float]) -> None:
    if not self.enabled:
      return
    now = time.perf_counter()
    elapsed = now - self._t0
    # Rate over the last interval: the first one includes compilation and would skew the ETA.
    last_step, last_t = self._last
    self._last = (step, now)
    rate = (step - last_step) / (now - last_t) if now > last_t else 0.0
    eta = (self.total - step) / rate if rate > 0 else float("nan")
    shown = " ".join(f"{k} {v:.4g}" for k, v in metrics.items())
    pct = 100.0 * step / max(self.total, 1)
    eta_s = _fmt_duration(eta) if eta == eta else "?"
    print(f"[{step}/{self.total} {pct:5.1f}%] {shown} | {rate:.2f} steps/s | "
          f"elapsed {_fmt_duration(elapsed)} ETA {eta_s}", file=self.stream, flush=True)
