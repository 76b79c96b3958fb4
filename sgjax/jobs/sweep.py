"""Quality vs compute: evaluate a grid of guidance settings from one checkpoint, then plot it.

  python -m sgjax.jobs.sweep --config=configs/fashion_mnist.py --workdir=DIR [--config.sweep.…]

The grid is `config.sweep` (rule × ω × γ_strong × γ_weak × steps); settings a rule does not use
(γ for CFG) collapse, and SG/CFG+SG points with γ_strong ≥ γ_weak are left out. Every point
samples `sweep.per_class` images per class with the same seed, is scored (FD-FMNIST and class
accuracy on Fashion-MNIST), and is appended as one JSON line to `<workdir>/sweep/results.jsonl`
together with its GMACs per image and sampling images/s. Points already in the file are skipped,
so a killed sweep resumes; a table made with other settings (another checkpoint step, samples
per class, seed or sampler) is never added to: the sweep then writes beside it. Plots (PNG, in
`<workdir>/sweep/`): metric vs GMACs per image with each rule's Pareto front, and ω × γ_weak
heat-maps per rule.
"""

from __future__ import annotations

import itertools
import json
import os
import time

import jax
import ml_collections
import numpy as np
from absl import flags, logging
from ml_collections import config_flags

from sgjax import (
  checkpoint,
  errors,
  files,
  flops,
  generate,
  lock,
  metrics,
  platform,
  readers,
  sharding,
  validation,
)
from sgjax import config as config_lib
from sgjax import guidance as guidance_lib
from sgjax import workdir as workdir_lib
from sgjax.eval import fmnist

METRICS = (("fd_fmnist", "FD-FMNIST (lower is better)"),
           ("class_accuracy", "class accuracy (higher is better)"))


def grid_points(sweep: ml_collections.ConfigDict) -> list[dict]:
  """The distinct, valid settings of the grid, in a stable order."""
  points, seen = [], set()
  for rule, omega, gs, gw, steps in itertools.product(
      sweep.rules, sweep.omegas, sweep.gammas_strong, sweep.gammas_weak, sweep.steps):
    s = guidance_lib.setting(rule, omega, gs, gw)  # Fields the rule ignores: one value.
    if s is None:
      continue
    p = dict(s, steps=int(steps))
    key = point_key(p)
    if key not in seen:
      seen.add(key)
      points.append(p)
  return points


# What point_config sets from a grid point; every other sample.* field is the sweep's setting.
GRID_FIELDS = ("sample.steps", "sample.num_samples", "sample.guidance.rule",
               "sample.guidance.omega", "sample.guidance.gamma_strong",
               "sample.guidance.gamma_weak", "sample.guidance.schedule")


def validate(config: ml_collections.ConfigDict, num_devices: int | None = None) -> None:
  """What the sweep reads: the sampling job's fields and `sweep`'s declared values (the grid
  itself: `check_grid`)."""
  validation.validate(config, num_devices, job="sweep")


def check_grid(sweep: ml_collections.ConfigDict) -> list[dict]:
  """The grid's points; refuses an empty axis or a grid whose every point is left out."""
  for name in ("rules", "omegas", "gammas_strong", "gammas_weak", "steps"):
    if len(sweep[name]) == 0:
      raise errors.UserError(f"sweep.{name} = {tuple(sweep[name])!r}", "empty: the grid has no "
                             "point", "give at least one value")
  points = grid_points(sweep)
  if not points:
    raise errors.UserError("sweep.gammas_strong, sweep.gammas_weak",
                           f"no valid point: rules {tuple(sweep.rules)} need γ_strong < γ_weak, "
                           f"and no pair of {tuple(sweep.gammas_strong)} × "
                           f"{tuple(sweep.gammas_weak)} has it",
                           "add a γ_weak above some γ_strong, or the rule 'cfg'")
  return points


def sweep_settings(config: ml_collections.ConfigDict, step: int) -> dict:
  """What every row of one results table shares: checkpoint step, samples per class, seed and
  the sample.* fields the grid does not set."""
  flat = workdir_lib.flat_config(config)
  return dict(step=int(step), per_class=int(config.sweep.per_class), seed=int(config.sweep.seed),
              **{k: v for k, v in flat.items() if k.startswith("sample.")
                 and k not in GRID_FIELDS})


def point_key(p: dict) -> tuple:
  return (p["rule"], round(p["omega"], 6), round(p["gamma_strong"], 6),
          round(p["gamma_weak"], 6), int(p["steps"]))


def load_results(path: str) -> list[dict]:
  """The rows of a results table (this sweep's results.jsonl, the study's points.jsonl): none
  when it does not exist yet; a damaged one is one line naming the file and the line."""
  if not files.exists(path):
    return []
  return readers.jsonl(path, "results table", f"move {path} aside (its points are then "
                       "sampled again) or restore it from a copy")


def point_config(config: ml_collections.ConfigDict, p: dict) -> ml_collections.ConfigDict:
  c = config_lib.replace(config, {
      "sample.steps": p["steps"], "sample.num_samples": 0, "sample.guidance.schedule": "constant",
      **{f"sample.guidance.{k}": p[k] for k in ("rule", "omega", "gamma_strong", "gamma_weak")}})
  validation.validate(c, jax.device_count(), job="sweep")
  return c


def run(config: ml_collections.ConfigDict, workdir: str) -> str:
  """Evaluates every missing grid point and redraws the plots; returns the results path."""
  points = check_grid(config.sweep)
  if config.data.name != "fashion_mnist":
    raise errors.UserError(
        f"data.name = {config.data.name!r}", "the sweep scores with FD-FMNIST, which needs "
        "Fashion-MNIST", "score other data with --mode=eval (FID) per setting")
  log = metrics.print0
  steps = checkpoint.saved_steps(os.path.join(workdir, "checkpoints"))
  if not steps:
    workdir_lib.refuse_inside_a_run(workdir, f"--workdir={workdir}")  # Name the run, if any.
    raise errors.UserError(os.path.join(workdir, "checkpoints"), "no checkpoint there",
                           "train first (--mode=train) or point --workdir at a trained run")
  workdir_lib.check(workdir, config, resuming=False)  # Before any output folder is made.
  out_dir = workdir_lib.output_dir(os.path.join(workdir, "sweep"),
                                   sweep_settings(config, steps[-1]), log)
  with lock.hold(out_dir, "sweep", log=log):  # One writer per sweep folder.
    return _evaluate_points(config, workdir, points, steps, out_dir, log)


def _evaluate_points(config: ml_collections.ConfigDict, workdir: str, points: list[dict],
                     steps: list[int], out_dir: str, log) -> str:
  results_path = os.path.join(out_dir, "results.jsonl")
  done = {point_key(r) for r in load_results(results_path)}
  todo = [p for p in points if point_key(p) not in done]
  log(f"sweep: {len(done)} points done, {len(todo)} to go -> {results_path}")
  if todo:
    clf, ref, _ = fmnist.for_workdir(config.data, workdir, log=log)
    mesh = sharding.build_mesh(config.mesh)
  for i, p in enumerate(todo):
    c = point_config(config, p)
    plan = guidance_lib.config_plan(c)
    with jax.set_mesh(mesh):
      model, weights, step = generate.load_weights(c, workdir, mesh)
      labels = generate.class_labels(model.num_classes, config.sweep.per_class)
      t0 = time.perf_counter()
      images = generate.images(c, model, weights, labels, plan, mesh, config.sweep.seed)
      seconds = time.perf_counter() - t0
    macs = flops.plan_macs(c, plan)
    row = dict(p, **fmnist.sample_metrics(clf, ref, images, labels),
               gmacs_per_image=macs.with_attention / 1e9,
               gmacs_per_image_linear=macs.linear_only / 1e9,
               images_per_s=len(labels) / seconds, checkpoint_step=step)
    if jax.process_index() == 0:  # Rewritten whole: a bucket object cannot be appended to.
      rows = load_results(results_path) + [row]
      files.write_text(results_path, "".join(json.dumps(r) + "\n" for r in rows))
    log(f"[{i + 1}/{len(todo)}] {p['rule']} ω={p['omega']:g} γ={p['gamma_strong']:g}/"
        f"{p['gamma_weak']:g} steps={p['steps']}: FD-FMNIST {row['fd_fmnist']:.2f}, "
        f"acc {100 * row['class_accuracy']:.1f}%, {row['gmacs_per_image']:.2f} GMACs/image")
  rows = load_results(results_path)
  metrics.log_scalars(workdir, steps[-1], {f"{tensorboard_tag(r)}/{m}": r[m] for r in rows
                                           for m, _ in METRICS if m in r}, "sweep")
  if jax.process_index() == 0:
    draw(results_path, log)
  return results_path


def tensorboard_tag(p: dict) -> str:
  """A point's TensorBoard name, e.g. `sg_w2_g0-0.5_s30` (rule, ω, γ strong-weak, steps)."""
  return (f"{p['rule']}_w{p['omega']:g}_g{p['gamma_strong']:g}-{p['gamma_weak']:g}"
          f"_s{p['steps']}")


def draw(results_path: str, log=print) -> list[str]:
  """The plots of a results table, beside it. Without matplotlib (a lean GPU image), says so
  and how to draw them elsewhere: the table is what matters and it is already written."""
  try:
    import matplotlib  # noqa: F401
  except ImportError:
    log(f"plots not drawn: matplotlib is not installed here; copy {results_path} and run "
        "`python -m sgjax.jobs.sweep --plot_only --results=<it>` where it is")
    return []
  paths = plot(load_results(results_path), os.path.dirname(results_path))
  for path in paths:
    log(f"plot: {path}")
  return paths


def pareto_front(xs: np.ndarray, ys: np.ndarray, lower_is_better: bool) -> np.ndarray:
  """Indices of the points no other point beats on both cost (x, lower) and metric (y)."""
  signed = np.asarray(ys) if lower_is_better else -np.asarray(ys)
  # By cost, and at equal cost best metric first: a tie in cost is won by the better metric.
  order = np.lexsort((signed, xs))
  front, best = [], None
  for i in order:
    y = signed[i]
    if best is None or y < best:
      front.append(i)
      best = y
  return np.asarray(front, int)


def save_figure(fig, path: str) -> None:
  import matplotlib.pyplot as plt
  with files.atomic_open(path) as f:
    fig.savefig(f, dpi=120, format="png")
  plt.close(fig)


def plot(results: list[dict], out_dir: str) -> list[str]:
  """Metric vs GMACs per image (Pareto front per rule) and ω × γ_weak heat-maps."""
  import matplotlib  # Local: plotting only.
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  if not results:
    return []
  paths = []
  rules = sorted({r["rule"] for r in results})
  for metric, label in METRICS:
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for rule in rules:
      rows = [r for r in results if r["rule"] == rule]
      xs = np.array([r["gmacs_per_image"] for r in rows])
      ys = np.array([r[metric] for r in rows])
      points = ax.scatter(xs, ys, s=18, alpha=0.5, label=f"{rule} (all)")
      front = pareto_front(xs, ys, lower_is_better=metric == "fd_fmnist")
      ax.plot(xs[front], ys[front], "-o", color=points.get_facecolor()[0][:3], ms=4,
              label=f"{rule} Pareto front")
    ax.set_xlabel("GMACs per image (whole sampler, attention included)")
    ax.set_ylabel(label)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(os.path.join(out_dir, f"{metric}_vs_gmacs.png"))
    save_figure(fig, paths[-1])

  for rule in [r for r in rules if r in ("sg", "cfg_sg")]:
    rows = [r for r in results if r["rule"] == rule]
    for gs in sorted({r["gamma_strong"] for r in rows}):
      sub = [r for r in rows if r["gamma_strong"] == gs]
      omegas = sorted({r["omega"] for r in sub})
      gws = sorted({r["gamma_weak"] for r in sub})
      grid = np.full((len(omegas), len(gws)), np.nan)
      for r in sub:
        grid[omegas.index(r["omega"]), gws.index(r["gamma_weak"])] = r["fd_fmnist"]
      fig, ax = plt.subplots(figsize=(1.2 * len(gws) + 2, 0.8 * len(omegas) + 1.5))
      im = ax.imshow(grid, cmap="viridis_r", aspect="auto", origin="lower")
      ax.set_xticks(range(len(gws)), [f"{g:g}" for g in gws])
      ax.set_yticks(range(len(omegas)), [f"{o:g}" for o in omegas])
      ax.set_xlabel("γ_weak")
      ax.set_ylabel("ω")
      for (a, b), v in np.ndenumerate(grid):
        if np.isfinite(v):
          ax.text(b, a, f"{v:.1f}", ha="center", va="center", fontsize=7, color="w")
      ax.set_title(f"{rule}, γ_strong = {gs:g}: FD-FMNIST")
      fig.colorbar(im, ax=ax)
      fig.tight_layout()
      paths.append(os.path.join(out_dir, f"heatmap_{rule}_gs{gs:g}.png"))
      save_figure(fig, paths[-1])
  return paths


def main(argv) -> None:
  del argv
  # Orbax logs every restore at INFO; the console shows the sweep's own lines (as sgjax.main).
  logging.set_verbosity(logging.WARNING)
  platform.set_default_xla_flags(sampling=True)
  if flags.FLAGS.plot_only:
    results = flags.FLAGS.results or os.path.join(flags.FLAGS.workdir or "", "sweep",
                                                  "results.jsonl")
    if not files.exists(results):
      raise errors.UserError(f"--results = {results!r}", "no results table there",
                             "pass the results.jsonl a sweep wrote")
    draw(results)
    return
  config = flags.FLAGS.config
  if config is None or not flags.FLAGS.workdir:
    raise errors.UserError("--config, --workdir", "required (except with --plot_only)",
                           "pass both")
  validate(config, jax.device_count())
  run(config, flags.FLAGS.workdir)


def cli() -> None:
  """`python -m sgjax.jobs.sweep` (flags defined here, only for this command)."""
  config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=False)
  flags.DEFINE_string("workdir", None, "A trained workdir; results go to <workdir>/sweep/.")
  flags.DEFINE_bool("plot_only", False, "Only redraw the plots of an existing results table.")
  flags.DEFINE_string("results", "", "--plot_only: the results.jsonl (default: "
                      "<workdir>/sweep/results.jsonl); plots go beside it.")
  errors.run(main)


if __name__ == "__main__":
  cli()
