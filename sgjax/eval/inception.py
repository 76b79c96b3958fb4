"""The FID Inception-v3 (TF graph `inception-2015-12-05`, as ported by pytorch-fid), in Flax.

This is the network behind FID, sFID, IS and precision/recall in the ADM evaluation suite
(openai/guided-diffusion `evaluations/evaluator.py`), which runs the TF graph itself. Its
structure is torchvision's Inception-v3 with the FID patches: the pooling branch of the A, C and
first E blocks averages without counting the zero padding (TF's `SAME` average pool), the last E
block max-pools there, BatchNorm ε = 1e-3, 1008 classes, no auxiliary head. Module and parameter
names mirror the PyTorch state dict (`Mixed_6d/branch1x1/conv/kernel` <-> `Mixed_6d.branch1x1.
conv.weight`), so the converter (`sgjax/convert/inception_fid.py`) is a renaming plus transposes.

Outputs (NHWC in, any size (resized to 299 inside), 1 or 3 channels, uint8 or [0, 255] floats):
  pool     (B, 2048)  `pool_3`: global average of the last block (FID, precision/recall).
  spatial  (B, 2023)  `mixed_6/conv`: the 1x1 branch of Mixed_6d (TF's 7th mixed block) after
                      BN + ReLU, its first 7 channels of 17x17 flattened in HWC order (sFID).
  logits   (B, 1008)  pool @ W of the final layer, *without* its bias: what improved-GAN's and
                      the ADM suite's Inception Score feed the softmax.

Preprocessing (`preprocess`):
  "adm"          the TF graph's own: TF1 bilinear resize to 299 (legacy, align_corners=False:
                 source = dst · in/out), then (x − 128) / 128. Matches the ADM suite and TTUR.
  "pytorch_fid"  pytorch-fid's: half-pixel bilinear resize (F.interpolate, align_corners=False),
                 then x / 127.5 − 1. Its FIDs differ slightly from the TF ones.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Iterable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from sgjax import errors, metrics, sharding

INPUT_SIZE = 299
NUM_CLASSES = 1008
POOL_DIM = 2048
SPATIAL_CHANNELS = 7  # The ADM suite keeps the first 7 of the 192 channels of mixed_6/conv.
SPATIAL_DIM = SPATIAL_CHANNELS * 17 * 17  # mixed_6 is 17x17 at the 299x299 input: 2023.
BN_EPSILON = 1e-3
PREPROCESS = ("adm", "pytorch_fid")
# Features are compared across machines: no TF32/bf16 passes inside convolutions and matmuls.
_PRECISION = jax.lax.Precision.HIGHEST


def resize_matrix(in_size: int, out_size: int, mode: str) -> np.ndarray:
  """(out_size, in_size) bilinear interpolation weights along one axis (rows sum to 1).

  Computed in float32 like both reference kernels (TF's resize_bilinear, PyTorch's upsample).
  """
  dst = np.arange(out_size, dtype=np.float32)
  scale = np.float32(in_size) / np.float32(out_size)
  if mode == "adm":  # TF1 legacy mapping: no half-pixel offset.
    src = dst * scale
  elif mode == "pytorch_fid":  # Half-pixel centres; negative sources clamp to 0.
    src = np.maximum((dst + np.float32(0.5)) * scale - np.float32(0.5), np.float32(0))
  else:
    raise errors.UserError(f"preprocess = {mode!r}", f"allowed: {PREPROCESS}")
  lo = np.floor(src).astype(np.int64)
  hi = np.minimum(lo + 1, in_size - 1)
  frac = src - lo.astype(np.float32)
  m = np.zeros((out_size, in_size), np.float32)
  np.add.at(m, (np.arange(out_size), lo), 1 - frac)
  np.add.at(m, (np.arange(out_size), hi), frac)
  return m


def preprocess(images: jax.Array, mode: str) -> jax.Array:
  """uint8 / [0, 255] NHWC (1 or 3 channels) -> the network's 299x299x3 input."""
  x = images.astype(jnp.float32)
  if x.shape[-1] == 1:  # Grayscale: the same value in R, G and B.
    x = jnp.repeat(x, 3, axis=-1)
  if x.shape[-1] != 3:
    raise errors.UserError(f"images of shape {images.shape}", "Inception needs 1 or 3 channels")
  # Separable resize as two small matmuls: exact bilinear, and fast on every backend.
  ry = jnp.asarray(resize_matrix(x.shape[1], INPUT_SIZE, mode))
  rx = jnp.asarray(resize_matrix(x.shape[2], INPUT_SIZE, mode))
  x = jnp.einsum("oh,bhwc->bowc", ry, x, precision=_PRECISION)
  x = jnp.einsum("pw,bowc->bopc", rx, x, precision=_PRECISION)
  if mode == "adm":
    return (x - 128.0) / 128.0  # The graph's Sub(128) and Mul(1/128).
  return x / 127.5 - 1.0  # pytorch-fid: 2·(x/255) − 1.


class ConvBN(nn.Module):
  """Conv (no bias) -> BatchNorm with running statistics (ε 1e-3) -> ReLU: `BasicConv2d`."""

  features: int
  kernel: tuple[int, int]
  strides: int = 1
  padding: tuple[int, int] = (0, 0)

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    ph, pw = self.padding
    x = nn.Conv(self.features, self.kernel, self.strides, padding=((ph, ph), (pw, pw)),
                use_bias=False, precision=_PRECISION, name="conv")(x)
    x = nn.BatchNorm(use_running_average=True, epsilon=BN_EPSILON, name="bn")(x)
    return nn.relu(x)


def _avg_pool_same(x: jax.Array) -> jax.Array:
  # TF's SAME average pool divides by the number of real pixels under the window.
  return nn.avg_pool(x, (3, 3), (1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool(x: jax.Array, stride: int = 2, pad: int = 0) -> jax.Array:
  return nn.max_pool(x, (3, 3), (stride, stride), padding=((pad, pad), (pad, pad)))


class InceptionA(nn.Module):  # Mixed_5b/c/d (TF mixed, mixed_1, mixed_2): 35x35.
  pool_features: int

  @nn.compact
  def __call__(self, x):
    b1 = ConvBN(64, (1, 1), name="branch1x1")(x)
    b5 = ConvBN(48, (1, 1), name="branch5x5_1")(x)
    b5 = ConvBN(64, (5, 5), padding=(2, 2), name="branch5x5_2")(b5)
    b3 = ConvBN(64, (1, 1), name="branch3x3dbl_1")(x)
    b3 = ConvBN(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(b3)
    b3 = ConvBN(96, (3, 3), padding=(1, 1), name="branch3x3dbl_3")(b3)
    bp = ConvBN(self.pool_features, (1, 1), name="branch_pool")(_avg_pool_same(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):  # Mixed_6a (TF mixed_3): 35x35 -> 17x17.
  @nn.compact
  def __call__(self, x):
    b3 = ConvBN(384, (3, 3), strides=2, name="branch3x3")(x)
    bd = ConvBN(64, (1, 1), name="branch3x3dbl_1")(x)
    bd = ConvBN(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
    bd = ConvBN(96, (3, 3), strides=2, name="branch3x3dbl_3")(bd)
    return jnp.concatenate([b3, bd, _max_pool(x)], axis=-1)


class InceptionC(nn.Module):  # Mixed_6b..6e (TF mixed_4..mixed_7): 17x17.
  channels_7x7: int

  @nn.compact
  def __call__(self, x):
    """Returns (block output, its 1x1 branch: TF's `mixed_N/conv`, the sFID features)."""
    c7 = self.channels_7x7
    b1 = ConvBN(192, (1, 1), name="branch1x1")(x)
    b7 = ConvBN(c7, (1, 1), name="branch7x7_1")(x)
    b7 = ConvBN(c7, (1, 7), padding=(0, 3), name="branch7x7_2")(b7)
    b7 = ConvBN(192, (7, 1), padding=(3, 0), name="branch7x7_3")(b7)
    bd = ConvBN(c7, (1, 1), name="branch7x7dbl_1")(x)
    bd = ConvBN(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_2")(bd)
    bd = ConvBN(c7, (1, 7), padding=(0, 3), name="branch7x7dbl_3")(bd)
    bd = ConvBN(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_4")(bd)
    bd = ConvBN(192, (1, 7), padding=(0, 3), name="branch7x7dbl_5")(bd)
    bp = ConvBN(192, (1, 1), name="branch_pool")(_avg_pool_same(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1), b1


class InceptionD(nn.Module):  # Mixed_7a (TF mixed_8): 17x17 -> 8x8.
  @nn.compact
  def __call__(self, x):
    b3 = ConvBN(192, (1, 1), name="branch3x3_1")(x)
    b3 = ConvBN(320, (3, 3), strides=2, name="branch3x3_2")(b3)
    b7 = ConvBN(192, (1, 1), name="branch7x7x3_1")(x)
    b7 = ConvBN(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
    b7 = ConvBN(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
    b7 = ConvBN(192, (3, 3), strides=2, name="branch7x7x3_4")(b7)
    return jnp.concatenate([b3, b7, _max_pool(x)], axis=-1)


class InceptionE(nn.Module):  # Mixed_7b (avg pool), Mixed_7c (max pool: the FID graph's quirk).
  pool: str

  @nn.compact
  def __call__(self, x):
    b1 = ConvBN(320, (1, 1), name="branch1x1")(x)
    b3 = ConvBN(384, (1, 1), name="branch3x3_1")(x)
    b3 = jnp.concatenate([ConvBN(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(b3),
                          ConvBN(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(b3)], -1)
    bd = ConvBN(448, (1, 1), name="branch3x3dbl_1")(x)
    bd = ConvBN(384, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
    bd = jnp.concatenate([ConvBN(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(bd),
                          ConvBN(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(bd)], -1)
    pooled = _avg_pool_same(x) if self.pool == "avg" else _max_pool(x, stride=1, pad=1)
    bp = ConvBN(192, (1, 1), name="branch_pool")(pooled)
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class Logits(nn.Module):
  """The 2048 -> 1008 classifier. IS uses pool @ W alone (improved-GAN and ADM drop the bias);
  the bias is kept so the converted weights are the whole network."""

  with_bias: bool = False

  @nn.compact
  def __call__(self, pool):
    kernel = self.param("kernel", nn.initializers.lecun_normal(), (POOL_DIM, NUM_CLASSES))
    bias = self.param("bias", nn.initializers.zeros, (NUM_CLASSES,))
    logits = jnp.dot(pool, kernel, precision=_PRECISION)
    return logits + bias if self.with_bias else logits


class InceptionV3(nn.Module):
  """images (B, H, W, 1|3) in [0, 255] -> {"pool", "spatial", "logits"} (see module doc)."""

  preprocess: str = "adm"
  logits_with_bias: bool = False

  @nn.compact
  def __call__(self, images: jax.Array) -> dict[str, jax.Array]:
    x = preprocess(images, self.preprocess)
    x = ConvBN(32, (3, 3), strides=2, name="Conv2d_1a_3x3")(x)  # 149
    x = ConvBN(32, (3, 3), name="Conv2d_2a_3x3")(x)  # 147
    x = ConvBN(64, (3, 3), padding=(1, 1), name="Conv2d_2b_3x3")(x)
    x = _max_pool(x)  # 73
    x = ConvBN(80, (1, 1), name="Conv2d_3b_1x1")(x)
    x = ConvBN(192, (3, 3), name="Conv2d_4a_3x3")(x)  # 71
    x = _max_pool(x)  # 35
    x = InceptionA(32, name="Mixed_5b")(x)
    x = InceptionA(64, name="Mixed_5c")(x)
    x = InceptionA(64, name="Mixed_5d")(x)
    x = InceptionB(name="Mixed_6a")(x)  # 17
    x, _ = InceptionC(128, name="Mixed_6b")(x)
    x, _ = InceptionC(160, name="Mixed_6c")(x)
    x, mixed_6_conv = InceptionC(160, name="Mixed_6d")(x)
    x, _ = InceptionC(192, name="Mixed_6e")(x)
    x = InceptionD(name="Mixed_7a")(x)  # 8
    x = InceptionE("avg", name="Mixed_7b")(x)
    x = InceptionE("max", name="Mixed_7c")(x)
    pool = x.mean(axis=(1, 2))
    spatial = mixed_6_conv[..., :SPATIAL_CHANNELS]
    return dict(pool=pool, spatial=spatial.reshape(spatial.shape[0], -1),
                logits=Logits(self.logits_with_bias, name="fc")(pool))


@functools.lru_cache(maxsize=1)
def variables_template():
  """Shapes of every variable ({"params", "batch_stats"}), without computing anything."""
  return jax.eval_shape(InceptionV3().init, jax.random.key(0),
                        jax.ShapeDtypeStruct((1, INPUT_SIZE, INPUT_SIZE, 3), jnp.uint8))


@functools.lru_cache(maxsize=8)
def _feature_fn(preprocess_mode: str, mesh):
  """One jitted forward per (preprocess, mesh): repeated calls reuse the executable."""
  return jax.jit(InceptionV3(preprocess=preprocess_mode).apply,
                 in_shardings=(sharding.replicated(mesh), sharding.batch_sharding(mesh)))


def extract_features(variables, batches: Iterable[np.ndarray], mesh, *, batch_size: int,
                     num_images: int, preprocess_mode: str = "adm", log_every: int = 20,
                     what: str = "images") -> dict[str, np.ndarray]:
  """Features of uint8 NHWC batches (any batch lengths), sharded over the mesh's batch axes.

  Every device batch is padded to `batch_size` (one compile); outputs come back as numpy.
  """
  fn = _feature_fn(preprocess_mode, mesh)
  variables = jax.device_put(variables, sharding.replicated(mesh))
  out: dict[str, list[np.ndarray]] = {}
  done, calls = 0, 0
  progress = metrics.Progress(-(-num_images // batch_size))
  t0 = time.perf_counter()

  def run(chunk: np.ndarray) -> None:
    nonlocal done, calls
    padded = np.concatenate([chunk, np.zeros((batch_size - len(chunk), *chunk.shape[1:]),
                                              chunk.dtype)])
    feats = fn(variables, jax.device_put(padded, sharding.batch_sharding(mesh)))
    if jax.process_count() > 1:
      feats = multihost_utils.process_allgather(feats, tiled=True)
    for k, v in jax.device_get(feats).items():
      out.setdefault(k, []).append(np.asarray(v[:len(chunk)], np.float32))
    done, calls = done + len(chunk), calls + 1
    if calls % log_every == 0:
      progress.report(calls, {what: done})

  for batch in batches:
    batch = np.asarray(batch)
    for lo in range(0, len(batch), batch_size):
      run(batch[lo:lo + batch_size])
  if jax.process_index() == 0:
    print(f"Inception features of {done} {what} in {time.perf_counter() - t0:.1f}s", flush=True)
  return {k: np.concatenate(v) for k, v in out.items()}


def features_of_array(variables, images: np.ndarray, mesh, *, batch_size: int,
                      preprocess_mode: str = "adm", what: str = "images"
                      ) -> Mapping[str, np.ndarray]:
  return extract_features(variables, [images], mesh, batch_size=batch_size,
                          num_images=len(images), preprocess_mode=preprocess_mode, what=what)
