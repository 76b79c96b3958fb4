"""The SG-vs-CFG study tool (sgjax.jobs.study): its search, matched comparison, resume, report,
intervals, and the latent + Inception FID path."""

import json
import os
import shutil

import numpy as np
import pytest

from sgjax import errors
from sgjax.convert import inception_fid
from sgjax.eval import frechet
from sgjax.jobs import study as study_lib
from sgjax.jobs.study import compare as compare_lib
from tests.builders import (
  VAE,
  inception_state_dict,
  latent_config,
  summaries,
  tiny_config,
  write_checkpoints,
  write_weights,
)


def test_bootstrap_interval_matches_the_spread_of_fresh_samples():
  rng = np.random.default_rng(0)
  mu, sigma = frechet.statistics(rng.normal(size=(4000, 16)))
  fresh = [frechet.frechet_distance(*frechet.statistics(rng.normal(0.1, 1, (1000, 16))), mu,
                                    sigma) for _ in range(40)]
  feats = rng.normal(0.1, 1, (1000, 16))
  lo, hi = frechet.bootstrap_interval(feats, mu, sigma, resamples=200, seed=1)
  point = frechet.frechet_distance(*frechet.statistics(feats), mu, sigma)
  assert lo < point < hi and (hi - point) == pytest.approx(point - lo)
  # The half-width is 1.96 bootstrap SDs; the SD of FD over fresh draws of 1000 is the truth.
  assert (hi - lo) / (2 * 1.96) == pytest.approx(np.std(fresh, ddof=1), rel=0.35)
  # Fewer samples than dimensions: the N × N route equals sqrtm's answer.
  few = rng.normal(size=(20, 16))
  assert frechet.distance_of_features(few, mu, sigma) == pytest.approx(
      frechet.frechet_distance(*frechet.statistics(few), mu, sigma), rel=1e-7)
  a, b = frechet.proportion_interval(np.r_[np.ones(80), np.zeros(20)])
  assert a == pytest.approx(0.7112, abs=1e-4) and b == pytest.approx(0.8666, abs=1e-4)


def _config():
  """tiny_config in Fashion-MNIST's shape (the probe reads held-out images): 16 tokens."""
  c = tiny_config()
  c.data.update(name="fashion_mnist", image_size=28, channels=1, num_classes=10)
  c.model.update(patch_size=7)
  c.sample.batch_size = 16
  c.study.update(per_class=1, final_per_class=2, bootstrap=20, steps=(2, 3), steps_ref=2,
                 omega_ref=2.0, cfg_omegas=(2.0,), cfg_intervals=((0.25, 1.0),), omegas=(3.0,),
                 gammas_strong=(0.0,), gammas_weak=(0.5, 0.75), unguided_gammas=(0.0,),
                 rules=("cfg", "sg", "ag_sg"), probe_images=8, probe_ts=(0.5,), probe_draws=1)
  return c


def _pixel_judge():
  """A fixed random projection of the pixels as the feature net (the study's logic, not the
  FD-FMNIST classifier, is under test; tests/test_eval.py covers that), and its first ten
  features as a 10-way classifier."""
  proj = np.random.default_rng(7).normal(size=(28 * 28, 12))

  def features(images):
    f = (images.reshape(len(images), -1).astype(np.float64) / 255.0) @ proj
    return f, f[:, :10]
  ref = np.random.default_rng(8).normal(size=(64, 12)) + 5
  return study_lib.Judge("fd_fmnist", features, *frechet.statistics(ref))


def test_study_searches_compares_at_matched_compute_and_resumes(tmp_path, monkeypatch):
  c = _config()
  workdir, dense = str(tmp_path / "routed"), str(tmp_path / "dense")
  write_checkpoints(c, workdir, [1, 2])
  c_dense = c.copy_and_resolve_references()
  c_dense.sparsity.routes = ()
  write_checkpoints(c_dense, dense, [3])
  c.study.dense_workdir = dense
  monkeypatch.setattr(study_lib.table, "judge_for", lambda *a, **k: _pixel_judge())
  path = study_lib.run(c, workdir)
  rows = list(study_lib.Study(c, workdir).rows.values())
  screen = [r for r in rows if r["per_class"] == 1 and r["checkpoint"] == 2]
  by_rule = {rule: [r for r in screen if r["rule"] == rule] for rule in study_lib.ALL_RULES}
  assert [(r["gamma_strong"], r["steps"]) for r in by_rule["none"]] == [(0.0, 2), (0.0, 3)]
  assert len(by_rule["cfg"]) == 2 + 1  # ω × steps, and the interval at the best ω.
  interval = [r for r in by_rule["cfg"] if r["interval"] == [0.25, 1.0]]
  full = [r for r in by_rule["cfg"] if r["steps"] == 2 and r["interval"] == [0, 1]]
  # Guiding only on part of the path costs less than guiding on all of it.
  assert len(interval) == 1 and interval[0]["gmacs_per_image"] < full[0]["gmacs_per_image"]
  fams = {f: [r for r in screen if study_lib.family(r) == f] for f in study_lib.FAMILIES}
  for fam, pairs in (("sg", {(0, .5), (0, .75)}), ("ag_sg", {(0, .5), (0, .75)}),
                     ("ag", {(0, 0)})):  # AG+SG at γ 0/0: autoguidance alone, searched apart.
    mine = fams[fam]
    grid = [r for r in mine if r["omega"] == 2.0 and r["steps"] == 2]
    assert {(r["gamma_strong"], r["gamma_weak"]) for r in grid} == pairs
    best = min(grid, key=lambda r: r["fd_fmnist"])
    line = [r for r in mine if r["omega"] == 3.0 and r["steps"] == 2]
    assert [(r["gamma_strong"], r["gamma_weak"]) for r in line] == [(best["gamma_strong"],
                                                                     best["gamma_weak"])]
    best = min(grid + line, key=lambda r: r["fd_fmnist"])
    assert [(r["omega"], r["gamma_weak"]) for r in mine if r["steps"] == 3] == [
        (best["omega"], best["gamma_weak"])]
  assert {r["guide_step"] for r in by_rule["ag_sg"]} == {1}  # The earliest kept checkpoint.

  # Final: per budget (CFG's cost at each steps), each rule's best screened point within it,
  # rescored with 2 per class and a 95% interval.
  budgets = sorted({r["gmacs_per_image"] for r in by_rule["cfg"] if r["interval"] == [0, 1]})
  final = [r for r in rows if r["per_class"] == 2]
  assert final and all(r["num_samples"] == 2 * 10 for r in final)
  assert all(r["fd_fmnist_lo"] < r["fd_fmnist"] < r["fd_fmnist_hi"] for r in final)
  assert all(0 <= r["class_accuracy_lo"] <= r["class_accuracy_hi"] <= 1 for r in final)
  for budget in budgets:
    for mine in fams.values():
      fits = [r for r in mine if r["gmacs_per_image"] <= budget * 1.000001]
      if fits:
        best = min(fits, key=lambda r: r["fd_fmnist"])
        assert any(study_lib.key(dict(best, per_class=2)) == study_lib.key(r) for r in final)
  # Over training: each rule's best at both checkpoints (AG+SG only after its guide).
  assert {r["rule"] for r in rows if r["checkpoint"] == 1} == {"none", "cfg", "sg"}
  # The dense twin: unguided and CFG at its own latest checkpoint.
  dense_rows = [r for r in rows if r["model"] == "dense"]
  assert sorted(r["rule"] for r in dense_rows) == ["cfg", "none"]
  assert all(r["checkpoint"] == 3 for r in dense_rows)
  probe = [json.loads(line) for line in open(os.path.join(workdir, "study", "probe.jsonl"))]
  assert [(p["checkpoint"], p["t"]) for p in probe] == [(1, 0.5), (2, 0.5)]
  for p in probe:
    assert p["sg_diff_norm"] > 0 and p["cfg_diff_norm"] > 0 and -1 <= p["cosine"] <= 1
    assert all(np.isfinite(p[f"loss_gamma{g:g}"]) and p[f"loss_gamma{g:g}"] > 0
               for g in study_lib.LOSS_GAMMAS)
  assert probe[0]["loss_gamma0"] != probe[1]["loss_gamma0"]  # The checkpoints differ.
  report = open(path).read()
  for section in ("## Matched compute", "## Each rule's best setting over training",
                  "dense twin", "## Probe"):
    assert section in report
  for name in ("fd_fmnist_vs_gmacs", "class_accuracy_vs_gmacs", "fd_fmnist_vs_step", "probe"):
    assert os.path.getsize(os.path.join(workdir, "study", name + ".png")) > 1000

  # TensorBoard: each rule's best over training at the checkpoints' steps, the final table.
  tags = summaries(os.path.join(workdir, "tensorboard"))
  assert [step for step, _ in tags["study/sg/fd_fmnist"]] == [1, 2]
  assert any(t.startswith("study_final/") and t.endswith("/cfg/fd_fmnist") for t in tags)

  # Again: every point is in the table, so nothing is sampled.
  monkeypatch.setattr(study_lib.Study, "score", lambda *a: pytest.fail("resampled a point"))
  assert study_lib.run(c, workdir) == path


@pytest.mark.parametrize("field, value, match", [
    ("stages", ("screen", "plots"), r"study.stages = .*unknown or no stage; a subset of"),
    ("gammas_strong", (0.95,), r"study.gammas_weak = \(0.6, .*\): no γ_weak above any γ_strong"),
    ("cfg_intervals", ((0.5, 0.2),), r"study.cfg_intervals = .*0 <= lo < hi <= 1"),
    ("dense_workdir", "/no/such/run", r"study.dense_workdir = '/no/such/run': no checkpoints"),
])
def test_bad_study_settings_are_refused_in_one_line(field, value, match):
  c = tiny_config()
  c.study[field] = value
  with pytest.raises(errors.UserError, match=match):
    study_lib.check(c)


def test_study_on_latents_scores_fid_with_inception_weights(tmp_path):
  """A latent model (decoded by the SD-VAE) scored by FID in generated Inception weights."""
  vae = write_weights(tmp_path / "vae.safetensors", seed=5, **VAE)
  c = latent_config(weights=vae)
  c.study.update(stages=("screen",), rules=("cfg",), cfg_omegas=(1.5,), steps=(2,), steps_ref=2,
                 unguided_gammas=(0.0,), cfg_intervals=(), per_class=1, bootstrap=0)
  weights = str(tmp_path / "inception.npz")
  inception_fid.save(inception_fid.convert(inception_state_dict(seed=3)), weights)
  ref = str(tmp_path / "ref.npz")
  rng = np.random.default_rng(4)
  np.savez(ref, arr_0=rng.integers(0, 256, (6, 20, 20, 3), np.uint8))
  c.eval.update(inception_weights=weights, reference=ref, batch_size=8, metrics=("fid",))
  workdir = str(tmp_path / "run")
  write_checkpoints(c, workdir, [1])
  study_lib.run(c, workdir)
  rows = list(study_lib.Study(c, workdir).rows.values())
  assert {r["rule"] for r in rows} == {"none", "cfg"}
  assert all(np.isfinite(r["fid"]) and r["fid"] > 0 and "class_accuracy" not in r for r in rows)


def test_budget_search_gives_every_rule_the_whole_budget_and_paired_intervals(tmp_path,
                                                                               monkeypatch):
  """study.search = "budget": each point at the most steps within its budget, ω × γ jointly,
  intervals for every guided rule, the dense twin at the same budgets, paired differences,
  diversity, the probe's draw noise at a fixed pair (and on the twin through probe_routes)."""
  c = _config()
  c.study.update(search="budget", rules=("cfg", "sg"), omegas=(3.0,), top_settings=1,
                 final_seeds=(2,), bootstrap=8, stages=("screen", "dense", "final"),
                 omega_extensions=1)
  workdir, dense = str(tmp_path / "routed"), str(tmp_path / "dense")
  write_checkpoints(c, workdir, [1])
  c_dense = c.copy_and_resolve_references()
  c_dense.sparsity.routes = ()
  write_checkpoints(c_dense, dense, [3])  # Other weights than the routed model's.
  c.study.dense_workdir = dense
  judge = _pixel_judge()
  rng = np.random.default_rng(9)
  judge.ref_features, judge.ref_labels = rng.normal(5, 1, (64, 12)), np.tile(np.arange(10), 7)[:64]
  monkeypatch.setattr(study_lib.table, "judge_for", lambda *a, **k: judge)
  path = study_lib.run(c, workdir)
  study = study_lib.Study(c, workdir)
  rows = list(study.rows.values())
  levels = study_lib.budget_levels(study)  # CFG's cost at 2 and 3 steps.
  assert len(levels) == 2 and levels[0] < levels[1]
  ref = study_lib.reference_budget(study, levels)
  assert ref == levels[1]
  screen = [r for r in rows if r["per_class"] == 1]
  for r in screen:  # Most steps that fit: one more step would not.
    budget = min(b for b in levels if r["gmacs_per_image"] <= b * 1.000001)
    assert study.gmacs(dict(r, steps=r["steps"] + 1)) > budget * 1.000001
  sg_ref = [r for r in screen if r["rule"] == "sg" and r["model"] == "main" and r["omega"] == 3
            and r["interval"] == [0, 1] and r["gmacs_per_image"] > levels[0]]
  # A one-ω grid's best is its edge: ω was pushed past it once (× 1.5) at the best setting.
  for rule, omega in (("sg", 4.5), ("cfg", 3.0)):
    past = [r for r in screen if r["rule"] == rule and r["model"] == "main"
            and r["omega"] == omega and r["gmacs_per_image"] > levels[0]]
    assert len(past) == 1
  # Joint grid: every ω × pair at the reference budget; SG runs at least as many steps as CFG.
  assert {(r["omega"], r["gamma_weak"]) for r in sg_ref} == {(3.0, .5), (3.0, .75)}
  cfg_ref = [r for r in screen if r["rule"] == "cfg" and r["model"] == "main" and r["omega"] == 2
             and r["gmacs_per_image"] > levels[0]]
  assert {tuple(r["interval"]) for r in cfg_ref} == {(0, 1), (0.25, 1.0)}
  cfg_full = [r for r in cfg_ref if r["interval"] == [0, 1]][0]
  assert all(r["steps"] >= cfg_full["steps"] for r in sg_ref)  # (here 1.75 vs 2 passes a step)
  assert any(r["rule"] == "sg" and r["interval"] == [0.25, 1.0] for r in screen)
  assert {r["rule"] for r in screen if r["model"] == "dense"} == {"none", "cfg"}
  # At both budgets, each of 3 main + 2 dense families at the second seed (rows are shared
  # between budgets where the best point is the same).
  table = study_lib.final(study, screen)
  assert len(table) == 2 * 5 and {r["seed"] for r in table} == {2}
  assert all(r["gmacs_per_image"] <= r["budget"] * 1.000001 for r in table)
  final = [r for r in rows if r["per_class"] == 2]
  assert all(0 <= r["precision"] <= 1 and 0 <= r["recall"] <= 1 and r["variance_ratio"] > 0
             for r in final)
  paired = [json.loads(line) for line in open(os.path.join(workdir, "study", "paired.jsonl"))]
  got = {(p["a"], p["b"]) for p in paired}
  assert {("sg", "cfg"), ("sg", "none"), ("none", "dense none"), ("cfg", "dense cfg"),
          ("dense cfg", "dense none")} <= got
  for p in paired:  # The estimate is the difference of the two rows' own FDs.
    if " − " in p["a"]:  # CFG's gain routed vs dense: the difference of two pairs' estimates.
      pair = {(q["budget"], q["seed"], q["a"], q["b"]): q["d_fd_fmnist"] for q in paired}
      (a1, a2), (b1, b2) = (side.split(" − ") for side in (p["a"], p["b"]))
      at = (p["budget"], p["seed"])
      assert p["d_fd_fmnist"] == pytest.approx(pair[(*at, a1, a2)] - pair[(*at, b1, b2)])
      continue
    fa = [r for r in table if r["budget"] == p["budget"] and r["seed"] == p["seed"]
          and study_lib.label(r) == p["a_label"] and (p["a"].startswith("dense")
                                                      == (r["model"] == "dense"))]
    fb = [r for r in table if r["budget"] == p["budget"] and r["seed"] == p["seed"]
          and study_lib.label(r) == p["b_label"] and (p["b"].startswith("dense")
                                                      == (r["model"] == "dense"))]
    assert p["d_fd_fmnist"] == pytest.approx(fa[0]["fd_fmnist"] - fb[0]["fd_fmnist"])
    assert p["d_fd_fmnist_lo"] < p["d_fd_fmnist"] < p["d_fd_fmnist_hi"]
  assert "## Paired differences" in open(path).read()

  # The probe at a fixed pair needs no screen; on the twin it drops tokens on probe_routes.
  c_dense.study.update(c.study.to_dict())
  c_dense.study.update(stages=("probe",), probe_gammas=(0.0, 0.75), dense_workdir="",
                       probe_routes=((0, 1, 0.5),))
  monkeypatch.setattr(study_lib.Study, "score", lambda *a: pytest.fail("sampled for a probe"))
  study_lib.run(c_dense, dense)
  probe = [json.loads(line) for line in open(os.path.join(dense, "study", "probe.jsonl"))]
  assert [(p["gamma_strong"], p["gamma_weak"]) for p in probe] == [(0.0, 0.75)]
  assert probe[0]["draw_noise_norm"] > 0 and probe[0]["sg_diff_norm"] > 0


def test_paired_differences_and_the_gain_difference_keep_earlier_rows_without_features(
    tmp_path):
  """Each pair is FD(a) − FD(b) over the same samples; CFG's gain routed vs dense is the
  difference of two such differences; a study folder copied without features/ (points.jsonl
  alone) can still be extended: pairs whose features are missing keep their earlier row."""
  rng = np.random.default_rng(0)
  c = _config()
  c.study.bootstrap = 50
  judge = _pixel_judge()
  logged = []
  os.makedirs(tmp_path / "checkpoints" / "2")  # A study opens a trained workdir.
  study = study_lib.Study(c, str(tmp_path), log=logged.append)
  study._judge = judge
  at = dict(checkpoint_step=2, per_class=2)
  settings = {("main", "sg"): ("sg", 3.0, 0.5), ("main", "cfg"): ("cfg", 2.0, 0),
              ("main", "none"): ("none", 1.0, 0), ("dense", "cfg"): ("cfg", 2.0, 0),
              ("dense", "none"): ("none", 1.0, 0)}
  finals = {(b, m, f): dict(study_lib.point(rule, w, 0, gw, steps, model=m, **at), budget=b,
                            gmacs_per_image=b)
            for b, steps in ((1.0, 3), (2.0, 6)) for (m, f), (rule, w, gw) in settings.items()
            if b == 1.0 or m == "main" and f != "none"}
  labels = np.repeat(np.arange(10), 2)
  fd = {}
  for k, r in finals.items():
    if k[0] == 1.0:  # Features of the budget-1 rows only.
      f, logits = judge.features(rng.integers(0, 256, (20, 28, 28, 1)))
      os.makedirs(os.path.dirname(study.features_path(r)), exist_ok=True)
      np.savez(study.features_path(r), features=f, labels=labels,
               hits=(logits.argmax(-1) == labels).astype(np.float64))
      fd[k[1:]] = frechet.distance_of_features(f, judge.ref_mu, judge.ref_sigma)
  earlier = dict(budget=2.0, seed=c.study.seed, a="sg", b="cfg",
                 a_label=study_lib.label(finals[2.0, "main", "sg"]),
                 b_label=study_lib.label(finals[2.0, "main", "cfg"]), d_fd_fmnist=-1.25)
  os.makedirs(study.out_dir, exist_ok=True)
  paired_path = os.path.join(study.out_dir, "paired.jsonl")
  open(paired_path, "w").write(json.dumps(earlier) + "\n")
  out = study_lib.paired(study, list(finals.values()))
  by = {(r["budget"], r["a"], r["b"]): r for r in out}
  want = {("sg", "cfg"): fd["main", "sg"] - fd["main", "cfg"],
          ("sg", "none"): fd["main", "sg"] - fd["main", "none"],
          ("cfg", "none"): fd["main", "cfg"] - fd["main", "none"],
          ("dense cfg", "dense none"): fd["dense", "cfg"] - fd["dense", "none"],
          ("none", "dense none"): fd["main", "none"] - fd["dense", "none"],
          ("cfg", "dense cfg"): fd["main", "cfg"] - fd["dense", "cfg"]}
  want["cfg − none", "dense cfg − dense none"] = (want["cfg", "none"]
                                                  - want["dense cfg", "dense none"])
  assert set(by) == {(1.0, *k) for k in want} | {(2.0, "sg", "cfg")}
  for k, v in want.items():
    r = by[(1.0, *k)]
    assert r["d_fd_fmnist"] == pytest.approx(v, rel=1e-9, abs=1e-9), k
    assert r["d_fd_fmnist_lo"] < v < r["d_fd_fmnist_hi"], k
    assert -1 <= r["d_class_accuracy_lo"] <= r["d_class_accuracy"] <= r["d_class_accuracy_hi"]
  assert by[2.0, "sg", "cfg"] == earlier  # Kept, not recomputed from missing features.
  assert any("(sg) − (cfg) at 2.00 GMACs left out" in m and "earlier estimate is kept" in m
             for m in logged)
  assert [json.loads(line) for line in open(paired_path)] == out
  # SG's best setting moved since (another ω): the earlier estimate is of other rows, so it goes.
  finals[2.0, "main", "sg"]["omega"] = 4.0
  out = study_lib.paired(study, list(finals.values()))
  assert (2.0, "sg", "cfg") not in {(r["budget"], r["a"], r["b"]) for r in out}
  assert any("(sg) − (cfg) at 2.00 GMACs left out" in m and "of other settings, is dropped" in m
             for m in logged)
  assert [json.loads(line) for line in open(paired_path)] == out


def test_trend_runs_the_fair_comparison_at_each_checkpoint_with_every_variant_and_resumes(
    tmp_path, monkeypatch):
  """study.stages = ("trend",): at each checkpoint its own budget search (γ_weak pushed past the
  grid's edge), finals and paired differences; SG with the weak branch's tokens drawn once per
  trajectory beside per step; AG at a share of the studied step (its guide moves with it) and
  AG+SG on the cosine γ schedule; the trend table over checkpoints; a rerun samples nothing."""
  c = _config()
  c.study.update(search="budget", stages=("trend",), rules=("cfg", "sg", "ag_sg"),
                 steps=(2,), cfg_intervals=(), omegas=(3.0,), gammas_weak=(0.5, 0.75),
                 omega_extensions=0, gamma_extensions=1, token_draws=("step", "trajectory"),
                 guides=(0.5,), ag_cosine=(0.0, 0.5, 0.5, 0.0), bootstrap=8,
                 checkpoints=(2, 4), probe_gammas=(0.0, 0.75))
  workdir = str(tmp_path / "run")
  write_checkpoints(c, workdir, [1, 2, 4])
  judge = _pixel_judge()
  rng = np.random.default_rng(9)
  judge.ref_features, judge.ref_labels = rng.normal(5, 1, (64, 12)), np.tile(np.arange(10), 7)[:64]
  monkeypatch.setattr(study_lib.table, "judge_for", lambda *a, **k: judge)
  study_lib.run(c, workdir)
  root = tmp_path / "run" / "study" / "trend"
  for step, guide in ((2, 1), (4, 2)):
    rows = [json.loads(line) for line in open(root / f"step_{step}" / "points.jsonl")]
    assert {r["checkpoint"] for r in rows} == {step}
    fams = {study_lib.family(r) for r in rows}
    assert {"none", "cfg", "sg", "sg traj", "ag_sg g/2", "ag g/2", "ag_sg cos g/2"} == fams
    assert {r["guide_step"] for r in rows if r["rule"] == "ag_sg"} == {guide}
    cos = [r for r in rows if study_lib.family(r) == "ag_sg cos g/2"]
    assert all((r["gamma_strong"], r["gamma_strong_end"], r["gamma_weak"], r["gamma_weak_end"])
               == (0.0, 0.5, 0.5, 0.0) for r in cos)
    for fam in ("sg", "sg traj"):  # A two-value grid's best is an edge: pushed past it.
      gammas = {r["gamma_weak"] for r in rows if study_lib.family(r) == fam}
      assert 1 <= len(gammas - {0.5, 0.75}) <= 2 and gammas - {0.5, 0.75} <= {.3, .4, .85, .925}
    paired = {(p["a"], p["b"]) for p in map(json.loads, open(root / f"step_{step}"
                                                              / "paired.jsonl"))}
    assert {("sg", "cfg"), ("sg traj", "sg"), ("sg traj", "cfg"), ("ag g/2", "cfg"),
            ("ag_sg g/2", "ag g/2"), ("ag_sg cos g/2", "ag g/2")} <= paired
  trend = [json.loads(line) for line in open(root / "trend.jsonl")]
  # One final per family and step: the one chosen now (the table may hold superseded ones).
  assert len([r for r in trend if r["kind"] == "final"]) == 2 * 7
  finals = [r for r in trend if r["kind"] == "final"]
  assert {(r["step"], r["family"]) for r in finals} == {
      (s, f) for s in (2, 4) for f in ("none", "cfg", "sg", "sg traj", "ag_sg g/2", "ag g/2",
                                       "ag_sg cos g/2")}
  # Epochs = step × batch / the training split's size (Fashion-MNIST's 60,000 images).
  assert {r["step"]: r["epochs"] for r in finals} == {2: 2 * 16 / 60000, 4: 4 * 16 / 60000}
  pair = {(r["step"], r["a"], r["b"]): r["d_fd_fmnist"] for r in trend if r["kind"] == "paired"}
  by = {(r["step"], r["family"]): r["fd_fmnist"] for r in finals}
  for s in (2, 4):
    assert pair[(s, "sg", "cfg")] == pytest.approx(by[(s, "sg")] - by[(s, "cfg")])
  assert {(r["step"], r["t"]) for r in trend if r["kind"] == "probe"} == {(2, 0.5), (4, 0.5)}
  assert (root / "trend.png").exists()
  assert "## Paired differences" in (root / "trend.md").read_text()
  before = (root / "trend.jsonl").read_text()
  monkeypatch.setattr(study_lib.Study, "score", lambda *a: pytest.fail("sampled on a rerun"))
  study_lib.run(c, workdir)
  assert (root / "trend.jsonl").read_text() == before


def test_compare_pairs_two_runs_finals_family_by_family(tmp_path, monkeypatch):
  """`sgjax.jobs.study.compare`: A − B for each family both runs' trend stage chose, and the
  difference of gains (A f − A g) − (B f − B g), each with a paired interval; a run against a
  copy of itself differs by exactly 0; another classifier or an unstudied step is refused."""
  c = _config()
  c.study.update(search="budget", stages=("trend",), rules=("cfg", "sg"), steps=(2,),
                 cfg_intervals=(), omegas=(3.0,), gammas_weak=(0.5,), omega_extensions=0,
                 gamma_extensions=0, bootstrap=16, checkpoints=(2,), probe_gammas=(0.0, 0.5))
  monkeypatch.setattr(study_lib.table, "judge_for", lambda *a, **k: _pixel_judge())
  a, b = tmp_path / "a", tmp_path / "b"
  write_checkpoints(c, str(a), [2])
  write_checkpoints(c, str(b), [1, 2], scale=0.05)
  for w in (a, b):
    (w / compare_lib.CLASSIFIER).write_bytes(b"one classifier")
    study_lib.run(c, str(w))
  rows = compare_lib.compare(c, str(a), 2, str(b), 2)
  finals = {w: {study_lib.family(r): r["fd_fmnist"] for r in map(
      json.loads, open(w / "study" / "trend" / "step_2" / "finals.jsonl"))} for w in (a, b)}
  by = {r["family"]: r for r in rows}
  assert set(by) == {"none", "cfg", "sg", "(sg − cfg)", "(sg − none)", "(cfg − none)"}
  for f in ("none", "cfg", "sg"):
    assert by[f]["d_fd_fmnist"] == pytest.approx(finals[a][f] - finals[b][f])
    assert by[f]["d_fd_fmnist_lo"] < by[f]["d_fd_fmnist"] < by[f]["d_fd_fmnist_hi"]
  gain = lambda w: finals[w]["sg"] - finals[w]["cfg"]
  assert by["(sg − cfg)"]["d_fd_fmnist"] == pytest.approx(gain(a) - gain(b))
  assert "| sg | " in compare_lib.table(rows, "fd_fmnist", "A@2", "B@2")

  shutil.copytree(a, tmp_path / "a_copy")
  for r in compare_lib.compare(c, str(a), 2, str(tmp_path / "a_copy"), 2):
    assert r["d_fd_fmnist"] == r["d_fd_fmnist_lo"] == r["d_fd_fmnist_hi"] == 0

  with pytest.raises(errors.UserError, match=r"--other_step = 1: .*has not been studied"):
    compare_lib.compare(c, str(a), 2, str(b), 1)
  (b / compare_lib.CLASSIFIER).write_bytes(b"another classifier")
  with pytest.raises(errors.UserError, match=r"fmnist_classifier.msgpack: another FD-FMNIST"):
    compare_lib.compare(c, str(a), 2, str(b), 2)


def test_trend_report_gives_no_gain_per_doubling_from_step_0():
  """A run started from other weights (train.init_from) has a step-0 checkpoint: the probe there
  is listed, and the convergence table starts its doublings after it (was a division by 0)."""
  probe = dict(kind="probe", t=0.5, sg_diff_norm=2.0, cfg_diff_norm=1.0, cosine=0.3,
               draw_noise_norm=0.5, **{"loss_gamma0.5": 0.3, "loss_gamma0.9": 0.4})
  rows = [dict(probe, step=s, epochs=s / 100, loss_gamma0=v)
          for s, v in ((0, 0.4), (100, 0.2), (400, 0.1))]
  study = type("S", (), dict(metric="fd_fmnist", workdir="RUN", config=_config()))()
  text = study_lib.training.trend_report(study, rows)
  assert "| 0 | 0.00 | 0.4000 | — |" in text and "| 100 | 1.00 | 0.2000 | — |" in text
  assert "| 400 | 4.00 | 0.1000 | 29.3% |" in text  # 1 − 0.5^(1/2): two doublings halve it.


def test_two_guide_choices_that_name_one_checkpoint_are_searched_once():
  """At step 8000 with checkpoints kept every 500, the guide at 1/16 is step 500, the fixed
  guide's: one family (the first named), not the same points sampled twice under two tags."""
  c = _config()
  c.study.guides = (500.0, 0.0625)
  logged = []
  study = type("S", (), dict(config=c, saved=[125, 250, 500, 1000, 8000, 16000],
                             log=staticmethod(logged.append)))()
  assert study_lib.search.variants(study, "ag_sg", 8000) == [
      {"guide_step": 500, "guide": "g@500"}]
  assert any("g/16 is g@500 at step 8000 (guide 500)" in m for m in logged)
  assert study_lib.search.variants(study, "ag_sg", 16000) == [
      {"guide_step": 500, "guide": "g@500"}, {"guide_step": 1000, "guide": "g/16"}]


def test_omega_is_pushed_toward_1_below_a_grid_that_starts_at_its_best():
  """Autoguidance's best is often the CFG grid's lowest ω, 1.5: ÷ 1.5 would be unguided, so ω
  goes halfway to 1 (1.25, 1.125, …) until quality turns; above, the ÷ 1.5 step is unchanged."""
  c = _config()
  c.study.omega_extensions = 3

  def scored(points, optimum):
    return [dict(p, fd_fmnist=(p["omega"] - optimum) ** 2) for p in points if p is not None]

  def fd(r):
    return r["fd_fmnist"]

  for rule, grid, optimum, pushed in (("ag_sg", (1.5, 2.0, 3.0), 1.2, [1.25, 1.125]),
                                      ("sg", (3.0, 4.5), 2.2, [2.0, 1.3333])):
    study = type("S", (), dict(
        config=c, gmacs=lambda self, p: float(p["steps"]),
        run=lambda self, points, what, optimum=optimum: scored(points, optimum),
        best=lambda self, rows: min(rows, key=fd)))()
    at = dict(checkpoint_step=400, per_class=1, guide_step=100 if rule == "ag_sg" else -1)
    rows = scored([study_lib.point(rule, w, 0.0, 0.0 if rule == "ag_sg" else 0.5, 12, **at)
                   for w in grid], optimum)
    added = study_lib.bracket_omega(study, rows, budget=12.0)
    assert [r["omega"] for r in added] == pushed
    assert all(r["steps"] == 12 for r in added)  # Each at the whole budget.


def test_trend_compares_the_reference_budget_where_a_checkpoint_has_finals_at_others(tmp_path):
  """Where SG comes close, a checkpoint's finals are repeated at CFG's 8- and 20-step costs and a
  second seed: the trend's tables and plots keep to the middle (reference) budget, every row is
  kept in trend.jsonl with its budget, and the other budgets stay in the checkpoint's report."""
  c = _config()
  study = type("S", (), dict(metric="fd_fmnist", workdir="RUN", config=c, _train_size=6400,
                             out_dir=str(tmp_path)))()
  at = dict(checkpoint_step=400, per_class=2)
  settings = dict(cfg=("cfg", 2.0, 0.0), sg=("sg", 3.0, 0.5))
  fd = {1.0: 9.0, 2.0: 5.0, 3.0: 4.0}  # The middle budget, 2.0, is the reference.
  finals, pairs = [], []
  for budget, v in fd.items():
    for seed in (c.study.seed, c.study.seed + 1):
      for fam, (rule, w, gw) in settings.items():
        r = dict(study_lib.point(rule, w, 0.0, gw, 4, **at), budget=budget,
                 gmacs_per_image=budget, fd_fmnist=v + (fam == "sg") + 0.5 * (seed != c.study.seed))
        finals.append(dict(r, seed=seed) if seed != c.study.seed else r)
      pairs.append(dict(budget=budget, seed=seed, a="sg", b="cfg", d_fd_fmnist=budget,
                        d_fd_fmnist_lo=budget - 1, d_fd_fmnist_hi=budget + 1))
  d = tmp_path / "trend" / "step_400"
  os.makedirs(d)
  (d / "finals.jsonl").write_text("".join(json.dumps(r) + "\n" for r in finals))
  (d / "paired.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pairs))
  rows = study_lib.training.trend_rows(study)
  assert len([r for r in rows if r["kind"] == "final"]) == 12
  assert {(r["budget"], r["reference"]) for r in rows} == {(1.0, False), (2.0, True),
                                                           (3.0, False)}
  text = (tmp_path / "trend" / "trend.md").read_text()
  assert "| cfg | 5.00 |" in text and "| sg | 6.00 |" in text  # Seed 1 at the reference.
  assert f"| sg − cfg | {c.study.seed} | +2.00 [+1.00, +3.00] |" in text
  assert f"| sg − cfg | {c.study.seed + 1} | +2.00 [+1.00, +3.00] |" in text
  assert "9.00" not in text and "+3.00 [+2.00" not in text  # No other budget's row.
