"""Every config field fuzzed (issue 32): for each declared field, hypothesis draws values of the
wrong type, the wrong arity, NaN/±inf, just and far out of range, not allowed, and allowed ones,
into a shipped config drawn among all of them, over the command-line parser, over
`sgjax.load(..., overrides=…)`'s override path and over the pipeline's keywords. A refused value
is one `UserError` line naming the field; an allowed one passes validation (or meets a check
of what depends on another field, one line too). Never a traceback of another exception.

Fixed seed (derandomize) and example counts: the file runs in about 30 s on 2 cores.
"""

import contextlib
import io

import pytest
from absl import flags
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ml_collections import config_flags

from sgjax import config as config_lib
from sgjax import errors, pipeline, validation
from tests.builders import invalid_values, valid_values

DECLARED = config_lib.declarations()
SHIPPED = config_lib.shipped_names()
# The job that reads each section (`validate(job=…)`); the core sections: every job ("all").
JOB_OF = {own: job for job, own in validation.OWN.items()}
def fuzz(examples: int) -> settings:
  return settings(max_examples=examples, derandomize=True, deadline=None, database=None,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])


def _job(field: str) -> str:
  return JOB_OF.get(field.split(".")[0], "all")


def _get(config, field: str):
  node = config
  for key in field.split("."):
    node = node[key]
  return node


def _values(field: str):
  """(value, whether its declaration allows it), bad three times in four."""
  spec = DECLARED[field]
  return st.one_of(invalid_values(spec), invalid_values(spec), invalid_values(spec),
                   valid_values(spec)).map(lambda v: (v, config_lib.problem(spec, v) is None))


def _names_field(err: errors.UserError, field: str) -> None:
  line = str(err)
  assert "\n" not in line and line.startswith(field), (field, line)


def _validate(config, field: str, allowed: bool) -> None:
  """Validation passes, or (a value that breaks only a check across fields) is one line; a
  value the declaration refuses is refused naming the field."""
  try:
    validation.validate(config, job=_job(field))
  except errors.UserError as err:
    assert "\n" not in str(err)
    if not allowed:
      _names_field(err, field)
    return
  assert allowed, (field, _get(config, field))


def _cli_text(value) -> str:
  return value if isinstance(value, str) else repr(value)


@pytest.mark.parametrize("field", sorted(DECLARED))
@fuzz(6)
@given(data=st.data())
def test_the_command_line_refuses_bad_values_in_one_line_naming_the_field(field, data):
  name = data.draw(st.sampled_from(SHIPPED), label="config")
  value, _ = data.draw(_values(field), label="value")
  argv = ["sgjax", f"--config={name}", f"--config.{field}={_cli_text(value)}"]
  flag_values = flags.FlagValues()  # The overrides' flags are defined from argv.
  config_flags.DEFINE_config_file("config", None, "", flag_values=flag_values, lock_config=True,
                                  sys_argv=argv)
  stderr = io.StringIO()
  try:
    with contextlib.redirect_stderr(stderr):
      errors.parse_flags(argv, flag_values)
  except SystemExit as stop:  # The parser's refusal: one line naming the flag, exit 2.
    lines = stderr.getvalue().splitlines()
    assert stop.code == 2 and len(lines) == 1, (argv, stderr.getvalue())
    assert lines[0].startswith(f"error: --config.{field}: "), (argv, lines[0])
    assert "unknown flag" not in lines[0] and "no such config field" not in lines[0]
    return
  config = flag_values["config"].value
  parsed = _get(config, field)  # What the parser made of the text (e.g. 0.5 -> (0.5,)).
  _validate(config, field, config_lib.problem(DECLARED[field], parsed) is None)


@pytest.mark.parametrize("field", sorted(DECLARED))
@fuzz(6)
@given(data=st.data())
def test_overrides_refuse_bad_values_in_one_line_naming_the_field(field, data):
  """What `sgjax.load(..., overrides=…)` and `sgjax.load(..., config=…)` do with a config."""
  config = config_lib.load_config_file(data.draw(st.sampled_from(SHIPPED), label="config"))
  value, allowed = data.draw(_values(field), label="value")
  try:
    changed = pipeline.with_overrides(config, {field: value})
  except errors.UserError as err:
    assert not allowed, (field, value, str(err))
    _names_field(err, field)
    return
  assert allowed, (field, value)
  _validate(changed, field, True)


KEYWORDS = {**{k: f"sample.guidance.{k}" for k in pipeline.guidance_fields()},
            **{k: f"sample.{k}" for k in pipeline.SAMPLER_FIELDS}}


@pytest.mark.parametrize("keyword", sorted(KEYWORDS))
@fuzz(10)
@given(data=st.data())
def test_pipeline_keywords_refuse_bad_values_in_one_line_naming_the_field(keyword, data):
  config = config_lib.load_config_file(data.draw(st.sampled_from(SHIPPED), label="config"))
  pipe = pipeline.Pipeline(config, None, None, None)  # settings() reads the config only.
  value, allowed = data.draw(_values(KEYWORDS[keyword]), label="value")
  try:
    pipe.settings(**{keyword: value})
  except errors.UserError as err:
    assert "\n" not in str(err)
    if not allowed:
      _names_field(err, KEYWORDS[keyword])
    return
  assert allowed, (keyword, value)


@fuzz(30)
@given(pair=st.one_of(st.sampled_from([0.5, "ab", None, (0.1,), (0.1, 0.2, 0.3)]),
                      st.tuples(st.sampled_from([float("nan"), -1.0, 1.0, "x"]),
                                st.floats(0, 0.99))))
def test_the_gamma_pair_keyword_refuses_bad_pairs_in_one_line(pair):
  pipe = pipeline.Pipeline(config_lib.load_config_file("fashion_mnist"), None, None, None)
  with pytest.raises(errors.UserError) as refused:
    pipe.settings(gamma=pair)
  assert "\n" not in str(refused.value)
  assert str(refused.value).startswith(("gamma = ", "sample.guidance.gamma_strong"))
