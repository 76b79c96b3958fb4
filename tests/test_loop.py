"""The train loop end to end on synthetic data: exact resume, NaN abort, sampling a workdir."""

import json
import os

import jax
import numpy as np
import pytest

from sgjax import checkpoint, errors, generate, train
from sgjax import config as config_lib
from sgjax.jobs import demo as demo_job
from sgjax.jobs import sample as sample_job
from tests.builders import tiny_config


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
  with pytest.raises(errors.UserError, match=r"model.width = 64 there, 128 requested"):
    train.train(c, str(tmp_path))
  # A workdir without a record (made before records): the checkpoint's shapes still refuse it.
  os.remove(tmp_path / "workdir.json")
  with pytest.raises(errors.UserError, match=r"checkpoint step 2 does not fit the configured "
                     r"model \(params/block0/adaLN/bias \(384,\) saved, \(768,\) in the model"):
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
  assert ("there is no good checkpoint yet" if good is None
          else f"last good checkpoint: step {good}") in str(err.value)


def test_sampling_a_trained_workdir_writes_grid_and_npz(tmp_path):
  c = tiny_config()
  c.train.num_steps = 2
  train.train(c, str(tmp_path))
  png = sample_job.run(c, str(tmp_path))
  assert os.path.exists(png)
  data = np.load(str(tmp_path / "samples_sg.npz"))
  n = c.data.num_classes * c.sample.per_class
  assert data["arr_0"].shape == (n, 16, 16, 1) and data["arr_0"].dtype == np.uint8
  np.testing.assert_array_equal(data["labels"], np.repeat(np.arange(4), 2))


def test_eval_set_is_sharded_resumable_and_ag_sg_reads_the_kept_guide(tmp_path):
  c = tiny_config()
  c.train.update(num_steps=4, checkpoint_every=1, keep_checkpoints=1, keep_period=2)
  train.train(c, str(tmp_path))
  c.sample.guidance.update(rule="ag_sg", omega=1.5, gamma_strong=0.0, gamma_weak=0.5,
                           guide_step=2)  # Kept by keep_period although max_to_keep is 1.
  c.sample.update(num_samples=20, shard_batches=1, batch_size=8)  # 3 shards, the last short.
  sample_job.run(c, str(tmp_path), name="eval")
  out = tmp_path / "eval_20"
  merged = np.load(str(tmp_path / "eval_20.npz"))
  assert merged["arr_0"].shape == (20, 16, 16, 1) and merged["arr_0"].dtype == np.uint8
  np.testing.assert_array_equal(merged["labels"], np.arange(20) % 4)
  assert sorted(os.listdir(out)) == ["settings.json", "shard_00000.npz", "shard_00001.npz",
                                     "shard_00002.npz"]
  first = merged["arr_0"].copy()

  # A run killed after shard 0: shards 1-2 and the merge are missing; rerunning redoes only
  # those and gives the same images.
  os.remove(out / "shard_00001.npz")
  os.remove(out / "shard_00002.npz")
  os.remove(tmp_path / "eval_20.npz")
  kept = os.path.getmtime(out / "shard_00000.npz")
  sample_job.run(c, str(tmp_path), name="eval")
  assert os.path.getmtime(out / "shard_00000.npz") == kept
  np.testing.assert_array_equal(np.load(str(tmp_path / "eval_20.npz"))["arr_0"], first)

  c.sample.guidance.guide_step = 1  # Deleted by max_to_keep: a clear error, not a fallback.
  with pytest.raises(errors.UserError, match=r"no checkpoint of step 1 .*\[2, 4\]"):
    sample_job.run(c, str(tmp_path), name="eval2")


def test_demo_writes_cfg_and_sg_grids_from_one_sampling_pass(tmp_path):
  c = tiny_config()
  c.train.num_steps = 2
  c.demo.update(omega_cfg=2.0, omega_sg=2.0, eval_per_class=3)
  train.train(c, str(tmp_path))
  paths, metrics = demo_job.run(c, str(tmp_path))
  assert [os.path.basename(p) for p in paths] == [
      "samples_none.png", "samples_cfg.png", "samples_sg.png"]
  assert metrics == {}  # Synthetic data: no FD-FMNIST classifier to judge it.
  # Matched compute: SG at sample.steps sets the budget; the others take the most steps in it.
  budget = demo_job.gmacs(demo_job.rule_config(c, "sg"))
  steps = {}
  for rule in ("none", "cfg"):
    m = demo_job.matched_config(c, rule, budget)
    more = config_lib.replace(m, {"sample.steps": m.sample.steps + 1})
    assert demo_job.gmacs(m) <= budget < demo_job.gmacs(more), rule
    steps[rule] = m.sample.steps
  assert steps["cfg"] < c.sample.steps < steps["none"]  # CFG: 2 dense forwards; none: 1.
  cfg, sg = (np.load(str(tmp_path / f"samples_{r}.npz")) for r in ("cfg", "sg"))
  assert json.loads(str(cfg["settings"]))["sample.steps"] == steps["cfg"]
  np.testing.assert_array_equal(cfg["labels"], np.repeat(np.arange(4), 3))
  assert cfg["arr_0"].shape == sg["arr_0"].shape == (12, 16, 16, 1)
  # The grid shows sample.per_class (2) of the 3 images per class: 4 rows x 2 columns.
  from PIL import Image
  width, height = Image.open(paths[0]).size
  assert (width, height) == (2 * (2 * 18 + 2), 2 * (4 * 18 + 2))


def test_sweep_grid_skips_done_points_and_plots(tmp_path):
  from sgjax.jobs import sweep
  c = tiny_config()
  c.sweep.update(rules=("cfg", "sg", "cfg_sg"), omegas=(1.0, 2.0), gammas_strong=(0.0, 0.5),
                 gammas_weak=(0.5, 0.7), steps=(3,))
  points = sweep.grid_points(c.sweep)
  keys = [sweep.point_key(p) for p in points]
  assert len(keys) == len(set(keys))
  # CFG ignores γ: 2 ω; SG and CFG+SG need γ_s < γ_w: (0,.5), (0,.7), (.5,.7) x 2 ω each.
  assert sum(p["rule"] == "cfg" for p in points) == 2
  assert sum(p["rule"] == "sg" for p in points) == 6 == sum(p["rule"] == "cfg_sg" for p in points)
  assert all(p["gamma_strong"] < p["gamma_weak"] for p in points if p["rule"] != "cfg")

  xs = np.array([1.0, 2.0, 3.0, 4.0])
  ys = np.array([5.0, 6.0, 2.0, 1.0])  # Point 1 is dominated by point 0 (cheaper and better).
  np.testing.assert_array_equal(sweep.pareto_front(xs, ys, lower_is_better=True), [0, 2, 3])
  # Equal cost (one γ, several ω): only the best of them is on the front, whatever the order.
  xs, ys = np.array([1.0, 1.0, 1.0, 2.0]), np.array([0.7, 0.9, 0.8, 0.95])
  np.testing.assert_array_equal(sweep.pareto_front(xs, ys, lower_is_better=False), [1, 3])
  np.testing.assert_array_equal(sweep.pareto_front(xs, ys, lower_is_better=True), [0])

  rows = [dict(p, fd_fmnist=float(i), class_accuracy=0.5, gmacs_per_image=1.0 + i)
          for i, p in enumerate(points)]
  paths = sweep.plot(rows, str(tmp_path))
  names = sorted(os.path.basename(p) for p in paths)
  assert "fd_fmnist_vs_gmacs.png" in names and "heatmap_sg_gs0.png" in names
  assert all(os.path.getsize(p) > 1000 for p in paths)

  results = tmp_path / "sweep"
  results.mkdir()
  with open(results / "results.jsonl", "w") as f:
    f.write(json.dumps(rows[0]) + "\n")
  done = {sweep.point_key(r) for r in sweep.load_results(str(results / "results.jsonl"))}
  assert done == {sweep.point_key(points[0])}
  with pytest.raises(errors.UserError, match="data.name = 'synthetic'"):
    sweep.run(c, str(tmp_path))


def test_long_sampling_runs_report_progress_and_keep_batch_keys(monkeypatch, capsys):
  c = tiny_config()
  c.sample.batch_size = 4
  keys = []

  def fake_batch(config, model, weights, labels, plan, mesh, key, null=None, cache=None):
    keys.append(int(jax.random.key_data(key)[-1]))
    return np.full((len(labels), 2, 2, 1), labels[:, None, None, None], np.uint8)

  monkeypatch.setattr(generate, "batch", fake_batch)
  labels = np.arange(38, dtype=np.int32) % 7  # 10 batches, the last one short.
  images = generate.images(c, None, None, labels, None, None, seed=3)
  np.testing.assert_array_equal(images[:, 0, 0, 0], labels)
  assert keys == [int(jax.random.key_data(jax.random.fold_in(jax.random.key(3), i))[-1])
                  for i in range(10)]
  lines = [s for s in capsys.readouterr().err.splitlines() if s.startswith("[")]
  assert lines[0].startswith("[1/10") and lines[-1].startswith("[10/10 100.0%] images 38")
