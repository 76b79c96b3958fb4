"""Damaged files, wrong folders and refusals that leave no trace (issue 32 items 3-5).

Every file a user can hand us is read through sgjax.readers, so a truncated or wrong-typed one is
one line naming the file and what to do; a folder inside a run given as a workdir names the
workdir to pass; and every refusal here leaves the tree as it found it (`builders.unchanged`).
"""

import json
import os

import numpy as np
import pytest
from safetensors.numpy import save_file

import sgjax
from sgjax import errors, export, lock, readers, workdir
from sgjax.data import captions, latents
from sgjax.jobs import export as export_job
from sgjax.jobs import sweep
from tests.builders import tiny_config, unchanged


def _cut(path, keep: int) -> None:
  with open(path, "r+b") as f:
    f.truncate(keep)


def _offsets(size: int) -> list[int]:
  return sorted({0, 1, size // 3, size // 2, size - 2})


def _refused_naming(path, call, tmp_path, what: str = "") -> str:
  """`call()` refuses in one line that begins with `path` (and says `what`), changing
  nothing on disk."""
  with unchanged(tmp_path), pytest.raises(errors.UserError) as refused:
    call()
  line = str(refused.value)
  assert "\n" not in line and line.startswith(str(path)), line
  assert what in line, line
  return line


def _export_file(path, config_text: str, step: str = "4") -> str:
  meta = {"sgjax.format": export.FORMAT, "sgjax.layout": "sgjax", "sgjax.step": step,
          "sgjax.config": config_text}
  save_file({"x": np.zeros(2, np.float32)}, str(path), metadata=meta)
  return str(path)


# ------------------------------------------------------------------ item 3: damaged files
def test_a_damaged_export_is_one_line_naming_it(tmp_path):
  text = json.dumps(workdir.flat_config(tiny_config()))
  path = tmp_path / "model.safetensors"
  for keep in _offsets(len(text)):  # The config metadata cut short (the find).
    _export_file(path, text[:keep])
    _refused_naming(path, lambda: sgjax.load(str(path)), tmp_path,
                    "not a readable sgjax export (its config metadata) (")
  _export_file(path, json.dumps({"model.width": "wide"}))
  assert _refused_naming(path, lambda: sgjax.load(str(path)), tmp_path) == (
      f"{path}: holds model.width = 'wide', not an int >= 1; re-export it with sgjax-export")
  _export_file(path, "[1, 2]")
  _refused_naming(path, lambda: sgjax.load(str(path)), tmp_path, "holds list, not a JSON object")
  _export_file(path, text, step="four")
  _refused_naming(path, lambda: sgjax.load(str(path)), tmp_path, "its step is 'four'")
  whole = _export_file(path, text)
  size = os.path.getsize(whole)
  for keep in _offsets(size):  # The file itself cut short: its header or its tensors.
    _export_file(path, text)
    _cut(path, keep)
    _refused_naming(path, lambda: sgjax.load(str(path)), tmp_path, "not a safetensors file")


def test_a_damaged_workdir_record_is_one_line_naming_it(tmp_path):
  run = tmp_path / "run"
  record = run / workdir.RECORD
  workdir.write(str(run), tiny_config(), base_step=-1, written_by="test")
  good = record.read_bytes()
  for keep in _offsets(len(good)):
    record.write_bytes(good[:keep])
    what = "is empty" if keep == 0 else "not a readable workdir record ("
    line = _refused_naming(record, lambda: sgjax.load(str(run)), tmp_path, what)
    assert line.endswith("; restore it from a copy, or move it aside to open the workdir "
                         "unchecked")
  data = json.loads(good)
  for config, what in (({"model.width": "wide"}, "holds model.width = 'wide', not an int >= 1"),
                       ([], "'config' is list [], not dict")):
    record.write_text(json.dumps(dict(data, config=config)))
    _refused_naming(record, lambda: sgjax.load(str(run)), tmp_path, what)


def test_damaged_settings_metadata_and_tables_are_one_line_naming_them(tmp_path):
  # An output folder's settings file.
  base = tmp_path / "samples_sg_8"
  base.mkdir()
  (base / "shard_0.npz").write_bytes(b"x")
  settings = json.dumps({"step": 4, "per_class": 2}).encode()
  for keep in _offsets(len(settings))[1:]:
    (base / workdir.SETTINGS).write_bytes(settings[:keep])
    _refused_naming(base / workdir.SETTINGS, lambda: workdir.output_dir(str(base), {"step": 4}),
                    tmp_path, "not a readable settings file (")
  # A latent set's metadata.
  data = tmp_path / "latents"
  data.mkdir()
  meta = json.dumps({"format": latents.FORMAT, "shape": [4, 4, 4], "dtype": "float16",
                     "num_records": 2, "num_shards": 1}).encode()
  for keep in _offsets(len(meta))[1:]:
    (data / latents.METADATA).write_bytes(meta[:keep])
    _refused_naming(data / latents.METADATA, lambda: latents.read_metadata(str(data)), tmp_path,
                    "not a readable JSON file (")
  # A caption set's metadata (sgjax.tools.encode_text's).
  c = tiny_config()
  c.data.cache_dir = str(tmp_path / "cache")
  folder = captions.dataset_dir(c.data.cache_dir)
  os.makedirs(folder)
  written = json.dumps(captions.metadata(c)).encode()
  path = os.path.join(folder, captions.METADATA)
  for keep in _offsets(len(written))[1:]:
    with open(path, "wb") as f:
      f.write(written[:keep])
    _refused_naming(path, lambda: captions.check_written(c), tmp_path,
                    "not a readable caption set's metadata (")
  # Results tables: a sweep's results.jsonl, the study's points.jsonl and paired.jsonl.
  rows = b'{"rule": "cfg", "omega": 1.5}\n{"rule": "sg", "omega": 2.0}\n'
  table = tmp_path / "points.jsonl"
  first = rows.index(b"\n")
  for keep in (5, first // 2, first + 4, len(rows) - 3):
    table.write_bytes(rows[:keep])
    line = 1 if keep < first else 2
    _refused_naming(f"{table}, line {line}", lambda: sweep.load_results(str(table)), tmp_path,
                    "not a readable results table row (")
    _refused_naming(f"{table}, line {line}", lambda: readers.jsonl(
        str(table), "study table", "move it aside and rerun"), tmp_path, "study table row")
  table.write_bytes(rows + b"[1, 2]\n")
  _refused_naming(f"{table}, line 3", lambda: sweep.load_results(str(table)), tmp_path,
                  "(it holds list, not a JSON object)")
  table.write_bytes(b"")
  assert sweep.load_results(str(table)) == []  # An empty table is a table.
  table.write_bytes(rows)
  assert [r["rule"] for r in sweep.load_results(str(table))] == ["cfg", "sg"]
  # A metrics file (eval's metrics.json, the text demo's t2i_metrics.json).
  metrics = tmp_path / "metrics.json"
  metrics.write_bytes(b'{"fid": 3.5, "samples": "x"}'[:9])
  _refused_naming(metrics, lambda: readers.json_object(metrics, "metrics file", "move it aside"),
                  tmp_path, "not a readable metrics file (")


# ------------------------------------------------------------------ item 4: folders in a run
def test_a_folder_inside_a_run_given_as_a_workdir_names_the_run(tmp_path):
  run = tmp_path / "run"
  workdir.write(str(run), tiny_config(), base_step=-1, written_by="test")
  for sub in ("checkpoints/10/state", "samples_sg_8", "study"):
    (run / sub).mkdir(parents=True)
  step = run / "checkpoints" / "10"
  assert _refused_naming(step, lambda: sgjax.load(str(step)), tmp_path) == (
      f"{step}: is checkpoint step 10 of the run at {run}, not a workdir; pass that run's "
      f"workdir, {run} (and step=10)")
  out = tmp_path / "model.safetensors"
  _refused_naming(step, lambda: export_job.run(str(step), "sgjax", str(out)), tmp_path,
                  f"is checkpoint step 10 of the run at {run}")
  _refused_naming(step / "state", lambda: sgjax.load(str(step / "state")), tmp_path,
                  "is checkpoint step 10 (its state) of the run at")
  _refused_naming(run / "checkpoints", lambda: sgjax.load(str(run / "checkpoints")), tmp_path,
                  f"is the checkpoints folder of the run at {run}, not a workdir")
  for sub in ("samples_sg_8", "study"):
    _refused_naming(run / sub, lambda sub=sub: sgjax.load(str(run / sub)), tmp_path,
                    f"is the output folder {sub} of the run at {run}, not a workdir")
  assert workdir.run_of(str(run)) is None and workdir.run_of(str(tmp_path)) is None
  with pytest.raises(errors.UserError, match=r"^--workdir=.*/10: is checkpoint step 10 of"):
    workdir.refuse_inside_a_run(str(step), f"--workdir={step}")


# ------------------------------------------------------------------ item 5: no trace
def test_a_job_that_refuses_under_its_lock_leaves_no_folder(tmp_path):
  """The study's refusal of a workdir that does not exist left that folder behind: the lock
  made <workdir>/study and its parents, and removed only the last."""
  @lock.holding("workdir", "study", "study")
  def refuses(workdir):
    assert os.path.isdir(os.path.join(workdir, "study"))  # Held while the job checks.
    raise errors.UserError(workdir, "no checkpoint there", "train first")

  with unchanged(tmp_path), pytest.raises(errors.UserError, match="no checkpoint there"):
    refuses(str(tmp_path / "never" / "made"))
  assert os.listdir(tmp_path) == []
  (tmp_path / "kept").mkdir()
  with unchanged(tmp_path), pytest.raises(errors.UserError):
    refuses(str(tmp_path / "kept"))  # A folder that was there stays.
