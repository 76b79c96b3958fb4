"""The matched comparison: each rule's best screened setting within each budget rescored with
more samples (`final`), and the paired differences that carry the verdict (`paired`)."""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import scipy.stats

from sgjax import files, readers
from sgjax.eval import frechet
from sgjax.jobs.study.search import (
  budget_levels,
  budgets,
  everywhere,
  reference_budget,
  setting_of,
)
from sgjax.jobs.study.table import (
  GAIN_PAIRS,
  PAIRS,
  Judge,
  Study,
  families_of,
  family,
  key,
  label,
)


def final(study: Study, rows: list[dict]) -> list[dict]:
  """At each budget, each rule's best screened point within it (per model: the dense twin's
  rows too, where screened), rescored with more samples at each of `final_seeds`."""
  s = study.config.study
  levels = (budget_levels(study) if s.search == "budget"
            else budgets(study, [r for r in rows if r["model"] == "main"]))
  seeds = [int(x) for x in s.final_seeds] or [int(s.seed)]
  ref = reference_budget(study, levels) if s.search == "budget" else None
  table = []
  # The reference budget first: it holds the most rows, so a study cut short still has it.
  for budget in sorted(levels, key=lambda b: (b != ref, b)):
    for model in sorted({r["model"] for r in rows}):
      for fam in [f for f in families_of(rows) if budget == ref or everywhere(study, model, f)]:
        fits = [r for r in rows if r["model"] == model and family(r) == fam
                and r["gmacs_per_image"] <= budget * 1.000001]
        if fits:
          b = setting_of(study.best(fits))
          for seed in seeds:
            p = dict(b, per_class=s.final_per_class)
            if seed != s.seed:
              p["seed"] = seed
            table.append((budget, p))
  scored = study.run([p for _, p in table], "final (matched compute)", resamples=s.bootstrap)
  by_key = {key(r): r for r in scored}
  return [dict(by_key[key(p)], budget=budget) for budget, p in table]


def pairs_of(families: list[str]) -> list[tuple]:
  """PAIRS, then each variant family's: SG with another token draw against SG and CFG;
  autoguidance (each guide) against CFG; AG+SG (each guide, constant or cosine γ) against
  autoguidance with the same guide."""
  out = list(PAIRS)
  for f in families:
    rule, *tags = f.split()
    if rule == "sg" and tags:
      out += [(f, "sg"), (f, "cfg")]
    elif rule == "ag":
      out.append((f, "cfg"))
    elif rule == "ag_sg" and (tags and tags[-1] != "cos"):
      ag = " ".join(["ag", tags[-1]])
      if (f, ag) not in out:
        out.append((f, ag))
    elif rule == "ag_sg" and tags == ["cos"]:
      out.append((f, "ag"))
  return out


def paired(study: Study, finals: list[dict]) -> list[dict]:
  """The differences that carry the verdict (`PAIRS`), each at each budget and seed: the
  estimate a − b of FD and of class accuracy with a 95% interval from a paired bootstrap — the
  same resampled sample indices for both rows, which share labels and initial noise, so the
  interval is that of the difference, not of two separate estimates.

  A pair whose rows' features are not in the study's folder (points.jsonl copied without
  features/, e.g. back from another machine) is left out with a note, and its row from an
  earlier paired.jsonl is kept rather than lost, where it pairs the same settings (a side whose
  best setting has changed since makes it an estimate of other rows: dropped, with a note)."""
  s, m = study.config.study, study.metric
  by = {(r["budget"], r["model"], family(r), r.get("seed", s.seed)): r for r in finals}
  side = lambda x: x if isinstance(x, tuple) else ("main", x)
  name = lambda x: x[1] if x[0] == "main" else f"{x[0]} {x[1]}"
  path = os.path.join(study.out_dir, "paired.jsonl")
  pair_key = lambda r: (round(r["budget"], 6), r["seed"], r["a"], r["b"])
  earlier = ({pair_key(r): r for r in readers.jsonl(path, "study table",
                                                     f"move {path} aside and rerun")}
             if files.exists(path) else {})
  out = []

  def add(row: dict, plus: list[dict], minus: list[dict]) -> None:
    if not all(files.exists(study.features_path(r)) for r in plus + minus):
      kept = earlier.get(pair_key(row))
      stale = kept is not None and (kept.get("a_label"), kept.get("b_label")) != (
          row["a_label"], row["b_label"])
      if stale:  # A side's best setting has changed since: that estimate is of other rows.
        kept = None
        del earlier[pair_key(row)]
      study.log(f"paired: ({row['a']}) − ({row['b']}) at {row['budget']:.2f} GMACs left out: "
                f"a row's features are not in {study.out_dir}/features (rescore the row to "
                "pair it)" + ("; its earlier estimate is kept" if kept else
                              "; its earlier estimate, of other settings, is dropped" if stale
                              else ""))
      if kept:
        out.append(kept)
      return
    row.update(paired_difference([study.features_of(r) for r in plus],
                                 [study.features_of(r) for r in minus], study.judge(),
                                 max(s.bootstrap, 2), row["seed"], m))
    out.append(row)

  for budget, seed in sorted({(k[0], k[3]) for k in by}):
    row_of = lambda x, budget=budget, seed=seed: by.get((budget, *side(x), seed))
    for a, b in pairs_of(families_of(finals)):
      ra, rb = row_of(a), row_of(b)
      if ra is None or rb is None:
        continue
      add(dict(budget=budget, seed=seed, a=name(side(a)), b=name(side(b)), a_label=label(ra),
               b_label=label(rb), a_gmacs=ra["gmacs_per_image"], b_gmacs=rb["gmacs_per_image"]),
          [ra], [rb])
    for (a1, a2), (b1, b2) in GAIN_PAIRS:
      r = [row_of(x) for x in (a1, a2, b1, b2)]
      if any(x is None for x in r):
        continue
      add(dict(budget=budget, seed=seed, a=f"{name(side(a1))} − {name(side(a2))}",
               b=f"{name(side(b1))} − {name(side(b2))}",
               a_label=f"{label(r[0])} − {label(r[1])}", b_label=f"{label(r[2])} − {label(r[3])}",
               a_gmacs=r[0]["gmacs_per_image"], b_gmacs=r[2]["gmacs_per_image"]),
          [r[0], r[3]], [r[1], r[2]])
  done = {pair_key(r) for r in out}
  out += [r for k, r in earlier.items() if k not in done]  # Pairs this run did not reach.
  if out and jax.process_index() == 0:
    files.write_text(path, "".join(json.dumps(r) + "\n" for r in out))
  return out


def paired_difference(plus: list[dict], minus: list[dict], judge: Judge, resamples: int,
                      seed: int, metric: str, level: float = 0.95) -> dict:
  """Σ FD(plus) − Σ FD(minus) (and accuracy), every row over the same resampled indices:
  estimate ± z·SD. One row each is a − b; two each, a difference of differences."""
  rows = plus + minus
  if not all(np.array_equal(rows[0]["labels"], f["labels"]) for f in rows):
    raise ValueError("paired rows must share their labels (same per_class and order)")  # A bug.
  dist = lambda f, idx: frechet.distance_of_features(f["features"][idx], judge.ref_mu,
                                                     judge.ref_sigma)
  diff = lambda value, idx: (sum(value(f, idx) for f in plus)
                             - sum(value(f, idx) for f in minus))
  accuracy = lambda f, idx: float(f["hits"][idx].mean())
  n = len(rows[0]["labels"])
  everything = np.arange(n)
  has_hits = all("hits" in f for f in rows)
  rng = np.random.default_rng(seed)
  draws, acc_draws = [], []
  for _ in range(resamples):
    idx = rng.integers(0, n, n)
    draws.append(diff(dist, idx))
    if has_hits:
      acc_draws.append(diff(accuracy, idx))
  z = float(scipy.stats.norm.ppf((1 + level) / 2))
  est, half = diff(dist, everything), z * float(np.std(draws, ddof=1))
  row = {f"d_{metric}": est, f"d_{metric}_lo": est - half, f"d_{metric}_hi": est + half}
  if has_hits:
    d, h = diff(accuracy, everything), z * float(np.std(acc_draws, ddof=1))
    row.update(d_class_accuracy=d, d_class_accuracy_lo=d - h, d_class_accuracy_hi=d + h)
  return row

