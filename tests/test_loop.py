"""The train loop end to end on synthetic data: exact resume, NaN abort, sampling a workdir."""

import json
import os

import jax
import numpy as np
import pytest

from sgjax import checkpoint, sampling_job, train
from tests.test_train import tiny_config


def _leaves(state):
  return [np.asarray(a) for a in jax.tree.leaves(state)]


def test_resume_is_bit_exact(tmp_path):
  c = tiny_config()
  c.train.num_steps = 6
  c.train.checkpoint_every = 3
  straight = train.train(c, str(tmp_path / "straight"))

  # "Crash" after the step-3 checkpoint, then restart with the full step count.
  crashed = c.copy_and_resolve_references()
  crashed.train.num_steps = 3
  train.train(crashed, str(tmp_path / "resumed"))
  resumed = train.train(c, str(tmp_path / "resumed"))

  assert int(straight["step"]) == int(resumed["step"]) == 6
  for a, b in zip(_leaves(straight), _leaves(resumed), strict=True):
    np.testing.assert_array_equal(a, b)
  lines = [json.loads(s) for s in open(tmp_path / "resumed" / "metrics.jsonl")]
  assert [m["step"] for m in lines] == [2, 3, 4, 6]
  assert all(np.isfinite(m["loss"]) and m["examples_per_s"] > 0 for m in lines)
  assert os.listdir(tmp_path / "resumed" / "tensorboard")


def test_restore_of_a_wrong_model_fails_loudly(tmp_path):
  c = tiny_config()
  c.train.num_steps = 2
  train.train(c, str(tmp_path))
  c.model.width = 128  # Same workdir, other model: must not silently start from scratch.
  c.train.num_steps = 4
  with pytest.raises(Exception, match="(?i)shape"):
    train.train(c, str(tmp_path))


def test_nan_loss_stops_with_step_and_keeps_last_good_checkpoint(tmp_path):
  c = tiny_config()
  c.train.update(num_steps=8, checkpoint_every=2, log_every=1, lr=1e30, grad_clip=0.0)
  with pytest.raises(FloatingPointError, match=r"non-finite loss at step \d+") as err:
    train.train(c, str(tmp_path))
  bad_step = int(str(err.value).split("step ")[1].split(";")[0])
  mngr = checkpoint.manager(str(tmp_path / "checkpoints"))
  good = mngr.latest_step()
  assert good is None or good < bad_step
  assert f"last good checkpoint: step {good}" in str(err.value)


def test_sampling_a_trained_workdir_writes_grid_and_npz(tmp_path):
  c = tiny_config()
  c.train.num_steps = 2
  train.train(c, str(tmp_path))
  png = sampling_job.run(c, str(tmp_path))
  assert os.path.exists(png)
  data = np.load(str(tmp_path / "samples_sg.npz"))
  n = c.data.num_classes * c.sample.per_class
  assert data["arr_0"].shape == (n, 16, 16, 1) and data["arr_0"].dtype == np.uint8
  np.testing.assert_array_equal(data["labels"], np.repeat(np.arange(4), 2))
