"""sgjax.load and the pipeline (issue 24): a workdir sampled from Python gives exactly what
`--mode=sample` writes, samplers compile once per plan and batch shape, settings are checked
with the command line's one-line errors, and the FLOPs of a setting are the counter's."""

import os

import jax
import numpy as np
import pytest

import sgjax
from sgjax import config as config_lib
from sgjax import errors, flops, generate, pipeline, validation
from sgjax import workdir as workdir_lib
from sgjax.jobs import sample
from tests.builders import tiny_config, unchanged, write_checkpoints

SG = dict(rule="sg", omega=3.0, gamma=(0.0, 0.5), steps=3, seed=0)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A workdir of tiny_config with checkpoints at steps 2 and 4 and its record."""
  workdir = str(tmp_path_factory.mktemp("pipe") / "run")
  config = tiny_config()
  write_checkpoints(config, workdir, [2, 4])
  workdir_lib.write(workdir, config, base_step=-1, written_by="test")
  return workdir, config


def test_a_call_is_what_mode_sample_writes_and_compiles_once(trained):
  workdir, config = trained
  pipe = sgjax.load(workdir)
  assert pipe.step == 4 and pipe.model.num_classes == 4 and not pipe.text
  # The record's config came back (tuples and all): the same model fingerprint.
  assert (workdir_lib.fingerprint(workdir_lib.flat_config(pipe.config))
          == workdir_lib.fingerprint(workdir_lib.flat_config(config)))

  # --mode=sample's grid: per_class of every class, sample.batch_size batches, sample.seed.
  c = config_lib.replace(config, {"sample.guidance.omega": 3.0})
  validation.validate(c, jax.device_count(), job="sample")
  png = sample.run(c, workdir, name="grid")
  assert png == os.path.join(workdir, "grid.png")
  written = np.load(os.path.join(workdir, "grid.npz"))
  labels = generate.class_labels(4, config.sample.per_class)
  assert written["labels"].tolist() == labels.tolist()

  images = pipe(labels=labels.tolist(), batch_size=config.sample.batch_size, **SG)
  assert images.dtype == np.uint8 and images.shape == (8, 16, 16, 1) and images.std() > 0
  np.testing.assert_array_equal(images, written["arr_0"])
  assert pipe.compiled == 1
  # Again, and with two labels (the default batch: 2 rounded up to the 8 devices, the same
  # shape): the one executable; the first two images of a batch of 8 are the same draws.
  np.testing.assert_array_equal(pipe(labels=labels.tolist(), **SG), images)
  np.testing.assert_array_equal(pipe(labels=[0, 0], **SG), images[:2])
  assert pipe.compiled == 1
  # Another ω runs the same executable (ω is traced), and its value shows in the images.
  assert not np.array_equal(pipe(labels=[0, 0], **dict(SG, omega=5.0)), images[:2])
  assert pipe.compiled == 1
  # Another plan (steps) compiles once more; the settings' step count shows in the images.
  other = pipe(labels=[0, 0], **dict(SG, steps=2))
  assert pipe.compiled == 2 and not np.array_equal(other, images[:2])
  # An earlier checkpoint, raw params: other weights, other images.
  early = sgjax.load(workdir, step=2, ema=False)
  assert early.step == 2
  assert not np.array_equal(early(labels=[0, 0], **SG), images[:2])


def test_settings_are_checked_like_the_command_line(trained):
  workdir, _ = trained
  pipe = sgjax.load(workdir, overrides={"sample.batch_size": 16})
  assert pipe.config.sample.batch_size == 16
  c = pipe.settings(rule="cfg_sg", omega=2.0, gamma=(0.0, 0.5), interval=[0.2, 0.9],
                    schedule="constant", gamma_quantum=0.0, sampler="heun", time_shift=2.0)
  g = c.sample.guidance
  assert (g.rule, g.omega, g.gamma_strong, g.gamma_weak, g.interval) == (
      "cfg_sg", 2.0, 0.0, 0.5, (0.2, 0.9))
  assert (c.sample.sampler, c.sample.time_shift) == ("heun", 2.0)
  assert {"rule", "omega", "interval", "guide_step"} <= set(pipeline.guidance_fields())
  cases = [
      (dict(rule="sgg"), "sample.guidance.rule = 'sgg': unknown value; allowed: one of 'none', "
                         "'cfg', 'sg', "),
      (dict(omega=-1.0), "sample.guidance.omega = -1.0: out of range; allowed: a finite number "
                         ">= 0"),
      (dict(omega=float("inf")), "sample.guidance.omega = inf: not finite"),
      (dict(interval=0.5), "sample.guidance.interval = 0.5: not a tuple (a float)"),
      (dict(rule="sg", gamma=(0.5, 0.3)), "sample.guidance.gamma_weak = 0.3: must be > "
                                          "gamma_strong = 0.5 at step 0"),
      (dict(steps=0), "sample.steps = 0: out of range; allowed: an int >= 1"),
      (dict(sampler="rk4"), "sample.sampler = 'rk4': unknown value; allowed: one of 'euler', "
                            "'heun'"),
      (dict(gamma=0.5), "gamma = 0.5: not a pair; (gamma_strong, gamma_weak)"),
      (dict(omgea=2.0), "omgea=: no such sampling setting; allowed: batch_size, gamma, "),
      (dict(batch_size=12), "sample.batch_size = 12: must be divisible by the data-parallel"),
  ]
  for fields, message in cases:
    with pytest.raises(errors.UserError) as err:
      pipe.settings(**fields)
    assert str(err.value).startswith(message), (fields, str(err.value))
  with pytest.raises(errors.UserError, match="did you mean 'omega'"):
    pipe.settings(omgea=2.0)
  for kw, message in [(dict(labels=[0, 4]), "labels = [0, 4]: not a non-empty list of class "
                                            "labels; ints in 0..3"),
                      (dict(labels=[]), "labels = []: not a non-empty list"),
                      (dict(prompts=["a bag"]), "labels: a class-conditional model samples "
                                                "class labels, not prompts")]:
    with pytest.raises(errors.UserError) as err:
      pipe(**kw)
    assert str(err.value).startswith(message), str(err.value)
  assert pipe.compiled == 0  # Every refusal came before any sampler was built.


def test_load_refusals_are_one_line(trained, tmp_path):
  workdir, _ = trained
  refusals = [
      (lambda: sgjax.load(workdir, step=3), f"step = 3: no checkpoint of step 3 under "
                                            f"{workdir}/checkpoints; there are [2, 4]"),
      (lambda: sgjax.load(str(tmp_path / "nothing")), f"{tmp_path}/nothing: no such workdir "
                                                      "or file"),
      (lambda: sgjax.load(workdir, overrides={"sample.omega": 2.0}),
       "sample.omega: no such config field; sample has: "),
      (lambda: sgjax.load(str(tmp_path)), f"{tmp_path}: records no config"),
  ]
  for load, message in refusals:
    with unchanged(os.path.dirname(workdir), tmp_path), pytest.raises(errors.UserError) as err:
      load()
    assert str(err.value).startswith(message), str(err.value)


def test_flops_of_a_setting_are_the_counters(trained):
  workdir, _ = trained
  pipe = sgjax.load(workdir)
  sg = pipe.flops(rule="sg", gamma=(0.0, 0.5), steps=10)
  cfg = pipe.flops(rule="cfg", steps=10)
  want = flops.report(pipe.settings(rule="sg", gamma=(0.0, 0.5), steps=10))
  assert sg == pytest.approx(want["sampler per image"]["with_attention"], rel=1e-12)
  dense = want["dense model"]["with_attention"]
  assert cfg == pytest.approx(20 * dense, rel=1e-12)  # Two dense forwards a step.
  assert dense * 10 < sg < cfg  # SG: one dense and one routed forward a step.
  assert pipe.flops(rule="sg", gamma=(0.0, 0.5), steps=20) == pytest.approx(2 * sg)
