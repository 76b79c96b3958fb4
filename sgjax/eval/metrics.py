"""Sample-quality metrics from features, computed as the ADM evaluation suite computes them.

  FID        Fréchet distance of the Inception pool features (2048-d), sgjax.eval.frechet.
  sFID       the same on the spatial features (mixed_6/conv, first 7 channels, 2023-d).
  IS         exp E_x KL(p(y|x) ‖ p(y)) over consecutive splits of `split_size` samples (ADM:
             5000, so 50k samples give 10 splits), averaged; p(y|x) = softmax of the bias-free
             logits.
  precision  fraction of samples inside the reference manifold; recall: fraction of reference
  recall     points inside the sample manifold (Kynkäänniemi et al. 2019). A manifold is the
             union of balls around its points whose radius is the distance to the k-th nearest
             neighbour (k = 3; the point itself is the 0-th).

Pairwise distances run blockwise on the default device (squared Euclidean, float32, clamped at
0, as in the ADM code; ADM first tries float16 there, we stay in float32).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import scipy.special

from sgjax import errors, sharding
from sgjax.eval import frechet

METRICS = ("fid", "sfid", "is", "precision", "recall")
# What embeds the samples: the FID Inception (sgjax.eval.inception), or the Fashion-MNIST demo
# classifier (sgjax.eval.fmnist; FD-FMNIST).
FEATURE_NETS = ("inception", "fmnist")


def check_config(config, num_devices: int | None = None) -> None:
  """The `eval` section: the sample count, the feature net and its preprocessing and batches,
  and these metrics' settings. Given the device count, Inception's batch must split over the
  mesh's batch axes (only Inception is sharded)."""
  e, check = config.eval, errors.check  # Each field's own values: its declaration.
  if e.feature_net == "fmnist":
    check(config.data.name == "fashion_mnist", "eval.feature_net", e.feature_net,
          f"'fmnist' scores Fashion-MNIST samples; data.name = {config.data.name!r} needs "
          "'inception'")
  if any(k in e.metrics for k in ("precision", "recall")):
    check(e.num_samples > e.nearest_k, "eval.num_samples", e.num_samples,
          f"must be > eval.nearest_k = {e.nearest_k} for precision/recall")
  if num_devices is not None and e.feature_net == "inception":
    shards = sharding.data_parallel_size(config.mesh, num_devices)
    check(e.batch_size % shards == 0, "eval.batch_size", e.batch_size,
          f"must be divisible by the data-parallel size mesh.data*mesh.fsdp = {shards}")


def inception_score(logits: np.ndarray, split_size: int = 5000) -> float:
  """Mean over splits of exp(mean KL(p(y|x) ‖ p(y))); float64, log-softmax for stability."""
  logits = np.asarray(logits, np.float64)
  if logits.ndim != 2 or len(logits) < 1:  # The classifier's own output: a bug if so.
    raise ValueError(f"logits must be (N >= 1, classes), got shape {logits.shape}")
  scores = []
  for lo in range(0, len(logits), split_size):
    log_p = scipy.special.log_softmax(logits[lo:lo + split_size], axis=1)
    log_marginal = scipy.special.logsumexp(log_p, axis=0) - np.log(len(log_p))
    kl = np.sum(np.exp(log_p) * (log_p - log_marginal), axis=1)
    scores.append(np.exp(kl.mean()))
  return float(np.mean(scores))


@jax.jit
def _squared_distances(rows: jax.Array, cols: jax.Array) -> jax.Array:
  hi = jax.lax.Precision.HIGHEST
  d = ((rows * rows).sum(1)[:, None] - 2 * jnp.dot(rows, cols.T, precision=hi)
       + (cols * cols).sum(1)[None, :])
  return jnp.maximum(d, 0.0)


@functools.partial(jax.jit, static_argnums=2)
def _kth_smallest(rows: jax.Array, cols: jax.Array, k: int) -> jax.Array:
  neg_smallest, _ = jax.lax.top_k(-_squared_distances(rows, cols), k + 1)
  return -neg_smallest[:, k]


@jax.jit
def _inside(rows: jax.Array, cols: jax.Array, col_radii: jax.Array) -> jax.Array:
  return jnp.any(_squared_distances(rows, cols) <= col_radii[None, :], axis=1)


def _row_blocks(fn, rows: np.ndarray, block: int, *args) -> np.ndarray:
  """fn over fixed-size row blocks (the last one padded: one compile), concatenated."""
  rows = np.asarray(rows, np.float32)
  out = []
  for lo in range(0, len(rows), block):
    chunk = rows[lo:lo + block]
    pad = min(block, len(rows)) - len(chunk)
    padded = np.concatenate([chunk, np.zeros((pad, rows.shape[1]), np.float32)])
    out.append(np.asarray(fn(jnp.asarray(padded), *args))[:len(chunk)])
  return np.concatenate(out)


def manifold_radii(features: np.ndarray, k: int = 3, block: int = 10000) -> np.ndarray:
  """Squared distance of every point to its k-th nearest neighbour in the set (self = 0th)."""
  features = np.asarray(features, np.float32)
  if len(features) <= k:
    raise errors.UserError(f"a manifold with k = {k}",
                           f"needs more than {k} points, got {len(features)}",
                           "score more samples, or a smaller k")
  return _row_blocks(lambda r, c: _kth_smallest(r, c, k), features, block,
                     jnp.asarray(features))


def precision_recall(reference: np.ndarray, samples: np.ndarray, k: int = 3,
                     block: int = 10000) -> tuple[float, float]:
  """Improved precision and recall (k-NN manifolds) of samples against reference features."""
  ref_radii = manifold_radii(reference, k, block)
  sample_radii = manifold_radii(samples, k, block)
  ref, smp = jnp.asarray(reference, jnp.float32), jnp.asarray(samples, jnp.float32)
  precision = _row_blocks(_inside, samples, block, ref, jnp.asarray(ref_radii)).mean()
  recall = _row_blocks(_inside, reference, block, smp, jnp.asarray(sample_radii)).mean()
  return float(precision), float(recall)


def fid_metrics(samples: dict[str, np.ndarray], reference: dict[str, np.ndarray],
                which=METRICS, *, k: int = 3, split_size: int = 5000, block: int = 10000
                ) -> dict[str, float]:
  """The requested metrics of sample features {"pool", "spatial", "logits"} against reference
  statistics {"mu", "sigma", "mu_s", "sigma_s"} and (for precision/recall) features "pool"."""
  out = {}
  if "fid" in which:
    out["fid"] = frechet.frechet_distance(*frechet.statistics(samples["pool"]),
                                          reference["mu"], reference["sigma"])
  if "sfid" in which:
    out["sfid"] = frechet.frechet_distance(*frechet.statistics(samples["spatial"]),
                                           reference["mu_s"], reference["sigma_s"])
  if "is" in which:
    out["inception_score"] = inception_score(samples["logits"], split_size)
  if "precision" in which or "recall" in which:
    p, r = precision_recall(reference["pool"], samples["pool"], k, block)
    out.update({m: v for m, v in (("precision", p), ("recall", r)) if m in which})
  return out
