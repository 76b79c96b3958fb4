"""IS and improved precision/recall on sets whose answer is known, and against brute force."""

import numpy as np
import pytest

from sgjax.eval import metrics
from tests.builders import tiny_config

BIG = 60.0  # A logit gap that makes a softmax one-hot to ~1e-26.


def test_inception_score_of_uniform_and_one_hot_predictions():
  assert metrics.inception_score(np.zeros((50, 1008))) == pytest.approx(1.0, abs=1e-12)
  # Every sample sure of its own class, classes equally used: IS = number of classes.
  assert metrics.inception_score(BIG * np.eye(10)) == pytest.approx(10.0, rel=1e-9)
  # Splits are consecutive blocks: two blocks of 10 distinct classes score 10 each.
  assert metrics.inception_score(BIG * np.tile(np.eye(10), (2, 1)), split_size=10) == \
      pytest.approx(10.0, rel=1e-9)
  # All samples sure of the same class: no diversity, IS = 1.
  assert metrics.inception_score(BIG * np.tile(np.eye(10)[:1], (7, 1))) == \
      pytest.approx(1.0, abs=1e-9)


def test_inception_score_of_a_mixed_set_matches_the_kl_formula():
  # Half the samples are sure of class 0, half split evenly between classes 0 and 1.
  logits = np.array([[BIG, 0.0], [0.0, 0.0]] * 4)
  marginal = np.array([0.75, 0.25])
  kl_sure = np.log(1 / marginal[0])
  kl_split = 0.5 * np.log(0.5 / marginal[0]) + 0.5 * np.log(0.5 / marginal[1])
  assert metrics.inception_score(logits) == pytest.approx(np.exp((kl_sure + kl_split) / 2),
                                                          rel=1e-9)


def _clusters(rng, centres, n, scale=0.1):
  return np.concatenate([c + scale * rng.normal(size=(n, len(c))) for c in centres])


def test_precision_recall_identical_disjoint_and_subset():
  rng = np.random.default_rng(0)
  a = _clusters(rng, [np.zeros(8)], 20)
  b = _clusters(rng, [np.full(8, 100.0)], 20)
  assert metrics.precision_recall(a, a) == (1.0, 1.0)
  assert metrics.precision_recall(a, b) == (0.0, 0.0)
  # Samples = copies of cluster A of a two-cluster reference: all samples are real-looking
  # (precision 1) but only half of the reference is covered (recall 0.5).
  ref = np.concatenate([a, b])
  assert metrics.precision_recall(ref, a, block=7) == (1.0, 0.5)
  assert metrics.precision_recall(a, ref, block=7) == (0.5, 1.0)


def _brute_force(ref, smp, k):
  d_rr = ((ref[:, None] - ref[None]) ** 2).sum(-1)
  d_ss = ((smp[:, None] - smp[None]) ** 2).sum(-1)
  d_sr = ((smp[:, None] - ref[None]) ** 2).sum(-1)
  r_ref = np.sort(d_rr, axis=1)[:, k]  # Column 0 is the point itself.
  r_smp = np.sort(d_ss, axis=1)[:, k]
  return (d_sr <= r_ref[None]).any(1).mean(), (d_sr.T <= r_smp[None]).any(1).mean(), r_ref


@pytest.mark.parametrize("k,block", [(3, 1000), (3, 16), (5, 9)])
def test_precision_recall_match_brute_force_on_overlapping_gaussians(k, block):
  rng = np.random.default_rng(k + block)
  ref = rng.normal(size=(150, 12)).astype(np.float32)
  smp = (0.8 + 0.8 * rng.normal(size=(110, 12))).astype(np.float32)
  want_p, want_r, want_radii = _brute_force(ref.astype(np.float64), smp.astype(np.float64), k)
  np.testing.assert_allclose(metrics.manifold_radii(ref, k, block), want_radii, rtol=1e-4)
  p, r = metrics.precision_recall(ref, smp, k, block)
  assert 0.05 < p < 0.95 and 0.05 < r < 0.95  # A case where both are informative.
  assert (p, r) == pytest.approx((want_p, want_r), abs=1.5 / 110)  # At most one borderline.


def test_fid_metrics_of_a_set_against_its_own_statistics():
  rng = np.random.default_rng(3)
  pool, spatial = rng.normal(size=(64, 16)), rng.normal(size=(64, 7))
  logits = BIG * np.eye(8)[np.arange(64) % 8]
  ref = dict(mu=pool.mean(0), sigma=np.cov(pool, rowvar=False), mu_s=spatial.mean(0),
             sigma_s=np.cov(spatial, rowvar=False), pool=pool)
  got = metrics.fid_metrics(dict(pool=pool, spatial=spatial, logits=logits), ref)
  assert got["fid"] == pytest.approx(0, abs=1e-6) and got["sfid"] == pytest.approx(0, abs=1e-6)
  assert got["inception_score"] == pytest.approx(8.0, rel=1e-9)
  assert (got["precision"], got["recall"]) == (1.0, 1.0)
  assert set(metrics.fid_metrics(dict(pool=pool + 1, spatial=spatial, logits=logits), ref,
                                 ("fid",))) == {"fid"}


def test_manifold_needs_more_points_than_k():
  with pytest.raises(ValueError, match="more than 3 points"):
    metrics.manifold_radii(np.zeros((3, 4)), k=3)


@pytest.mark.parametrize("field,value,message", [
    ("metrics", ("fid", "kid"), r"eval.metrics\[1\] = 'kid': unknown value; allowed: one of "
                                r"'fid', 'sfid', 'is', 'precision', 'recall'$"),
    ("batch_size", 12, r"eval.batch_size = 12: must be divisible by .* = 8"),
    ("feature_net", "fmnist", r"eval.feature_net = 'fmnist': 'fmnist' scores Fashion-MNIST"),
    ("preprocess", "tf2", r"eval.preprocess = 'tf2': unknown value; allowed: one of 'adm'"),
    ("num_samples", 3, r"eval.num_samples = 3: must be > eval.nearest_k = 3"),
    ("nearest_k", 0, r"eval.nearest_k = 0: out of range; allowed: an int >= 1$")])
def test_eval_config_errors_name_the_field_and_range(field, value, message):
  from sgjax import validation
  c = tiny_config()
  c.eval[field] = value
  with pytest.raises(ValueError, match=message):
    validation.validate(c, num_devices=8)
