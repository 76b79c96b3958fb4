"""Bad config values fail at start, naming the field and the allowed range."""


import functools

import pytest

from sgjax import config as config_lib
from sgjax import errors, guidance, init_from, models, objectives, sampling, train, validation
from sgjax.data import pipeline
from sgjax.eval import inception, metrics
from sgjax.jobs import demo, study, sweep
from sgjax.models import dit
from sgjax.tools import encode_latents
from tests.builders import tiny_config


def _load(name):
  return config_lib.load_config_file(name)


@pytest.mark.parametrize("name", config_lib.shipped_names())
def test_shipped_configs_validate(name):
  validation.validate(_load(name), num_devices=8)


def test_imagenet_recipe_is_the_papers():
  c = _load("imagenet256")
  validation.validate(c)
  assert (c.model.depth, c.model.width, c.model.heads, c.model.patch_size) == (28, 1152, 16, 2)
  assert (c.data.image_size, c.data.channels) == (32, 4)
  assert tuple(map(tuple, c.sparsity.routes)) == ((2, 24, 0.5),)
  assert (c.train.lr, c.train.b1, c.train.b2, c.train.batch_size) == (1e-4, 0.9, 0.999, 256)
  assert (c.train.ema_decay, c.train.label_dropout, c.dtype) == (0.9999, 0.1, "bfloat16")


IN_01 = r"out of range; allowed: a finite number in \[0, 1\)$"


@pytest.mark.parametrize("field, value, message", [
    ("sparsity.routes", ((1, 4, 1.0),), r"^sparsity.routes\[0\].gamma = 1.0: " + IN_01),
    ("sparsity.routes", ((1, 6, 0.5),), r"sparsity.routes\[0\] = \(1, 6\).*depth-1 = 5"),
    ("sparsity.routes", ((-1, 3, 0.5),), r"^sparsity.routes\[0\].start = -1: out of range"),
    ("model.patch_size", 3, r"model.patch_size = 3: must divide data.image_size = 28"),
    ("model.preset", "XXL/2", r"^model.preset = 'XXL/2': unknown value; allowed: one of '', "
     r"'S/2'"),
    ("train.batch_size", 36, r"train.batch_size = 36: .*divisible by the data-parallel size"),
    ("train.grad_accum", 3, r"train.grad_accum = 3: must divide train.batch_size = 32"),
    ("train.ema_decay", 1.0, r"^train.ema_decay = 1.0: " + IN_01),
    ("sample.guidance.rule", "foo", r"^sample.guidance.rule = 'foo': unknown value; allowed: "
     r"one of 'none', 'cfg', 'sg', 'cfg_sg', 'ag_sg'$"),
    ("sample.guidance.gamma_weak", 0.0, r"gamma_weak = 0.0: must be > gamma_strong = 0.0"),
    ("sample.guidance.interval", (0.5, 0.2), r"sample.guidance.interval = \(0.5, 0.2\): must be"),
    ("sample.guidance.schedule", "linear", r"^sample.guidance.schedule = 'linear': unknown "
     r"value; allowed: one of 'constant', 'cosine'$"),
    ("sample.time_shift", 0.0, r"^sample.time_shift = 0.0: out of range; allowed: a finite "
     r"number > 0 \(1 = uniform grid\)$"),
    ("train.keep_period", -1, r"^train.keep_period = -1: out of range; allowed: an int >= 0 "
     r"\(0 = off\)$"),
    ("sample.guidance.gamma_strong", -0.1, r"^sample.guidance.gamma_strong = -0.1: " + IN_01),
    ("mesh.data", 0, r"^mesh.data = 0: out of range; allowed: an int >= 1, or -1 "
     r"\(-1 = the rest\)$"),
    ("dtype", "float16", r"^dtype = 'float16': unknown value; allowed: one of 'float32', "
     r"'bfloat16'$"),
    # Issue 32's finds: non-finite numbers and tuples of the wrong arity.
    ("sample.guidance.omega", float("inf"), r"^sample.guidance.omega = inf: not finite; "
     r"allowed: a finite number >= 0$"),
    ("sample.time_shift", float("nan"), r"^sample.time_shift = nan: not finite"),
    ("sample.guidance.interval", (0.5,), r"^sample.guidance.interval = \(0.5,\): 1 value, not "
     r"2; allowed: \(t_lo, t_hi\) with t_lo a finite number in \[0, 1\]; t_hi a finite number "
     r"in \[0, 1\]$"),
    ("sparsity.routes", ((1, 3),), r"^sparsity.routes\[0\] = \(1, 3\): 2 values, not 3; "
     r"allowed: \(start, end, gamma\) with start an int >= 0"),
    # A registry others add to (tests/test_train.py adds one): checked by sgjax.objectives.
    ("train.objective", "probe", r"^train.objective = 'probe': unknown value; allowed: one of "
     r"'flow', 'masked'$"),
])
def test_bad_values_name_the_field(field, value, message):
  c = _load("fashion_mnist")
  node = c
  *path, leaf = field.split(".")
  for p in path:
    node = node[p]
  node[leaf] = value
  with pytest.raises(ValueError, match=message):
    validation.validate(c, num_devices=8)


def test_cosine_schedule_end_is_range_checked():
  c = _load("fashion_mnist")
  c.sample.guidance.update(schedule="cosine", gamma_strong_end=0.0, gamma_weak_end=1.0)
  message = (r"^sample.guidance.gamma_weak_end = 1.0: out of range; allowed: a finite number "
             r"in \[0, 1\)$")
  with pytest.raises(errors.UserError, match=message):
    validation.validate(c, num_devices=8)


def test_routes_are_required_only_where_a_branch_is_sparse():
  c = _load("fashion_mnist")
  c.sparsity.routes = ()
  c.sample.guidance.update(rule="cfg", gamma_strong=0.5)  # CFG ignores γ: a dense model is fine.
  validation.validate(c, num_devices=8)
  c.sample.guidance.rule = "none"
  with pytest.raises(ValueError, match=r"sparsity.routes = \(\): sparse guidance needs"):
    validation.validate(c, num_devices=8)


def test_ag_sg_needs_a_guide_step():
  c = _load("fashion_mnist")
  c.sample.guidance.rule = "ag_sg"
  with pytest.raises(ValueError, match=r"sample.guidance.guide_step = -1: rule 'ag_sg' needs"):
    validation.validate(c, num_devices=8)
  c.sample.guidance.guide_step = 500
  validation.validate(c, num_devices=8)


def test_mesh_must_fit_devices():
  c = _load("fashion_mnist")
  c.mesh.update(data=3, fsdp=1, tensor=1)
  with pytest.raises(ValueError, match="must divide the device count 8"):
    validation.validate(c, num_devices=8)


def test_presets_fill_model_dims():
  c = _load("fashion_mnist")
  c.model.preset = "B/4"
  c.data.image_size = 32
  validation.validate(c)
  assert (c.model.depth, c.model.width, c.model.heads, c.model.patch_size) == (12, 768, 12, 4)


def test_a_job_checks_the_fields_it_reads_and_a_training_run_ignores_the_rest(tmp_path):
  """Sweep, evaluation, demo and encoder settings are theirs: a training run (and sampling)
  does not read them and so does not refuse them; the job that reads them does."""
  c = tiny_config()
  c.train.update(num_steps=1, checkpoint_every=1)
  c.sweep.omegas = (-1.0,)
  c.eval.num_samples = 1
  c.demo.eval_per_class = 0
  c.encode.batch_size = 0
  for job in ("train", "sample", "bench", "flops", "encode_text"):
    validation.validate(c, num_devices=8, job=job)
  assert int(train.train(c, str(tmp_path / "run"))["step"]) == 1
  with pytest.raises(errors.UserError, match=r"^sweep.omegas\[0\] = -1.0: out of range; "
                     r"allowed: a finite number >= 0$"):
    sweep.validate(c, num_devices=8)
  with pytest.raises(errors.UserError, match=r"^eval.num_samples = 1: out of range; allowed: "
                     r"an int >= 2 \(a covariance\)$"):
    validation.validate(c, num_devices=8, job="eval")
  with pytest.raises(errors.UserError, match=r"^demo.eval_per_class = 0: out of range; "
                     r"allowed: an int >= 1$"):
    demo.validate(c, num_devices=8)
  with pytest.raises(errors.UserError, match=r"^encode.batch_size = 0: out of range; allowed: "
                     r"an int >= 1$"):
    validation.validate(c, job="encode_latents")
  with pytest.raises(errors.UserError, match=r"^(sweep|eval)\."):  # No job named: all of core.
    validation.validate(c, num_devices=8)


def test_train_fields_are_not_the_samplers():
  c = tiny_config()
  c.train.batch_size = 36  # Not read by sampling, which still checks its own batches.
  validation.validate(c, num_devices=8, job="sample")
  with pytest.raises(errors.UserError, match=r"^train.batch_size = 36: .*divisible"):
    validation.validate(c, num_devices=8, job="train")
  c.sample.batch_size = 12
  with pytest.raises(errors.UserError, match=r"^sample.batch_size = 12: must be divisible"):
    validation.validate(c, num_devices=8, job="sample")


def _leaves(node, prefix=""):
  for key in node.keys():
    if hasattr(node[key], "keys"):
      yield from _leaves(node[key], f"{prefix}{key}.")
    else:
      yield prefix + key


def test_every_field_is_declared_and_its_default_is_allowed():
  """A field cannot be added without saying what it accepts (`_declared` takes only F's), and
  every default (and every shipped config's value) passes its own declaration."""
  declared = config_lib.declarations()
  assert sorted(_leaves(config_lib.base_config())) == sorted(declared)
  assert len(declared) > 140
  for name in config_lib.shipped_names():
    c = _load(name)
    for field, spec in declared.items():
      value = functools.reduce(lambda node, key: node[key], field.split("."), c)
      assert config_lib.problem(spec, value) is None, (name, field, value)


def test_declared_choices_are_the_registries_the_code_reads():
  """The allowed values beside each default are exactly what the modules implement."""
  choices = {f: s.choices for f, s in config_lib.declarations().items() if s.choices}
  assert choices["model.kind"] == models.KINDS
  assert choices["model.preset"] == ("", *models.PRESETS)
  assert choices["dtype"] == models.DTYPES
  assert choices["model.attention"] == dit.ATTENTION_IMPLS
  assert choices["model.remat"] == dit.REMAT_POLICIES
  assert choices["model.prediction"] == dit.PREDICTIONS
  assert choices["data.name"] == pipeline.DATASETS
  assert "train.objective" not in choices and tuple(objectives.OBJECTIVES) == ("flow", "masked")
  assert choices["train.init_params"] == init_from.PARAMS
  assert choices["sample.sampler"] == sampling.SAMPLERS
  assert choices["sample.guidance.rule"] == guidance.RULES
  assert choices["sample.guidance.schedule"] == guidance.SCHEDULES
  assert choices["sample.guidance.token_draw"] == guidance.TOKEN_DRAWS
  assert choices["eval.feature_net"] == metrics.FEATURE_NETS
  assert choices["eval.preprocess"] == inception.PREPROCESS
  assert choices["encode.source"] == encode_latents.SOURCES
  assert choices["encode.dtype"] == encode_latents.LATENT_DTYPES
  each = {f: s.each.choices for f, s in config_lib.declarations().items()
          if s.each is not None and s.each.choices}
  assert each["eval.metrics"] == metrics.METRICS
  assert each["sweep.rules"] == guidance.RULES and each["study.rules"] == guidance.RULES[1:]
  assert each["study.token_draws"] == guidance.TOKEN_DRAWS
  assert each["study.stages"] == study.STAGES


def test_a_field_without_a_declaration_is_a_bug_named_at_once(monkeypatch):
  real = config_lib._declared

  def with_a_bare_field():
    tree = real()
    tree["train"]["new_field"] = 3
    return tree

  monkeypatch.setattr(config_lib, "_declared", with_a_bare_field)
  with pytest.raises(TypeError, match=r"^train.new_field = 3: declare it as F\(default, spec\)$"):
    config_lib.base_config()
