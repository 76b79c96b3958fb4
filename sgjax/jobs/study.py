"""Where does Sparse Guidance beat CFG? The guidance rules compared at matched compute.

  python -m sgjax.jobs.study --config=configs/fashion_mnist_study.py --workdir=DIR \
      [--config.study.dense_workdir=DENSE_DIR] [--config.study.stages="(…)"]

Stages (`study.stages`, each resumable: every scored point is one JSON line of
`<workdir>/study/points.jsonl`, and a point already there is never sampled again):

  screen       at the latest checkpoint, `study.per_class` samples per class a point:
               unguided (rule none) at each γ of `unguided_gammas` (the paper's Fig. 4),
               then `steps` at the best γ;
               CFG at every ω × steps, and with each guidance interval at its best ω;
               SG, CFG+SG and AG+SG searched coordinate-wise: γ_strong × γ_weak at `omega_ref`
               and `steps_ref` (CFG+SG and AG+SG over SG's 3 best pairs; AG+SG also at γ 0/0,
               autoguidance alone), then ω at the best pair, then steps at the best ω.
  final        the matched comparison: at each compute level (`budgets` GMACs/image, default
               CFG's at each steps), the best screened setting of each rule within it, scored
               again with `final_per_class` samples per class and a 95% interval (bootstrap).
  checkpoints  each rule's best setting at every checkpoint of `checkpoints` (the paper's
               Fig. 5: quality vs training step).
  dense        `dense_workdir`, a dense-trained twin: unguided and CFG over `cfg_omegas`,
               beside the same on this model (the paper's Fig. 2: CFG's gain on each).
  probe        the mechanism at each checkpoint, on held-out images at each t of `probe_ts`:
               ‖v(c;γs) − v(c;γw)‖ against ‖v(c) − v(∅)‖ and their cosine, and the flow
               matching loss at γ 0 / 0.5 / 0.9 (pixel data only).

Every point samples the same labels with the same seed (common random numbers: differences
between settings are not sampling noise of the seed). The judge is FD-FMNIST and class
accuracy for Fashion-MNIST, else FID in the Inception network of `eval.inception_weights`
against `eval.reference` (docs/eval.md). `report.md` and the plots go beside the table.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import scipy.stats
from absl import flags, logging
from ml_collections import config_flags

from sgjax import (
  checkpoint,
  errors,
  files,
  flops,
  flow,
  generate,
  lock,
  metrics,
  platform,
  sharding,
  validation,
)
from sgjax import config as config_lib
from sgjax import guidance as guidance_lib
from sgjax import state as state_lib
from sgjax import workdir as workdir_lib
from sgjax.convert import inception_fid
from sgjax.data import pipeline
from sgjax.eval import fmnist, frechet, inception
from sgjax.eval import metrics as eval_metrics
from sgjax.jobs import evaluate, sweep
from sgjax.sparsity import Sparsity

STAGES = ("screen", "final", "checkpoints", "dense", "probe")
SEARCHES = ("coordinate", "budget")
ALL_RULES = guidance_lib.RULES
# What the tables compare: the rules, and AG+SG at γ 0/0 apart ("ag": autoguidance alone, both
# branches dense, the control that says how much of AG+SG is the guide).
FAMILIES = (*ALL_RULES, "ag")
# Rules searched over γ pairs: two branches, sparsity a choice.
SEARCHED = tuple(r for r, b in guidance_lib.RULE_BRANCHES.items() if b.weak and b.sparse)
TOP_PAIRS = 3  # CFG+SG and AG+SG start from SG's best γ pairs (the grid costs 20 points).
LOSS_GAMMAS = (0.0, 0.5, 0.9)
FULL = (0.0, 1.0)
MAX_STEPS = 1000  # The budget search's ceiling on Euler steps.
# The differences that carry the verdict (paired: same labels, noise and seed): (a, b) means a − b,
# families of the main model, or ("dense", family) for the twin.
PAIRS = (("sg", "cfg"), ("cfg_sg", "cfg"), ("ag_sg", "ag"), ("sg", "none"), ("cfg", "none"),
         (("dense", "cfg"), ("dense", "none")),  # CFG's gain on each model (the premise).
         ("none", ("dense", "none")), ("cfg", ("dense", "cfg")))  # Routed − dense.
# Differences of two such differences, each side (x, y) meaning x − y: CFG's gain on the routed
# model minus its gain on the dense twin (the paper's premise: a routed model gains less).
GAIN_PAIRS = ((("cfg", "none"), (("dense", "cfg"), ("dense", "none"))),)


def family(r: dict) -> str:
  dense_ag = r["rule"] == "ag_sg" and r["gamma_strong"] == 0 and r["gamma_weak"] == 0
  return "ag" if dense_ag else r["rule"]


def check(config: ml_collections.ConfigDict) -> None:
  """The study's own fields (this module owns `config.study`); one line per refusal."""
  s = config.study

  def need(ok: bool, field: str, what: str, allowed: str) -> None:
    if not ok:
      raise errors.UserError(f"study.{field} = {s[field]!r}", what, allowed)

  need(len(s.stages) > 0 and set(s.stages) <= set(STAGES), "stages", "unknown or no stage",
       f"a subset of {STAGES}")
  need(len(s.rules) > 0 and set(s.rules) <= set(ALL_RULES) - {"none"}, "rules",
       "unknown or no rule", f"a subset of {ALL_RULES[1:]} (unguided always runs)")
  for name in ("per_class", "final_per_class", "steps_ref", "probe_images", "probe_draws"):
    need(int(s[name]) >= 1, name, "must be >= 1", "a positive integer")
  need(s.final_per_class * config.data.num_classes >= 2, "final_per_class", "too few samples",
       "at least 2 samples (a covariance)")
  need(s.bootstrap >= 0, "bootstrap", "must be >= 0", "resamples for the intervals (0 = none)")
  need(len(s.steps) > 0 and all(int(n) >= 1 for n in s.steps), "steps", "empty or < 1",
       "sampler step counts >= 1")
  for name in ("cfg_omegas", "omegas"):
    need(len(s[name]) > 0, name, "empty", "at least one ω")
  need(len(s.gammas_strong) > 0 and all(0 <= g < 1 for g in s.gammas_strong), "gammas_strong",
       "empty or outside [0, 1)", "γ values in [0, 1)")
  need(len(s.gammas_weak) > 0 and all(0 < g < 1 for g in s.gammas_weak), "gammas_weak",
       "empty or outside (0, 1)", "γ values in (0, 1)")
  need(any(a < b for a in s.gammas_strong for b in s.gammas_weak), "gammas_weak",
       "no γ_weak above any γ_strong", "SG needs γ_strong < γ_weak")
  need(all(0 <= g < 1 for g in s.unguided_gammas), "unguided_gammas", "outside [0, 1)",
       "γ values in [0, 1)")
  need(all(len(iv) == 2 and 0 <= iv[0] < iv[1] <= 1 for iv in s.cfg_intervals),
       "cfg_intervals", "not (lo, hi) with 0 <= lo < hi <= 1", "pairs of t (0 noise, 1 data)")
  need(all(0 < t < 1 for t in s.probe_ts), "probe_ts", "outside (0, 1)", "t values in (0, 1)")
  need(all(b > 0 for b in s.budgets), "budgets", "must be > 0", "GMACs per image")
  need(s.search in SEARCHES, "search", "unknown search", f"one of {SEARCHES}")
  need(set(s.final_families) <= set(FAMILIES), "final_families", "unknown family",
       f"a subset of {FAMILIES} (() = all)")
  need(s.budget_ref >= 0, "budget_ref", "must be >= 0", "GMACs per image (0 = the middle budget)")
  need(int(s.top_settings) >= 1, "top_settings", "must be >= 1", "a positive integer")
  need(int(s.omega_extensions) >= 0, "omega_extensions", "must be >= 0", "0 (off) or more")
  need(len(s.probe_gammas) in (0, 2) and (not s.probe_gammas or 0 <= s.probe_gammas[0]
                                           < s.probe_gammas[1] < 1), "probe_gammas",
       "not (γs, γw) with 0 <= γs < γw < 1", "() or a (γs, γw) pair")
  if "dense" in s.stages and s.dense_workdir and not files.exists(
      os.path.join(s.dense_workdir, "checkpoints")):
    raise errors.UserError(f"study.dense_workdir = {s.dense_workdir!r}", "no checkpoints there",
                           "a workdir trained with --config.sparsity.routes='()' (or '' to "
                           "leave the dense stage out)")
  if config.model.kind != "dit":
    raise errors.UserError(f"model.kind = {config.model.kind!r}", "the study samples class "
                           "labels", "a class-conditional model (model.kind 'dit')")


# ---------------------------------------------------------------------------------------------
# Points and their scores.

def point(rule: str, omega: float, gamma_strong: float, gamma_weak: float, steps: int, *,
          checkpoint_step: int, per_class: int, interval=FULL, guide_step: int = -1,
          model: str = "main") -> dict | None:
  """One setting, with the fields its rule ignores collapsed (None: the rule refuses it)."""
  s = guidance_lib.setting(rule, omega, gamma_strong, gamma_weak)
  if s is None:
    return None
  if not guidance_lib.RULE_BRANCHES[rule].weak:
    interval = FULL
  return dict(s, steps=int(steps), interval=[float(v) for v in interval],
              guide_step=int(guide_step) if guidance_lib.uses_guide(rule) else -1,
              checkpoint=int(checkpoint_step), per_class=int(per_class), model=model)


def key(p: dict) -> tuple:
  # "seed" only on points sampled with another seed than study.seed (the final's second seed).
  return (p["model"], p["checkpoint"], p["per_class"], *sweep.point_key(p), *p["interval"],
          p["guide_step"], p.get("seed"))


def label(p: dict) -> str:
  b = guidance_lib.RULE_BRANCHES[p["rule"]]
  out = p["rule"]
  if b.weak:
    out += f" ω={p['omega']:g}"
  if b.sparse:
    out += f" γ={p['gamma_strong']:g}" + (f"/{p['gamma_weak']:g}" if b.weak else "")
  if tuple(p["interval"]) != FULL:
    out += f" interval={p['interval'][0]:g}-{p['interval'][1]:g}"
  if p["guide_step"] >= 0:
    out += f" guide@{p['guide_step']}"
  return out + f" {p['steps']} steps"


@dataclasses.dataclass
class Judge:
  """Scores uint8 images: a Fréchet distance to fixed reference statistics and, where the
  feature net is a classifier of the data's classes, class accuracy; with the reference's own
  features (`ref_features`, `ref_labels`), diversity beside fidelity on the final points."""

  metric: str  # The row key of the distance: fd_fmnist | fid.
  features: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray | None]]  # (feats, logits)
  ref_mu: np.ndarray
  ref_sigma: np.ndarray
  ref_features: np.ndarray | None = None
  ref_labels: np.ndarray | None = None

  def score(self, images: np.ndarray, labels: np.ndarray, resamples: int, seed: int
            ) -> tuple[dict, np.ndarray, np.ndarray | None]:
    """(row of scores, features, per-sample class hits or None)."""
    feats, logits = self.features(images)
    row = {self.metric: frechet.distance_of_features(feats, self.ref_mu, self.ref_sigma),
           "num_samples": int(len(images))}
    if resamples:
      lo, hi = frechet.bootstrap_interval(feats, self.ref_mu, self.ref_sigma,
                                          resamples=resamples, seed=seed)
      row.update({f"{self.metric}_lo": lo, f"{self.metric}_hi": hi})
      if self.ref_features is not None:
        row.update(diversity(feats, labels, self.ref_features, self.ref_labels, seed))
    hits = None
    if logits is not None:
      hits = logits.argmax(-1) == labels
      row["class_accuracy"] = float(hits.mean())
      if resamples:
        row["class_accuracy_lo"], row["class_accuracy_hi"] = frechet.proportion_interval(hits)
    return row, feats, hits


def diversity(feats: np.ndarray, labels: np.ndarray, ref_feats: np.ndarray,
              ref_labels: np.ndarray, seed: int, k: int = 3) -> dict:
  """Precision and recall (k-NN manifolds, k = 3) against as many reference images as samples
  (a fixed random subset: recall depends on the sample count), and the mean over classes of
  the samples' per-class feature variance (trace of the covariance) relative to the
  reference's: the paper's claim that SG keeps the conditional prediction's variance."""
  pick = np.random.default_rng(seed).permutation(len(ref_feats))[:len(feats)]
  precision, recall = eval_metrics.precision_recall(ref_feats[pick], feats, k=k)
  ratios = [np.var(feats[labels == c], axis=0, ddof=1).sum()
            / np.var(ref_feats[ref_labels == c], axis=0, ddof=1).sum()
            for c in np.unique(labels) if (labels == c).sum() >= 2]
  return dict(precision=precision, recall=recall, variance_ratio=float(np.mean(ratios)))


def judge_for(config: ml_collections.ConfigDict, workdir: str, mesh, log) -> Judge:
  """FD-FMNIST + class accuracy on Fashion-MNIST; otherwise Inception FID (eval.*)."""
  if config.data.name == "fashion_mnist":
    clf, (mu, sigma), (test_images, test_labels) = fmnist.for_workdir(config.data, workdir,
                                                                       log=log)
    test_feats = fmnist.apply_in_batches(clf, test_images)[0]
    return Judge("fd_fmnist", lambda x: fmnist.apply_in_batches(clf, x), mu, sigma,
                 np.asarray(test_feats), np.asarray(test_labels))
  e = config.eval
  if e.feature_net != "inception":
    raise errors.UserError(f"eval.feature_net = {e.feature_net!r}", f"data.name = "
                           f"{config.data.name!r} is not Fashion-MNIST",
                           "'inception' with eval.inception_weights and eval.reference")
  evaluate.check_inputs(e)  # The weights file and the reference, as --mode=eval checks them.
  variables = inception_fid.load_variables(e.inception_weights)
  ref = evaluate.reference_statistics(e, variables, mesh, os.path.join(workdir, "eval"))

  def features(images):
    feats = inception.features_of_array(variables, images, mesh, batch_size=e.batch_size,
                                        preprocess_mode=e.preprocess, what="samples")
    return feats["pool"], None
  return Judge("fid", features, ref["mu"], ref["sigma"])


class Study:
  """The points table of one study and what scoring a point needs (weights, judge, mesh)."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str, log=metrics.print0):
    self.config, self.workdir, self.log = config, workdir, log
    self.mesh = sharding.build_mesh(config.mesh)
    self.out_dir = os.path.join(workdir, "study")
    self.path = os.path.join(self.out_dir, "points.jsonl")
    self.rows = {key(r): r for r in sweep.load_results(self.path)}
    self._judge, self._weights = None, {}
    self.saved = checkpoint.saved_steps(os.path.join(workdir, "checkpoints"))
    if not self.saved:
      raise errors.UserError(os.path.join(workdir, "checkpoints"), "no checkpoint there",
                             "train first (--mode=train) or point --workdir at a trained run")

  def model_config(self, model: str) -> tuple[ml_collections.ConfigDict, str]:
    if model == "main":
      return self.config, self.workdir
    return config_lib.replace(self.config, {"sparsity.routes": ()}), self.config.study.dense_workdir

  def point_config(self, p: dict) -> ml_collections.ConfigDict:
    base, workdir = self.model_config(p["model"])
    return config_lib.replace(base, {
        "sample.steps": p["steps"], "sample.num_samples": 0, "sample.guidance.schedule":
        "constant", "sample.guidance.interval": tuple(p["interval"]),
        "sample.guidance.guide_step": p["guide_step"], "sample.guidance.guide_workdir": workdir,
        **{f"sample.guidance.{k}": p[k] for k in ("rule", "omega", "gamma_strong",
                                                  "gamma_weak")}})

  def params(self, model: str, step: int):
    """(model, EMA params) of a checkpoint; the last few are kept (points reuse them)."""
    k = (model, step)
    if k not in self._weights:
      if len(self._weights) >= 4:
        self._weights.pop(next(iter(self._weights)))
      c, workdir = self.model_config(model)
      net, params, _ = state_lib.restore_params(c, workdir, self.mesh,
                                                ema=c.sample.use_ema, step=step)
      self._weights[k] = (net, params)
    return self._weights[k]

  @property
  def metric(self) -> str:
    return self.judge().metric

  def judge(self) -> Judge:
    if self._judge is None:
      self._judge = judge_for(self.config, self.workdir, self.mesh, self.log)
    return self._judge

  def run(self, points: list[dict | None], what: str, resamples: int = 0) -> list[dict]:
    """The rows of `points` (None entries dropped), scoring the ones not in the table."""
    points = list({key(p): p for p in points if p is not None}.values())
    todo = [p for p in points if key(p) not in self.rows]
    if todo:
      self.log(f"{what}: {len(points) - len(todo)} of {len(points)} points done, "
               f"{len(todo)} to go")
    for i, p in enumerate(todo):
      self.rows[key(p)] = row = self.score(p, resamples)
      if jax.process_index() == 0:  # Rewritten whole: a bucket object cannot be appended to.
        files.makedirs(self.out_dir)
        files.write_text(self.path, "".join(json.dumps(r) + "\n" for r in self.rows.values()))
      ci = (f" [{row[self.metric + '_lo']:.2f}, {row[self.metric + '_hi']:.2f}]"
            if resamples else "")
      acc = f", acc {100 * row['class_accuracy']:.1f}%" if "class_accuracy" in row else ""
      self.log(f"  [{i + 1}/{len(todo)}] {p['model']}@{p['checkpoint']} {label(p)}: "
               f"{self.metric} {row[self.metric]:.2f}{ci}{acc}, "
               f"{row['gmacs_per_image']:.2f} GMACs/image, {row['seconds']:.0f} s")
    return [self.rows[key(p)] for p in points]

  def gmacs(self, p: dict) -> float:
    """GMACs per image of a point's whole sampler (attention included)."""
    c = self.point_config(p)
    return flops.plan_macs(c, guidance_lib.config_plan(c)).with_attention / 1e9

  def score(self, p: dict, resamples: int) -> dict:
    c = self.point_config(p)
    plan = guidance_lib.config_plan(c)
    seed = p.get("seed", self.config.study.seed)
    t0 = time.perf_counter()
    with jax.set_mesh(self.mesh):
      net, params = self.params(p["model"], p["checkpoint"])
      weights = {guidance_lib.MAIN: params}
      if guidance_lib.uses_guide(p["rule"]):
        weights[guidance_lib.GUIDE] = self.params(p["model"], p["guide_step"])[1]
      labels = generate.class_labels(net.num_classes, p["per_class"])
      images = generate.images(c, net, weights, labels, plan, self.mesh, seed)
    seconds = time.perf_counter() - t0
    macs = flops.plan_macs(c, plan)
    row, feats, hits = self.judge().score(images, labels, resamples, seed)
    if resamples and jax.process_index() == 0:  # Kept for the paired differences.
      files.makedirs(os.path.dirname(self.features_path(p)))
      files.save_npz(self.features_path(p), features=feats, labels=labels,
                     **({"hits": hits} if hits is not None else {}))
    return dict(p, **row, gmacs_per_image=macs.with_attention / 1e9,
                gmacs_per_image_linear=macs.linear_only / 1e9, seconds=seconds)

  def features_path(self, p: dict) -> str:
    digest = hashlib.sha1(json.dumps(key(p)).encode()).hexdigest()[:16]
    return os.path.join(self.out_dir, "features", f"{digest}.npz")

  def features_of(self, p: dict) -> dict[str, np.ndarray]:
    return files.load_npz(self.features_path(p))

  def best(self, rows: list[dict]) -> dict:
    return min(rows, key=lambda r: r[self.metric])


# ---------------------------------------------------------------------------------------------
# Stages.

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


def screen(study: Study) -> list[dict]:
  s, step = study.config.study, study.saved[-1]
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
  at = dict(checkpoint_step=study.saved[-1], per_class=s.per_class)
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
  steps_of = (checkpoint.saved_steps(os.path.join(s.dense_workdir, "checkpoints"))
              if model == "dense" else study.saved)
  step = steps_of[-1]
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
    extra = guide_fields(study, rule, step)
    if extra is None:
      continue
    tried, omegas = pairs, s.omegas
    if rule != "sg":  # CFG-scale rules: CFG's ω grid, SG's best pairs.
      omegas = s.cfg_omegas
      if best_pairs:
        tried = best_pairs
    found = grid(rule, omegas, tried, extra, rule)
    if rule == "sg" and found:
      by_pair = {}
      for r in found:
        k = (r["gamma_strong"], r["gamma_weak"])
        by_pair[k] = min(by_pair.get(k, np.inf), r[study.metric])
      best_pairs = sorted(by_pair, key=by_pair.get)[:TOP_PAIRS]
    rows += found
    if guidance_lib.uses_guide(rule):
      rows += grid(rule, s.cfg_omegas, [(0.0, 0.0)], extra, "ag (autoguidance alone)")
  rows += bracket_omega(study, rows, ref, tag)
  refit = []
  for fam in [f for f in FAMILIES if everywhere(study, model, f)]:
    mine = [r for r in rows if family(r) == fam]
    for b in levels:
      if b != ref:
        refit += [fit_steps(study, {k: r[k] for k in POINT_FIELDS}, b)
                  for r in top(study, mine, int(s.top_settings))]
  return rows + study.run(refit, f"screen{tag}, the best settings at the other budgets")


OMEGA_STEP = 1.5


def bracket_omega(study: Study, rows: list[dict], budget: float, tag: str = "") -> list[dict]:
  """Where a guided family's best ω is the edge of the ω it was tried at, ω is pushed past that
  edge (× or ÷ 1.5, at the best setting's γ pair and interval) until quality turns, up to
  `study.omega_extensions` times: the optimum is then bracketed, not assumed to lie inside the
  configured grid."""
  added = []
  for fam in FAMILIES:
    mine = [r for r in rows if family(r) == fam]
    if not mine or not guidance_lib.RULE_BRANCHES[mine[0]["rule"]].weak:
      continue
    for _ in range(int(study.config.study.omega_extensions)):
      best = study.best(mine)
      tried = sorted({r["omega"] for r in mine if r["gamma_strong"] == best["gamma_strong"] and
                      r["gamma_weak"] == best["gamma_weak"] and r["interval"] == best["interval"]})
      if best["omega"] == tried[-1]:
        omega = best["omega"] * OMEGA_STEP
      elif best["omega"] == tried[0] and best["omega"] / OMEGA_STEP > 1:
        omega = best["omega"] / OMEGA_STEP
      else:
        break  # Bracketed: a worse ω on each side.
      p = fit_steps(study, dict({k: best[k] for k in POINT_FIELDS}, omega=round(omega, 4)), budget)
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


def budgets(study: Study, rows: list[dict]) -> list[float]:
  s = study.config.study
  if s.budgets:
    return sorted(float(b) for b in s.budgets)
  return sorted({round(r["gmacs_per_image"], 6) for r in rows
                 if r["rule"] == "cfg" and tuple(r["interval"]) == FULL})


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
      for fam in [f for f in FAMILIES if budget == ref or everywhere(study, model, f)]:
        fits = [r for r in rows if r["model"] == model and family(r) == fam
                and r["gmacs_per_image"] <= budget * 1.000001]
        if fits:
          b = {k: study.best(fits)[k] for k in POINT_FIELDS}
          for seed in seeds:
            p = dict(b, per_class=s.final_per_class)
            if seed != s.seed:
              p["seed"] = seed
            table.append((budget, p))
  scored = study.run([p for _, p in table], "final (matched compute)", resamples=s.bootstrap)
  by_key = {key(r): r for r in scored}
  return [dict(by_key[key(p)], budget=budget) for budget, p in table]


def paired(study: Study, finals: list[dict]) -> list[dict]:
  """The differences that carry the verdict (`PAIRS`), each at each budget and seed: the
  estimate a − b of FD and of class accuracy with a 95% interval from a paired bootstrap — the
  same resampled sample indices for both rows, which share labels and initial noise, so the
  interval is that of the difference, not of two separate estimates.

  A pair whose rows' features are not in the study's folder (points.jsonl copied without
  features/, e.g. back from another machine) is left out with a note, and its row from an
  earlier paired.jsonl is kept rather than lost."""
  s, m = study.config.study, study.metric
  by = {(r["budget"], r["model"], family(r), r.get("seed", s.seed)): r for r in finals}
  side = lambda x: x if isinstance(x, tuple) else ("main", x)
  name = lambda x: x[1] if x[0] == "main" else f"{x[0]} {x[1]}"
  path = os.path.join(study.out_dir, "paired.jsonl")
  pair_key = lambda r: (round(r["budget"], 6), r["seed"], r["a"], r["b"])
  earlier = ({pair_key(r): r for r in map(json.loads, files.read_text(path).splitlines())}
             if files.exists(path) else {})
  out = []

  def add(row: dict, plus: list[dict], minus: list[dict]) -> None:
    if not all(files.exists(study.features_path(r)) for r in plus + minus):
      kept = earlier.get(pair_key(row))
      study.log(f"paired: ({row['a']}) − ({row['b']}) at {row['budget']:.2f} GMACs left out: "
                f"a row's features are not in {study.out_dir}/features (rescore the row to "
                "pair it)" + ("; its earlier estimate is kept" if kept else ""))
      if kept:
        out.append(kept)
      return
    row.update(paired_difference([study.features_of(r) for r in plus],
                                 [study.features_of(r) for r in minus], study.judge(),
                                 max(s.bootstrap, 2), row["seed"], m))
    out.append(row)

  for budget, seed in sorted({(k[0], k[3]) for k in by}):
    row_of = lambda x, budget=budget, seed=seed: by.get((budget, *side(x), seed))
    for a, b in PAIRS:
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


def checkpoints_stage(study: Study, rows: list[dict]) -> list[dict]:
  s = study.config.study
  steps = sorted(int(x) for x in s.checkpoints) if s.checkpoints else study.saved
  missing = sorted(set(steps) - set(study.saved))
  if missing:
    raise errors.UserError(f"study.checkpoints = {tuple(s.checkpoints)!r}",
                           f"no checkpoint of steps {missing}", f"kept: {study.saved}")
  points = []
  for fam in FAMILIES:
    mine = [r for r in rows if family(r) == fam]
    if not mine:
      continue
    b = study.best(mine)
    for step in steps:
      if b["guide_step"] >= 0 and step <= b["guide_step"]:
        continue  # AG+SG needs a guide older than the model.
      points.append(dict(b, checkpoint=step))
  return study.run(points, "checkpoints")


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


def probe(study: Study, rows: list[dict]) -> list[dict]:
  """Per checkpoint and t: the SG and CFG differences on held-out images, and the loss at γ."""
  s, c = study.config.study, study.config
  if c.data.name != "fashion_mnist":
    study.log("probe: left out (it reads held-out pixels; data.name is not fashion_mnist)")
    return []
  sg = [r for r in rows if r["rule"] == "sg"]
  if s.probe_gammas:
    gs, gw = (float(g) for g in s.probe_gammas)
  else:
    gs, gw = ((study.best(sg)["gamma_strong"], study.best(sg)["gamma_weak"]) if sg
              else (0.0, 0.5))
  path = os.path.join(study.out_dir, "probe.jsonl")
  done = {(r["checkpoint"], r["t"]): r for r in sweep.load_results(path)}
  images, labels = pipeline.load_split_arrays(c.data, "test")
  x = jnp.asarray(fmnist.to_model_units(images[:s.probe_images]))
  y = jnp.asarray(labels[:s.probe_images], jnp.int32)
  # A dense twin has no routes of its own: `probe_routes` says where its sparse branches drop
  # tokens (the routed model's, so the two are probed alike).
  routes = (Sparsity.from_routes(s.probe_routes) if s.probe_routes and not c.sparsity.routes
            else Sparsity.from_config(c.sparsity))
  steps = sorted(int(v) for v in s.checkpoints) if s.checkpoints else study.saved
  net = study.params("main", steps[-1])[0]  # One model; only its checkpoints differ.
  v = jax.jit(lambda p, xt, t, y, k, sp: net.apply({"params": p}, xt, t, y, sparsity=sp,
                                                   token_key=k), static_argnums=5)
  null = jnp.full_like(y, net.num_classes)
  for step in steps:
    if all((step, float(t)) in done for t in s.probe_ts):
      continue
    params = study.params("main", step)[1]
    for t in s.probe_ts:
      key_ = jax.random.fold_in(jax.random.key(s.seed), int(1000 * t))
      noise = jax.random.normal(key_, x.shape)
      tt = jnp.full((len(x),), t, jnp.float32)
      xt = flow.interpolate(x, noise, tt)
      target = flow.target_velocity(x, noise)
      flat = lambda a: np.asarray(a).reshape(len(x), -1)
      d_sg, d_cfg, d_draw, loss = [], [], [], {g: [] for g in LOSS_GAMMAS}
      for d in range(s.probe_draws):
        k = jax.random.fold_in(key_, d)
        ks = jax.random.split(k, 3 + len(LOSS_GAMMAS))
        v_c = v(params, xt, tt, y, ks[0], Sparsity())
        d_cfg.append(flat(v_c - v(params, xt, tt, null, ks[0], Sparsity())))
        v_weak = v(params, xt, tt, y, ks[1], routes.with_gamma(gw))
        d_sg.append(flat(v(params, xt, tt, y, ks[0], routes.with_gamma(gs)) - v_weak))
        # Token-draw noise: the weak branch at two draws of its kept tokens (ω amplifies it).
        d_draw.append(flat(v_weak - v(params, xt, tt, y, ks[2], routes.with_gamma(gw))))
        for g, kg in zip(LOSS_GAMMAS, ks[3:], strict=True):
          loss[g].append(float(jnp.mean((v(params, xt, tt, y, kg, routes.with_gamma(g))
                                         - target) ** 2)))
      d_sg, d_cfg, d_draw = (np.concatenate(a) for a in (d_sg, d_cfg, d_draw))
      n_sg, n_cfg = np.linalg.norm(d_sg, axis=1), np.linalg.norm(d_cfg, axis=1)
      cos = (d_sg * d_cfg).sum(1) / np.maximum(n_sg * n_cfg, 1e-12)
      done[(step, float(t))] = dict(
          checkpoint=step, t=float(t), gamma_strong=gs, gamma_weak=gw,
          sg_diff_norm=float(n_sg.mean()), cfg_diff_norm=float(n_cfg.mean()),
          cosine=float(cos.mean()), cosine_std=float(cos.std()),
          draw_noise_norm=float(np.linalg.norm(d_draw, axis=1).mean()),
          **{f"loss_gamma{g:g}": float(np.mean(loss[g])) for g in LOSS_GAMMAS})
      r = done[(step, float(t))]
      study.log(f"probe @{step} t={t:g}: ‖ΔSG‖ {r['sg_diff_norm']:.3f}, ‖ΔCFG‖ "
                f"{r['cfg_diff_norm']:.3f}, cos {r['cosine']:.3f}, draw noise "
                f"{r['draw_noise_norm']:.3f}; loss γ0 "
                f"{r['loss_gamma0']:.4f} γ0.5 {r['loss_gamma0.5']:.4f} γ0.9 "
                f"{r['loss_gamma0.9']:.4f}")
    if jax.process_index() == 0:
      files.makedirs(study.out_dir)
      files.write_text(path, "".join(json.dumps(r) + "\n" for r in done.values()))
  return sorted(done.values(), key=lambda r: (r["checkpoint"], r["t"]))


# ---------------------------------------------------------------------------------------------
# Report and plots.

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
    for fam in FAMILIES:
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
    for fam in FAMILIES:
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


def plot(study: Study, parts: dict[str, list[dict]]) -> list[str]:
  """Quality vs GMACs with each rule's Pareto front (final points with their intervals),
  quality vs training step per rule, and the probe over training."""
  import matplotlib  # Local: plotting only (absent on lean device images).
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  m, paths = study.metric, []
  colors = dict(zip(FAMILIES, plt.rcParams["axes.prop_cycle"].by_key()["color"][:6],
                    strict=True))
  metric_names = [(m, f"{m} (lower is better)")]
  if parts.get("screen") and "class_accuracy" in parts["screen"][0]:
    metric_names.append(("class_accuracy", "class accuracy (higher is better)"))
  for name, axis in metric_names:
    if not parts.get("screen"):
      break
    fig, ax = plt.subplots(figsize=(7, 5))
    for rule in FAMILIES:
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
    for rule in FAMILIES:
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
    metrics.log_scalars(study.workdir, study.saved[-1], final, "study_final")


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
  log_tensorboard(study, parts)
  path = os.path.join(study.out_dir, "report.md")
  if jax.process_index() == 0:
    files.makedirs(study.out_dir)
    files.write_text(path, report(study, parts) + "\n")
    try:
      import matplotlib  # noqa: F401
      for p in plot(study, parts):
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
  validation.validate(config, jax.device_count(), job="sample")  # + check() in run()
  path = run(config, flags.FLAGS.workdir)
  if jax.process_index() == 0:
    print(files.read_text(path))


def cli() -> None:
  """`python -m sgjax.jobs.study` / `sgjax-study` (flags defined here, only for this command)."""
  config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=False)
  flags.DEFINE_string("workdir", None, "A trained workdir; results go to <workdir>/study/.")
  errors.run(main)



if __name__ == "__main__":
  cli()
