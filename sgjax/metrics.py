"""Metric logging: JSONL and TensorBoard event files in the workdir, a console progress line, and
the parameter table printed at start.

Written only by process 0. TensorBoard events come from tensorboardX, which needs no TensorFlow
(clu's and flax's writers import it; clu's `parameter_overview` does not).
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Mapping
from typing import Any

import jax
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
  """

  def __init__(self, workdir: str, *, enabled: bool | None = None):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self._tb = None
    self._jsonl = None
    if self.enabled:
      path = epath.Path(workdir) / "metrics.jsonl"
      path.parent.mkdir(parents=True, exist_ok=True)
      if "://" in workdir:  # Object stores cannot append: the file is rewritten at each write.
        self._remote = (path, path.read_text() if path.exists() else "")
      else:
        self._jsonl = open(path, "a")
      self._tb = _summary_writer_class()(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, metrics: Mapping[str, float]) -> None:
    if not self.enabled:
      return
    line = json.dumps({"step": step, **{k: float(v) for k, v in metrics.items()}}) + "\n"
    if self._jsonl is None:
      path, text = self._remote
      self._remote = (path, text + line)
      path.write_text(text + line)
    else:
      self._jsonl.write(line)
      self._jsonl.flush()
    for k, v in metrics.items():
      self._tb.add_scalar(k, float(v), step)
    self._tb.flush()

  def close(self) -> None:
    if self.enabled:
      if self._jsonl is not None:
        self._jsonl.close()
      self._tb.close()


class Progress:
  """One console line per report: step, percent, chosen metrics, rate and ETA."""

  def __init__(self, total: int, start: int = 0, *, enabled: bool | None = None, stream=None):
    self.total, self.start = total, start
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self.stream = stream or sys.stderr
    self._t0 = time.perf_counter()
    self._last = (start, self._t0)

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
