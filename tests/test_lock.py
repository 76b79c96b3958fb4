"""One writer per output folder (issue 23 item 2), with real processes: a second train on a
workdir is refused at once naming the first; a lock whose process was killed is taken over with
a note; the shard writers, encode_latents and the sweep refuse a folder another process holds;
readers take no lock."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from sgjax import errors, generate, lock
from sgjax import workdir as workdir_lib
from sgjax.jobs import sweep
from sgjax.tools import encode_latents
from tests.builders import latent_config, tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HOLDER = """
import sys
from sgjax import lock
with lock.hold(sys.argv[1], sys.argv[2]):
  print("held", flush=True)
  sys.stdin.read()
"""


def _env():
  env = dict(os.environ, PYTHONPATH=ROOT)
  env.pop("SGJAX_VERBOSE", None)
  return env


def _write_images(folder):
  for k in range(2):
    os.makedirs(folder / f"c{k}")
    Image.fromarray(np.full((32, 32, 3), 40 * k, np.uint8)).save(folder / f"c{k}" / "a.png")


def test_second_writers_are_refused_naming_the_holder_and_a_killed_one_is_taken_over(tmp_path):
  workdir = tmp_path / "run"
  shards, sweep_dir = workdir / "samples_sg_8", workdir / "sweep"
  latents_dir = tmp_path / "latents"
  held = ((workdir, "train"), (shards, "sample shards"), (latents_dir, "encode_latents"),
          (sweep_dir, "sweep"))
  holders = [subprocess.Popen([sys.executable, "-c", HOLDER, str(d), what], cwd=ROOT,
                              env=_env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True) for d, what in held]
  try:
    for p in holders:
      assert p.stdout.readline() == "held\n"
    info = lock.read(str(workdir))
    assert (info["what"], info["pid"], info["host"]) == ("train", holders[0].pid,
                                                         socket.gethostname())
    # A second train (the real command) is refused before it does anything.
    t0 = time.time()
    second = subprocess.Popen(
        [sys.executable, "-m", "sgjax.main", "--config=tests/configs/tiny.py",
         f"--workdir={workdir}"], cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)
    # Meanwhile, in this process: the shard writer refuses before it samples anything (it
    # needs no model to say so), encode_latents before metadata.json, the sweep's folder.
    with pytest.raises(errors.UserError, match=rf"^{shards}: another run writes here \(sample "
                       rf"shards, pid {holders[1].pid} on host"):
      generate.write_shards(tiny_config(), None, None, None, None, None, str(shards), 0)
    _write_images(tmp_path / "images")
    c = latent_config(str(tmp_path / "images"), str(latents_dir), "vae.safetensors")
    with pytest.raises(errors.UserError, match=rf"^{latents_dir}: another run writes here "
                       rf"\(encode_latents, pid {holders[2].pid}"):
      encode_latents.encode(c)
    assert os.listdir(latents_dir) == [lock.LOCK]
    # output_dir keeps the folder (a lock file alone is not "other settings"), then the lock.
    assert workdir_lib.output_dir(str(sweep_dir), {"a": 1}, log=print) == str(sweep_dir)
    with pytest.raises(errors.UserError, match=rf"\(sweep, pid {holders[3].pid}"):
      with lock.hold(str(sweep_dir), "sweep"):
        pass
    assert sweep.lock is lock  # sweep.run holds its folder with this call.
    out, err = second.communicate(timeout=300)
    print(f"second train refused in {time.time() - t0:.1f}s (its imports included)")
    assert second.returncode == 2, err[-3000:]
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(
        f"error: {workdir}: another run writes here (train, pid {holders[0].pid} on host "
        f"{socket.gethostname()} since {info['started']}, command: python")
    assert f"stop it (kill {holders[0].pid}) or write elsewhere" in err
    assert not os.path.exists(workdir / "checkpoints")
  finally:
    holders[0].send_signal(signal.SIGKILL)
    for p in holders:
      p.stdin.close()
      p.wait(timeout=60)
  # Killed: the kernel dropped its flock; the file still names it, and the next writer says so.
  assert lock.read(str(workdir))["pid"] == holders[0].pid
  notes = []
  with lock.hold(str(workdir), "train", log=notes.append):
    assert lock.read(str(workdir))["pid"] == os.getpid()
    with lock.hold(str(workdir), "train", log=notes.append):  # Re-entrant in one process.
      pass
    assert os.path.exists(lock.path_of(str(workdir)))
  assert len(notes) == 1 and notes[0].startswith(
      f"note: took over the writer lock of {workdir} from train, pid {holders[0].pid} on host ")
  assert "that process is gone" in notes[0]
  # Released: removed. The others ended cleanly: their files are gone, nothing to take over.
  for d, _ in held:
    assert not os.path.exists(lock.path_of(str(d)))
  with lock.hold(str(shards), "sample shards", log=notes.append):
    assert json.loads(open(lock.path_of(str(shards))).read())["pid"] == os.getpid()
  assert len(notes) == 1


def test_a_workdir_that_names_a_file_is_refused(tmp_path):
  path = tmp_path / "notes.txt"
  path.write_text("not a folder")
  with pytest.raises(errors.UserError, match=rf"^{path}: is a file, not a folder; name a folder"):
    with lock.hold(str(path), "train"):
      pass
  assert path.read_text() == "not a folder"
  # A folder made for the lock alone (a job that then stops early) does not stay behind.
  fresh = tmp_path / "fresh" / "study"
  with lock.hold(str(fresh), "study"):
    assert os.listdir(fresh) == [lock.LOCK]
  assert not fresh.exists()
