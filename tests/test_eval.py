"""Fréchet distance against an independent formula; the FD-FMNIST classifier on real data."""

import numpy as np
import pytest

from sgjax.eval import frechet


def _random_cov(rng, d):
  a = rng.normal(size=(d, 2 * d))
  return a @ a.T / (2 * d)


def _reference_fd(mu1, s1, mu2, s2):
  """Independent route: Tr((Σ₁Σ₂)^½) = Σ √λ of the symmetric PSD matrix Σ₁^½ Σ₂ Σ₁^½."""
  w, v = np.linalg.eigh(s1)
  root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
  lam = np.linalg.eigvalsh(root1 @ s2 @ root1)
  return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2)
               - 2 * np.sum(np.sqrt(np.clip(lam, 0, None))))


@pytest.mark.parametrize("d", [2, 16, 64, 128])
def test_frechet_distance_matches_the_eigenvalue_formula(d):
  rng = np.random.default_rng(d)
  mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
  s1, s2 = _random_cov(rng, d), _random_cov(rng, d)
  got = frechet.frechet_distance(mu1, s1, mu2, s2)
  assert got == pytest.approx(_reference_fd(mu1, s1, mu2, s2), rel=1e-6, abs=1e-8)
  assert got > 0


def test_frechet_distance_of_rank_deficient_covariances_matches_the_formula():
  # Fewer samples than dimensions (sFID's 2023-d features from a few thousand images): both
  # covariances are singular; the result must still agree with the eigenvalue route.
  rng = np.random.default_rng(7)
  a, b = rng.normal(size=(40, 96)), 0.5 + 1.5 * rng.normal(size=(60, 96))
  got = frechet.frechet_distance(*frechet.statistics(a), *frechet.statistics(b))
  want = _reference_fd(*frechet.statistics(a), *frechet.statistics(b))
  assert got == pytest.approx(want, rel=1e-5)


def test_a_large_imaginary_part_is_an_error_not_dropped():
  # Not a covariance (negative eigenvalues): the product's square root is genuinely complex.
  s1, s2 = np.diag([1.0, 2.0, 3.0]), np.diag([1.0, -4.0, 2.0])
  with pytest.raises(ValueError, match="imaginary"):
    frechet.frechet_distance(np.zeros(3), s1, np.zeros(3), s2)


def test_frechet_distance_of_a_distribution_to_itself_is_zero_and_shift_adds_norm():
  rng = np.random.default_rng(0)
  feats = rng.normal(size=(500, 8))
  mu, s = frechet.statistics(feats)
  assert abs(frechet.frechet_distance(mu, s, mu, s)) < 1e-8
  shift = np.arange(8.0)
  assert frechet.frechet_distance(mu + shift, s, mu, s) == pytest.approx(shift @ shift, rel=1e-6)


def test_statistics_reject_too_few_samples():
  with pytest.raises(ValueError, match="N >= 2"):
    frechet.statistics(np.zeros((1, 4)))


def test_singular_covariances_are_stabilised_not_silently_wrong():
  rng = np.random.default_rng(1)
  feats = rng.normal(size=(300, 6))
  feats[:, 5] = 0.0  # A dead unit: both covariances singular.
  other = feats + rng.normal(size=feats.shape) * 0.1
  other[:, 5] = 0.0
  got = frechet.frechet_distance(*frechet.statistics(feats), *frechet.statistics(other))
  want = _reference_fd(*frechet.statistics(feats), *frechet.statistics(other))
  assert np.isfinite(got) and got == pytest.approx(want, abs=1e-4)


def test_fmnist_classifier_reaches_90_percent_and_scores_samples(tmp_path):
  from sgjax.data import fashion_mnist
  from sgjax.eval import fmnist
  raw = fashion_mnist.DEFAULT_DIR
  train, test = fashion_mnist.read_split(raw, "train"), fashion_mnist.read_split(raw, "test")
  cache = str(tmp_path / "clf.msgpack")
  params = fmnist.train_or_load(cache, train, test, log=lambda m: None)
  assert fmnist.accuracy(params, *test) >= 0.90
  again = fmnist.train_or_load(cache, train, test, log=lambda m: None)  # From the cache.
  ref = fmnist.reference_statistics(again, test[0])
  # Real test images of the asked-for class score high; shuffled labels and noise score low.
  real = fmnist.sample_metrics(again, ref, test[0][:1000], test[1][:1000])
  noise = np.random.default_rng(0).integers(0, 256, (1000, 28, 28, 1), np.uint8)
  fake = fmnist.sample_metrics(again, ref, noise, test[1][:1000])
  assert real["class_accuracy"] > 0.88 and fake["class_accuracy"] < 0.3
  assert real["fd_fmnist"] < 0.1 * fake["fd_fmnist"]
