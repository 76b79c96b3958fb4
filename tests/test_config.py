"""Bad config values fail at start, naming the field and the allowed range."""


import pytest

from sgjax import config as config_lib
from sgjax import errors, guidance, models, sampling, train, validation
from sgjax.eval import metrics
from sgjax.jobs import demo, sweep
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


@pytest.mark.parametrize("field, value, message", [
    ("sparsity.routes", ((1, 4, 1.0),), r"sparsity.routes\[0\].gamma = 1.0: must be in \[0, 1\)"),
    ("sparsity.routes", ((1, 6, 0.5),), r"sparsity.routes\[0\] = \(1, 6\).*depth-1 = 5"),
    ("sparsity.routes", ((-1, 3, 0.5),), r"sparsity.routes\[0\]"),
    ("model.patch_size", 3, r"model.patch_size = 3: must divide data.image_size = 28"),
    ("model.preset", "XXL/2", r"model.preset = 'XXL/2': unknown; allowed: S/2"),
    ("train.batch_size", 36, r"train.batch_size = 36: .*divisible by the data-parallel size"),
    ("train.grad_accum", 3, r"train.grad_accum = 3: must divide train.batch_size = 32"),
    ("train.ema_decay", 1.0, r"train.ema_decay = 1.0: must be in \[0, 1\)"),
    ("sample.guidance.rule", "foo", r"sample.guidance.rule = 'foo': allowed"),
    ("sample.guidance.gamma_weak", 0.0, r"gamma_weak = 0.0: must be > gamma_strong = 0.0"),
    ("sample.guidance.interval", (0.5, 0.2), r"sample.guidance.interval = \(0.5, 0.2\): must be"),
    ("sample.guidance.schedule", "linear", r"sample.guidance.schedule = 'linear': allowed"),
    ("sample.time_shift", 0.0, r"sample.time_shift = 0.0: must be > 0"),
    ("train.keep_period", -1, r"train.keep_period = -1: must be >= 0"),
    ("sample.guidance.gamma_strong", -0.1, r"gamma_strong = -0.1: must be in \[0, 1\)"),
    ("mesh.data", 0, r"mesh.data = 0: must be >= 1, or -1"),
    ("dtype", "float16", r"dtype = 'float16': allowed"),
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


def test_cosine_schedule_end_is_range_checked_at_its_step():
  c = _load("fashion_mnist")
  c.sample.guidance.update(schedule="cosine", gamma_strong_end=0.0, gamma_weak_end=1.0)
  last = c.sample.steps - 1
  message = rf"gamma_weak = 1.0: must be in \[0, 1\) \(value at sampling step {last}\)"
  with pytest.raises(ValueError, match=message):
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
  with pytest.raises(errors.UserError, match=r"^sweep.omegas = \(-1.0,\): must be each >= 0$"):
    sweep.validate(c, num_devices=8)
  with pytest.raises(errors.UserError, match=r"^eval.num_samples = 1: must be >= 2"):
    validation.validate(c, num_devices=8, job="eval")
  with pytest.raises(errors.UserError, match=r"^demo.eval_per_class = 0: must be >= 1$"):
    demo.validate(c, num_devices=8)
  with pytest.raises(errors.UserError, match=r"^encode.batch_size = 0: must be >= 1$"):
    encode_latents.check_config(c)
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


def test_every_allowed_values_list_is_its_modules():
  """The lists config.py used to mirror live once, in the modules that read the fields."""
  for name in ("ATTENTION_IMPLS", "PREDICTIONS", "MODEL_KINDS", "KINDS", "SAMPLERS", "RULES",
               "PRESETS", "DTYPES", "EVAL_FEATURE_NETS", "ENCODE_SOURCES", "LATENT_DTYPES"):
    assert not hasattr(config_lib, name), name
  assert dit.ATTENTION_IMPLS and models.KINDS == ("dit", "trdit") and sampling.SAMPLERS
  assert guidance.RULES and metrics.FEATURE_NETS and encode_latents.SOURCES
