"""Over training: each rule's best setting rescored at every checkpoint (the paper's Fig. 5), and
the trend stage — the whole fair comparison (screen, finals, paired differences) at each of a
run's checkpoints, the probe at all of them, and the trends over training drawn from them."""

from __future__ import annotations

import json
import os

import jax
import numpy as np

from sgjax import errors, files, readers
from sgjax.data import pipeline
from sgjax.jobs import sweep
from sgjax.jobs.study.finals import final, paired
from sgjax.jobs.study.probe import probe
from sgjax.jobs.study.report import report
from sgjax.jobs.study.search import reference_budget, screen_budget
from sgjax.jobs.study.table import Study, families_of, family, label


def requested_steps(study: Study) -> list[int]:
  """`study.checkpoints` (() = all kept), each one a kept checkpoint."""
  s = study.config.study
  steps = sorted(int(x) for x in s.checkpoints) if s.checkpoints else study.saved
  missing = sorted(set(steps) - set(study.saved))
  if missing:
    raise errors.UserError(f"study.checkpoints = {tuple(s.checkpoints)!r}",
                           f"no checkpoint of steps {missing}", f"kept: {study.saved}")
  return steps


def checkpoints_stage(study: Study, rows: list[dict]) -> list[dict]:
  steps = requested_steps(study)
  points = []
  for fam in families_of(rows):
    mine = [r for r in rows if family(r) == fam]
    if not mine:
      continue
    b = study.best(mine)
    for step in steps:
      if b["guide_step"] >= 0 and step <= b["guide_step"]:
        continue  # AG+SG needs a guide older than the model.
      points.append(dict(b, checkpoint=step))
  return study.run(points, "checkpoints")


def step_dir(study: Study, step: int) -> str:
  return os.path.join(study.out_dir, "trend", f"step_{step}")


def trend(study: Study) -> list[dict]:
  """At each of `study.checkpoints` in turn: the budget search re-run at that checkpoint (ω and
  γ re-bracketed there: both optima move with training), the finals and paired differences,
  each checkpoint's tables and report in study/trend/step_<N>/; then the probe at every one.
  Resumable like every stage (points already scored are never sampled again), so a killed run
  goes on where it stopped. Returns the trend rows (`trend_rows`) over every studied step."""
  steps = requested_steps(study)
  for i, step in enumerate(steps):
    at = Study(study.config, study.workdir, study.log, step=step, out_dir=step_dir(study, step))
    at._judge = study.judge()
    study.log(f"trend: checkpoint {step} ({epochs(study, step):.2f} epochs), {i + 1} of "
              f"{len(steps)}")
    screen = screen_budget(at)
    finals = final(at, screen)
    parts = dict(screen=screen, final=finals, paired=paired(at, finals))
    if jax.process_index() == 0:  # The finals chosen now (the table keeps superseded ones).
      files.write_text(os.path.join(at.out_dir, "finals.jsonl"),
                       "".join(json.dumps(r) + "\n" for r in finals))
      files.write_text(os.path.join(at.out_dir, "report.md"), report(at, parts) + "\n")
  probe(study, [])
  return trend_rows(study)


def epochs(study: Study, step: int) -> float:
  """Training epochs at `step`: step × batch / the training split's size."""
  if not hasattr(study, "_train_size"):
    study._train_size = len(pipeline.data_source(study.config.data, "train"))
  return step * study.config.train.batch_size / study._train_size


def trend_rows(study: Study) -> list[dict]:
  """One row per studied checkpoint and final family ("final"), pair ("paired") and probe t
  ("probe"), each with its step and epochs; written to study/trend/trend.jsonl."""
  s, m = study.config.study, study.metric
  root = os.path.join(study.out_dir, "trend")
  steps = sorted(int(n.removeprefix("step_")) for n in files.listdir(root)
                 if n.startswith("step_")) if files.exists(root) else []
  out = []
  for step in steps:
    ep = dict(step=step, epochs=epochs(study, step))
    path = os.path.join(step_dir(study, step), "finals.jsonl")
    finals = (readers.jsonl(path, "study table", f"move {path} aside and rerun")
              if files.exists(path) else [])
    # The trend compares the reference budget; a checkpoint may also hold finals at other
    # budgets (CFG's cost at 8 and 20 steps where SG came close), listed in its report.md.
    levels = sorted({round(r["budget"], 6) for r in finals})
    ref = round(reference_budget(study, levels), 6) if levels else None
    at_ref = lambda r, ref=ref: ref is None or round(r["budget"], 6) == ref
    for r in sorted(finals, key=lambda r: (family(r), r.get("seed", s.seed), r["budget"])):
      out.append(dict(ep, kind="final", family=family(r), label=label(r),
                      seed=r.get("seed", s.seed), gmacs=r["gmacs_per_image"],
                      budget=r["budget"], reference=at_ref(r),
                      **{k: r[k] for k in (m, f"{m}_lo", f"{m}_hi", "class_accuracy",
                                           "precision", "recall", "variance_ratio") if k in r}))
    path = os.path.join(step_dir(study, step), "paired.jsonl")
    if files.exists(path):
      for r in readers.jsonl(path, "study table", f"move {path} aside and rerun"):
        out.append(dict(ep, kind="paired", a=r["a"], b=r["b"], seed=r["seed"],
                        budget=r["budget"], reference=at_ref(r),
                        **{k: r[k] for k in r if k.startswith("d_")}))
  path = os.path.join(study.out_dir, "probe.jsonl")
  if files.exists(path):
    # Every probed checkpoint, not only the studied ones: the probe is cheap, so it runs at
    # more steps (the held-out loss per doubling says when the run has converged).
    for r in readers.jsonl(path, "study table", f"move {path} aside and rerun"):
      out.append(dict(step=r["checkpoint"], epochs=epochs(study, r["checkpoint"]), kind="probe",
                      **{k: v for k, v in r.items() if k != "checkpoint"}))
  if jax.process_index() == 0 and out:
    files.makedirs(root)
    files.write_text(os.path.join(root, "trend.jsonl"),
                     "".join(json.dumps(r) + "\n" for r in out))
    files.write_text(os.path.join(root, "trend.md"), trend_report(study, out) + "\n")
  return out


def _ci(v: float, lo: float | None, hi: float | None, sign: str = "") -> str:
  return f"{v:{sign}.2f}" + ("" if lo is None else f" [{lo:{sign}.2f}, {hi:{sign}.2f}]")


def trend_report(study: Study, rows: list[dict]) -> str:
  """trend.md: each family's final score, each paired difference and the probe, by checkpoint."""
  m, seed = study.metric, study.config.study.seed
  steps = sorted({r["step"] for r in rows if r["kind"] != "probe"})
  ep = {r["step"]: r["epochs"] for r in rows}
  head = " | ".join(f"{s} ({ep[s]:.1f} ep)" for s in steps)
  out = [f"# Trend over training: {study.workdir}", "",
         f"Finals at the reference budget (seed {seed}), {m} with its 95% bootstrap interval; "
         "paired differences a − b at that budget with their 95% paired intervals (each seed); "
         "the probe at each t. Other budgets: each checkpoint's report.md.", "",
         f"## {m} by checkpoint (step, epochs)", "", f"| family | {head} |",
         "|---|" + "---|" * len(steps)]
  finals = [r for r in rows if r["kind"] == "final" and r["seed"] == seed
            and r.get("reference", True)]
  for fam in sorted({r["family"] for r in finals}, key=lambda f: (f.split()[0], f)):
    by = {r["step"]: r for r in finals if r["family"] == fam}
    out.append(f"| {fam} | " + " | ".join(
        _ci(by[s][m], by[s].get(f"{m}_lo"), by[s].get(f"{m}_hi")) if s in by else "—"
        for s in steps) + " |")
  out += ["", f"## Paired differences Δ{m} (a − b) by checkpoint", "",
          f"| a − b | seed | {head} |", "|---|---|" + "---|" * len(steps)]
  pairs = [r for r in rows if r["kind"] == "paired" and r.get("reference", True)]
  for a, b, sd in sorted({(r["a"], r["b"], r["seed"]) for r in pairs}):
    by = {r["step"]: r for r in pairs if (r["a"], r["b"], r["seed"]) == (a, b, sd)}
    d = f"d_{m}"
    out.append(f"| {a} − {b} | {sd} | " + " | ".join(
        _ci(by[s][d], by[s][d + "_lo"], by[s][d + "_hi"], "+") if s in by else "—"
        for s in steps) + " |")
  out += ["", "## Probe: ‖ΔSG‖/‖ΔCFG‖, cosine, draw noise, held-out loss at γ 0 / 0.5 / 0.9",
          "", "| step | epochs | t | ‖ΔSG‖/‖ΔCFG‖ | cosine | draw noise | loss γ0 | loss γ0.5 "
          "| loss γ0.9 |", "|---|---|---|---|---|---|---|---|---|"]
  probes = sorted((r for r in rows if r["kind"] == "probe"), key=lambda r: (r["step"], r["t"]))
  for r in probes:
    out.append(f"| {r['step']} | {r['epochs']:.2f} | {r['t']:g} | "
               f"{r['sg_diff_norm'] / r['cfg_diff_norm']:.2f} | {r['cosine']:.3f} | "
               f"{r.get('draw_noise_norm', float('nan')):.3f} | {r['loss_gamma0']:.4f} | "
               f"{r['loss_gamma0.5']:.4f} | {r['loss_gamma0.9']:.4f} |")
  out += ["", "## Convergence: held-out loss at γ 0 (mean over the probe's t), its gain per "
          "doubling of steps", "", "| step | epochs | loss γ0 | gain per doubling since the "
          "previous probed step |", "|---|---|---|---|"]
  prev = None
  for step in sorted({r["step"] for r in probes}):
    loss = float(np.mean([r["loss_gamma0"] for r in probes if r["step"] == step]))
    # No doubling from step 0 (a run started from other weights saves its start as step 0).
    gain = ("—" if prev is None or prev[0] == 0 else
            f"{100 * (1 - (loss / prev[1]) ** (1 / np.log2(step / prev[0]))):.1f}%")
    out.append(f"| {step} | {ep[step]:.2f} | {loss:.4f} | {gain} |")
    prev = (step, loss)
  return "\n".join(out)


def plot_trend(study: Study, rows: list[dict]) -> str | None:
  """trend.png: each family's final score ± 95% against epochs; the paired differences against
  epochs (0 = level); ‖ΔSG‖/‖ΔCFG‖ against epochs at each probe t."""
  import matplotlib  # Local: plotting only (absent on lean device images).
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  m, seed = study.metric, study.config.study.seed
  if not rows:
    return None
  fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
  finals = [r for r in rows if r["kind"] == "final" and r["seed"] == seed
            and r.get("reference", True)]
  fams = sorted({r["family"] for r in finals}, key=lambda f: (f.split()[0], f))
  cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
  colors = {f: cycle[i % len(cycle)] for i, f in enumerate(fams)}
  for fam in fams:
    rs = sorted((r for r in finals if r["family"] == fam), key=lambda r: r["step"])
    x, y = np.array([r["epochs"] for r in rs]), np.array([r[m] for r in rs])
    err = [[r[m] - r.get(f"{m}_lo", r[m]) for r in rs], [r.get(f"{m}_hi", r[m]) - r[m] for r in rs]]
    axes[0].errorbar(x, y, yerr=err, fmt="-o", ms=3, capsize=2, color=colors[fam], label=fam)
  axes[0].set_ylabel(f"{m} (lower is better)")
  pairs = [r for r in rows if r["kind"] == "paired" and r["seed"] == seed
           and r.get("reference", True) and " − " not in r["a"] and r["b"] != "none"
           and not r["b"].startswith("dense")]
  d = f"d_{m}"
  for i, (a, b) in enumerate(sorted({(r["a"], r["b"]) for r in pairs})):
    rs = sorted((r for r in pairs if (r["a"], r["b"]) == (a, b)), key=lambda r: r["step"])
    x = np.array([r["epochs"] for r in rs]) * (1 + 0.02 * i)  # Offset: intervals side by side.
    y = np.array([r[d] for r in rs])
    axes[1].errorbar(x, y, yerr=[y - [r[d + "_lo"] for r in rs], [r[d + "_hi"] for r in rs] - y],
                     fmt="-o", ms=3, capsize=2, label=f"{a} − {b}")
  axes[1].axhline(0, color="k", lw=0.8)
  axes[1].set_ylabel(f"Δ{m}, paired (< 0: a is better)")
  probes = sorted((r for r in rows if r["kind"] == "probe"), key=lambda r: (r["step"], r["t"]))
  for t in sorted({r["t"] for r in probes}):
    rs = sorted((r for r in probes if r["t"] == t), key=lambda r: r["step"])
    axes[2].plot([r["epochs"] for r in rs], [r["sg_diff_norm"] / r["cfg_diff_norm"] for r in rs],
                 "-o", ms=3, label=f"t={t:g}")
  axes[2].set_ylabel("‖ΔSG‖ / ‖ΔCFG‖ (probe)")
  for ax in axes:
    ax.set_xscale("log", base=2)
    ax.set_xlabel("training epochs")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  fig.tight_layout()
  path = os.path.join(study.out_dir, "trend", "trend.png")
  sweep.save_figure(fig, path)
  return path
