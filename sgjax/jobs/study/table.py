"""The study's points and their scores: the constants every stage shares, a point's fields, key
and label, the judge (FD and class accuracy, diversity), and `Study` (the points table of one
study and what scoring a point needs)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from collections.abc import Callable

import jax
import ml_collections
import numpy as np

from sgjax import (
  checkpoint,
  errors,
  files,
  flops,
  generate,
  metrics,
  sharding,
)
from sgjax import config as config_lib
from sgjax import guidance as guidance_lib
from sgjax import state as state_lib
from sgjax import workdir as workdir_lib
from sgjax.convert import inception_fid
from sgjax.eval import fmnist, frechet, inception
from sgjax.eval import metrics as eval_metrics
from sgjax.jobs import evaluate, sweep

STAGES = ("screen", "final", "checkpoints", "dense", "probe", "trend")
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


# A point's optional fields, present only where not the default (so the keys, feature files and
# families of points without them are what they were): the weak branch's token draw, a γ
# schedule with its end values, and the tag of AG's guide choice (`study.guides`).
VARIANT_FIELDS = ("token_draw", "schedule", "gamma_strong_end", "gamma_weak_end", "guide")


def family(r: dict) -> str:
  """What a table compares: the rule, "ag" for AG+SG at γ 0/0, and a variant's tags ("sg traj",
  "ag_sg cos g/16", "ag g@500")."""
  dense_ag = r["rule"] == "ag_sg" and r["gamma_strong"] == 0 and r["gamma_weak"] == 0 and (
      r.get("schedule", "constant") == "constant")
  out = "ag" if dense_ag else r["rule"]
  if r.get("schedule", "constant") != "constant":
    out += " cos"
  if r.get("token_draw", "step") != "step":
    out += " traj"
  if "guide" in r:
    out += f" {r['guide']}"
  return out


def families_of(rows: list[dict]) -> list[str]:
  """The families present in `rows`: FAMILIES' order, then variants sorted."""
  present = {family(r) for r in rows}
  return [f for f in FAMILIES if f in present] + sorted(present - set(FAMILIES))


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
  need({f.split()[0] for f in s.final_families} <= set(FAMILIES), "final_families",
       "unknown family", f"a subset of {FAMILIES}, variants tagged (() = all)")
  if "trend" in s.stages:
    need(len(s.checkpoints) > 0, "checkpoints", "the trend stage needs them",
         "the checkpoint steps to study, e.g. (2000, 4000, 8000)")
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
          model: str = "main", **variant) -> dict | None:
  """One setting, with the fields its rule ignores collapsed (None: the rule refuses it).
  `variant`: VARIANT_FIELDS, kept only where they change the sampler."""
  s = guidance_lib.setting(rule, omega, gamma_strong, gamma_weak)
  if s is None:
    return None
  b = guidance_lib.RULE_BRANCHES[rule]
  if not b.weak:
    interval = FULL
  extra = {k: variant[k] for k in VARIANT_FIELDS if k in variant}
  if extra.get("token_draw") == "step" or not (b.weak and b.sparse):
    extra.pop("token_draw", None)
  if extra.get("schedule", "constant") == "constant":
    for k in ("schedule", "gamma_strong_end", "gamma_weak_end"):
      extra.pop(k, None)
  if not guidance_lib.uses_guide(rule):
    extra.pop("guide", None)
  return dict(s, steps=int(steps), interval=[float(v) for v in interval],
              guide_step=int(guide_step) if guidance_lib.uses_guide(rule) else -1,
              checkpoint=int(checkpoint_step), per_class=int(per_class), model=model, **extra)


def key(p: dict) -> tuple:
  # "seed" only on points sampled with another seed than study.seed (the final's second seed);
  # variant fields only where present (a point without them keeps its key and features file).
  return (p["model"], p["checkpoint"], p["per_class"], *sweep.point_key(p), *p["interval"],
          p["guide_step"], p.get("seed"), *((k, p[k]) for k in VARIANT_FIELDS if k in p))


def label(p: dict) -> str:
  b = guidance_lib.RULE_BRANCHES[p["rule"]]
  out = p["rule"]
  if b.weak:
    out += f" ω={p['omega']:g}"
  if b.sparse:
    out += f" γ={p['gamma_strong']:g}" + (f"/{p['gamma_weak']:g}" if b.weak else "")
  if p.get("schedule", "constant") != "constant":
    out += f" {p['schedule']}→{p['gamma_strong_end']:g}/{p['gamma_weak_end']:g}"
  if p.get("token_draw", "step") != "step":
    out += f" draw per {p['token_draw']}"
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

  def __init__(self, config: ml_collections.ConfigDict, workdir: str, log=metrics.print0, *,
               step: int | None = None, out_dir: str = ""):
    """`step`: the checkpoint the screens study (default the latest); `out_dir`: where its
    tables go (default <workdir>/study; the trend stage gives each checkpoint its own)."""
    self.config, self.workdir, self.log = config, workdir, log
    self.mesh = sharding.build_mesh(config.mesh)
    self.out_dir = out_dir or os.path.join(workdir, "study")
    self.path = os.path.join(self.out_dir, "points.jsonl")
    self.rows = {key(r): r for r in sweep.load_results(self.path)}
    self._judge, self._weights = None, {}
    workdir_lib.refuse_inside_a_run(workdir, f"--workdir={workdir}")
    self.saved = checkpoint.saved_steps(os.path.join(workdir, "checkpoints"))
    if not self.saved:
      raise errors.UserError(os.path.join(workdir, "checkpoints"), "no checkpoint there",
                             "train first (--mode=train) or point --workdir at a trained run")
    self.step = self.saved[-1] if step is None else int(step)

  def model_config(self, model: str) -> tuple[ml_collections.ConfigDict, str]:
    if model == "main":
      return self.config, self.workdir
    return config_lib.replace(self.config, {"sparsity.routes": ()}), self.config.study.dense_workdir

  def point_config(self, p: dict) -> ml_collections.ConfigDict:
    base, workdir = self.model_config(p["model"])
    return config_lib.replace(base, {
        "sample.steps": p["steps"], "sample.num_samples": 0,
        "sample.guidance.interval": tuple(p["interval"]),
        "sample.guidance.guide_step": p["guide_step"], "sample.guidance.guide_workdir": workdir,
        "sample.guidance.schedule": p.get("schedule", "constant"),
        "sample.guidance.gamma_strong_end": p.get("gamma_strong_end", 0.0),
        "sample.guidance.gamma_weak_end": p.get("gamma_weak_end", 0.0),
        "sample.guidance.token_draw": p.get("token_draw", "step"),
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


