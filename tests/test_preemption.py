"""SIGTERM checkpoints at the next step and exits cleanly; SIGKILL loses nothing checkpointed;
either way, resuming gives the same final params as an uninterrupted run, bit for bit."""

import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np

from sgjax import checkpoint, train
from tests.builders import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS, EVERY = 30, 5  # The signal comes at step EVERY: 25 steps and 5 saves before the end.
OVERRIDES = [f"--config.train.num_steps={STEPS}", f"--config.train.checkpoint_every={EVERY}",
             "--config.train.log_every=5", "--config.train.async_checkpoint=False"]


def _config():
  c = tiny_config()
  c.train.update(num_steps=STEPS, checkpoint_every=EVERY, log_every=5, async_checkpoint=False)
  return c


def _launch(workdir):
  return subprocess.Popen(
      [sys.executable, "-m", "sgjax.main", "--config=tests/configs/tiny.py",
       f"--workdir={workdir}", *OVERRIDES], cwd=ROOT, stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT, text=True)


def _signal_at_first_checkpoint(runs: dict, timeout=120):
  """Sends each run's signal as soon as its first checkpoint exists (the runs go at once)."""
  t_end, pending = time.time() + timeout, dict(runs)
  while pending:
    for sig, (workdir, proc) in list(pending.items()):
      if os.path.isdir(os.path.join(workdir, "checkpoints", str(EVERY))):
        proc.send_signal(sig)
        del pending[sig]
      else:
        assert proc.poll() is None, proc.stdout.read()
    assert time.time() < t_end, "no checkpoint appeared"
    time.sleep(0.005)


def test_sigterm_or_sigkill_then_resume_equals_uninterrupted(tmp_path):
  # The uninterrupted run first: its compiled step lands in the test run's compilation cache
  # (tests/conftest.py), so the two interrupted runs, which then go at once, load it instead of
  # each compiling the same program beside the other.
  uninterrupted = [np.asarray(a) for a in jax.tree.leaves(
      train.train(_config(), str(tmp_path / "straight")))]
  runs = {sig: (str(tmp_path / sig.name), _launch(str(tmp_path / sig.name)))
          for sig in (signal.SIGTERM, signal.SIGKILL)}
  _signal_at_first_checkpoint(runs)
  for sig, (workdir, proc) in runs.items():
    out, _ = proc.communicate(timeout=120)
    latest = checkpoint.manager(os.path.join(workdir, "checkpoints")).latest_step()
    if sig == signal.SIGTERM:
      assert proc.returncode == 0, out
      assert f"SIGTERM: stopped at step {latest} with a checkpoint" in out
      assert EVERY < latest < STEPS  # Saved at the step after the signal, not a scheduled one.
    else:
      assert proc.returncode == -signal.SIGKILL
      assert latest is not None and latest >= EVERY  # Nothing completed was lost.
    resumed = train.train(_config(), workdir)
    assert int(resumed["step"]) == STEPS
    for a, b in zip(uninterrupted, jax.tree.leaves(resumed), strict=True):
      np.testing.assert_array_equal(a, np.asarray(b))
