"""Official DiT (facebookresearch/DiT) and SiT (willisma/SiT) PyTorch checkpoints -> our params.

  python -m third_party.dit_checkpoint --src=DiT-XL-2-256x256.pt --kind=dit --out=DIR
  python -m sgjax.main --config=DIR/config.py --workdir=DIR --mode=sample

writes DIR as a workdir: an orbax checkpoint at step 0 whose params and EMA are the converted
weights, DIR/config.py, the config of the imported model (architecture read from the state
dict, everything else from --base_config), and the workdir record (sgjax.workdir) that marks
step 0 as imported, so training on from it never deletes it. Every tool that reads a workdir
(sample, sweep, eval) then works unchanged. DIR must be new or an empty folder: nothing in it
is ever overwritten. The key mapping, the time conventions and why the DiT kind needs
`model.prediction = "eps_vp"` are in docs/checkpoints.md. Nothing is downloaded.

Both repositories use the same module names, so one mapping serves both; they differ in what
the network's time input means (`kind`):
  dit  DDPM ε-prediction, time input = DDPM step 0..999 -> prediction "eps_vp", time_scale 1
  sit  velocity on SiT's Linear path (which is ours: t = 0 noise), t in [0, 1] fed unscaled
       -> prediction "velocity", time_scale 1
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

KINDS = {"dit": dict(prediction="eps_vp", time_scale=1.0),
         "sit": dict(prediction="velocity", time_scale=1.0)}
# DiT/SiT width -> heads (their Table 1); other widths need --heads.
HEADS_BY_WIDTH = {384: 6, 768: 12, 1024: 16, 1152: 16}


def load_state_dict(src: str | Mapping[str, Any], key: str = "") -> dict[str, np.ndarray]:
  """A state dict as float32 numpy arrays, from a `.pt` path (read with weights_only=True) or a
  mapping. `key` picks a sub-dict (a DiT training checkpoint holds "model" and "ema")."""
  if isinstance(src, str):
    import torch  # Local: only reading a .pt file needs torch.
    src = torch.load(src, map_location="cpu", weights_only=True)
  if key:
    if key not in src:
      raise KeyError(f"--key={key!r} is not in the checkpoint; it holds {sorted(src)}")
    src = src[key]
  elif "pos_embed" not in src and "ema" in src:
    src = src["ema"]  # A DiT training checkpoint: sample from its EMA weights, as DiT does.
  out = {}
  for k, v in src.items():
    v = v.detach().cpu().float().numpy() if hasattr(v, "detach") else np.asarray(v)
    out[k] = v.astype(np.float32)
  return out


def architecture(sd: Mapping[str, np.ndarray], heads: int | None = None) -> dict[str, Any]:
  """Model dimensions read off the state dict's shapes (heads from the width unless given)."""
  for k in ("x_embedder.proj.weight", "pos_embed", "final_layer.linear.weight",
            "y_embedder.embedding_table.weight", "blocks.0.mlp.fc1.weight"):
    if k not in sd:
      raise KeyError(f"{k!r} missing: not a DiT/SiT state dict (keys: {sorted(sd)[:8]} ...)")
  width, channels, patch, _ = sd["x_embedder.proj.weight"].shape
  tokens = sd["pos_embed"].shape[-2]
  grid = int(round(tokens ** 0.5))
  if grid * grid != tokens:
    raise ValueError(f"pos_embed has {tokens} tokens: not a square grid")
  depth = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k)))
  out_channels = sd["final_layer.linear.weight"].shape[0] // (patch * patch)
  if out_channels not in (channels, 2 * channels):
    raise ValueError(f"final_layer.linear has {out_channels} channels per pixel; expected "
                     f"{channels} or {2 * channels} (learn_sigma) for {channels} input channels")
  if heads is None:
    if width not in HEADS_BY_WIDTH:
      raise ValueError(f"width {width} is not a DiT/SiT size {sorted(HEADS_BY_WIDTH)}: "
                       "pass heads (--heads)")
    heads = HEADS_BY_WIDTH[width]
  return dict(depth=depth, width=int(width), heads=int(heads), patch_size=int(patch),
              mlp_ratio=sd["blocks.0.mlp.fc1.weight"].shape[0] / width,
              channels=int(channels), image_size=grid * int(patch),
              # The table has a row for the null label (DiT trains with label dropout 0.1).
              num_classes=sd["y_embedder.embedding_table.weight"].shape[0] - 1,
              learn_sigma=out_channels == 2 * channels)


def _linear(sd, prefix):
  """torch Linear (out, in) -> flax Dense {kernel (in, out), bias}."""
  return {"kernel": sd[prefix + ".weight"].T, "bias": sd[prefix + ".bias"]}


def _mapping(depth: int) -> dict[str, str]:
  """Our param path ("a/b/kernel") -> the torch module prefix it comes from (Linears only)."""
  table = {"t_embed1": "t_embedder.mlp.0", "t_embed2": "t_embedder.mlp.2",
           "final_adaLN": "final_layer.adaLN_modulation.1"}
  for i in range(depth):
    table.update({f"block{i}/adaLN": f"blocks.{i}.adaLN_modulation.1",
                  f"block{i}/attn/qkv": f"blocks.{i}.attn.qkv",
                  f"block{i}/attn/proj": f"blocks.{i}.attn.proj",
                  f"block{i}/fc1": f"blocks.{i}.mlp.fc1",
                  f"block{i}/fc2": f"blocks.{i}.mlp.fc2"})
  return table


def convert(sd: Mapping[str, np.ndarray], heads: int | None = None,
            ) -> tuple[dict[str, Any], dict[str, Any]]:
  """(params, architecture): our linen params (nested dicts of float32 arrays) from a DiT/SiT
  state dict. Fails naming the keys if any state-dict entry is unused or any param unfilled."""
  from sgjax.models import dit  # Local: the module's CLI flags parse before jax loads.
  arch = architecture(sd, heads)
  p, c, width = arch["patch_size"], arch["channels"], arch["width"]
  grid = arch["image_size"] // p
  # pos_embed is a fixed buffer; ours is computed, so the two must agree.
  ours = dit.sincos_pos_embed_2d(width, grid)
  err = float(np.abs(sd["pos_embed"].reshape(ours.shape) - ours).max())
  if err > 1e-5:
    raise ValueError(f"pos_embed differs from our 2-D sin-cos embedding by {err:.3g}: this "
                     "checkpoint's position layout is not DiT's")
  used = {"pos_embed"}
  flat: dict[str, np.ndarray] = {}
  for ours_name, prefix in _mapping(arch["depth"]).items():
    for leaf, value in _linear(sd, prefix).items():
      flat[f"{ours_name}/{leaf}"] = value
    used |= {prefix + ".weight", prefix + ".bias"}
  # Conv2d (out, in, kh, kw) -> flax Conv (kh, kw, in, out); tokens are raster order in both.
  flat["patch_embed/kernel"] = sd["x_embedder.proj.weight"].transpose(2, 3, 1, 0)
  flat["patch_embed/bias"] = sd["x_embedder.proj.bias"]
  flat["y_embed/embedding"] = sd["y_embedder.embedding_table.weight"]
  used |= {"x_embedder.proj.weight", "x_embedder.proj.bias", "y_embedder.embedding_table.weight"}
  # Output rows are (row-in-patch, col-in-patch, channel), channel fastest, in both unpatchify
  # orders; with learn_sigma there are 2C channels and the first C are the prediction (ε or v),
  # the rest DDPM's variance interpolation, which an ODE sampler does not use.
  out_c = 2 * c if arch["learn_sigma"] else c
  rows = np.array([r for r in range(p * p * out_c) if r % out_c < c])
  flat["final_proj/kernel"] = sd["final_layer.linear.weight"][rows].T
  flat["final_proj/bias"] = sd["final_layer.linear.bias"][rows]
  used |= {"final_layer.linear.weight", "final_layer.linear.bias"}

  unused = sorted(set(sd) - used)
  if unused:
    raise KeyError(f"state-dict keys with no place in our model: {unused}")
  expected = _expected_shapes(arch)
  missing = sorted(set(expected) - set(flat))
  extra = sorted(set(flat) - set(expected))
  wrong = sorted(f"{k}: {flat[k].shape} vs ours {expected[k]}" for k in set(flat) & set(expected)
                 if tuple(flat[k].shape) != expected[k])
  if missing or extra or wrong:
    raise KeyError(f"params not filled: {missing}; converted but not ours: {extra}; "
                   f"shape mismatches: {wrong}")
  params: dict[str, Any] = {}
  for path, value in flat.items():
    node = params
    *parents, leaf = path.split("/")
    for name in parents:
      node = node.setdefault(name, {})
    node[leaf] = np.ascontiguousarray(value, np.float32)
  return params, arch


def model(arch: Mapping[str, Any], kind: str):
  """Our DiT for an imported architecture (float32)."""
  from sgjax.models import dit
  if kind not in KINDS:
    raise ValueError(f"kind = {kind!r}: allowed {sorted(KINDS)}")
  return dit.DiT(image_size=arch["image_size"], channels=arch["channels"],
                 num_classes=arch["num_classes"], depth=arch["depth"], width=arch["width"],
                 heads=arch["heads"], patch_size=arch["patch_size"],
                 mlp_ratio=arch["mlp_ratio"], **KINDS[kind])


def _expected_shapes(arch) -> dict[str, tuple[int, ...]]:
  import flax
  import jax
  import jax.numpy as jnp
  m = model(arch, "sit")
  n, c = m.image_size, m.channels
  shapes = jax.eval_shape(lambda: m.init(jax.random.key(0), jnp.zeros((1, n, n, c)),
                                         jnp.zeros((1,)), jnp.zeros((1,), jnp.int32)))
  flat = flax.traverse_util.flatten_dict(flax.linen.unbox(shapes["params"]), sep="/")
  return {k: tuple(v.shape) for k, v in flat.items()}


def imported_config(arch: Mapping[str, Any], kind: str, base_config: str = ""):
  """The config of an imported model: `base_config` (a config file's path; '' = defaults) with
  the checkpoint's architecture and time convention, dense (no routes), CFG sampling."""
  from sgjax import config as config_lib
  c = config_lib.load_config_file(base_config) if base_config else config_lib.base_config()
  c.model.update(preset="", depth=arch["depth"], width=arch["width"], heads=arch["heads"],
                 patch_size=arch["patch_size"], mlp_ratio=arch["mlp_ratio"], decoder_depth=0,
                 **KINDS[kind])
  c.data.update(image_size=arch["image_size"], channels=arch["channels"],
                num_classes=arch["num_classes"])
  if c.data.name == "latents" and "encode" in c and "vae" in c:
    # Latent models: the pixel size the VAE decodes to follows (DiT-XL/2-512: 64 -> 512).
    c.encode.image_size = arch["image_size"] * 2 ** (len(c.vae.block_out_channels) - 1)
  c.sparsity.update(routes=(), mask_gamma=0.0)  # Trained dense: SG on routes is off-recipe.
  c.sample.guidance.update(rule="cfg", gamma_strong=0.0)
  return c


_CONFIG_FILE = '''"""Written by `python -m sgjax.convert.dit_checkpoint` from {src} ({kind})."""

from sgjax.convert import dit_checkpoint


def get_config():
  return dit_checkpoint.imported_config({arch!r}, {kind!r}, {base!r})
'''


def check_out(out: str) -> None:
  """Refuses an --out that holds anything (a file, or a folder that is not empty): the
  import would mix with, or rotate away, what is there."""
  from sgjax import errors
  if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
    held = sorted(os.listdir(out))[:5] if os.path.isdir(out) else "a file"
    raise errors.UserError(f"--out={out}", f"is not empty (holds {held})",
                           "import into a new or empty folder; nothing there is overwritten")


def write_workdir(params: Mapping[str, Any], arch: Mapping[str, Any], kind: str, out: str,
                  base_config: str = "", src: str = "a state dict") -> str:
  """Writes `out` as a workdir (step-0 checkpoint, params = EMA = `params`), out/config.py and
  the workdir record. `out` must be new or empty (`check_out`)."""
  import jax
  import jax.numpy as jnp

  from sgjax import checkpoint
  from sgjax import state as state_lib
  from sgjax import workdir as workdir_lib
  check_out(out)
  config = imported_config(arch, kind, base_config)
  tx = state_lib.make_optimizer(config.train)
  params = jax.tree.map(jnp.asarray, dict(params))
  state = dict(step=jnp.zeros((), jnp.int32), params=params, ema=params,
               opt_state=tx.init(params),
               rng=jax.random.key_data(jax.random.key(config.seed)))
  os.makedirs(out, exist_ok=True)
  # max_to_keep=None: this manager deletes nothing (there is nothing else, by check_out).
  mngr = checkpoint.manager(os.path.join(out, "checkpoints"), async_save=False, max_to_keep=None)
  checkpoint.save(mngr, 0, state, None)
  mngr.wait_until_finished()
  mngr.close()
  # Step 0 is an import: base_step 0 keeps it whatever train.keep_checkpoints says.
  workdir_lib.write(out, config, base_step=0, written_by="sgjax.convert.dit_checkpoint")
  path = os.path.join(out, "config.py")
  with open(path, "w") as f:
    f.write(_CONFIG_FILE.format(src=os.path.basename(src), kind=kind, arch=dict(arch),
                                base=(os.path.abspath(base_config) if os.path.exists(base_config)
                                      else base_config)))
  return path


def main(argv) -> None:
  del argv
  from absl import flags, logging
  logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO.
  from sgjax import errors
  f = flags.FLAGS
  check_out(f.out)  # Before the (slow) read of the .pt.
  if not os.path.isfile(f.src):
    raise errors.UserError(f"--src={f.src}", "no such file", "pass a DiT/SiT .pt state dict")
  try:
    sd = load_state_dict(f.src, f.key)
    params, arch = convert(sd, f.heads)
  except (KeyError, ValueError) as err:  # Not a DiT/SiT state dict of a size we know.
    raise errors.UserError(f"--src={f.src}", errors.first_line(err).strip('"'),
                           "pass an official DiT/SiT checkpoint (and --heads for other widths)"
                           ) from err
  path = write_workdir(params, arch, f.kind, f.out, f.base_config, f.src)
  n = sum(int(np.prod(v.shape)) for v in sd.values())
  print(f"{f.src}: {f.kind}, {arch}; {n / 1e6:.1f}M numbers -> {f.out}\n"
        f"sample: python -m sgjax.main --config={path} --workdir={f.out} --mode=sample")


def cli() -> None:
  """`python -m sgjax.convert.dit_checkpoint --src=… --out=…` (flags defined here)."""
  from absl import flags
  flags.DEFINE_string("src", None, "DiT/SiT .pt file (a state dict).")
  flags.DEFINE_string("out", None, "Workdir to write (checkpoint at step 0 and config.py).")
  flags.DEFINE_enum("kind", "dit", sorted(KINDS), "dit: DDPM ε-prediction; sit: velocity.")
  flags.DEFINE_string("key", "", "Sub-dict of the .pt to read ('' = the state dict itself, or "
                      "its 'ema' entry for a DiT training checkpoint).")
  flags.DEFINE_integer("heads", None, "Attention heads (default: from the width, DiT sizes).")
  flags.DEFINE_string("base_config", "imagenet256",
                      "Config file the imported config starts from (data, sampling, mesh).")
  flags.mark_flags_as_required(["src", "out"])
  from sgjax import errors
  errors.run(main)


if __name__ == "__main__":
  cli()
