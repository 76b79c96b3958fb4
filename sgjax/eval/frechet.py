"""Feature statistics and the Fréchet distance between two Gaussians (FID's formula).

  d² = ‖μ₁ − μ₂‖² + Tr(Σ₁ + Σ₂ − 2·(Σ₁Σ₂)^½)

computed as the standard FID code does (scipy's sqrtm of the product), in float64, with the
usual stabilisation: if the product is near-singular, an ε·I offset is added to both
covariances; a complex result whose imaginary part is not negligible is an error, not silently
dropped.
"""

from __future__ import annotations

import warnings

import numpy as np
import scipy.linalg
import scipy.stats

from sgjax import errors


def statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(mean, covariance) of (N, D) features, float64; N ≥ 2."""
  f = np.asarray(features, np.float64)
  if f.ndim != 2 or f.shape[0] < 2:
    raise errors.UserError(f"features of shape {f.shape}", "a Fréchet distance needs (N >= 2, D)",
                           "score at least 2 samples")
  return f.mean(axis=0), np.cov(f, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = 1e-6) -> float:
  mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
  sigma1 = np.atleast_2d(sigma1).astype(np.float64)
  sigma2 = np.atleast_2d(sigma2).astype(np.float64)
  if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
    raise errors.UserError("reference statistics", f"shape mismatch: mu {mu1.shape} vs "
                           f"{mu2.shape}, sigma {sigma1.shape} vs {sigma2.shape}",
                           "use reference statistics of the same feature network")
  diff = mu1 - mu2
  with warnings.catch_warnings():
    warnings.simplefilter("error", scipy.linalg.LinAlgWarning)
    try:
      covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
      singular = not np.isfinite(covmean).all()
    except scipy.linalg.LinAlgWarning:  # Singular product (e.g. dead feature units).
      singular = True
  if singular:
    offset = np.eye(sigma1.shape[0]) * eps
    covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
  if np.iscomplexobj(covmean):
    imag = np.max(np.abs(covmean.imag))
    if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
      # Numerical, not a setting the user chose: the traceback helps more than a line.
      raise ValueError(f"sqrtm of the covariance product has a large imaginary part ({imag:g})")
    covmean = covmean.real
  return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def distance_of_features(features: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
  """The Fréchet distance of (N, D) features to (mu2, sigma2); `frechet_distance` of their
  statistics, computed in N dimensions when N ≤ D.

  Then the sample covariance is Σ₁ = AᵀA with A = (X − μ₁)/√(N − 1), N × D, and the nonzero
  eigenvalues of Σ₁Σ₂ are those of the N × N symmetric PSD matrix A Σ₂ Aᵀ, so
  Tr((Σ₁Σ₂)^½) = Σ √λ(A Σ₂ Aᵀ) exactly: no sqrtm of a singular D × D product (minutes for
  2,048-d Inception features on 2 cores, and an ε-regularised answer), but one N × N eigh.
  """
  f = np.asarray(features, np.float64)
  n, d = f.shape
  if n - 1 >= d:
    return frechet_distance(*statistics(f), mu2, sigma2)
  mu1 = f.mean(axis=0)
  a = (f - mu1) / np.sqrt(n - 1)
  sigma2 = np.asarray(sigma2, np.float64)
  lam = np.linalg.eigvalsh(a @ sigma2 @ a.T)
  diff = mu1 - np.asarray(mu2, np.float64)
  return float(diff @ diff + np.sum(a * a) + np.trace(sigma2)
               - 2.0 * np.sum(np.sqrt(np.clip(lam, 0, None))))


def bootstrap_interval(features: np.ndarray, ref_mu: np.ndarray, ref_sigma: np.ndarray, *,
                       resamples: int = 1000, level: float = 0.95, seed: int = 0
                       ) -> tuple[float, float]:
  """A `level` interval for the Fréchet distance of `features` (N, D) to a fixed reference:
  the estimate ± z·(bootstrap standard deviation over resamples of the samples).

  It measures how much FD at this N moves with the draw of samples, which is what deciding
  between two settings scored at the same N needs. It says nothing of FD's upward bias at
  finite N (the same for every point of one N, so compare points of equal N only). Centred on
  the estimate on purpose: resampling with replacement repeats samples, which moves every
  resampled distance up, so percentile ends (or their reflection) can exclude the estimate.
  """
  f = np.asarray(features, np.float64)
  point = distance_of_features(f, ref_mu, ref_sigma)
  rng = np.random.default_rng(seed)
  draws = np.array([distance_of_features(f[rng.integers(0, len(f), len(f))], ref_mu, ref_sigma)
                    for _ in range(resamples)])
  half = float(scipy.stats.norm.ppf((1 + level) / 2)) * float(draws.std(ddof=1))
  return point - half, point + half


def proportion_interval(hits: np.ndarray, level: float = 0.95) -> tuple[float, float]:
  """Wilson score interval of a proportion (class accuracy) from its (N,) 0/1 outcomes."""
  n = len(hits)
  p = float(np.mean(hits))
  z = float(scipy.stats.norm.ppf((1 + level) / 2))
  centre = (p + z * z / (2 * n)) / (1 + z * z / n)
  half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
  return float(centre - half), float(centre + half)
