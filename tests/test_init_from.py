"""train.init_from (issue 31 items 1, 2): a new run starts from a workdir's, an export's or an
official state dict's weights; at step 0 it samples bit for bit as its source, records the
source, resumes without it, and refuses in one line what cannot carry the weights."""

import os
import shutil

import jax
import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

import sgjax
from sgjax import (
  checkpoint,
  errors,
  export,
  init_from,
  models,
  pipeline,
  sharding,
  train,
  validation,
)
from sgjax import config as config_lib
from sgjax import state as state_lib
from sgjax import workdir as workdir_lib
from sgjax.convert import dit_checkpoint
from sgjax.jobs import export as export_job
from sgjax.jobs import study as study_lib
from tests.builders import file_snapshot, official_dit_state_dict, tiny_config, trained_workdir

LABELS = [0, 3, 4, 9]
CFG = dict(rule="cfg", omega=2.0, steps=3, seed=0)
TABLE = init_from.LABEL_TABLE


def _dense():
  """The source: tiny_config trained dense, in 10 classes."""
  c = tiny_config()
  c.sparsity.routes = ()
  c.sample.guidance.rule = "cfg"  # SG needs routes.
  c.data.num_classes = 10
  return c


def _run(source, **fields):
  """A fine-tune of the source: routed (tiny_config's route), another lr and seed."""
  c = tiny_config()
  c.data.num_classes = 10
  c.seed = 7
  c.train.update(init_from=source, lr=5e-4, num_steps=2)
  return config_lib.replace(c, fields)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
  root = tmp_path_factory.mktemp("init_from")
  return trained_workdir(_dense(), str(root / "dense"), [2, 4]), root


def _mesh():
  return sharding.build_mesh(tiny_config().mesh)


def _ema(config, workdir, step=None):
  mesh = _mesh()
  with jax.set_mesh(mesh):
    _, params, _ = state_lib.restore_params(config, workdir, mesh, step=step)
  return jax.tree.map(np.asarray, jax.device_get(params))


def _flat(tree):
  return {k: np.asarray(v) for k, v in export.paths(tree).items()}


def _equal(a, b, but=()):
  a, b = _flat(a), _flat(b)
  assert sorted(a) == sorted(b)
  for k in a:
    if k not in but:
      assert a[k].dtype == b[k].dtype == np.float32
      np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def _pipe(config, params):
  """The pipeline of weights in memory at step 0 (what the run's first step starts from)."""
  validation.validate(config, jax.device_count(), job="sample")
  mesh, model = _mesh(), models.from_config(config)
  _, shardings = state_lib.abstract_params_and_shardings(model, config.seed, mesh)
  return pipeline.Pipeline(config, model, jax.device_put(params, shardings), mesh)


def test_a_dense_workdir_starts_a_routed_run_that_samples_as_its_source_at_step_0(source):
  src, root = source
  before = file_snapshot(src)
  config = _run(src, **{"train.init_step": 2})  # Not the latest: the step is the one asked.
  validation.validate(config, jax.device_count(), job="train")
  new = str(root / "routed")
  train.train(config, new)

  ema2 = _ema(_dense(), src, step=2)
  record = workdir_lib.read(new)
  assert record["init_from"] == dict(path=os.path.abspath(src), kind="workdir", step=2,
                                     weights="ema", sha256=init_from.weights_sha256(ema2))
  assert record["config"]["sparsity.routes"] == [[1, 1, 0.5]]
  assert checkpoint.saved_steps(os.path.join(new, "checkpoints")) == [0, 2]
  # Step 0: params = EMA = the source's EMA of step 2, a fresh optimizer, the run's own seed.
  model, tx = models.from_config(config), state_lib.make_optimizer(config.train)
  abstract, _ = state_lib.abstract_state_and_shardings(model, tx, config.seed, _mesh())
  mngr = checkpoint.manager(os.path.join(new, "checkpoints"), async_save=False, read_only=True)
  with jax.set_mesh(_mesh()):
    step0 = jax.device_get(checkpoint.restore(mngr, abstract, None, step=0))
  mngr.close()
  _equal(step0["params"], ema2)
  _equal(step0["ema"], ema2)
  assert int(step0["step"]) == 0
  assert all(not np.any(leaf) for leaf in jax.tree.leaves(step0["opt_state"]))
  np.testing.assert_array_equal(step0["rng"], jax.random.key_data(jax.random.key(7)))
  # It samples at step 0 exactly as the source at the same seed and settings; then it trains.
  at0 = sgjax.load(new, step=0)(labels=LABELS, **CFG)
  np.testing.assert_array_equal(at0, sgjax.load(src, step=2)(labels=LABELS, **CFG))
  assert np.any(sgjax.load(new, step=2)(labels=LABELS, **CFG) != at0)

  # Its resume never reads the source, even from step 0: with the source gone and step 2
  # removed, it trains again from its own step 0 to the same step 2, bit for bit, and on.
  ema_at_2 = _ema(config, new, step=2)
  shutil.rmtree(os.path.join(new, "checkpoints", "2"))
  os.rename(src, src + ".away")
  try:
    train.train(config_lib.replace(config, {"train.num_steps": 4}), new)
  finally:
    os.rename(src + ".away", src)
  assert checkpoint.saved_steps(os.path.join(new, "checkpoints")) == [0, 2, 4]
  _equal(_ema(config, new, step=2), ema_at_2)
  assert workdir_lib.read(new)["init_from"] == record["init_from"]
  # What its checkpoints mean is fixed: another source is refused on resume.
  with pytest.raises(errors.UserError, match=r"^train.init_from: .*routed holds another model, "
                     r"data or training recipe \(train.init_from = '.*dense' there, '.*other' "
                     "requested"):
    train.train(_run(str(root / "other"), **{"train.num_steps": 6, "train.init_step": 2}), new)
  # The study opens it like any other run (its record, its checkpoints).
  net, params = study_lib.Study(config, new).params("main", 4)
  _equal(params, _ema(config, new, step=4))
  assert file_snapshot(src) == before  # Nothing in the source was written.


def test_an_export_in_each_layout_starts_a_run_as_its_workdir_does(source, tmp_path):
  src, _ = source
  ours, sit = str(tmp_path / "ours.safetensors"), str(tmp_path / "sit.safetensors")
  export_job.run(src, "sgjax", ours)
  export_job.run(src, "sit", sit)
  before = file_snapshot(src), file_snapshot(tmp_path)
  new, mesh = str(tmp_path / "new"), _mesh()
  from_workdir, s_workdir = init_from.initial_params(_run(src), new, mesh)
  from_ours, s_ours = init_from.initial_params(_run(ours), new, mesh)
  from_sit, s_sit = init_from.initial_params(_run(sit), new, mesh)
  ema4 = _ema(_dense(), src)
  for params in (from_workdir, from_ours, from_sit):
    _equal(params, ema4)
  assert s_ours == dict(path=ours, kind="export", layout="sgjax", step=4, weights="ema",
                        sha256=s_workdir["sha256"])
  assert s_sit == dict(s_ours, path=sit, layout="sit")
  assert s_workdir == dict(path=os.path.abspath(src), kind="workdir", step=4, weights="ema",
                           sha256=init_from.weights_sha256(ema4))
  np.testing.assert_array_equal(_pipe(_run(ours), from_ours)(labels=LABELS, **CFG),
                                sgjax.load(src)(labels=LABELS, **CFG))
  assert (file_snapshot(src), file_snapshot(tmp_path)) == before


def test_ten_classes_to_five_keep_their_rows_and_new_classes_start_as_the_null_row(source):
  src, root = source
  ema = _ema(_dense(), src)
  five, s5 = init_from.initial_params(_run(src, **{"data.num_classes": 5}), str(root / "5"),
                                      _mesh())
  table = ema["y_embed"]["embedding"]
  np.testing.assert_array_equal(five["y_embed"]["embedding"], table[[0, 1, 2, 3, 4, 10]])
  _equal(five, ema, but=(TABLE,))
  # Classes 0..4 (and CFG's ∅, now row 5) sample exactly as in the 10-class source.
  labels = [0, 3, 4, 1]
  np.testing.assert_array_equal(
      _pipe(_run(src, **{"data.num_classes": 5}), five)(labels=labels, **CFG),
      sgjax.load(src)(labels=labels, **CFG))
  twelve, s12 = init_from.initial_params(_run(src, **{"data.num_classes": 12}),
                                         str(root / "12"), _mesh())
  np.testing.assert_array_equal(twelve["y_embed"]["embedding"],
                                table[list(range(10)) + [10, 10, 10]])
  # The record hashes the source's weights, whatever the run resizes.
  assert s5["sha256"] == s12["sha256"] == init_from.weights_sha256(ema)


def test_an_official_state_dict_starts_a_run_at_another_image_size(tmp_path):
  """A SiT state dict of 8×8×4 latents (its pos_embed a 4×4 grid) into a 16-px run of 5
  classes: every weight carried, the label table resized, the position table the new grid's
  (computed, never read from the file); .pt and .safetensors alike."""
  sd = official_dit_state_dict(depth=3, width=64, patch=4, channels=1, image_size=8,
                               num_classes=10, learn_sigma=True)
  st, pt = str(tmp_path / "sit.safetensors"), str(tmp_path / "sit.pt")
  save_file(sd, st)
  torch.save({k: torch.from_numpy(v) for k, v in sd.items()}, pt)
  before = file_snapshot(tmp_path)
  config = _run(st, **{"data.num_classes": 5, "model.time_scale": 1.0})
  params, source = init_from.initial_params(config, str(tmp_path / "new"), _mesh())
  converted, _ = dit_checkpoint.convert(sd, heads=4)
  _equal(params, converted, but=(TABLE,))
  np.testing.assert_array_equal(params["y_embed"]["embedding"],
                                sd["y_embedder.embedding_table.weight"][[0, 1, 2, 3, 4, 10]])
  assert source == dict(path=st, kind="state_dict", step=None, weights="state dict",
                        sha256=init_from.weights_sha256(converted))
  from_pt, source_pt = init_from.initial_params(_run(pt, **{"data.num_classes": 5}),
                                                str(tmp_path / "new"), _mesh())
  _equal(from_pt, params)
  assert source_pt == dict(source, path=pt)
  assert not any("pos" in k for k in _flat(params))  # No stored table to carry.
  images = _pipe(config, params)(labels=[0, 4], **CFG)
  assert images.shape == (2, 16, 16, 1) and images.dtype == np.uint8
  assert file_snapshot(tmp_path) == before


@pytest.mark.parametrize("fields, match", [
    ({"model.width": 32}, r"^train.init_from = '.*dense': its weights do not fit the configured "
     r"model \(block0/adaLN/bias \(384,\) there, \(192,\) here; .* more; model.width = 64 there, "
     "32 here\\); a run started from weights may change sparsity"),
    ({"model.depth": 4}, r"^train.init_from = .*block3/adaLN/bias \(384,\) here, not there; .*"
     r"model.depth = 3 there, 4 here\)"),
    ({"model.patch_size": 2}, r"final_proj/bias \(16,\) there, \(4,\) here; .*patch_embed/kernel "
     r"\(4, 4, 1, 64\) there, \(2, 2, 1, 64\) here.*model.patch_size = 4 there, 2 here"),
    ({"data.channels": 3}, r"patch_embed/kernel \(4, 4, 1, 64\) there, \(4, 4, 3, 64\) here; "
     r"data.channels = 1 there, 3 here"),
    ({"model.heads": 8}, r"^model.heads = 8: the weights of .*dense were trained with 4 \(same "
     r"shapes, another function\); keep model.heads = 4"),
    ({"model.prediction": "eps_vp"}, r"^model.prediction = 'eps_vp': the weights of .*dense "
     "were trained with 'velocity'"),
    ({"train.init_step": 3}, r"^train.init_step = 3: no checkpoint of step 3 under .*dense/"
     r"checkpoints; there are \[2, 4\]"),
    ({"train.init_from": "missing"}, r"^train.init_from = 'missing': no such file; a trained "
     "workdir, a file written by sgjax-export, or an official DiT/SiT state dict"),
    ({"train.init_from": "."}, r"^train.init_from = '.': no checkpoint under \./checkpoints"),
])
def test_what_cannot_carry_the_weights_is_refused_in_one_line(source, fields, match):
  src, root = source
  with pytest.raises(errors.UserError, match=match):
    init_from.initial_params(_run(src, **fields), str(root / "refused"), _mesh())
  assert not os.path.exists(root / "refused")


def test_sources_and_settings_that_cannot_start_a_run_are_refused(source, tmp_path):
  src, _ = source
  new, mesh = str(tmp_path / "new"), _mesh()
  with pytest.raises(errors.UserError, match=r"^train.init_from = '.*dense': is this run's own "
                     "workdir; a run resumes from its own checkpoints by itself"):
    init_from.initial_params(_run(src), src, mesh)
  with pytest.raises(errors.UserError, match=r"^train.init_from = '.*dense/checkpoints/4': is "
                     r"checkpoint step 4 of the run at .*dense, not a workdir; "
                     r"train.init_from=.*dense with train.init_step=4$"):
    init_from.initial_params(_run(os.path.join(src, "checkpoints", "4")), new, mesh)
  text = tmp_path / "notes.txt"
  text.write_text("not weights")
  with pytest.raises(errors.UserError, match=r"^train.init_from = '.*notes.txt': is not a "
                     "workdir, an sgjax export or a state dict; a trained workdir"):
    init_from.initial_params(_run(str(text)), new, mesh)
  ours = str(tmp_path / "ours.safetensors")
  export_job.run(src, "sgjax", ours)
  with pytest.raises(errors.UserError, match=r"^train.init_params = 'params': .*ours.safetensors "
                     "holds the EMA weights only; 'ema', or start from its workdir"):
    init_from.initial_params(_run(ours, **{"train.init_params": "params"}), new, mesh)
  with pytest.raises(errors.UserError, match=r"^train.init_step = 2: .*ours.safetensors holds "
                     "step 4; -1, or start from its workdir for other steps"):
    init_from.initial_params(_run(ours, **{"train.init_step": 2}), new, mesh)
  sd = official_dit_state_dict(depth=3, width=64, patch=4, channels=1, image_size=16)
  sd["blocks.1.mlp.fc1.weight"][0, :3] = np.nan
  bad = str(tmp_path / "nan.safetensors")
  save_file(sd, bad)
  with pytest.raises(errors.UserError, match=r"^train.init_from = '.*nan.safetensors': tensor "
                     r"'blocks.1.mlp.fc1.weight' holds 3 non-finite values"):
    init_from.initial_params(_run(bad), new, mesh)
  with pytest.raises(errors.UserError, match=r"^train.init_params = 'params': the state dict "
                     "holds one set of weights"):
    init_from.initial_params(_run(bad, **{"train.init_params": "params"}), new, mesh)
  # Choosing within a source that is not there does nothing: refused with the config.
  with pytest.raises(errors.UserError, match=r"^train.init_step = 2: picks a checkpoint of "
                     "train.init_from, which is ''"):
    validation.validate(_run("", **{"train.init_step": 2}), job="train")
  assert not os.path.exists(new)
