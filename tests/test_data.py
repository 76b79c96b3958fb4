"""Data: the idx reader, the tfds ArrayRecord packing, and grain's determinism and resume."""

import gzip
import os
import subprocess
import sys
import time

import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest

from sgjax import checkpoint
from sgjax.data import fashion_mnist, pipeline, prefetch

RAW = fashion_mnist.DEFAULT_DIR


def _cfg(name="fashion_mnist", **kw):
  base = dict(name=name, dir="", cache_dir="", image_size=28, channels=1, num_classes=10,
              worker_count=0, prefetch=2)
  base.update(kw)
  return ml_collections.ConfigDict(base)


def _take(it, n):
  return [next(it) for _ in range(n)]


def _same(batches_a, batches_b):
  return all(np.array_equal(a["image"], b["image"]) and np.array_equal(a["label"], b["label"])
             for a, b in zip(batches_a, batches_b, strict=True))


def test_idx_reader_matches_raw_bytes():
  images, labels = fashion_mnist.read_split("", "train")
  assert images.shape == (60000, 28, 28, 1) and images.dtype == np.uint8
  assert labels.shape == (60000,) and labels.dtype == np.int32
  with gzip.open(os.path.join(RAW, "train-labels-idx1-ubyte.gz")) as f:
    raw_labels = f.read()
  with gzip.open(os.path.join(RAW, "train-images-idx3-ubyte.gz")) as f:
    raw_images = f.read()
  assert labels[0] == raw_labels[8] and labels[-1] == raw_labels[-1]
  np.testing.assert_array_equal(images[1, :, :, 0].ravel(),
                                np.frombuffer(raw_images, np.uint8, 784, 16 + 784))
  assert set(np.unique(labels)) == set(range(10))


def test_missing_data_names_the_fix(tmp_path):
  with pytest.raises(FileNotFoundError, match="apt-get install -y dataset-fashion-mnist"):
    fashion_mnist.read_split(str(tmp_path), "train")
  with pytest.raises(FileNotFoundError, match="--config.data.dir"):
    pipeline.make_train_iterator(_cfg(dir=str(tmp_path), cache_dir=str(tmp_path)), 8, 0)


def test_bad_dataset_fields_are_named():
  with pytest.raises(ValueError, match="data.name = 'imagenet'"):
    pipeline.data_source(_cfg(name="imagenet"))
  with pytest.raises(ValueError, match="data.image_size = 32"):
    pipeline.data_source(_cfg(image_size=32))


def test_packed_tfds_dataset_equals_raw(tmp_path):
  cfg = _cfg(cache_dir=str(tmp_path))
  train = pipeline.data_source(cfg, "train")
  test = pipeline.data_source(cfg, "test")  # Second call reuses the packed files.
  assert len(train) == 60000 and len(test) == 10000
  images, labels = fashion_mnist.read_split("", "test")
  for i in (0, 1234, 9999):
    j = int(test[i]["index"])
    np.testing.assert_array_equal(np.asarray(test[i]["image"]), images[j])
    assert int(test[i]["label"]) == labels[j]
  # Every raw record is there exactly once (tfds picks the order).
  indices = [int(r["index"]) for r in test.__getitems__(list(range(10000)))]
  assert sorted(indices) == list(range(10000))
  assert any(f.endswith(".array_record-00000-of-00001") or "array_record" in f
             for _, _, files in os.walk(tmp_path) for f in files)


def test_pipeline_is_deterministic_and_seeded():
  cfg = _cfg(name="synthetic", image_size=8, channels=3, num_classes=5)
  a = _take(pipeline.make_train_iterator(cfg, 16, seed=3), 3)
  b = _take(pipeline.make_train_iterator(cfg, 16, seed=3), 3)
  c = _take(pipeline.make_train_iterator(cfg, 16, seed=4), 3)
  assert _same(a, b) and not _same(a, c)
  assert a[0]["image"].shape == (16, 8, 8, 3) and a[0]["image"].dtype == np.float32
  assert a[0]["image"].min() >= -1.0 and a[0]["image"].max() <= 1.0
  assert a[0]["label"].dtype == np.int32


def test_iterator_state_resumes_exactly(tmp_path):
  cfg = _cfg(name="synthetic", image_size=8, channels=1, num_classes=5)
  it = pipeline.make_train_iterator(cfg, 8, seed=0)
  _take(it, 5)
  state = it.get_state()
  expected = _take(it, 3)
  fresh = pipeline.make_train_iterator(cfg, 8, seed=0)
  fresh.set_state(state)
  assert _same(_take(fresh, 3), expected)

  # Through an orbax checkpoint, as the train loop saves it.
  it = pipeline.make_train_iterator(cfg, 8, seed=0)
  _take(it, 2)
  mngr = checkpoint.manager(str(tmp_path / "ckpt"), async_save=False)
  checkpoint.save(mngr, 2, {"x": np.zeros(2)}, it)
  expected = _take(it, 3)
  fresh = pipeline.make_train_iterator(cfg, 8, seed=0)
  checkpoint.restore(mngr, {"x": ocp.utils.to_shape_dtype_struct(np.zeros(2))}, fresh)
  assert _same(_take(fresh, 3), expected)
  mngr.close()


def test_processes_read_their_rows_of_the_same_global_batches():
  cfg = _cfg(name="synthetic", image_size=4, channels=1, num_classes=7)
  n_batches = len(pipeline.data_source(cfg)) // 16 + 2  # Crosses an epoch boundary.
  whole = _take(pipeline.make_train_iterator(cfg, 16, seed=0), n_batches)
  # Two processes holding one block each (JAX's usual layout), and four interleaved ones (a pod
  # mesh along the physical topology): their rows put together are the one-process batches.
  for layouts in ([range(0, 8), range(8, 16)], [(r, r + 4, r + 8, r + 12) for r in range(4)]):
    parts = [_take(pipeline.make_train_iterator(cfg, 16, seed=0, rows=rows), n_batches)
             for rows in layouts]
    for k in range(n_batches):
      for key in ("image", "label"):
        together = np.empty_like(whole[k][key])
        for rows, part in zip(layouts, parts, strict=True):
          together[list(rows)] = part[k][key]
        np.testing.assert_array_equal(together, whole[k][key])
  with pytest.raises(ValueError, match=r"rows = .*train.batch_size = 16"):
    pipeline.make_train_iterator(cfg, 16, seed=0, rows=(3, 2))


def test_device_prefetch_reads_ahead_but_checkpoints_what_was_consumed(tmp_path):
  cfg = _cfg(name="synthetic", image_size=8, channels=1, num_classes=5)
  placed = []

  def put(batch):  # Stands in for the device transfer; records when each batch was placed.
    placed.append(batch["label"].copy())
    return batch

  it = prefetch.DevicePrefetch(pipeline.make_train_iterator(cfg, 8, seed=0), put, depth=3)
  plain = _take(pipeline.make_train_iterator(cfg, 8, seed=0), 9)
  assert _same(_take(it, 2), plain[:2])
  # grain's thread fills its queue of 3 and blocks holding a 4th: 2 + 3 + 1 placed, no more.
  deadline = time.monotonic() + 20
  while len(placed) < 6 and time.monotonic() < deadline:
    time.sleep(0.01)
  time.sleep(0.2)
  assert len(placed) == 6

  # Async save, then the loop reads on before the save finishes: the checkpoint still holds
  # the position after batch 2, not the host iterator's (4) nor the loop's later one.
  mngr = checkpoint.manager(str(tmp_path / "ckpt"), async_save=True)
  checkpoint.save(mngr, 2, {"x": np.zeros(2)}, it)
  assert _same(_take(it, 3), plain[2:5])
  mngr.wait_until_finished()
  fresh = prefetch.DevicePrefetch(pipeline.make_train_iterator(cfg, 8, seed=0), put, depth=3)
  checkpoint.restore(mngr, {"x": ocp.utils.to_shape_dtype_struct(np.zeros(2))}, fresh)
  assert _same(_take(fresh, 4), plain[2:6])
  mngr.close()
  it.close()  # Stops the threads: nothing more is placed.
  fresh.close()

  # A state taken from the wrapper restores a bare grain iterator the same way, and depth 0
  # places each batch only when asked for.
  placed.clear()
  lazy = prefetch.DevicePrefetch(pipeline.make_train_iterator(cfg, 8, seed=0), put, depth=0)
  _take(lazy, 3)
  assert len(placed) == 3
  bare = pipeline.make_train_iterator(cfg, 8, seed=0)
  bare.set_state(lazy.get_state())
  assert _same(_take(bare, 2), plain[3:5])
  with pytest.raises(ValueError, match=r"data.prefetch = -1"):
    prefetch.DevicePrefetch(pipeline.make_train_iterator(cfg, 8, seed=0), put, depth=-1)


def test_processes_preparing_one_cache_at_once_all_succeed(tmp_path):
  """Three trainings started together used to race on tfds' final rename (FileExistsError in
  all but one): preparation now takes a lock in the cache, so the others wait and reuse it."""
  code = ("import sys; from tests.test_data import _cfg; from sgjax.data import pipeline; "
          "print(len(pipeline.data_source(_cfg(cache_dir=sys.argv[1]), 'test')))")
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=os.path.dirname(os.path.dirname(__file__))) for _ in range(2)]
  outs = [p.communicate(timeout=600) for p in procs]
  assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outs]
  assert [out.split()[-1] for out, _ in outs] == ["10000", "10000"]
