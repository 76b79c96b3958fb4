"""`--mode=eval`: sample `eval.num_samples` images with the configured guidance, score them.

  1. samples: class-balanced, through sgjax.generate.write_samples (sharded over the mesh,
     resumable .npz shards) into <workdir>/eval/<set>/, where <set> names the rule, the
     checkpoint step, N and a hash of config.sample: a changed setting never reuses old shards.
  2. features: Inception (or the FD-FMNIST classifier) over the shards, cached beside them per
     weights file and preprocessing; the reference's features/statistics are cached in
     <workdir>/eval/ per reference file, weights and preprocessing.
  3. metrics (sgjax.eval.metrics) -> <workdir>/metrics.json (and <set>/metrics.json), printed,
     and to the workdir's TensorBoard as `eval/<rule>/<metric>` scalars at the checkpoint's step.
"""

from __future__ import annotations

import hashlib
import io
import json
import os

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from sgjax import errors, files, flops, generate, guidance, lock, metrics, readers, sharding
from sgjax.convert import inception_fid
from sgjax.eval import fmnist, frechet, inception
from sgjax.eval import metrics as metrics_lib

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".JPEG", ".PNG", ".JPG")
IMAGES_EXPECTED = ("expected uint8 NHWC images (N >= 1, H, W, 1 or 3), as the ADM reference "
                   "batches hold them; floats in [0, 1] convert with "
                   "(x * 255).round().clip(0, 255).astype(np.uint8)")
# An ADM reference batch's statistics, of the FID Inception's pool and spatial features.
STATISTICS = {"mu": (inception.POOL_DIM,), "sigma": (inception.POOL_DIM, inception.POOL_DIM),
              "mu_s": (inception.SPATIAL_DIM,),
              "sigma_s": (inception.SPATIAL_DIM, inception.SPATIAL_DIM)}


def _sync(name: str) -> None:
  if jax.process_count() > 1:  # Host 0 wrote files the others read next (shared filesystem).
    multihost_utils.sync_global_devices(name)


def _digest(*parts) -> str:
  return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:10]


def _save_npz(path: str, **arrays) -> None:
  if jax.process_index() == 0:
    files.save_npz(path, **arrays)


def check_images(shape: tuple, dtype, where: str) -> None:
  """Refuses anything but uint8 NHWC with 1 or 3 channels: floats in [0, 1] or wider ints
  would be scored as if they were pixels (a wrong FID, not an error)."""
  shape = tuple(shape)
  if np.dtype(dtype) != np.uint8 or len(shape) != 4 or shape[0] < 1 or shape[-1] not in (1, 3):
    raise errors.UserError(where, f"images of shape {shape} and dtype {np.dtype(dtype)}",
                           IMAGES_EXPECTED)


REFERENCE_ALLOWED = ("an ADM reference batch .npz, an .npz of uint8 images (arr_0) or an image "
                     "folder")


def npz_headers(path: str) -> dict[str, tuple[tuple, np.dtype]]:
  """{key: (shape, dtype)} of an .npz's arrays, read from the headers only (a reference batch
  is gigabytes); a file that cannot be read is one line naming it (sgjax.readers)."""
  return readers.npz_headers(path, path, REFERENCE_ALLOWED)


def check_reference(path: str, needs_images: bool) -> None:
  """Refuses a reference that would be scored wrongly, before anything is sampled: images not
  uint8 NHWC, statistics not of the FID Inception's feature sizes, or no images where
  precision/recall (or missing statistics) need them."""
  if not path.endswith(".npz"):
    if not files.isdir(path) or not any(n.endswith(IMAGE_SUFFIXES) for n in files.listdir(path)):
      raise errors.UserError(f"eval.reference = {path!r}", f"no {IMAGE_SUFFIXES} files there",
                             "an ADM reference batch .npz, an .npz of uint8 images (arr_0) or "
                             "a folder of same-sized images")
    return
  headers = npz_headers(path)
  for key, want in STATISTICS.items():
    if key in headers and headers[key][0] != want:
      raise errors.UserError(f"eval.reference = {path!r}",
                             f"{key!r} has shape {headers[key][0]}",
                             f"expected {want}: statistics of the FID Inception's "
                             f"{'pool' if key in ('mu', 'sigma') else 'spatial'} features")
  if "arr_0" in headers:
    check_images(*headers["arr_0"], f"eval.reference = {path!r} ['arr_0']")
  elif needs_images or not all(k in headers for k in STATISTICS):
    raise errors.UserError(f"eval.reference = {path!r}",
                           f"has statistics {sorted(k for k in headers if k in STATISTICS)} but "
                           "no 'arr_0' images", "precision/recall and missing statistics "
                           f"need them (keys found: {sorted(headers)})")


def read_images(path: str) -> np.ndarray:
  """uint8 NHWC images from an .npz (`arr_0`) or a folder of same-sized PNG/JPEG files."""
  if path.endswith(".npz"):
    z = readers.npz(path, f"eval.reference = {path!r}", REFERENCE_ALLOWED)
    if "arr_0" not in z:
      raise errors.UserError(f"eval.reference = {path!r}", "no 'arr_0' images in it",
                             f"keys found: {list(z)}")
    check_images(z["arr_0"].shape, z["arr_0"].dtype, f"eval.reference = {path!r} ['arr_0']")
    return z["arr_0"]
  from PIL import Image  # Local: only folders need it.
  names = [n for n in files.listdir(path) if n.endswith(IMAGE_SUFFIXES)]
  if not names:
    raise errors.UserError(f"eval.reference = {path!r}", f"no {IMAGE_SUFFIXES} files there",
                           "a folder of same-sized images")
  images = []
  for n in names:
    with readers.reading(os.path.join(path, n), f"eval.reference = {path!r} ({n})",
                         "PNG or JPEG files", "image"):
      images.append(np.asarray(Image.open(io.BytesIO(files.read_bytes(os.path.join(path, n))))
                               .convert("RGB")))
  sizes = sorted({im.shape for im in images})
  if len(sizes) > 1:
    raise errors.UserError(f"eval.reference = {path!r}", f"images of sizes {sizes[:4]}",
                           "they must share one size (ADM reference batches are "
                           "center-cropped)")
  return np.stack(images)


def _needs_reference(e: ml_collections.ConfigDict) -> bool:
  return any(m in e.metrics for m in ("fid", "sfid", "precision", "recall"))  # Not IS.


def check_inputs(e: ml_collections.ConfigDict) -> None:
  """Fail before sampling, naming the field, when the Inception run cannot finish."""
  if e.feature_net != "inception":
    return
  for field, what in (("inception_weights", "weights file (.npz or .pth)"),
                      ("reference", "reference batch .npz or image folder")):
    if field == "reference" and not _needs_reference(e):
      continue
    if not e[field] or not files.exists(e[field]):
      raise errors.UserError(f"eval.{field} = {e[field]!r}", "no such file or folder",
                             f"name an existing {what} for eval.feature_net = 'inception' "
                             "(see docs/eval.md)")
  if _needs_reference(e):
    check_reference(e.reference, any(m in e.metrics for m in ("precision", "recall")))


def reference_statistics(e: ml_collections.ConfigDict, variables, mesh, cache_dir: str
                         ) -> dict[str, np.ndarray]:
  """{"mu", "sigma", "mu_s", "sigma_s"} and, for precision/recall, reference "pool" features.

  An ADM reference batch carries mu/sigma (pool) and mu_s/sigma_s (spatial) computed by the
  suite over a large set: those are used as they are, and its `arr_0` images (10k) give the
  features for precision/recall, as in the ADM evaluator. Anything missing is computed from the
  images. Cached per (reference, weights, preprocess).
  """
  need_pool = any(m in e.metrics for m in ("precision", "recall"))
  files.makedirs(cache_dir)
  cache = os.path.join(cache_dir, "reference_" + _digest(
      files.identity(e.reference), files.identity(e.inception_weights), e.preprocess) + ".npz")
  if files.exists(cache):
    metrics.print0(f"reference statistics from the cache {cache}")
    return files.load_npz(cache)
  stats, has_images = {}, True
  check_reference(e.reference, need_pool)
  if e.reference.endswith(".npz"):
    z = readers.npz(e.reference, f"eval.reference = {e.reference!r}", REFERENCE_ALLOWED)
    stats = {k: z[k] for k in STATISTICS if k in z}
    has_images = "arr_0" in z
  if need_pool or len(stats) < 4:
    if not has_images:  # check_reference refused this; kept for callers that skip it.
      raise errors.UserError(f"eval.reference = {e.reference!r}",
                             f"has statistics {sorted(stats)} but no 'arr_0' images",
                             "precision/recall and missing statistics need them")
    images = read_images(e.reference)
    feats = inception.features_of_array(variables, images, mesh, batch_size=e.batch_size,
                                        preprocess_mode=e.preprocess, what="reference images")
    for name, key in (("", "pool"), ("_s", "spatial")):
      if f"mu{name}" not in stats:
        stats[f"mu{name}"], stats[f"sigma{name}"] = frechet.statistics(feats[key])
    stats["pool"] = feats["pool"]
  _save_npz(cache, **stats)
  return stats


def _shards(sample_dir: str) -> list[str]:
  return files.glob(sample_dir, "shard_*.npz")


@lock.holding("sample_dir", "eval features")  # One writer of a set's cache.
def sample_features(e: ml_collections.ConfigDict, variables, mesh, sample_dir: str
                    ) -> dict[str, np.ndarray]:
  """Inception features of the sample set, streamed shard by shard; cached beside the shards."""
  cache = os.path.join(sample_dir, "features_" + _digest(
      files.identity(e.inception_weights), e.preprocess) + ".npz")
  if files.exists(cache):
    metrics.print0(f"sample features from the cache {cache}")
    return files.load_npz(cache)

  def batches():
    for path in _shards(sample_dir):
      yield files.load_npz(path)["arr_0"]

  feats = inception.extract_features(variables, batches(), mesh, batch_size=e.batch_size,
                                     num_images=e.num_samples, preprocess_mode=e.preprocess,
                                     what="samples")
  _save_npz(cache, **feats)
  return feats


def _inception_metrics(config, workdir: str, sample_dir: str, mesh) -> dict[str, float]:
  e = config.eval
  variables = inception_fid.load_variables(e.inception_weights)
  feats = sample_features(e, variables, mesh, sample_dir)
  ref = (reference_statistics(e, variables, mesh, os.path.join(workdir, "eval"))
         if _needs_reference(e) else {})
  return metrics_lib.fid_metrics(feats, ref, e.metrics, k=e.nearest_k,
                                 split_size=e.is_split_size, block=e.pr_block_size)


def _fmnist_metrics(config, workdir: str, sample_dir: str) -> dict[str, float]:
  """FD-FMNIST and class accuracy (sgjax.eval.fmnist) against the test split; precision and
  recall in the classifier's 64-d features when eval.metrics asks for them."""
  e = config.eval
  clf, ref, test = fmnist.for_workdir(config.data, workdir, log=metrics.print0)
  parts = [files.load_npz(p) for p in _shards(sample_dir)]
  images = np.concatenate([p["arr_0"] for p in parts])
  labels = np.concatenate([p["labels"] for p in parts])
  out = fmnist.sample_metrics(clf, ref, images, labels)
  if any(m in e.metrics for m in ("precision", "recall")):
    p, r = metrics_lib.precision_recall(fmnist.apply_in_batches(clf, test[0])[0],
                                        fmnist.apply_in_batches(clf, images)[0],
                                        e.nearest_k, e.pr_block_size)
    out.update({m: v for m, v in (("precision", p), ("recall", r)) if m in e.metrics})
  return out


def sample_set_name(config: ml_collections.ConfigDict, step: int) -> str:
  g = config.sample.guidance
  return (f"{g.rule}_step{step}_n{config.eval.num_samples}_"
          f"{_digest(config.sample.to_dict(), config.eval.seed)}")


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Samples, features, metrics; returns the metrics (also in <workdir>/metrics.json)."""
  e = config.eval
  check_inputs(e)
  mesh = sharding.build_mesh(config.mesh)
  plan = guidance.config_plan(config)
  g = config.sample.guidance
  with jax.set_mesh(mesh):
    model, weights, step = generate.load_weights(config, workdir, mesh)
    sample_dir = os.path.join(workdir, "eval", sample_set_name(config, step))
    metrics.print0(f"eval: {e.num_samples} samples ({g.rule}, ω={g.omega:g}) of step {step} "
                   f"-> {sample_dir}")
    generate.write_samples(config, model, weights, plan, mesh, sample_dir, e.num_samples,
                               e.seed)
    del weights
    _sync("eval_samples_written")
    if e.feature_net == "fmnist":
      scores = _fmnist_metrics(config, workdir, sample_dir)
    else:
      scores = _inception_metrics(config, workdir, sample_dir, mesh)
  macs = flops.plan_macs(config, plan)
  results = dict(scores, num_samples=int(e.num_samples), step=int(step), rule=g.rule,
                 omega=float(g.omega), gamma_strong=float(g.gamma_strong),
                 gamma_weak=float(g.gamma_weak), steps=int(config.sample.steps),
                 sampler=config.sample.sampler, feature_net=e.feature_net,
                 gmacs_per_image=macs.with_attention / 1e9, samples=sample_dir)
  # Beside the loss curve, at the checkpoint's step: eval/<rule>/fid, …/inception_score, ….
  metrics.log_scalars(workdir, step, scores, prefix=f"eval/{g.rule}")
  if jax.process_index() == 0:
    latest = os.path.join(workdir, "metrics.json")  # The latest eval; each set keeps its own.
    if files.exists(latest):
      before = readers.json_object(latest, "metrics file", f"move {latest} aside and rerun: "
                                   "each sample set keeps its own metrics.json").get("samples")
      if before and before != sample_dir:
        metrics.print0(f"replacing {latest} (it held {before}, whose metrics stay in its "
                       "metrics.json)")
    for path in (os.path.join(sample_dir, "metrics.json"), latest):
      files.write_text(path, json.dumps(results, indent=2))
    metrics.print0("\n".join(f"  {k:16s} {v:.4f}" if isinstance(v, float)
                             else f"  {k:16s} {v}" for k, v in results.items()))
  return results
