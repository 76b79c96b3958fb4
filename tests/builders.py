"""Builders the tests share: tiny configs, tiny models with random (non-zero) params, inputs.

The one place test files take helpers from (no test module imports another).
"""

import contextlib
import hashlib
import math
import os
import subprocess
import zlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from hypothesis import strategies as st
from safetensors.numpy import save_file

from sgjax import checkpoint, models
from sgjax import config as config_lib
from sgjax import state as state_lib
from sgjax import workdir as workdir_lib
from sgjax.models import dit, trdit
from sgjax.text import encoder as encoder_lib


def tiny_config():
  c = config_lib.base_config()
  c.dtype = "float32"
  c.model.update(preset="", depth=3, width=64, heads=4, patch_size=4)
  c.data.update(name="synthetic", image_size=16, channels=1, num_classes=4)
  c.sparsity.routes = ((1, 1, 0.5),)
  # No sample grids while training (they cost a sampler compile per rule): tests turn them on.
  c.train.update(batch_size=16, num_steps=4, lr=1e-3, grad_clip=1.0, ema_decay=0.9,
                 log_every=2, checkpoint_every=2, async_checkpoint=False, sample_every=0)
  c.sample.update(batch_size=8, steps=3, per_class=2)
  c.sample.guidance.update(rule="sg", omega=1.5, gamma_strong=0.0, gamma_weak=0.5)
  return c


def dit_model(depth=4, **kw):
  return dit.DiT(image_size=16, channels=3, num_classes=5, depth=depth, width=64, heads=4,
                 patch_size=2, **kw)


def random_params(model, seed=0, scale=0.1):
  """Init, then replace every leaf with noise: zero-init adaLN (modulation) would make every
  block the identity. Only the init's tree and shapes are kept, so it is traced, not run
  (an eager init dispatches every op on its own: ~12 s for the tiny TR-DiT on 2 cores)."""
  x = jnp.zeros((1, model.image_size, model.image_size, model.channels))
  params = jax.eval_shape(model.init, jax.random.key(seed), x, jnp.zeros((1,)),
                          model.example_condition(1))
  params = jax.tree.map(lambda a: a.value if hasattr(a, "value") else a, params["params"],
                        is_leaf=lambda a: hasattr(a, "value"))
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
  noisy = [scale * jax.random.normal(k, a.shape) for k, a in zip(keys, leaves, strict=True)]
  return jax.tree.unflatten(tree, noisy)


def dit_random_params(model, seed=0):
  return random_params(model, seed, scale=0.1)


def dit_inputs(model, batch=3, seed=2):
  k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
  x = jax.random.normal(k1, (batch, model.image_size, model.image_size, model.channels))
  t = jax.random.uniform(k2, (batch,))
  y = jax.random.randint(k3, (batch,), 0, model.num_classes + 1)
  return x, t, y


def all_shapes(jaxpr) -> set:
  """Output shapes of every equation, descending into nested jaxprs (jit, remat, ...)."""
  out = set()
  for e in jaxpr.eqns:
    out |= {tuple(v.aval.shape) for v in e.outvars if hasattr(v.aval, "shape")}
    for p in e.params.values():
      sub = getattr(p, "jaxpr", p)
      if hasattr(sub, "eqns"):
        out |= all_shapes(sub)
  return out


def trdit_model(depth=3, **kw):
  return trdit.TRDiT(image_size=16, channels=3, depth=depth, width=64, heads=4, patch_size=2,
                     text_width=24, text_tokens=6, text_layers=1, **kw)


def trdit_random_params(model, seed=0):
  return random_params(model, seed, scale=0.2)


def trdit_inputs(model, batch=3, seed=2):
  k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
  x = jax.random.normal(k1, (batch, model.image_size, model.image_size, model.channels))
  t = jax.random.uniform(k2, (batch,))
  text = jax.random.normal(k3, (batch, model.text_tokens, model.text_width))
  mask = jnp.arange(model.text_tokens)[None] < jnp.array([[2], [4], [6]])[:batch]
  return x, t, {"text": text, "text_mask": mask}


def load_config(name):
  return config_lib.load_config_file(name)


def guidance_config(rule, omega=2.0, gs=0.25, gw=0.75, **kw):
  g = config_lib.base_config().sample.guidance
  g.update(dict(rule=rule, omega=omega, gamma_strong=gs, gamma_weak=gw, guide_step=0, **kw))
  return g


def tiny_t2i_config():
  c = config_lib.base_config()
  c.dtype = "float32"
  c.model.update(kind="trdit", preset="", depth=2, width=64, heads=4, patch_size=4)
  c.text.update(width=24, max_tokens=6, layers=1)
  c.data.update(name="synthetic", image_size=16, channels=1, num_classes=4)
  c.sparsity.routes = ((1, 1, 0.5),)
  c.train.update(batch_size=16, num_steps=4, lr=1e-3, grad_clip=1.0, ema_decay=0.9,
                 label_dropout=0.25)
  c.sample.update(batch_size=8, steps=3, per_class=2)
  c.sample.guidance.update(rule="cfg_sg", omega=1.5, gamma_strong=0.0, gamma_weak=0.5)
  return c


class WordEncoder:
  """A deterministic stand-in for MiniLM: one feature row per word plus two end tokens."""

  name, width = "words", 24

  def encode(self, texts, max_tokens):
    rows = [np.stack([np.random.default_rng(zlib.crc32(w.encode())).standard_normal(self.width)
                      for w in ["[CLS]", *t.split(), "[SEP]"]]) for t in texts]
    return encoder_lib.pad_features(rows, max_tokens, self.width)


# ---- SD-VAE weights in diffusers' layout, and the tiny latent setup.


TINY = dict(block_out_channels=(8, 16), layers_per_block=1, latent_channels=4, in_channels=3,
            norm_groups=4)


ATTN_NEW = ("to_q", "to_k", "to_v", "to_out.0")


ATTN_OLD = ("query", "key", "value", "proj_attn")


def diffusers_shapes(block_out_channels, layers_per_block, latent_channels, in_channels,
                     old_attention=False, conv_attention=False, **_):
  """{key: shape} of a diffusers AutoencoderKL state dict (Encoder/Decoder of diffusers' vae.py)."""
  shapes = {}

  def conv(name, out, inp, k):
    shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (out, inp, k, k), (out,)

  def norm(name, c):
    shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (c,), (c,)

  def resnet(name, inp, out):
    norm(f"{name}.norm1", inp)
    conv(f"{name}.conv1", out, inp, 3)
    norm(f"{name}.norm2", out)
    conv(f"{name}.conv2", out, out, 3)
    if inp != out:
      conv(f"{name}.conv_shortcut", out, inp, 1)

  def mid(name, c):
    resnet(f"{name}.resnets.0", c, c)
    norm(f"{name}.attentions.0.group_norm", c)
    for proj in ATTN_OLD if old_attention else ATTN_NEW:
      p = f"{name}.attentions.0.{proj}"
      shapes[f"{p}.weight"] = (c, c, 1, 1) if conv_attention else (c, c)
      shapes[f"{p}.bias"] = (c,)
    resnet(f"{name}.resnets.1", c, c)

  ch, last = tuple(block_out_channels), len(block_out_channels) - 1
  conv("encoder.conv_in", ch[0], in_channels, 3)
  prev = ch[0]
  for i, c in enumerate(ch):
    for j in range(layers_per_block):
      resnet(f"encoder.down_blocks.{i}.resnets.{j}", prev, c)
      prev = c
    if i < last:
      conv(f"encoder.down_blocks.{i}.downsamplers.0.conv", c, c, 3)
  mid("encoder.mid_block", ch[-1])
  norm("encoder.conv_norm_out", ch[-1])
  conv("encoder.conv_out", 2 * latent_channels, ch[-1], 3)
  conv("quant_conv", 2 * latent_channels, 2 * latent_channels, 1)
  conv("post_quant_conv", latent_channels, latent_channels, 1)
  rev = ch[::-1]
  conv("decoder.conv_in", rev[0], latent_channels, 3)
  mid("decoder.mid_block", rev[0])
  prev = rev[0]
  for i, c in enumerate(rev):
    for j in range(layers_per_block + 1):
      resnet(f"decoder.up_blocks.{i}.resnets.{j}", prev, c)
      prev = c
    if i < last:
      conv(f"decoder.up_blocks.{i}.upsamplers.0.conv", c, c, 3)
  norm("decoder.conv_norm_out", ch[0])
  conv("decoder.conv_out", in_channels, ch[0], 3)
  return shapes


def random_state_dict(seed=0, **arch):
  rng = np.random.default_rng(seed)
  state = {}
  for name, shape in diffusers_shapes(**arch).items():
    if name.endswith(".bias"):
      v = 0.1 * rng.standard_normal(shape)
    elif len(shape) == 1:  # GroupNorm scale.
      v = 1.0 + 0.1 * rng.standard_normal(shape)
    else:  # Fan-in scaled, so activations stay O(1) through the blocks.
      v = rng.standard_normal(shape) / np.sqrt(np.prod(shape[1:]))
    state[name] = v.astype(np.float32)
  return state


def write_weights(path, seed=0, **arch) -> str:
  save_file(random_state_dict(seed, **(arch or TINY)), str(path))
  return str(path)


def apply(model, params, x, method):
  """model.apply jitted (one compile instead of an eager compile per op)."""
  return jax.jit(model.apply, static_argnames="method")({"params": params}, x, method=method)


def vae_config(weights="", **arch) -> ml_collections.ConfigDict:
  vc = config_lib.base_config().vae
  vc.update(dict(TINY, **arch), weights=weights)
  return vc


CROP = 32  # The tiny VAE (channels (8, 16), 1 latent channel) downsamples x2: 16x16x1 latents.


VAE = dict(block_out_channels=(8, 16), layers_per_block=1, latent_channels=1, in_channels=3,
           norm_groups=4)


def latent_config(image_dir="", data_dir="", weights=""):
  """tiny_config on encoded latents: 16x16x1 in 4 classes, so the DiT, its train step and its
  sampler are exactly tiny_config's and share compiled programs with tests/test_train.py and
  test_loop.py through the test run's compilation cache."""
  c = tiny_config()
  c.data.update(name="latents", dir=data_dir, image_size=CROP // 2, channels=1, num_classes=4)
  c.vae.update(VAE, weights=weights, chunk=4)
  c.encode.update(source="folder", source_dir=image_dir, image_size=CROP, flip=True,
                  batch_size=4, shard_size=3)  # 8 images -> shards of 3, 3, 2 (last is short).
  c.train.update(num_steps=2)
  return c


def write_checkpoints(config, workdir, steps, scale=0.02):
  """Checkpoints of `config`'s model at `steps` without training (no train-step compile): the
  fresh state with its params and EMA moved by step-dependent noise, so checkpoints differ."""
  model, tx = models.from_config(config), state_lib.make_optimizer(config.train)
  state = state_lib.fresh_state(model, tx, config.seed)
  mngr = checkpoint.manager(os.path.join(workdir, "checkpoints"), async_save=False)
  for step in steps:
    leaves, tree = jax.tree.flatten(state["params"])
    keys = jax.random.split(jax.random.key(step), len(leaves))
    moved = jax.tree.unflatten(tree, [a + scale * jax.random.normal(k, a.shape, a.dtype)
                                      for a, k in zip(leaves, keys, strict=True)])
    checkpoint.save(mngr, step, dict(state, params=moved, ema=moved, step=jnp.int32(step)), None)
  mngr.wait_until_finished()
  mngr.close()


def trained_workdir(config, workdir, steps):
  """A workdir of `config` with checkpoints at `steps` (`write_checkpoints`: no training) and
  its record, as a trained run leaves it; its path."""
  write_checkpoints(config, workdir, steps)
  workdir_lib.write(workdir, config, base_step=-1, written_by="test")
  return str(workdir)


def file_snapshot(root):
  """{relative path: (size, mtime_ns, sha256)} of every file under `root`: equal before and
  after a step means nothing there was written, added or removed."""
  out = {}
  for folder, _, names in os.walk(root):
    for name in names:
      path = os.path.join(folder, name)
      with open(path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
      st = os.stat(path)
      out[os.path.relpath(path, root)] = (st.st_size, st.st_mtime_ns, digest)
  return out


# ------------------------------------------------------------ the FID Inception's weights
# name -> (in, out, kh, kw, stride, pad_h, pad_w): torchvision's Inception-v3 as patched by
# pytorch-fid (aux head removed).
def _conv(i, o, kh, kw=None, s=1, ph=0, pw=None):
  """Square kernels pad ph on both axes; 1x7 / 7x1 kernels give pw / ph explicitly."""
  if kw is None:
    kw, pw = kh, ph
  return (i, o, kh, kw, s, ph, pw or 0)


def _block_a(i, pool):
  return {"branch1x1": _conv(i, 64, 1), "branch5x5_1": _conv(i, 48, 1),
          "branch5x5_2": _conv(48, 64, 5, ph=2), "branch3x3dbl_1": _conv(i, 64, 1),
          "branch3x3dbl_2": _conv(64, 96, 3, ph=1), "branch3x3dbl_3": _conv(96, 96, 3, ph=1),
          "branch_pool": _conv(i, pool, 1)}


def _block_c(c7):
  return {"branch1x1": _conv(768, 192, 1), "branch7x7_1": _conv(768, c7, 1),
          "branch7x7_2": _conv(c7, c7, 1, 7, pw=3), "branch7x7_3": _conv(c7, 192, 7, 1, ph=3),
          "branch7x7dbl_1": _conv(768, c7, 1), "branch7x7dbl_2": _conv(c7, c7, 7, 1, ph=3),
          "branch7x7dbl_3": _conv(c7, c7, 1, 7, pw=3), "branch7x7dbl_4": _conv(c7, c7, 7, 1, ph=3),
          "branch7x7dbl_5": _conv(c7, 192, 1, 7, pw=3), "branch_pool": _conv(768, 192, 1)}


def _block_e(i):
  return {"branch1x1": _conv(i, 320, 1), "branch3x3_1": _conv(i, 384, 1),
          "branch3x3_2a": _conv(384, 384, 1, 3, pw=1), "branch3x3_2b": _conv(384, 384, 3, 1, ph=1),
          "branch3x3dbl_1": _conv(i, 448, 1), "branch3x3dbl_2": _conv(448, 384, 3, ph=1),
          "branch3x3dbl_3a": _conv(384, 384, 1, 3, pw=1),
          "branch3x3dbl_3b": _conv(384, 384, 3, 1, ph=1), "branch_pool": _conv(i, 192, 1)}


BLOCKS = {
    "Mixed_5b": _block_a(192, 32), "Mixed_5c": _block_a(256, 64), "Mixed_5d": _block_a(288, 64),
    "Mixed_6a": {"branch3x3": _conv(288, 384, 3, s=2), "branch3x3dbl_1": _conv(288, 64, 1),
                 "branch3x3dbl_2": _conv(64, 96, 3, ph=1),
                 "branch3x3dbl_3": _conv(96, 96, 3, s=2)},
    "Mixed_6b": _block_c(128), "Mixed_6c": _block_c(160), "Mixed_6d": _block_c(160),
    "Mixed_6e": _block_c(192),
    "Mixed_7a": {"branch3x3_1": _conv(768, 192, 1), "branch3x3_2": _conv(192, 320, 3, s=2),
                 "branch7x7x3_1": _conv(768, 192, 1),
                 "branch7x7x3_2": _conv(192, 192, 1, 7, pw=3),
                 "branch7x7x3_3": _conv(192, 192, 7, 1, ph=3),
                 "branch7x7x3_4": _conv(192, 192, 3, s=2)},
    "Mixed_7b": _block_e(1280), "Mixed_7c": _block_e(2048),
}
CONVS = {"Conv2d_1a_3x3": _conv(3, 32, 3, s=2), "Conv2d_2a_3x3": _conv(32, 32, 3),
         "Conv2d_2b_3x3": _conv(32, 64, 3, ph=1), "Conv2d_3b_1x1": _conv(64, 80, 1),
         "Conv2d_4a_3x3": _conv(80, 192, 3)}
CONVS.update({f"{b}.{n}": spec for b, convs in BLOCKS.items() for n, spec in convs.items()})


def inception_state_dict(seed=0, with_counters=True):
  """Random FID-Inception weights under pytorch-fid's key names, as numpy arrays (what
  sgjax.convert.inception_fid converts); He-scaled convs keep activations O(1)."""
  rng = np.random.default_rng(seed)
  sd = {}
  for name, (i, o, kh, kw, *_) in CONVS.items():
    sd[f"{name}.conv.weight"] = (rng.standard_normal((o, i, kh, kw), np.float32)
                                 * np.float32(np.sqrt(2 / (i * kh * kw))))
    sd[f"{name}.bn.weight"] = rng.uniform(0.8, 1.2, o)
    sd[f"{name}.bn.bias"] = rng.normal(0, 0.1, o)
    sd[f"{name}.bn.running_mean"] = rng.normal(0, 0.1, o)
    sd[f"{name}.bn.running_var"] = rng.uniform(0.5, 1.5, o)
    if with_counters:
      sd[f"{name}.bn.num_batches_tracked"] = np.array(0, np.int64)
  sd["fc.weight"] = rng.standard_normal((1008, 2048), np.float32) * np.float32(0.02)
  sd["fc.bias"] = rng.normal(0, 0.1, 1008)
  return {k: np.asarray(v, np.int64 if v.dtype == np.int64 else np.float32)
          for k, v in sd.items()}


def read_events(folder):
  """Every tensorboardX `Event` in the event files directly in `folder`, file by file.

  TFRecord framing (length u64, its masked CRC u32, data, its masked CRC u32), parsed by hand:
  TensorBoard's own reader is not installed (tensorboardX brings only the protos).
  """
  import struct

  from tensorboardX.proto import event_pb2
  events = []
  for name in sorted(os.listdir(folder)):
    if "tfevents" not in name:
      continue
    with open(os.path.join(folder, name), "rb") as f:
      data = f.read()
    pos = 0
    while pos + 12 <= len(data):
      (length,) = struct.unpack("<Q", data[pos:pos + 8])
      event = event_pb2.Event()
      event.ParseFromString(data[pos + 12:pos + 12 + length])
      events.append(event)
      pos += 12 + length + 4
  return events


def summaries(folder):
  """{tag: [(step, Summary.Value)]} of every summary value in `folder`'s event files."""
  out = {}
  for event in read_events(folder):
    for value in event.summary.value:
      out.setdefault(value.tag, []).append((event.step, value))
  return out


def official_dit_state_dict(depth=2, width=64, patch=2, channels=4, image_size=8,
                            num_classes=10, learn_sigma=True, seed=0, dtype=np.float32):
  """A DiT/SiT state dict in the official layout (facebookresearch/DiT key names and torch
  shapes), random non-zero weights of `dtype`, the exact sin-cos `pos_embed` (numpy arrays).
  DiT-XL/2 is depth=28, width=1152, image_size=32 (latents of 256 px), num_classes=1000."""
  rng = np.random.default_rng(seed)
  grid, out_c = image_size // patch, (2 if learn_sigma else 1) * channels
  shapes = {"x_embedder.proj.weight": (width, channels, patch, patch),
            "x_embedder.proj.bias": (width,),
            "t_embedder.mlp.0.weight": (width, 256), "t_embedder.mlp.0.bias": (width,),
            "t_embedder.mlp.2.weight": (width, width), "t_embedder.mlp.2.bias": (width,),
            "y_embedder.embedding_table.weight": (num_classes + 1, width),
            "final_layer.linear.weight": (patch * patch * out_c, width),
            "final_layer.linear.bias": (patch * patch * out_c,),
            "final_layer.adaLN_modulation.1.weight": (2 * width, width),
            "final_layer.adaLN_modulation.1.bias": (2 * width,)}
  for i in range(depth):
    for name, (rows, cols) in {"attn.qkv": (3 * width, width), "attn.proj": (width, width),
                               "mlp.fc1": (4 * width, width), "mlp.fc2": (width, 4 * width),
                               "adaLN_modulation.1": (6 * width, width)}.items():
      shapes[f"blocks.{i}.{name}.weight"] = (rows, cols)
      shapes[f"blocks.{i}.{name}.bias"] = (rows,)
  sd = {"pos_embed": dit.sincos_pos_embed_2d(width, grid)[None].astype(dtype)}
  for name, shape in shapes.items():
    sd[name] = (rng.standard_normal(shape, np.float32) * 0.05).astype(dtype)
  return sd


# ---- faults: a small real disk, an image folder for the latent writer.


def image_folder(root, classes=4, per_class=2, seed=0) -> str:
  """`<root>/c<k>/img<i>.png`: `classes` folders of `per_class` noisy RGB images (40x48, above
  latent_config's 32 px crop), the layout sgjax.tools.encode_latents reads; its path."""
  from PIL import Image
  rng = np.random.default_rng(seed)
  for k in range(classes):
    os.makedirs(os.path.join(root, f"c{k}"), exist_ok=True)
    for i in range(per_class):
      pixels = rng.integers(0, 256, (40, 48, 3), np.uint8)
      Image.fromarray(pixels).save(os.path.join(root, f"c{k}", f"img{i}.png"))
  return str(root)


@contextlib.contextmanager
def tmpfs(folder, size: str):
  """A tmpfs of `size` (e.g. "5m") mounted on the new, empty `folder` for the block (a disk that
  really fills up); skips where mounting is not allowed. `remount(size)` resizes it."""
  import pytest
  os.makedirs(folder)
  run = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                       capture_output=True, text=True)
  if run.returncode:
    os.rmdir(folder)
    pytest.skip(f"cannot mount a tmpfs here ({run.stderr.strip() or run.returncode}): the "
                "full-disk tests need root and mount")

  def remount(new_size: str) -> None:
    subprocess.run(["mount", "-o", f"remount,size={new_size}", str(folder)], check=True)

  try:
    yield remount
  finally:
    subprocess.run(["umount", "-l", str(folder)], check=False)



def fill(folder, leave: int) -> str:
  """Writes a ballast file, `filler`, so that `leave` bytes stay free on `folder`'s disk (a
  tmpfs: the failure then comes at the write meant to hit it); its path."""
  st_ = os.statvfs(folder)
  filler = os.path.join(folder, "filler")
  with open(filler, "wb") as f:
    f.write(b"\0" * max(st_.f_bavail * st_.f_frsize - leave, 0))
  return filler


def one_error_line(proc: subprocess.CompletedProcess) -> str:
  """The one `error: …` line of a command a user's mistake (or a full disk) stopped: asserts
  exit status 2, no traceback and no other error line on stderr."""
  lines = [s for s in proc.stderr.splitlines() if s.startswith("error: ")]
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr and len(lines) == 1, proc.stderr[-3000:]
  return lines[0]


# ------------------------------------------------------------------ config values to fuzz with
def _number_bounds(spec) -> tuple[float, float, bool, bool]:
  """(lo, hi, lo_open, hi_open) of a declared number's bounds (±inf where open-ended)."""
  b = spec.bounds
  if not b:
    return -math.inf, math.inf, False, False
  if b[0] in "[(":
    lo, hi = (float(v) for v in b[1:-1].split(","))
    return lo, hi, b[0] == "(", b[-1] == ")"
  op, limit = b.split()
  return ((float(limit), math.inf, op == ">", False) if op.startswith(">")
          else (-math.inf, float(limit), False, op == "<"))


def valid_values(spec):
  """A hypothesis strategy of values `spec` allows, kept small (a valid step count of 1e9 would
  make validation walk 1e9 sampling steps)."""
  if spec.kind is bool:
    return st.booleans()
  if spec.kind in (int, float):
    lo, hi, lo_open, hi_open = _number_bounds(spec)
    lo = -8 if lo == -math.inf else lo
    if spec.kind is float:
      return st.floats(lo, min(lo + 16.0, hi), exclude_min=lo_open,
                       exclude_max=hi_open and hi <= lo + 16.0, allow_nan=False)
    lo = int(lo) + lo_open
    return st.one_of(st.integers(lo, int(min(lo + 40, hi - hi_open))),
                     *(st.just(v) for v in spec.also))
  if spec.kind is str:
    return st.sampled_from(spec.choices) if spec.choices else st.text("ab/_.", max_size=6)
  if spec.items:
    whole = st.tuples(*(valid_values(s) for s in spec.items))
    return st.one_of(st.just(()), whole) if spec.optional else whole
  return st.lists(valid_values(spec.each), min_size=spec.min_len,
                  max_size=spec.min_len + 3).map(tuple)


def _outside(spec) -> list:
  """Numbers just and far beyond a declared number's bounds."""
  lo, hi, lo_open, hi_open = _number_bounds(spec)
  step = 1 if spec.kind is int else 1e-6
  out = []
  if math.isfinite(lo):
    out += [lo if lo_open else lo - step, lo - 10**12]
  if math.isfinite(hi):
    out += [hi if hi_open else hi + step, hi + 10**12]
  return [spec.kind(v) for v in out if v not in spec.also]


def invalid_values(spec):
  """A hypothesis strategy of values `spec` refuses: the wrong type or arity, NaN/±inf, just
  and far out of range, not an allowed value, a bad element inside a tuple."""
  wrong_type = st.sampled_from(["", "x1", None, (1, 2)])
  if spec.kind is bool:
    return st.one_of(wrong_type, st.sampled_from([0, 1, 2, 0.5]))
  if spec.kind in (int, float):
    special = [math.nan, math.inf, -math.inf, True] + ([2.5] if spec.kind is int else [])
    return st.one_of(wrong_type, st.sampled_from(special + _outside(spec)))
  if spec.kind is str:
    others = st.sampled_from([0, -3, 1.5, ("a",), None])
    if spec.choices:
      return st.one_of(others, st.text(max_size=6).filter(lambda v: v not in spec.choices))
    return others
  scalar = st.sampled_from([0.5, "a", None])
  if spec.items:
    n = len(spec.items)
    arity = st.integers(1, n + 2).filter(lambda k: k != n).map(lambda k: (0.5,) * k)
    whole = st.tuples(*(valid_values(s) for s in spec.items))
    element = st.integers(0, n - 1).flatmap(lambda i: st.tuples(
        whole, invalid_values(spec.items[i])).map(lambda p: p[0][:i] + (p[1],) + p[0][i + 1:]))
    return st.one_of(scalar, arity, element)
  bad_each = st.tuples(valid_values(spec), invalid_values(spec.each)).map(
      lambda p: p[0] + (p[1],))
  short = ([st.lists(valid_values(spec.each), max_size=spec.min_len - 1).map(tuple)]
           if spec.min_len else [])
  return st.one_of(scalar, bad_each, *short)


# ------------------------------------------------------------------ refusals change nothing
def tree_state(*roots) -> dict[str, tuple]:
  """Every entry under `roots` (and whether each root exists): folders by name, files by size,
  mtime and mode, links by target. A folder's own mtime is left out: a lock made and removed
  again changes it, not what the folder holds."""
  state = {}
  for root in map(str, roots):
    state[root] = os.path.lexists(root)
    for folder, dirs, names in os.walk(root):
      for name in dirs + names:
        path = os.path.join(folder, name)
        st_ = os.lstat(path)
        state[path] = ("link", os.readlink(path)) if os.path.islink(path) else (
            ("dir",) if os.path.isdir(path) else ("file", st_.st_size, st_.st_mtime_ns,
                                                   st_.st_mode))
  return state


@contextlib.contextmanager
def unchanged(*roots):
  """Asserts the block changes nothing under `roots`: no folder made, no lock left, no file
  written or touched (wrap a refusal: `with unchanged(tmp_path), pytest.raises(...)`)."""
  before = tree_state(*roots)
  yield
  after = tree_state(*roots)
  changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
  assert not changed, f"the refusal changed {changed[:8]}"
