"""The study as a command: `run` the configured stages, resumably (`python -m sgjax.jobs.study`)."""

from __future__ import annotations

import os
import time

import jax
import ml_collections
from absl import flags, logging
from ml_collections import config_flags

from sgjax import errors, files, lock, platform, validation
from sgjax import workdir as workdir_lib
from sgjax.jobs.study.finals import final, paired
from sgjax.jobs.study.probe import probe
from sgjax.jobs.study.report import log_tensorboard, plot, report
from sgjax.jobs.study.search import dense_stage, screen, screen_budget
from sgjax.jobs.study.table import Study, check
from sgjax.jobs.study.training import checkpoints_stage, plot_trend, trend, trend_report


@lock.holding("workdir", "study", "study")  # One writer per <workdir>/study.
def run(config: ml_collections.ConfigDict, workdir: str) -> str:
  """Runs the configured stages; returns the path of report.md."""
  check(config)
  workdir_lib.check(workdir, config, resuming=False)
  study = Study(config, workdir)
  study.judge()  # Before any sampling: a missing weights file fails in the first second.
  stages = config.study.stages
  parts: dict[str, list[dict]] = {}
  t0 = time.perf_counter()
  by_budget = config.study.search == "budget"
  needs_screen = any(s in stages for s in ("screen", "final", "checkpoints")) or (
      "probe" in stages and not config.study.probe_gammas)
  parts["screen"] = (screen_budget(study) if by_budget else screen(study)) if needs_screen else []
  if "dense" in stages:
    parts["dense"] = dense_stage(study, parts["screen"])
  if "final" in stages:
    # The budget search also compares the dense twin at matched compute (routed − dense).
    parts["final"] = final(study, parts["screen"] + (parts.get("dense", []) if by_budget
                                                     else []))
    parts["paired"] = paired(study, parts["final"])
  if "checkpoints" in stages:
    parts["checkpoints"] = checkpoints_stage(study, parts["screen"])
  if "probe" in stages:
    parts["probe"] = probe(study, parts["screen"])
  trend_rows = trend(study) if "trend" in stages else []
  log_tensorboard(study, parts)
  path = os.path.join(study.out_dir, "report.md")
  if jax.process_index() == 0:
    files.makedirs(study.out_dir)
    files.write_text(path, report(study, parts) + "\n" + (
        "\n" + trend_report(study, trend_rows) + "\n" if trend_rows else ""))
    try:
      import matplotlib  # noqa: F401
      for p in plot(study, parts) + ([plot_trend(study, trend_rows)] if trend_rows else []):
        study.log(f"plot: {p}")
    except ImportError:
      study.log("plots not drawn: matplotlib is not installed here (the table and report are)")
    study.log(f"study: {time.perf_counter() - t0:.0f} s; report: {path}")
  return path


def main(argv) -> None:
  del argv
  logging.set_verbosity(logging.WARNING)  # Orbax logs every restore at INFO.
  platform.set_default_xla_flags(sampling=True)
  config = flags.FLAGS.config
  if config is None or not flags.FLAGS.workdir:
    raise errors.UserError("--config, --workdir", "required", "pass both")
  validation.validate(config, jax.device_count(), job="study")  # + check() in run()
  path = run(config, flags.FLAGS.workdir)
  if jax.process_index() == 0:
    print(files.read_text(path))


def cli() -> None:
  """`python -m sgjax.jobs.study` / `sgjax-study` (flags defined here, only for this command)."""
  config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=False)
  flags.DEFINE_string("workdir", None, "A trained workdir; results go to <workdir>/study/.")
  errors.run(main)

