"""Faults during writes (issue 23 items 3, 4; issue 32 item 6): a full disk (a real tmpfs that
fills up, and an injected OSError where a tmpfs cannot stand in) stops a writer (the train loop,
sample shards, an export, the study's table, a writer lock) with one line naming the file, the
full disk and what is kept, and from the command line nothing else (no traceback from orbax's
threads); it leaves nothing half-written where a resume would read it, and the rerun after space
is freed ends bit-exact; failed metric writes and sample grids never stop training; SIGKILL
during a sample-shard run, an eval's feature caching and encode_latents, then a rerun, gives the
uninterrupted run's bytes (or features)."""

import errno
import glob
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from sgjax import errors, files, lock, metrics, sharding, train
from sgjax.convert import inception_fid
from sgjax.jobs import evaluate as eval_job
from sgjax.jobs import sample as sample_job
from sgjax.jobs import study as study_lib
from sgjax.jobs import sweep
from sgjax.tools import encode_latents
from tests.builders import (
  VAE,
  fill,
  image_folder,
  inception_state_dict,
  latent_config,
  one_error_line,
  read_events,
  tiny_config,
  tmpfs,
  write_checkpoints,
  write_weights,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGE = 4096


def _env():
  env = dict(os.environ, PYTHONPATH=ROOT)
  env.pop("SGJAX_VERBOSE", None)
  return env


def _du(path) -> int:
  return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def _launch(args):
  return subprocess.Popen([sys.executable, *args], cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


def _kill_when(proc, ready, timeout=300):
  """SIGKILLs `proc` as soon as `ready()`; asserts it was still running then."""
  t_end = time.time() + timeout
  while not ready():
    assert proc.poll() is None, proc.communicate()[0][-3000:]
    assert time.time() < t_end, "the moment to kill never came"
    time.sleep(0.01)
  proc.send_signal(signal.SIGKILL)
  out = proc.communicate(timeout=60)[0]
  assert proc.returncode == -signal.SIGKILL, out[-3000:]


# ------------------------------------------------------------------ a full disk
FULL = "the disk is full (no space left on device)"
REDO = ("free space (or fix the folder) and rerun the same command: finished files are kept, "
        "this one is redone")


def _cli(*args: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=_env(), capture_output=True,
                        text=True, timeout=300)


def test_a_full_disk_stops_training_keeps_the_last_checkpoint_and_resumes_bit_exact(tmp_path):
  c = tiny_config()  # 4 steps, checkpoints at 2 and 4.
  # Async saves, as the shipped configs make them: the write fails in orbax's threads and event
  # loop, where it used to print tracebacks ("Event loop is closed") before the one line.
  c.train.async_checkpoint = True
  straight = str(tmp_path / "straight")
  expected = [np.asarray(a) for a in jax.tree.leaves(train.train(c, straight))]
  # A disk with room for everything but the step-4 checkpoint (half of it fits).
  ckpts = os.path.join(straight, "checkpoints")
  room = _du(straight) - _du(os.path.join(ckpts, "4")) // 2
  disk = tmp_path / "disk"
  with tmpfs(disk, str(room + 64 * PAGE)) as remount:
    workdir = str(disk / "run")
    proc = _cli("sgjax.main", "--config=tests/configs/tiny.py", f"--workdir={workdir}",
                "--config.train.async_checkpoint=True")
    assert one_error_line(proc) == (
        f"error: {workdir}/checkpoints/4: checkpoint step 4 was not saved: {FULL}; the last "
        "complete checkpoint is step 2 (kept): free space and rerun the same command to resume "
        "from it")
    # Nothing else on stderr but the progress lines: no log of orbax's threads.
    assert [s for s in proc.stderr.splitlines() if not s.startswith(("[2/4", "[4/4", "error: "))
            ] == [], proc.stderr[-3000:]
    # The unfinished step is gone (its space given back); nothing a resume would read.
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2"]
    assert not os.path.exists(os.path.join(workdir, "writer.lock"))
    remount("64m")  # Space freed: the same command resumes and ends bit for bit.
    resumed = train.train(c, workdir)
    assert int(resumed["step"]) == 4
    for a, b in zip(expected, jax.tree.leaves(resumed), strict=True):
      np.testing.assert_array_equal(a, np.asarray(b))


def test_a_full_disk_while_drawing_grids_is_a_warning_and_training_goes_on(tmp_path, capsys):
  c = tiny_config()
  c.train.sample_every = 2  # Grids at steps 2 and 4.
  c.sample.guidance.update(rule="cfg", omega=1.5)  # One grid a step (CFG is drawn beside others).
  workdir = tmp_path / "run"
  # The grids' folder alone is a full disk: checkpoints and TensorBoard land elsewhere.
  with tmpfs(workdir / "samples", "64k"):
    fill(workdir / "samples", 0)
    state = train.train(c, str(workdir))
    assert os.listdir(workdir / "samples") == ["filler"]  # No half-written grid.
  assert int(state["step"]) == 4
  assert sorted(os.listdir(workdir / "checkpoints")) == ["2", "4"]
  warnings = [s for s in capsys.readouterr().err.splitlines() if s.startswith("warning: ")]
  assert warnings == [f"warning: {workdir}/samples/step_{n}_cfg.png: sample grid not written: "
                      f"{FULL}; training goes on" for n in (2, 4)]
  # The grids still reach TensorBoard, on its own disk.
  images = [(e.step, v.tag) for e in read_events(workdir / "tensorboard")
            for v in e.summary.value if v.HasField("image")]
  assert images == [(2, "samples/cfg_omega1.5"), (4, "samples/cfg_omega1.5")]


def test_sample_shards_and_an_export_on_a_full_disk_are_one_line(checkpointed, tmp_path):
  shards_disk, export_disk = tmp_path / "shards", tmp_path / "export"
  with tmpfs(shards_disk, "4m"), tmpfs(export_disk, "64k"):
    workdir = str(shards_disk / "run")
    shutil.copytree(checkpointed, workdir)
    # Room for the lock, the set's settings.json and its first shard (a page each).
    fill(shards_disk, 3 * PAGE)
    fill(export_disk, 0)
    out = str(export_disk / "ema.safetensors")
    procs = {name: subprocess.Popen([sys.executable, "-m", *args], cwd=ROOT, env=_env(),
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name, args in {
                 "sample": ["sgjax.main", "--config=tests/configs/tiny.py", f"--workdir={workdir}",
                            "--mode=sample", "--config.sample.num_samples=32",
                            "--config.sample.shard_batches=1"],
                 "export": ["sgjax.jobs.export", "--config=tests/configs/tiny.py",
                            f"--workdir={checkpointed}", "--layout=sgjax", f"--out={out}"]}.items()}
    done = {k: subprocess.CompletedProcess(p.args, p.wait(timeout=300), *p.communicate())
            for k, p in procs.items()}
    sets = os.path.join(workdir, "samples_sg_32")
    assert one_error_line(done["sample"]) == (
        f"error: {sets}/shard_00001.npz: cannot write: {FULL}; {REDO}")
    assert sorted(os.listdir(sets)) == ["settings.json", "shard_00000.npz"]  # No .tmp, no lock.
    assert files.load_npz(os.path.join(sets, "shard_00000.npz"))["arr_0"].shape == (8, 16, 16, 1)
    assert one_error_line(done["export"]) == f"error: {out}: cannot write: {FULL}; {REDO}"
    assert os.listdir(export_disk) == ["filler"]


def test_the_study_table_and_a_writer_lock_on_a_full_disk_are_one_line(checkpointed, tmp_path,
                                                                        monkeypatch):
  disk = tmp_path / "disk"
  with tmpfs(disk, "64k"):
    study = study_lib.Study(tiny_config(), checkpointed, out_dir=str(disk / "study"))
    study._judge = study_lib.Judge("fd", None, None, None)  # Scores are not under test.
    monkeypatch.setattr(study_lib.Study, "score", lambda self, p, resamples: dict(
        p, fd=1.0, num_samples=4, gmacs_per_image=0.5, seconds=0.0))
    first, second = (study_lib.point("sg", 1.5, 0.0, g, 3, checkpoint_step=2, per_class=1)
                     for g in (0.5, 0.75))
    (row,) = study.run([first], "screen")
    filler = fill(disk, 0)
    with pytest.raises(errors.UserError) as stop:
      study.run([second], "screen")
    assert str(stop.value) == f"{study.path}: cannot write: {FULL}; {REDO}"
    # The table keeps its finished points (the rerun scores only the one that was lost).
    assert sweep.load_results(study.path) == [row]
    assert sorted(os.listdir(disk / "study")) == ["points.jsonl"]

    # A writer lock (any job's first write) on the full disk: the same line, nothing left.
    os.remove(filler)
    os.makedirs(disk / "run")
    fill(disk, 0)
    with pytest.raises(errors.UserError) as stop, lock.hold(str(disk / "run" / "out"), "test"):
      pass
    assert str(stop.value) == f"{disk}/run/out/writer.lock: cannot write: {FULL}; {REDO}"
    assert os.listdir(disk / "run") == []


def test_failed_metric_writes_warn_once_and_the_run_goes_on(tmp_path, capsys):
  disk = tmp_path / "disk"
  with tmpfs(disk, "1m"):
    writer = metrics.MetricWriter(str(disk / "run"), enabled=True)
    writer.write(1, {"loss": 1.0})
    filler = fill(disk, 0)
    for step in range(2, 40):  # Far more than tensorboardX's queue of 10 (a dead thread hangs).
      writer.write(step, {"loss": 1.0 / step, "lr": 0.1})
      writer.text(step, "config", "x" * 5000)
    err = capsys.readouterr().err
    assert err.count("warning: ") == 1, err
    assert f"not written (OSError: [Errno {errno.ENOSPC}] No space left on device" in err
    assert "training goes on" in err
    os.remove(filler)  # Space back: the lines written from here on land.
    writer.write(40, {"loss": 0.5})
    writer.close()
    lines = open(disk / "run" / "metrics.jsonl").read().splitlines()
    assert lines[0] == '{"step": 1, "loss": 1.0}' and lines[-1] == '{"step": 40, "loss": 0.5}'


def test_a_full_disk_keeps_finished_shards_and_names_the_one_that_failed(tmp_path, monkeypatch):
  disk = tmp_path / "disk"
  shard = np.random.default_rng(0).integers(0, 256, (64, 16, 16, 1), np.uint8)  # 16 KB.
  with tmpfs(disk, "256k"):
    files.save_npz(disk / "shard_00000.npz", arr_0=shard)
    fill(disk, 2 * PAGE)  # Half a shard's room.
    with pytest.raises(errors.UserError) as stop:
      files.save_npz(disk / "shard_00001.npz", arr_0=shard)
    assert str(stop.value) == (
        f"{disk}/shard_00001.npz: cannot write: the disk is full (no space left on device); "
        "free space (or fix the folder) and rerun the same command: finished files are kept, "
        "this one is redone")
    assert sorted(os.listdir(disk)) == ["filler", "shard_00000.npz"]  # No temporary file.
    np.testing.assert_array_equal(files.load_npz(disk / "shard_00000.npz")["arr_0"], shard)

  # Where no tmpfs reaches (a bucket; any other OSError): the same line, from the injected error.
  def no_space(path, mode):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)

  monkeypatch.setattr(files, "_open_for_write", no_space)
  with pytest.raises(errors.UserError, match=r"^gs://b/eval/features_1\.npz: cannot write: the "
                     r"disk is full \(no space left on device\); free space"):
    files.save_npz("gs://b/eval/features_1.npz", pool=np.ones(3))
  monkeypatch.setattr(files, "_open_for_write", lambda path, mode: (_ for _ in ()).throw(
      PermissionError(errno.EACCES, "Permission denied", path)))
  with pytest.raises(errors.UserError, match=r"metrics\.json: cannot write \(\[Errno 13\] "
                     r"Permission denied"):
    files.write_text(tmp_path / "metrics.json", "{}")
  assert not os.listdir(tmp_path / "disk") and os.listdir(tmp_path) == ["disk"]


# ------------------------------------------------------------------ kills mid-write
@pytest.fixture(scope="module")
def checkpointed(tmp_path_factory):
  """A workdir with one checkpoint (step 2) written without training."""
  workdir = str(tmp_path_factory.mktemp("sampled") / "run")
  write_checkpoints(tiny_config(), workdir, [2])
  return workdir


def test_sigkill_mid_sample_shards_then_rerun_equals_uninterrupted(checkpointed, tmp_path):
  c = tiny_config()
  c.sample.update(num_samples=32, shard_batches=1)  # 4 shards of one batch of 8.
  straight, killed = str(tmp_path / "straight"), str(tmp_path / "killed")
  for w in (straight, killed):
    shutil.copytree(checkpointed, w)
  proc = _launch(["-m", "sgjax.main", "--config=tests/configs/tiny.py", f"--workdir={killed}",
                  "--mode=sample", "--config.sample.num_samples=32",
                  "--config.sample.shard_batches=1"])
  sets = os.path.join(killed, "samples_sg_32")
  _kill_when(proc, lambda: os.path.exists(os.path.join(sets, "shard_00000.npz")))
  left = sorted(os.listdir(sets))
  assert "shard_00000.npz" in left and "shard_00003.npz" not in left, left
  sample_job.run(c, killed)  # The rerun: the kill's lock is taken over, shards resumed.
  sample_job.run(c, straight)
  for name in [f"shard_{s:05d}.npz" for s in range(4)] + ["../samples_sg_32.npz"]:
    a, b = (files.load_npz(os.path.join(w, "samples_sg_32", name)) for w in (straight, killed))
    assert sorted(a) == sorted(b) == ["arr_0", "labels"]
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])


def test_sigkill_while_eval_caches_features_then_rerun_equals_uninterrupted(checkpointed,
                                                                            tmp_path):
  workdir = str(tmp_path / "run")
  shutil.copytree(checkpointed, workdir)
  weights = str(tmp_path / "inception.npz")
  inception_fid.save(inception_fid.convert(inception_state_dict(seed=3)), weights)
  flags = ["--config.eval.num_samples=8", "--config.eval.batch_size=8",
           "--config.eval.metrics=('is',)", f"--config.eval.inception_weights={weights}"]
  proc = _launch(["-m", "sgjax.main", "--config=tests/configs/tiny.py", f"--workdir={workdir}",
                  "--mode=eval", *flags])
  # Killed once its samples are merged: it is then in the Inception pass that fills the cache.
  _kill_when(proc, lambda: glob.glob(os.path.join(workdir, "eval", "*.npz")))
  (sample_dir,) = [p for p in glob.glob(os.path.join(workdir, "eval", "*")) if os.path.isdir(p)]
  assert not glob.glob(os.path.join(sample_dir, "features_*")), "killed too late"
  shard = os.path.join(sample_dir, "shard_00000.npz")
  mtime = os.path.getmtime(shard)

  c = tiny_config()
  c.eval.update(num_samples=8, batch_size=8, metrics=("is",), inception_weights=weights)
  scores = eval_job.run(c, workdir)
  assert os.path.getmtime(shard) == mtime  # Not resampled.
  (cache,) = glob.glob(os.path.join(sample_dir, "features_*.npz"))
  # The uninterrupted computation of the same set's features (the cache moved aside).
  os.rename(cache, cache + ".resumed")
  variables = inception_fid.load_variables(weights)
  mesh = sharding.build_mesh(c.mesh)
  with jax.set_mesh(mesh):
    straight = eval_job.sample_features(c.eval, variables, mesh, sample_dir)
  resumed = np.load(cache + ".resumed")
  assert sorted(resumed.files) == sorted(straight)
  for k in straight:
    np.testing.assert_array_equal(resumed[k], straight[k])
  assert scores["inception_score"] >= 1.0


def _shard_bytes(folder):
  return {n: open(os.path.join(folder, n), "rb").read() for n in sorted(os.listdir(folder))
          if n.endswith(".array_record")}


def test_encode_latents_killed_between_shards_or_stopped_by_a_full_disk_resumes_bytewise(
    tmp_path):
  images = image_folder(tmp_path / "images")  # 8 images -> shards of 3, 3, 2.
  weights = write_weights(tmp_path / "vae.safetensors", seed=5, **VAE)
  straight = str(tmp_path / "straight")
  encode_latents.encode(latent_config(images, straight, weights))
  expected = _shard_bytes(straight)
  assert len(expected) == 3

  killed = str(tmp_path / "killed")
  proc = _launch(["-m", "sgjax.tools.encode_latents", "--config=tests/configs/tiny_latents.py",
                  f"--config.encode.source_dir={images}", f"--config.data.dir={killed}",
                  f"--config.vae.weights={weights}"])
  _kill_when(proc, lambda: os.path.exists(os.path.join(killed, sorted(expected)[0])))
  assert len(_shard_bytes(killed)) < 3
  encode_latents.encode(latent_config(images, killed, weights))
  assert _shard_bytes(killed) == expected

  # A disk with room for the metadata, the lock and the first shard, not the second.
  disk = tmp_path / "disk"
  pages = lambda n: -(-n // PAGE)
  sizes = [len(b) for b in expected.values()]
  meta = os.path.getsize(os.path.join(straight, "metadata.json"))
  with tmpfs(disk, "1m"):
    filler = fill(disk, PAGE * (1 + pages(meta) + pages(sizes[0]) + pages(sizes[1]) - 1))
    out = str(disk / "latents")
    with pytest.raises(errors.UserError) as stop:
      encode_latents.encode(latent_config(images, out, weights))
    name = sorted(expected)[1]
    assert str(stop.value) == (
        f"{out}/{name}: cannot write: the disk is full (no space left on device); 1 of 3 "
        "shards are complete (kept): free space and rerun the same command to encode the rest")
    assert sorted(os.listdir(out)) == [sorted(expected)[0], "metadata.json"]
    os.remove(filler)
    encode_latents.encode(latent_config(images, out, weights))
    assert _shard_bytes(out) == expected
