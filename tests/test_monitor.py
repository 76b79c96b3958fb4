"""What a run shows while it trains (issue 17 items 1–3): sample grids, config text and hparams,
eval scalars in TensorBoard, a profile of chosen steps — and that none of it moves training."""

import glob
import gzip
import io
import json
import os
import re

import jax
import ml_collections
import numpy as np
import pytest
from absl import flags
from ml_collections import config_flags
from PIL import Image

from sgjax import config as config_lib
from sgjax import (
  errors,
  generate,
  guidance,
  metrics,
  monitor,
  previews,
  sampling,
  sharding,
  train,
  validation,
)
from sgjax.text import encoder as encoder_lib
from tests.builders import WordEncoder, summaries, tiny_config, tiny_t2i_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _leaves(state):
  return [np.asarray(a) for a in jax.tree.leaves(state)]


def _losses(workdir):
  return {m["step"]: m["loss"] for m in map(json.loads, open(os.path.join(workdir,
                                                                          "metrics.jsonl")))}


def test_grids_and_a_profile_while_training_leave_the_run_bit_exact(tmp_path, capsys,
                                                                    monkeypatch):
  c = tiny_config()  # No grids (train.sample_every = 0), 8 devices, routed.
  c.train.update(num_steps=4, checkpoint_every=2, log_every=1)
  off = train.train(c, str(tmp_path / "off"))

  compiled = []  # Every sampler compilation of the grids, by rule.
  real = generate.compile_sampler
  monkeypatch.setattr(generate, "compile_sampler",
                      lambda cfg, *a, **k: compiled.append(cfg.sample.guidance.rule)
                      or real(cfg, *a, **k))
  on = c.copy_and_resolve_references()
  # AG+SG, its guide the step-2 checkpoint of this run: until that exists, CFG's grid alone,
  # CFG at its own ω (demo.omega_cfg), not AG+SG's.
  on.train.update(num_steps=3, sample_every=1, profile_steps=(2, 2))
  on.sample.guidance.update(rule="ag_sg", guide_step=2)
  on.demo.omega_cfg = 2.0
  workdir = str(tmp_path / "on")
  capsys.readouterr()
  train.train(on, workdir)  # Grids at steps 1, 2, 3; checkpoints at 2 and 3; step 2 traced.
  log = capsys.readouterr().out
  assert compiled == ["cfg", "ag_sg"]  # Each at its first grid, then reused.
  on.train.num_steps = 4
  resumed = train.train(on, workdir)  # From step 3: a grid at 4 (a new process would compile).

  # Grids on, a profile, a resume: the same state and the same loss at every step.
  for a, b in zip(_leaves(off), _leaves(resumed), strict=True):
    np.testing.assert_array_equal(a, b)
  assert _losses(str(tmp_path / "off")) == _losses(workdir)

  # The log: the parameter table, each grid's cost (with its compile the first time), the
  # wait for the guide (said once), the profile.
  assert "Total: 255,440 -- 1,021,760 bytes" in log
  grid_line = r"samples at step {}: {} \(4 images, 3 steps\) in [\d.]+s{} -> "
  compiling = r", [\d.]+s of it compiling the sampler"
  assert re.search(grid_line.format(1, "cfg ω=2", compiling), log), log
  assert re.search(grid_line.format(2, "ag_sg ω=1.5, cfg ω=2", compiling), log), log
  assert re.search(grid_line.format(3, "ag_sg ω=1.5, cfg ω=2", ""), log), log
  assert log.count("note: no ag_sg grids until its guide checkpoint exists (step 2 in "
                   f"{workdir}); CFG's are drawn meanwhile") == 1
  assert f"profile of steps 2..2 in {workdir}/tensorboard/plugins/profile/" in log

  # PNGs: the fixed classes 0..3 from fixed noise, drawn by the generation path from the live
  # EMA weights; the step-4 AG+SG grid is exactly what sampling the workdir's final EMA with
  # its step-2 guide gives.
  names = sorted(os.listdir(os.path.join(workdir, "samples")))
  assert names == sorted([f"step_{s}_cfg.png" for s in (1, 2, 3, 4)]
                         + [f"step_{s}_ag_sg.png" for s in (2, 3, 4)])
  png = lambda s, r: np.asarray(Image.open(os.path.join(workdir, "samples", f"step_{s}_{r}.png")))
  mesh = sharding.build_mesh(on.mesh)
  with jax.set_mesh(mesh):
    model, weights, step = generate.load_weights(on, workdir, mesh)
    want = generate.batch(on, model, weights, np.arange(4, dtype=np.int32),
                          guidance.config_plan(on), mesh,
                          jax.random.fold_in(jax.random.key(on.sample.seed), 0))
  assert step == 4
  grid = sampling.image_grid(want, rows=2).repeat(2, 0).repeat(2, 1)[..., 0]  # 2x2, shown x2.
  assert png(4, "ag_sg").shape == (76, 76)
  np.testing.assert_array_equal(png(4, "ag_sg"), grid)
  assert not np.array_equal(png(1, "cfg"), png(4, "cfg"))  # The weights moved.
  # CFG's grid: CFG at ω 2 (demo.omega_cfg) from the same weights and noise.
  cfg = config_lib.replace(on, {"sample.guidance.rule": "cfg", "sample.guidance.omega": 2.0})
  with jax.set_mesh(mesh):
    want_cfg = generate.batch(cfg, model, {"main": weights["main"]}, np.arange(4, dtype=np.int32),
                              guidance.config_plan(cfg), mesh,
                              jax.random.fold_in(jax.random.key(on.sample.seed), 0))
  np.testing.assert_array_equal(
      png(4, "cfg"), sampling.image_grid(want_cfg, rows=2).repeat(2, 0).repeat(2, 1)[..., 0])

  # An eval of a checkpoint adds its scores at that step (what sgjax.jobs.evaluate calls).
  assert metrics.log_scalars(workdir, 4, {"fid": 12.5, "rule": "sg", "n": 8}, "eval/sg") == {
      "eval/sg/fid": 12.5, "eval/sg/n": 8.0}

  # TensorBoard, read back from the event files (one per writer: both runs and the eval).
  tb = os.path.join(workdir, "tensorboard")
  assert len(glob.glob(os.path.join(tb, "events.out.tfevents.*"))) == 3
  found = summaries(tb)
  # Each grid's ω in its tag.
  assert [s for s, _ in found["samples/cfg_omega2"]] == [1, 2, 3, 4]
  assert [s for s, _ in found["samples/ag_sg_omega1.5"]] == [2, 3, 4]
  image = found["samples/ag_sg_omega1.5"][-1][1].image
  assert (image.height, image.width) == (76, 76)
  np.testing.assert_array_equal(
      np.asarray(Image.open(io.BytesIO(image.encoded_image_string)).convert("L")), grid)
  text = lambda tag: [(s, v.tensor.string_val[0].decode()) for s, v in found[tag]]
  config_text = dict(text("config/text_summary"))
  assert sorted(config_text) == [0, 3]  # At each start: fresh, then the resume from step 3.
  assert "train.sample_every = 1" in config_text[0] and "train.num_steps = 4" in config_text[3]
  assert "block0/attn/qkv/kernel" in text("parameters/text_summary")[0][1]
  assert "class 0, class 1, class 2, class 3" in text("samples/conditions/text_summary")[0][1]
  assert len(found["_hparams_/session_start_info"]) == 1  # A new run's, not again on resume.
  assert [s for s, _ in found["loss"]] == [1, 2, 3, 4]
  assert [(s, v.simple_value) for s, v in found["eval/sg/fid"]] == [(4, 12.5)]

  # The profile: step 2 alone, in TensorBoard's plugins/profile layout (xprof reads .xplane.pb).
  runs = glob.glob(os.path.join(tb, "plugins", "profile", "*"))
  assert len(runs) == 1
  assert [os.path.getsize(p) > 0 for p in glob.glob(os.path.join(runs[0], "*.xplane.pb"))] == [
      True]
  with gzip.open(glob.glob(os.path.join(runs[0], "*.trace.json.gz"))[0]) as f:
    events = json.load(f)["traceEvents"]
  assert {e["args"]["step_num"] for e in events if e.get("name") == "train"} == {"2"}


def test_grid_conditions_of_class_and_text_models(monkeypatch):
  assert previews.class_conditions(1000, 64)[[0, 1, -1]].tolist() == [0, 16, 999]
  assert len(set(previews.class_conditions(10, 10))) == 10
  assert [previews.grid_shape(n) for n in (1, 4, 7, 10, 64)] == [1, 2, 1, 2, 8]
  assert previews.rules(tiny_config()) == ("sg", "cfg")
  c = tiny_config()
  c.sample.guidance.rule = "cfg"
  assert previews.rules(c) == ("cfg",)

  monkeypatch.setitem(encoder_lib.ENCODERS, "words", WordEncoder)
  t = tiny_t2i_config()
  t.text.encoder = "words"
  assert "set sample.prompts" in previews.conditions(t)  # Synthetic data holds no prompts.
  t.sample.prompts = ("a pullover", "an ankle boot", "a bag")
  cond, null, shows = previews.conditions(t)
  assert shows == list(t.sample.prompts)
  assert cond["text"].shape == (3, 6, 24) and null["text"].shape == (6, 24)
  np.testing.assert_array_equal(cond["text"][1], WordEncoder().encode(["an ankle boot"], 6)[0][0])


@pytest.mark.parametrize("field, value, message", [
    ("sample_every", -2, "train.sample_every = -2: out of range; allowed: an int >= -1 (-1 = "
                         "at each checkpoint, 0 = off)"),
    ("profile_steps", (3,), "train.profile_steps = (3,): 1 value, not 2; allowed: () or (first, "
                            "last) with first an int >= 1; last an int >= 1"),
    ("profile_steps", (0, 2), "train.profile_steps.first = 0: out of range"),
    ("profile_steps", (5, 2), "train.profile_steps = (5, 2): not a range"),
])
def test_bad_sample_every_or_profile_steps_is_refused(field, value, message):
  c = tiny_config()
  c.train[field] = value
  with pytest.raises(errors.UserError) as err:
    validation.validate(c)
  assert str(err.value).startswith(message)


def test_the_profile_window_parses_from_the_command_line():
  argv = ["prog", f"--config={ROOT}/tests/configs/tiny.py", "--config.train.profile_steps=(2, 3)",
          "--config.train.sample_every=5"]
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=True,
                                  sys_argv=argv)
  fv(argv)
  assert fv.config.train.profile_steps == (2, 3) and fv.config.train.sample_every == 5
  validation.validate(fv.config)
  assert monitor.sample_every(fv.config.train) == 5
  default = config_lib.base_config().train
  assert monitor.sample_every(default) == default.checkpoint_every  # -1: at each checkpoint.
  tc = ml_collections.ConfigDict(dict(sample_every=3, checkpoint_every=2, num_steps=8))
  assert [s for s in range(1, 9) if monitor.samples_due(tc, s)] == [3, 6, 8]  # And the last.

