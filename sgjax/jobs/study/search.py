"""The screen: which setting of each rule is best. The coordinate search (`screen`) and the fair
budget search (`screen_budget`: every point at the most steps within a budget, ω pushed past a
grid's edge until quality turns), and the dense twin's stage."""

from __future__ import annotations

import os

import numpy as np

from sgjax import checkpoint, errors
from sgjax import guidance as guidance_lib
from sgjax.jobs.study.table import (
  FULL,
  MAX_STEPS,
  SEARCHED,
  TOP_PAIRS,
  VARIANT_FIELDS,
  Study,
  families_of,
  family,
  point,
)


def guide_step(study: Study, main_step: int) -> int | None:
  """AG+SG's guide: `study.guide_step`, or the earliest kept checkpoint before `main_step`."""
  g = study.config.study.guide_step
  if g >= 0:
    if g not in study.saved:
      raise errors.UserError(f"study.guide_step = {g}", "no such checkpoint",
                             f"one of {study.saved}, or -1 (the earliest)")
    return g
  earlier = [s for s in study.saved if s < main_step]
  return earlier[0] if earlier else None


def guide_fields(study: Study, rule: str, step: int) -> dict | None:
  """A rule's extra point fields: AG+SG's guide checkpoint ({} for the others; None, said once,
  where there is no checkpoint before `step` to guide with)."""
  if not guidance_lib.uses_guide(rule):
    return {}
  g = guide_step(study, step)
  if g is None:
    study.log(f"screen: {rule} left out: no checkpoint before step {step} to guide with")
    return None
  return {"guide_step": g}


def guide_for(study: Study, spec: float, main_step: int) -> int | None:
  """AG's guide for `main_step`: the kept checkpoint `spec` (>= 1), or the kept checkpoint
  before `main_step` nearest (in log steps) to the share `spec` < 1 of it (autoguidance's
  recipe: a guide trained ≈ 1/16 as long); None where there is none before `main_step`."""
  earlier = [s for s in study.saved if 0 < s < main_step]
  if spec >= 1:
    return int(spec) if int(spec) in earlier else None
  if not earlier:
    return None
  return min(earlier, key=lambda s: (abs(np.log(s / (spec * main_step))), s))


def guide_tag(spec: float) -> str:
  """A guide choice's name in family names: "g@500" (a step), "g/16" (a share)."""
  return f"g@{int(spec)}" if spec >= 1 else f"g/{1 / spec:g}"


def variants(study: Study, rule: str, step: int) -> list[dict]:
  """The variants a rule is searched in, as extra point fields: SG at each of `token_draws`;
  a guide rule at each of `guides` (tagged), or at `guide_step` (untagged); one ({}) else."""
  s = study.config.study
  if rule == "sg":
    return [{} if d == "step" else {"token_draw": d} for d in s.token_draws]
  if not guidance_lib.uses_guide(rule):
    return [{}]
  if not s.guides:
    extra = guide_fields(study, rule, step)
    return [] if extra is None else [extra]
  out = []
  for spec in s.guides:
    g = guide_for(study, float(spec), step)
    same = [o["guide"] for o in out if o["guide_step"] == g]
    if g is None:
      study.log(f"screen: {rule} {guide_tag(spec)} left out: no such checkpoint before {step}")
    elif same:  # Two choices, one guide (g/16 of 8000 is step 500): the same points twice.
      study.log(f"screen: {rule} {guide_tag(spec)} is {same[0]} at step {step} (guide {g}): "
                f"searched once, as {same[0]}")
    else:
      out.append({"guide_step": g, "guide": guide_tag(spec)})
  return out


def screen(study: Study) -> list[dict]:
  s, step = study.config.study, study.step
  at = dict(checkpoint_step=step, per_class=s.per_class)
  rows = study.run([point("none", 1, g, 0, s.steps_ref, **at) for g in s.unguided_gammas],
                   "screen, unguided")
  best = study.best(rows)
  rows += study.run([point("none", 1, best["gamma_strong"], 0, n, **at) for n in s.steps],
                    "screen, unguided steps")
  if "cfg" in s.rules:
    cfg = study.run([point("cfg", w, 0, 0, n, **at) for w in s.cfg_omegas for n in s.steps],
                    "screen, CFG")
    best = study.best([r for r in cfg if r["steps"] == s.steps_ref] or cfg)
    rows += cfg + study.run([point("cfg", best["omega"], 0, 0, best["steps"], interval=iv, **at)
                             for iv in s.cfg_intervals], "screen, CFG intervals")
  pairs = [(a, b) for a in s.gammas_strong for b in s.gammas_weak if a < b]

  def search(rule: str, tried: list[tuple[float, float]], extra: dict, what: str) -> list[dict]:
    """γ pairs at omega_ref, then ω at the best pair, then steps at the best ω."""
    grid = study.run([point(rule, s.omega_ref, a, b, s.steps_ref, **at, **extra)
                      for a, b in tried], f"screen, {what} γ pairs")
    b = study.best(grid)
    line = study.run([point(rule, w, b["gamma_strong"], b["gamma_weak"], s.steps_ref, **at,
                            **extra) for w in s.omegas], f"screen, {what} ω")
    b = study.best(grid + line)
    return grid + line + study.run(
        [point(rule, b["omega"], b["gamma_strong"], b["gamma_weak"], n, **at, **extra)
         for n in s.steps], f"screen, {what} steps")

  sg_grid = None
  for rule in [r for r in SEARCHED if r in s.rules]:
    extra = guide_fields(study, rule, step)
    if extra is None:
      continue
    tried = pairs
    if rule != "sg" and sg_grid:
      tried = [(r["gamma_strong"], r["gamma_weak"])
               for r in sorted(sg_grid, key=lambda r: r[study.metric])[:TOP_PAIRS]]
    found = search(rule, tried, extra, rule)
    if rule == "sg":
      sg_grid = [r for r in found if r["omega"] == s.omega_ref and r["steps"] == s.steps_ref]
    rows += found
    if guidance_lib.uses_guide(rule):
      rows += search(rule, [(0.0, 0.0)], extra, "ag (autoguidance alone)")
  return rows


def fit_steps(study: Study, p: dict | None, budget: float) -> dict | None:
  """`p` at the most Euler steps whose whole sampler costs at most `budget` GMACs per image
  (None where one step does not fit): every rule gets the whole budget, not a fixed list."""
  if p is None:
    return None
  at = lambda n: dict(p, steps=int(n))
  fits = lambda n: study.gmacs(at(n)) <= budget * 1.000001
  if not fits(1):
    return None
  lo, hi = 1, 2
  while hi <= MAX_STEPS and fits(hi):
    lo, hi = hi, 2 * hi
  hi = min(hi, MAX_STEPS + 1)
  while hi - lo > 1:  # fits(lo), not fits(hi): cost grows with steps.
    mid = (lo + hi) // 2
    lo, hi = (mid, hi) if fits(mid) else (lo, mid)
  return at(lo)


def budget_levels(study: Study) -> list[float]:
  """The budget search's levels: `study.budgets`, or CFG's cost at each of `study.steps`."""
  s = study.config.study
  if s.budgets:
    return sorted(float(b) for b in s.budgets)
  at = dict(checkpoint_step=study.step, per_class=s.per_class)
  return sorted(round(study.gmacs(point("cfg", 2.0, 0, 0, n, **at)), 6) for n in s.steps)


def reference_budget(study: Study, levels: list[float]) -> float:
  ref = float(study.config.study.budget_ref)
  return ref if ref > 0 else levels[len(levels) // 2]


def top(study: Study, rows: list[dict], n: int) -> list[dict]:
  return sorted(rows, key=lambda r: r[study.metric])[:n]


def screen_budget(study: Study, model: str = "main") -> list[dict]:
  """The fair search: at the reference budget every setting runs at the most steps that fit;
  ω × γ pairs (and CFG's ω × intervals) jointly on the configured grid, then the guidance
  intervals at each rule's best; each family's `top_settings` best are refit at the other
  budgets. The same for every rule, so no rule is searched more than another."""
  s = study.config.study
  step = (checkpoint.saved_steps(os.path.join(s.dense_workdir, "checkpoints"))[-1]
          if model == "dense" else study.step)
  at = dict(checkpoint_step=step, per_class=s.per_class, model=model)
  levels = budget_levels(study)
  ref = reference_budget(study, levels)
  fit = lambda ps: [fit_steps(study, p, ref) for p in ps]
  tag = "" if model == "main" else f" ({model} twin)"
  rows = study.run(fit([point("none", 1, g, 0, 1, **at) for g in
                        (s.unguided_gammas if model == "main" else (0.0,))]),
                   f"screen{tag} @ {ref:.2f} GMACs, unguided")
  ivs = (FULL, *s.cfg_intervals)
  rules = [r for r in s.rules if model == "main" or r == "cfg"]
  if "cfg" in rules:
    rows += study.run(fit([point("cfg", w, 0, 0, 1, interval=iv, **at)
                           for w in s.cfg_omegas for iv in ivs]),
                      f"screen{tag} @ {ref:.2f} GMACs, CFG ω × intervals")
  pairs = [(a, b) for a in s.gammas_strong for b in s.gammas_weak if a < b]
  best_pairs = None

  def grid(rule, omegas, tried, extra, what):
    found = study.run(fit([point(rule, w, a, b, 1, **at, **extra) for w in omegas
                           for a, b in tried]), f"screen @ {ref:.2f} GMACs, {what} ω × γ")
    if not found:
      return []
    b = study.best(found)
    return found + study.run(fit([point(rule, b["omega"], b["gamma_strong"], b["gamma_weak"], 1,
                                        interval=iv, **at, **extra) for iv in s.cfg_intervals]),
                             f"screen @ {ref:.2f} GMACs, {what} intervals")

  for rule in [r for r in SEARCHED if r in rules]:
    for extra in variants(study, rule, step):
      tried, omegas = pairs, s.omegas
      if rule != "sg":  # CFG-scale rules: CFG's ω grid, SG's best pairs.
        omegas = s.cfg_omegas
        if best_pairs:
          tried = best_pairs
      what = " ".join([rule, *(str(extra[k]) for k in ("token_draw", "guide") if k in extra)])
      found = grid(rule, omegas, tried, extra, what)
      if rule == "sg" and not extra and found:
        by_pair = {}
        for r in found:
          k = (r["gamma_strong"], r["gamma_weak"])
          by_pair[k] = min(by_pair.get(k, np.inf), r[study.metric])
        best_pairs = sorted(by_pair, key=by_pair.get)[:TOP_PAIRS]
      rows += found
      if guidance_lib.uses_guide(rule):
        tag_g = f" {extra['guide']}" if "guide" in extra else ""
        rows += grid(rule, s.cfg_omegas, [(0.0, 0.0)], extra, "ag (autoguidance alone)" + tag_g)
        if s.ag_cosine:  # The paper's AG+SG: γ on a cosine schedule, only ω searched.
          gs0, gs1, gw0, gw1 = (float(g) for g in s.ag_cosine)
          rows += grid(rule, s.cfg_omegas, [(gs0, gw0)],
                       dict(extra, schedule="cosine", gamma_strong_end=gs1, gamma_weak_end=gw1),
                       "ag_sg cosine" + tag_g)
  # γ_weak, then ω, then γ_weak again at the ω found (each a no-op where already bracketed).
  rows += bracket_gamma(study, rows, ref, tag)
  rows += bracket_omega(study, rows, ref, tag)
  rows += bracket_gamma(study, rows, ref, tag)
  refit = []
  for fam in [f for f in families_of(rows) if everywhere(study, model, f)]:
    mine = [r for r in rows if family(r) == fam]
    for b in levels:
      if b != ref:
        refit += [fit_steps(study, setting_of(r), b)
                  for r in top(study, mine, int(s.top_settings))]
  return rows + study.run(refit, f"screen{tag}, the best settings at the other budgets")


OMEGA_STEP = 1.5
OMEGA_FLOOR = 1.1  # Where the push toward 1 stops: ω 1 itself is unguided sampling.
GAMMA_STEP = 0.1


def bracket_gamma(study: Study, rows: list[dict], budget: float, tag: str = "") -> list[dict]:
  """Where a sparse family's best γ_weak is the edge of the γ_weak it was tried at (at its ω,
  γ_strong and interval), γ_weak is pushed past that edge (GAMMA_STEP lower or higher; above
  0.9 halfway to 1) until quality turns, up to `study.gamma_extensions` times: the optimum
  moves with training."""
  added = []
  for fam in families_of(rows):
    mine = [r for r in rows if family(r) == fam]
    b = guidance_lib.RULE_BRANCHES[mine[0]["rule"]]
    if not (b.weak and b.sparse) or fam.split()[0] == "ag" or "schedule" in mine[0]:
      continue
    for _ in range(int(study.config.study.gamma_extensions)):
      best = study.best(mine)
      same = lambda r, best=best: (r["omega"] == best["omega"] and r["interval"] == best["interval"]
                                   and r["gamma_strong"] == best["gamma_strong"])
      tried = sorted({r["gamma_weak"] for r in mine if same(r)})
      if best["gamma_weak"] == tried[0] and round(best["gamma_weak"] - GAMMA_STEP, 4) > max(
          best["gamma_strong"], 0.0):
        gamma = round(best["gamma_weak"] - GAMMA_STEP, 4)
      elif best["gamma_weak"] == tried[-1] and best["gamma_weak"] < 0.99:
        g = best["gamma_weak"]
        gamma = round(g + GAMMA_STEP if g + GAMMA_STEP < 0.9 + 1e-9 else (1 + g) / 2, 4)
      else:
        break  # Bracketed: a worse γ_weak on each side (or at the range's end).
      p = fit_steps(study, dict(setting_of(best), gamma_weak=gamma), budget)
      new = study.run([p], f"screen{tag} @ {budget:.2f} GMACs, {fam} γ_weak past the grid's edge")
      if not new:
        break
      mine, added = mine + new, added + new
  return added


def bracket_omega(study: Study, rows: list[dict], budget: float, tag: str = "") -> list[dict]:
  """Where a guided family's best ω is the edge of the ω it was tried at, ω is pushed past that
  edge (× or ÷ 1.5, at the best setting's γ pair and interval; where ÷ 1.5 would reach ω 1,
  unguided, halfway to 1) until quality turns, up to `study.omega_extensions` times: the optimum is
  then bracketed, not assumed to lie inside the configured grid. CFG-scale grids start at 1.5,
  so without the step toward 1 a family whose best is ω 1.5 (autoguidance, AG+SG) would be
  bracketed from above only."""
  added = []
  for fam in families_of(rows):
    mine = [r for r in rows if family(r) == fam]
    if not mine or not guidance_lib.RULE_BRANCHES[mine[0]["rule"]].weak:
      continue
    for _ in range(int(study.config.study.omega_extensions)):
      best = study.best(mine)
      tried = sorted({r["omega"] for r in mine if r["gamma_strong"] == best["gamma_strong"] and
                      r["gamma_weak"] == best["gamma_weak"] and r["interval"] == best["interval"]})
      if best["omega"] == tried[-1]:
        omega = best["omega"] * OMEGA_STEP
      elif best["omega"] == tried[0] and best["omega"] > OMEGA_FLOOR:
        w = best["omega"]
        omega = w / OMEGA_STEP if w / OMEGA_STEP > 1 else (1 + w) / 2
      else:
        break  # Bracketed: a worse ω on each side.
      p = fit_steps(study, dict(setting_of(best), omega=round(omega, 4)), budget)
      new = study.run([p], f"screen{tag} @ {budget:.2f} GMACs, {fam} ω past the grid's edge")
      if not new:
        break
      mine, added = mine + new, added + new
  return added


def everywhere(study: Study, model: str, fam: str) -> bool:
  """Whether a family is compared at every budget, not at the reference budget only
  (`final_families`: main-model families; () = all, the twin included)."""
  f = study.config.study.final_families
  return not f or (model == "main" and fam in f)


POINT_FIELDS = ("rule", "omega", "gamma_strong", "gamma_weak", "steps", "interval", "guide_step",
                "checkpoint", "per_class", "model")


def setting_of(r: dict) -> dict:
  """A scored row's point: its fields without the scores (variant fields where present)."""
  return {k: r[k] for k in (*POINT_FIELDS, *VARIANT_FIELDS) if k in r}


def budgets(study: Study, rows: list[dict]) -> list[float]:
  s = study.config.study
  if s.budgets:
    return sorted(float(b) for b in s.budgets)
  return sorted({round(r["gmacs_per_image"], 6) for r in rows
                 if r["rule"] == "cfg" and tuple(r["interval"]) == FULL})



def dense_stage(study: Study, rows: list[dict]) -> list[dict]:
  s = study.config.study
  if not s.dense_workdir:
    study.log("dense: left out (study.dense_workdir = '')")
    return []
  if s.search == "budget":
    return screen_budget(study, "dense")
  dense_steps = checkpoint.saved_steps(os.path.join(s.dense_workdir, "checkpoints"))
  at = dict(checkpoint_step=dense_steps[-1], per_class=s.per_class, model="dense")
  return study.run([point("none", 1, 0, 0, s.steps_ref, **at)]
                   + [point("cfg", w, 0, 0, s.steps_ref, **at) for w in s.cfg_omegas],
                   "dense twin")

