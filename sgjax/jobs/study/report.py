"""report.md, the plots and TensorBoard scalars of a study."""

from __future__ import annotations

import os

import numpy as np

from sgjax import metrics
from sgjax.jobs import sweep
from sgjax.jobs.study.search import budget_levels, reference_budget
from sgjax.jobs.study.table import FAMILIES, FULL, LOSS_GAMMAS, Study, families_of, family, label


def _ci(r: dict, m: str) -> str:
  if f"{m}_lo" not in r:
    return f"{r[m]:.2f}"
  return f"{r[m]:.2f} [{r[m + '_lo']:.2f}, {r[m + '_hi']:.2f}]"


def _acc(r: dict) -> str:
  if "class_accuracy" not in r:
    return "—"
  if "class_accuracy_lo" not in r:
    return f"{100 * r['class_accuracy']:.1f}%"
  return (f"{100 * r['class_accuracy']:.1f}% [{100 * r['class_accuracy_lo']:.1f}, "
          f"{100 * r['class_accuracy_hi']:.1f}]")


def report(study: Study, parts: dict[str, list[dict]]) -> str:
  """report.md: the matched comparison, the best of each rule, CFG's gain dense vs routed, the
  rules over training and the probe."""
  m = study.metric
  out = [f"# Study of {study.workdir}", "", f"Metric: {m} (lower is better), class accuracy "
         "(higher is better); GMACs per image for the whole sampler, attention included. "
         "Intervals: 95%, bootstrap over samples (FD), Wilson (accuracy).", ""]
  if parts.get("final"):
    out += ["## Matched compute: the best of each rule within each budget", "",
            f"| budget GMACs | model | rule | setting | seed | GMACs | samples | {m} | "
            "class accuracy | precision | recall | variance ratio |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in parts["final"]:
      div = " | ".join(f"{r[k]:.3f}" if k in r else "—"
                       for k in ("precision", "recall", "variance_ratio"))
      out.append(f"| {r['budget']:.2f} | {r['model']} | {family(r)} | {label(r)} | "
                 f"{r.get('seed', study.config.study.seed)} | {r['gmacs_per_image']:.2f} "
                 f"| {r['num_samples']} | {_ci(r, m)} | {_acc(r)} | {div} |")
    out.append("")
  if parts.get("paired"):
    out += ["## Paired differences (a − b; same labels, noise and seed; 95% paired bootstrap)",
            "", f"| budget GMACs | seed | a | b | a GMACs | b GMACs | Δ{m} | Δ class accuracy |",
            "|---|---|---|---|---|---|---|---|"]
    for r in parts["paired"]:
      d = f"d_{m}"
      acc = (f"{100 * r['d_class_accuracy']:+.1f} [{100 * r['d_class_accuracy_lo']:+.1f}, "
             f"{100 * r['d_class_accuracy_hi']:+.1f}]" if "d_class_accuracy" in r else "—")
      out.append(f"| {r['budget']:.2f} | {r['seed']} | {r['a']}: {r['a_label']} | {r['b']}: "
                 f"{r['b_label']} | {r['a_gmacs']:.2f} | {r['b_gmacs']:.2f} | {r[d]:+.2f} "
                 f"[{r[d + '_lo']:+.2f}, {r[d + '_hi']:+.2f}] | {acc} |")
    out.append("")
  if parts.get("screen"):
    n = parts["screen"][0]["num_samples"]
    out += [f"## Screening ({n} samples a point), best of each rule", "",
            f"| rule | setting | GMACs | {m} | class accuracy |", "|---|---|---|---|---|"]
    for fam in families_of(parts["screen"]):
      mine = [r for r in parts["screen"] if family(r) == fam]
      if mine:
        b = study.best(mine)
        out.append(f"| {fam} | {label(b)} | {b['gmacs_per_image']:.2f} | {b[m]:.2f} | "
                   f"{_acc(b)} |")
    out.append("")
  if parts.get("dense"):
    plain = lambda r: tuple(r["interval"]) == FULL and (r["rule"] == "cfg" or (
        r["rule"] == "none" and r["gamma_strong"] == 0))
    if study.config.study.search == "budget":  # Both within the reference budget.
      ref = reference_budget(study, budget_levels(study))
      within = lambda rs: [r for r in rs if plain(r) and r["gmacs_per_image"] <= ref * 1.000001]
      routed, dense = within(parts.get("screen", [])), within(parts["dense"])
      dense = [study.best([r for r in dense if r["rule"] == k]) for k in ("none", "cfg")
               if any(r["rule"] == k for r in dense)]
      routed = [study.best([r for r in routed if r["rule"] == k]) for k in ("none", "cfg")
                if any(r["rule"] == k for r in routed)]
      where = f" (the best of each within {ref:.2f} GMACs/image)"
    else:
      routed = [r for r in parts.get("screen", []) if plain(r)
                and r["steps"] == study.config.study.steps_ref]
      dense, where = parts["dense"], ""
    out += [f"## CFG's gain: dense-trained twin vs this (routed) model{where}", "",
            f"| model | unguided {m} | best CFG {m} (ω) | gain |", "|---|---|---|---|"]
    for name, rs in (("routed (this)", routed), ("dense twin", dense)):
      un = [r for r in rs if r["rule"] == "none"]
      cf = [r for r in rs if r["rule"] == "cfg"]
      if un and cf:
        b = study.best(cf)
        out.append(f"| {name} | {un[0][m]:.2f} | {b[m]:.2f} ({b['omega']:g}) | "
                   f"{un[0][m] - b[m]:.2f} |")
    out.append("")
  if parts.get("checkpoints"):
    rows = parts["checkpoints"]
    steps = sorted({r["checkpoint"] for r in rows})
    out += ["## Each rule's best setting over training", "",
            "| rule | setting | " + " | ".join(f"step {s}" for s in steps) + " |",
            "|---|---|" + "---|" * len(steps)]
    for fam in families_of(rows):
      mine = {r["checkpoint"]: r for r in rows if family(r) == fam}
      if mine:
        any_row = next(iter(mine.values()))
        out.append(f"| {fam} | {label(any_row)} | " + " | ".join(
            f"{mine[s][m]:.2f}" if s in mine else "—" for s in steps) + " |")
    out.append("")
  if parts.get("probe"):
    p0 = parts["probe"][0]
    out += [f"## Probe: SG's difference (γ {p0['gamma_strong']:g}/{p0['gamma_weak']:g}) vs CFG's",
            "", "| step | t | ‖v(c;γs)−v(c;γw)‖ | ‖v(c)−v(∅)‖ | cosine | ‖draw 1 − draw 2‖ "
            "(γw) | loss γ0 | loss γ0.5 | loss γ0.9 |", "|---|---|---|---|---|---|---|---|---|"]
    for r in parts["probe"]:
      noise = f"{r['draw_noise_norm']:.3f}" if "draw_noise_norm" in r else "—"
      out.append(f"| {r['checkpoint']} | {r['t']:g} | {r['sg_diff_norm']:.3f} | "
                 f"{r['cfg_diff_norm']:.3f} | {r['cosine']:.3f} | {noise} | "
                 f"{r['loss_gamma0']:.4f} | "
                 f"{r['loss_gamma0.5']:.4f} | {r['loss_gamma0.9']:.4f} |")
    out.append("")
  return "\n".join(out)


def _finish(fig, ax, xlabel: str, ylabel: str, path: str) -> str:
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  fig.tight_layout()
  sweep.save_figure(fig, path)
  return path


def family_colors(plt, rows: list[dict]) -> dict[str, str]:
  """A color per family: FAMILIES' six first (as every study drew them), variants after."""
  cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
  colors = dict(zip(FAMILIES, cycle[:6], strict=True))
  extra = [f for f in families_of(rows) if f not in colors]
  colors.update({f: cycle[(6 + i) % len(cycle)] for i, f in enumerate(extra)})
  return colors


def plot(study: Study, parts: dict[str, list[dict]]) -> list[str]:
  """Quality vs GMACs with each rule's Pareto front (final points with their intervals),
  quality vs training step per rule, and the probe over training."""
  import matplotlib  # Local: plotting only (absent on lean device images).
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  m, paths = study.metric, []
  colors = family_colors(plt, [r for rows in parts.values() for r in rows if "rule" in r])
  metric_names = [(m, f"{m} (lower is better)")]
  if parts.get("screen") and "class_accuracy" in parts["screen"][0]:
    metric_names.append(("class_accuracy", "class accuracy (higher is better)"))
  for name, axis in metric_names:
    if not parts.get("screen"):
      break
    fig, ax = plt.subplots(figsize=(7, 5))
    for rule in families_of(parts["screen"]):
      rows = [r for r in parts["screen"] if family(r) == rule]
      if not rows:
        continue
      xs = np.array([r["gmacs_per_image"] for r in rows])
      ys = np.array([r[name] for r in rows])
      ax.scatter(xs, ys, s=14, alpha=0.35, color=colors[rule])
      front = sweep.pareto_front(xs, ys, lower_is_better=name == m)
      ax.plot(xs[front], ys[front], "-", color=colors[rule], label=f"{rule} (Pareto front)")
    for r in parts.get("final", []):
      lo, hi = r.get(f"{name}_lo", r[name]), r.get(f"{name}_hi", r[name])
      ax.errorbar([r["gmacs_per_image"]], [r[name]], yerr=[[r[name] - lo], [hi - r[name]]],
                  fmt="D", color=colors[family(r)], mec="k", ms=6, capsize=3)
    ax.set_title("screen points (dots), Pareto fronts (lines), final points ± 95% (diamonds)",
                 fontsize=8)
    paths.append(_finish(fig, ax, "GMACs per image (whole sampler)", axis,
                         os.path.join(study.out_dir, f"{name}_vs_gmacs.png")))
  if parts.get("checkpoints"):
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for rule in families_of(parts["checkpoints"]):
      rows = sorted((r for r in parts["checkpoints"] if family(r) == rule),
                    key=lambda r: r["checkpoint"])
      if rows:
        ax.plot([r["checkpoint"] for r in rows], [r[m] for r in rows], "-o", ms=3,
                color=colors[rule], label=label(rows[0]))
    paths.append(_finish(fig, ax, "training step", f"{m} (lower is better)",
                         os.path.join(study.out_dir, f"{m}_vs_step.png")))
  if parts.get("probe"):
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    for t in sorted({r["t"] for r in parts["probe"]}):
      rows = [r for r in parts["probe"] if r["t"] == t]
      steps = [r["checkpoint"] for r in rows]
      axes[0].plot(steps, [r["sg_diff_norm"] / r["cfg_diff_norm"] for r in rows], "-o", ms=3,
                   label=f"t={t:g}")
      axes[1].plot(steps, [r["cosine"] for r in rows], "-o", ms=3, label=f"t={t:g}")
    by_step = {}
    for r in parts["probe"]:
      by_step.setdefault(r["checkpoint"], []).append(r)
    for g in LOSS_GAMMAS:
      axes[2].plot(sorted(by_step), [np.mean([r[f"loss_gamma{g:g}"] for r in by_step[s]])
                                     for s in sorted(by_step)], "-o", ms=3, label=f"γ={g:g}")
    titles = ("‖ΔSG‖ / ‖ΔCFG‖", "cosine(ΔSG, ΔCFG)", "flow-matching loss (held out, mean over t)")
    for ax, title in zip(axes, titles, strict=True):
      ax.set_title(title, fontsize=9)
      ax.set_xlabel("training step")
      ax.grid(alpha=0.3)
      ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(os.path.join(study.out_dir, "probe.png"))
    sweep.save_figure(fig, paths[-1])
  return paths


def log_tensorboard(study: Study, parts: dict[str, list[dict]]) -> None:
  """Each rule's best setting at each checkpoint as `study/<rule>/<metric>` at that step (the
  quality-vs-training-step curves beside the loss), and the matched comparison as
  `study_final/<budget>GMACs/<rule>/<metric>` at the latest step."""
  names = [study.metric, "class_accuracy"]
  by_step: dict[int, dict[str, float]] = {}
  for r in parts.get("checkpoints", []):
    by_step.setdefault(r["checkpoint"], {}).update(
        {f"{family(r)}/{m}": r[m] for m in names if m in r})
  for step, values in sorted(by_step.items()):
    metrics.log_scalars(study.workdir, step, values, "study")
  final = {f"{r['budget']:.2f}GMACs/{family(r)}/{m}": r[m] for r in parts.get("final", [])
           for m in names if m in r}
  if final:
    metrics.log_scalars(study.workdir, study.step, final, "study_final")

