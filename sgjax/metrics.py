"""Metric logging: JSONL and TensorBoard event files in the workdir, and a console progress line.

Written only by process 0. TensorBoard events come from tensorboardX, which needs no TensorFlow
(clu's and flax's writers import it).
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Mapping

import jax


def _fmt_duration(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


class MetricWriter:
  """Appends `{"step": s, **metrics}` lines to metrics.jsonl and scalars to TensorBoard."""

  def __init__(self, workdir: str, *, enabled: bool | None = None):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self._tb = None
    self._jsonl = None
    if self.enabled:
      os.makedirs(workdir, exist_ok=True)
      self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
      from tensorboardX import SummaryWriter  # Local: only process 0 writes events.
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, metrics: Mapping[str, float]) -> None:
    if not self.enabled:
      return
    self._jsonl.write(json.dumps({"step": step, **{k: float(v) for k, v in metrics.items()}})
                      + "\n")
    self._jsonl.flush()
    for k, v in metrics.items():
      self._tb.add_scalar(k, float(v), step)
    self._tb.flush()

  def close(self) -> None:
    if self.enabled:
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
