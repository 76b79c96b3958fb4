"""Faults and bad input (issue 14): every refusal is one line, a workdir knows what it holds,
nothing is lost. docs/reliability.md lists each promise with the test here that checks it."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from sgjax import checkpoint, errors, train, validation, workdir
from sgjax import config as config_lib
from sgjax.convert import dit_checkpoint
from sgjax.jobs import evaluate as eval_job
from sgjax.jobs import sample as sample_job
from sgjax.jobs import sweep
from tests.builders import tiny_config, unchanged

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A tiny workdir with checkpoints at steps 2 and 4 (each test works on a copy)."""
  path = str(tmp_path_factory.mktemp("trained") / "run")
  c = tiny_config()
  c.train.update(num_steps=4, checkpoint_every=2)
  train.train(c, path)
  return path


def _copy(trained, tmp_path):
  out = str(tmp_path / "run")
  shutil.copytree(trained, out)
  return out


# ------------------------------------------------------------------ error path
def test_guard_prints_one_line_exit_2_and_keeps_bugs_tracebacks(capsys, monkeypatch):
  monkeypatch.delenv("SGJAX_VERBOSE", raising=False)

  def refuses(argv):
    raise errors.UserError("train.lr = 0.0", "must be finite and > 0")

  with pytest.raises(SystemExit) as stop:
    errors.guard(refuses)([])
  assert stop.value.code == 2
  assert capsys.readouterr().err == "error: train.lr = 0.0: must be finite and > 0\n"
  with pytest.raises(SystemExit):  # The first line only.
    errors.guard(lambda argv: (_ for _ in ()).throw(errors.UserError("sparsity.routes[0] = (1, 9)",
                                                                     "bad\nmore")))([])
  assert capsys.readouterr().err == "error: sparsity.routes[0] = (1, 9): bad\n"
  # A ValueError is a bug even when its message names a field: no catch-all by prefix.
  with pytest.raises(ValueError, match="sparsity.routes"):
    errors.guard(lambda argv: (_ for _ in ()).throw(ValueError("sparsity.routes[0]: bad")))([])

  def bug(argv):
    raise KeyError("a bug")

  with pytest.raises(KeyError):  # Not the user's: the traceback stays.
    errors.guard(bug)([])
  monkeypatch.setenv("SGJAX_VERBOSE", "1")
  with pytest.raises(SystemExit):
    errors.guard(refuses)([])
  err = capsys.readouterr().err
  assert "Traceback" in err and err.endswith("error: train.lr = 0.0: must be finite and > 0\n")


def _run_all(commands: dict[str, list[str]]) -> dict[str, subprocess.CompletedProcess]:
  """Runs the commands side by side (each pays its own jax import)."""
  env = dict(os.environ)
  env.pop("SGJAX_VERBOSE", None)
  procs = {k: subprocess.Popen([sys.executable, *cmd], cwd=ROOT, env=env, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
           for k, cmd in commands.items()}
  out = {}
  for k, p in procs.items():
    stdout, stderr = p.communicate(timeout=300)
    out[k] = subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr)
  return out


def _error_lines(proc) -> list[str]:
  return [s for s in proc.stderr.splitlines() if s.startswith("error: ")]


def test_cli_refusals_are_one_line_without_traceback(tmp_path):
  missing = str(tmp_path / "never_made")
  used = tmp_path / "used"
  used.mkdir()
  (used / "notes.txt").write_text("keep me")
  tiny = ["--config=tests/configs/tiny.py"]
  with unchanged(tmp_path):
    results = _run_all({
        "unknown_key": ["-m", "sgjax.main", *tiny, f"--workdir={missing}",
                        "--config.train.num_step=3"],
        "sample_missing": ["-m", "sgjax.main", *tiny, f"--workdir={missing}", "--mode=sample"],
        "verbose": ["-m", "sgjax.main", *tiny, f"--workdir={missing}", "--mode=sample",
                    "--verbose"],
        "empty_grid": ["-m", "sgjax.jobs.sweep", *tiny, f"--workdir={missing}",
                       "--config.sweep.rules=('sg',)", "--config.sweep.gammas_strong=(0.5,)",
                       "--config.sweep.gammas_weak=(0.3,)"],
        "sweep_only": ["-m", "sgjax.jobs.sweep", *tiny, f"--workdir={missing}",
                       "--config.sweep.omegas=(-1.0,)"],  # A training run ignores it (test_config).
        "converter": ["-m", "sgjax.convert.dit_checkpoint", "--src=nothing.pt", f"--out={used}"],
        "help": ["-m", "sgjax.flops", "--help"],
    })
  for name in ("unknown_key", "sample_missing", "empty_grid", "sweep_only", "converter"):
    proc = results[name]
    assert proc.returncode == 2, (name, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr, (name, proc.stderr[-2000:])
    assert len(_error_lines(proc)) == 1, (name, proc.stderr[-2000:])
  assert _error_lines(results["unknown_key"])[0].startswith(
      "error: --config.train.num_step: no such config field; train has: async_checkpoint, b1,")
  assert _error_lines(results["unknown_key"])[0].endswith(
      "did you mean --config.train.num_steps?")
  assert _error_lines(results["sample_missing"]) == [
      f"error: {missing}/checkpoints: no checkpoint there; train first (--mode=train) or point "
      "--workdir at a trained run"]
  assert not os.path.exists(missing)  # A failed command leaves no half-made workdir.
  verbose = results["verbose"]
  assert verbose.returncode == 2 and "Traceback" in verbose.stderr
  assert verbose.stderr.rstrip().splitlines()[-1] == _error_lines(results["sample_missing"])[0]
  assert _error_lines(results["empty_grid"])[0].startswith(
      "error: sweep.gammas_strong, sweep.gammas_weak: no valid point: rules ('sg',) need "
      "γ_strong < γ_weak")
  assert _error_lines(results["sweep_only"]) == [
      "error: sweep.omegas[0] = -1.0: out of range; allowed: a finite number >= 0"]
  assert _error_lines(results["converter"]) == [
      f"error: --out={used}: is not empty (holds ['notes.txt']); import into a new or empty "
      "folder; nothing there is overwritten"]
  assert (used / "notes.txt").read_text() == "keep me" and os.listdir(used) == ["notes.txt"]
  assert results["help"].returncode == 0 and "--[no]json" in results["help"].stdout


# ------------------------------------------------------------------ config
def test_unknown_keys_in_config_files_are_refused():
  c = config_lib.base_config()
  c.text.update(dropout=0.1)  # What configs/t2i_2p5b.py once did: ConfigDict adds it silently.
  with pytest.raises(errors.UserError, match=r"^text.dropout: no such config field; text has: "
                     r"encoder, eval_templates, layers, max_tokens, templates, width$"):
    validation.validate(c)
  c = config_lib.base_config()
  c.sample.guidance.update(omgea=2.0)
  with pytest.raises(errors.UserError, match=r"sample.guidance.omgea: .*did you mean "
                     r"sample.guidance.omega\?"):
    validation.validate(c)


@pytest.mark.parametrize("field, value, message", [
    ("train.num_steps", 0, r"^train.num_steps = 0: out of range; allowed: an int >= 1 \(the "
                           r"step to train to\)$"),
    ("train.lr", float("nan"), r"^train.lr = nan: not finite; allowed: a finite number > 0$"),
    ("train.batch_size", 0, r"^train.batch_size = 0: out of range; allowed: an int >= 1$"),
    ("sample.per_class", 0, r"^sample.per_class = 0: out of range; allowed: an int >= 1"),
    ("data.num_classes", 0, r"^data.num_classes = 0: out of range; allowed: an int >= 1$"),
    ("eval.num_samples", 1, r"^eval.num_samples = 1: out of range; allowed: an int >= 2"),
])
def test_zero_or_empty_where_nothing_would_run_is_refused(field, value, message):
  c = tiny_config()
  section, leaf = field.rsplit(".", 1)
  c[section.split(".")[0]][leaf] = value
  with pytest.raises(errors.UserError, match=message):
    validation.validate(c, 8)


def test_empty_sweep_grids_are_refused():
  c = tiny_config()
  c.sweep.rules = ()
  with pytest.raises(errors.UserError, match=r"sweep.rules = \(\): empty"):
    sweep.check_grid(c.sweep)
  c.sweep.update(rules=("sg", "cfg_sg"), gammas_strong=(0.5, 0.7), gammas_weak=(0.3, 0.5))
  with pytest.raises(errors.UserError, match=r"no valid point: rules \('sg', 'cfg_sg'\)"):
    sweep.check_grid(c.sweep)
  c.sweep.rules = ("sg", "cfg")  # CFG ignores γ: one valid point per ω.
  assert len(sweep.check_grid(c.sweep)) == len(c.sweep.omegas)


# ------------------------------------------------------------------ the workdir record
def test_resume_refuses_another_model_or_recipe_and_allows_run_length_and_mesh(trained,
                                                                               tmp_path, capsys):
  path = _copy(trained, tmp_path)
  record = workdir.read(path)
  assert record["base_step"] == -1 and record["config"]["model.heads"] == 4
  assert record["fingerprint"] == workdir.fingerprint(workdir.flat_config(tiny_config()))
  c = tiny_config()
  c.model.heads = 2  # Same shapes: orbax would restore it and train on.
  c.train.num_steps = 6
  with unchanged(tmp_path), pytest.raises(
      errors.UserError, match=r"^model.heads: .* holds another model, data or training "
                              r"recipe \(model.heads = 4 there, 2 requested\)"):
    train.train(c, path)
  c = tiny_config()
  c.train.update(num_steps=6, lr=5e-4)
  with unchanged(tmp_path), pytest.raises(errors.UserError,
                                          match=r"train.lr = 0.001 there, 0.0005 requested"):
    train.train(c, path)
  # Run length, logging, checkpoint cadence, sampling and the mesh may change.
  c = tiny_config()
  c.mesh.update(data=4, fsdp=2)
  c.sample.update(steps=9, per_class=1)
  assert workdir.differences(record, c, resuming=True) == []
  c.train.update(num_steps=6, log_every=3, checkpoint_every=6, keep_checkpoints=1)
  c.mesh.update(data=-1, fsdp=1)  # The fixture's mesh: its compiled step is reused.
  state = train.train(c, path)
  assert int(state["step"]) == 6
  assert "resumed from step 4" in capsys.readouterr().out
  assert checkpoint.saved_steps(os.path.join(path, "checkpoints")) == [6]  # Its own: rotated.


def test_sampling_refuses_another_model_and_never_overwrites_another_setting(trained, tmp_path,
                                                                            capsys):
  path = _copy(trained, tmp_path)
  c = tiny_config()
  c.model.heads = 2
  with unchanged(tmp_path), pytest.raises(errors.UserError,
                                          match=r"model.heads = 4 there, 2 requested"):
    sample_job.run(c, path)
  c = tiny_config()
  c.data.num_classes = 6  # More classes than the model has.
  with unchanged(tmp_path), pytest.raises(errors.UserError,
                                          match=r"data.num_classes = 4 there, 6 requested"):
    sample_job.run(c, path)
  assert not os.path.exists(os.path.join(path, "samples_sg.png"))
  c = tiny_config()
  c.train.lr = 5e-4  # A training-only field: readers may differ.
  c.sample.update(num_samples=8, shard_batches=1)
  sample_job.run(c, path)
  first_set = os.path.join(path, "samples_sg_8")
  shards = sorted(os.listdir(first_set))
  first = np.load(os.path.join(path, "samples_sg_8.npz"))["arr_0"]
  c.sample.guidance.omega = 3.0
  sample_job.run(c, path)
  out = capsys.readouterr().out
  assert f"replacing {path}/samples_sg.png and its .npz (made with other settings: " \
         "sample.guidance.omega)" in out
  assert f"{first_set} holds outputs of other settings: writing beside it" in out
  assert sorted(os.listdir(first_set)) == shards  # The first set is untouched.
  np.testing.assert_array_equal(np.load(os.path.join(path, "samples_sg_8.npz"))["arr_0"], first)
  beside = [n for n in os.listdir(path) if n.startswith("samples_sg_8_") and n.endswith(".npz")]
  assert len(beside) == 1


def test_an_unrecorded_workdir_loads_with_a_note_and_keeps_its_old_steps(trained, tmp_path,
                                                                          capsys):
  path = _copy(trained, tmp_path)
  os.remove(workdir.record_path(path))  # As a workdir made before records.
  c = tiny_config()
  c.train.update(num_steps=8, checkpoint_every=2, keep_checkpoints=1)
  train.train(c, path)
  assert f"note: {path} has no workdir.json" in capsys.readouterr().out
  # keep_checkpoints counts only this loop's own saves: 2 and 4 stay, 6 rotated out.
  assert checkpoint.saved_steps(os.path.join(path, "checkpoints")) == [2, 4, 8]
  assert workdir.read(path)["base_step"] == 4


def test_a_manager_deletes_only_its_own_saves(tmp_path):
  import jax.numpy as jnp
  state = {"w": jnp.zeros(3)}
  for protected, kept in (((0,), [0, 3]), ((), [3])):
    directory = str(tmp_path / f"ckpt{len(protected)}")
    foreign = checkpoint.manager(directory, async_save=False, max_to_keep=None)
    checkpoint.save(foreign, 0, state, None)  # Written by someone else (an import).
    foreign.close()
    own = checkpoint.manager(directory, async_save=False, max_to_keep=1,
                             protected_steps=protected)
    for step in (1, 2, 3):
      checkpoint.save(own, step, state, None)
    own.close()
    assert checkpoint.saved_steps(directory) == kept


def test_a_damaged_checkpoint_is_named_never_skipped_nor_deleted(trained, tmp_path):
  path = _copy(trained, tmp_path)
  step4 = os.path.join(path, "checkpoints", "4")
  data = os.path.join(step4, "state", "ocdbt.process_0", "d")
  for name in os.listdir(data):  # A disk that lost the arrays' bytes.
    with open(os.path.join(data, name), "r+b") as f:
      f.truncate(10)
  message = (rf"^{step4}: checkpoint step 4 in {path}/checkpoints is unreadable \(.+\); move it "
             r"aside to resume from step 2$")
  c = tiny_config()
  c.train.num_steps = 6
  with unchanged(tmp_path), pytest.raises(errors.UserError, match=message):
    train.train(c, path)
  with unchanged(tmp_path), pytest.raises(errors.UserError, match=message):
    sample_job.run(tiny_config(), path)
  assert checkpoint.saved_steps(os.path.join(path, "checkpoints")) == [2, 4]
  # The metadata gone too: named the same way, before any array is read.
  os.remove(os.path.join(step4, "state", "_METADATA"))
  with pytest.raises(errors.UserError, match=message):
    train.train(c, path)
  assert os.path.isdir(step4)


# ------------------------------------------------------------------ evaluation input
def test_eval_inputs_are_checked_at_the_door(tmp_path):
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (6, 8, 8, 3), np.uint8)
  cases = {
      "float01": (images / 255.0, r"images of shape \(6, 8, 8, 3\) and dtype float64"),
      "int64x1000": (images.astype(np.int64) * 1000,
                     r"images of shape \(6, 8, 8, 3\) and dtype int64"),
      "nchw": (images.transpose(0, 3, 1, 2), r"images of shape \(6, 3, 8, 8\) and dtype uint8"),
      "gray2d": (images[..., 0], r"images of shape \(6, 8, 8\) and dtype uint8"),
  }
  for name, (array, found) in cases.items():
    path = str(tmp_path / f"{name}.npz")
    np.savez(path, arr_0=array)
    message = (rf"^eval.reference = '{path}' \['arr_0'\]: {found}; expected uint8 NHWC images "
               r"\(N >= 1, H, W, 1 or 3\)")
    with unchanged(tmp_path), pytest.raises(errors.UserError, match=message):
      eval_job.check_reference(path, needs_images=True)
    with unchanged(tmp_path), pytest.raises(errors.UserError, match=message):
      eval_job.read_images(path)
  good = str(tmp_path / "good.npz")
  np.savez(good, arr_0=images)
  eval_job.check_reference(good, needs_images=True)
  stats = str(tmp_path / "stats.npz")  # Statistics of another feature net's size.
  np.savez(stats, mu=np.zeros(64), sigma=np.eye(64), mu_s=np.zeros(2023), sigma_s=np.eye(2023))
  with pytest.raises(errors.UserError, match=r"'mu' has shape \(64,\); expected \(2048,\): "
                     r"statistics of the FID Inception's pool features"):
    eval_job.check_reference(stats, needs_images=False)
  with pytest.raises(errors.UserError, match="not a readable .npz"):
    eval_job.check_reference(_not_npz(tmp_path), needs_images=False)


def _not_npz(tmp_path) -> str:
  path = str(tmp_path / "broken.npz")
  with open(path, "wb") as f:
    f.write(b"not a zip file")
  return path


# ------------------------------------------------------------------ converters
def test_the_converter_refuses_a_folder_that_holds_anything(tmp_path):
  used = tmp_path / "used"
  (used / "checkpoints" / "500").mkdir(parents=True)
  with unchanged(tmp_path), pytest.raises(errors.UserError,
                                          match=r"--out=.*used: is not empty \(holds "
                                                r"\['checkpoints'\]\)"):
    dit_checkpoint.write_workdir({}, {}, "dit", str(used))
  assert os.listdir(used / "checkpoints") == ["500"]
  empty = tmp_path / "empty"
  empty.mkdir()
  dit_checkpoint.check_out(str(empty))  # An empty folder is fine.
  dit_checkpoint.check_out(str(tmp_path / "new"))
  with open(tmp_path / "a_file", "w") as f:
    json.dump({}, f)
  with pytest.raises(errors.UserError, match="holds a file"):
    dit_checkpoint.check_out(str(tmp_path / "a_file"))


def test_outputs_of_other_settings_go_beside_never_over(tmp_path, capsys):
  base = str(tmp_path / "sweep")
  assert workdir.output_dir(base, {"step": 4, "per_class": 16}) == base
  with open(os.path.join(base, "results.jsonl"), "w") as f:
    f.write('{"rule": "cfg"}\n')
  assert workdir.output_dir(base, {"step": 4, "per_class": 16}) == base  # Same: resumes.
  other = workdir.output_dir(base, {"step": 8, "per_class": 16})  # A later checkpoint.
  assert other == f"{base}_{workdir.digest({'step': 8, 'per_class': 16})}"
  assert f"{base} holds outputs of other settings: writing beside it, to {other}" in \
      capsys.readouterr().out
  assert open(os.path.join(base, "results.jsonl")).read() == '{"rule": "cfg"}\n'
  legacy = tmp_path / "old"  # Outputs from before settings files: treated as other settings.
  legacy.mkdir()
  (legacy / "results.jsonl").write_text("")
  assert workdir.output_dir(str(legacy), {"step": 4}) != str(legacy)


def test_a_run_that_fails_before_its_first_checkpoint_leaves_no_workdir(tmp_path):
  c = tiny_config()
  # Data that is not there: found only once the run has made its workdir and metric writer.
  c.data.update(name="fashion_mnist", dir=str(tmp_path / "no-such-data"), image_size=28,
                num_classes=10)
  new = tmp_path / "new_run"
  with pytest.raises(FileNotFoundError, match="Fashion-MNIST file"):
    train.train(c, str(new))
  assert not new.exists()
  # A workdir that was there before keeps everything it held.
  old = tmp_path / "old_run"
  old.mkdir()
  (old / "notes.txt").write_text("mine")
  with pytest.raises(FileNotFoundError, match="Fashion-MNIST file"):
    train.train(c, str(old))
  assert (old / "notes.txt").read_text() == "mine"
