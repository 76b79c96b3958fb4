"""Outputs that may live in a bucket: sgjax.files and the writers that use it, on a fake gs://."""

import contextlib
import os

import numpy as np
import pytest
from etils.epath import testing as epath_testing

from sgjax import files, sampling
from sgjax.jobs import evaluate as eval_job
from sgjax.jobs import sweep


@contextlib.contextmanager
def fake_bucket(root):
  """gs://… paths served from the folder `root` through etils.epath's own backend hooks, so the
  code under test takes its bucket branch (no temporary file and rename)."""
  root = str(root)
  to_local = lambda p: os.fspath(p).replace("gs://", root + "/", 1)
  to_gs = lambda p: os.fspath(p).replace(root + "/", "gs://", 1)
  one = lambda orig, p, *a, **k: orig(to_local(p), *a, **k)
  two = lambda orig, p, dst, *a, **k: orig(to_local(p), to_local(dst), *a, **k)

  def open_(orig, p, mode):  # A bucket has no folders to create before writing an object.
    if "w" in mode:
      os.makedirs(os.path.dirname(to_local(p)), exist_ok=True)
    return orig(to_local(p), mode)

  with epath_testing.mock_epath(
      open=open_, exists=one, isdir=one, listdir=one, makedirs=one, mkdir=one, remove=one,
      stat=one, rmtree=one, rename=two, replace=two, copy=two,
      glob=lambda orig, p: [to_gs(r) for r in orig(to_local(p))]):
    yield


def test_bucket_paths_write_whole_objects_and_read_back(tmp_path):
  with fake_bucket(tmp_path):
    assert files.is_remote("gs://b/run") and not files.is_remote(str(tmp_path))
    files.makedirs("gs://b/run/eval")
    images = np.arange(2 * 4 * 4 * 3, dtype=np.uint8).reshape(2, 4, 4, 3)
    for s in range(3):
      files.save_npz(f"gs://b/run/eval/shard_{s:05d}.npz", arr_0=images + s, labels=np.arange(2))
    assert files.glob("gs://b/run/eval", "shard_*.npz") == [
        f"gs://b/run/eval/shard_{s:05d}.npz" for s in range(3)]
    z = files.load_npz("gs://b/run/eval/shard_00002.npz")
    np.testing.assert_array_equal(z["arr_0"], images + 2)
    files.write_text("gs://b/run/metrics.json", '{"fid": 1.5}')
    assert files.read_text("gs://b/run/metrics.json") == '{"fid": 1.5}'
    assert files.exists("gs://b/run/metrics.json") and not files.exists("gs://b/run/nothing")
    assert files.listdir("gs://b/run") == ["eval", "metrics.json"]
    path, size, _ = files.identity("gs://b/run/metrics.json")
    assert path == "gs://b/run/metrics.json" and size == 12
  # Written straight to the object: no temporary names left in the bucket.
  assert sorted(os.listdir(tmp_path / "b" / "run" / "eval")) == [
      f"shard_{s:05d}.npz" for s in range(3)]


def test_grids_sweep_tables_and_reference_folders_work_in_a_bucket(tmp_path):
  rng = np.random.default_rng(0)
  with fake_bucket(tmp_path):
    files.makedirs("gs://b/ref")
    images = rng.integers(0, 256, (3, 8, 8, 3), np.uint8)
    for i, im in enumerate(images):
      sampling.save_png(f"gs://b/ref/{i}.png", im)
    np.testing.assert_array_equal(eval_job.read_images("gs://b/ref"), images)

    rows = [dict(rule="cfg", omega=w, gamma_strong=0.0, gamma_weak=0.0, steps=4,
                 fd_fmnist=10.0 / w, class_accuracy=0.5, gmacs_per_image=w) for w in (1, 2)]
    files.write_text("gs://b/sweep/results.jsonl", "")
    assert sweep.load_results("gs://b/sweep/results.jsonl") == []
    paths = sweep.plot(rows, "gs://b/sweep")
    assert paths and all(p.startswith("gs://b/sweep/") and files.exists(p) for p in paths)
    assert files.read_bytes(paths[0])[:8] == b"\x89PNG\r\n\x1a\n"


def test_local_writes_appear_only_when_complete(tmp_path):
  target = tmp_path / "shard_00000.npz"
  with pytest.raises(RuntimeError), files.atomic_open(target) as f:
    f.write(b"half a shard")
    raise RuntimeError("killed mid-write")
  assert os.listdir(tmp_path) == []  # Neither the shard nor its temporary file.
  files.save_npz(target, arr_0=np.ones(3))
  assert os.listdir(tmp_path) == ["shard_00000.npz"]
  np.testing.assert_array_equal(files.load_npz(target)["arr_0"], np.ones(3))


def test_sweep_plots_are_redrawn_from_the_table_and_skipped_without_matplotlib(tmp_path,
                                                                               monkeypatch):
  import json
  import sys
  rows = [dict(rule=r, omega=w, gamma_strong=0.0, gamma_weak=gw, steps=4, fd_fmnist=w + gw,
               class_accuracy=0.5, gmacs_per_image=2.0 - gw)
          for r, gws in (("cfg", (0.0,)), ("sg", (0.3, 0.5))) for w in (1.5, 2.0) for gw in gws]
  results = tmp_path / "results.jsonl"
  results.write_text("".join(json.dumps(r) + "\n" for r in rows))
  said = []
  with monkeypatch.context() as m:
    m.setitem(sys.modules, "matplotlib", None)  # A lean GPU image: import fails.
    assert sweep.draw(str(results), said.append) == []
  assert "matplotlib is not installed" in said[0] and "--plot_only" in said[0]
  paths = sweep.draw(str(results), said.append)
  assert sorted(os.path.basename(p) for p in paths) == [
      "class_accuracy_vs_gmacs.png", "fd_fmnist_vs_gmacs.png", "heatmap_sg_gs0.png"]
