"""Official DiT (facebookresearch/DiT) and SiT (willisma/SiT) PyTorch checkpoints -> our params.

  python -m third_party.dit_checkpoint --src=DiT-XL-2-256x256.pt --kind=dit --out=DIR
  (--src may be a .pt/.pth or a .safetensors file; the bytes tell which)
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

import ml_dtypes
import numpy as np

from sgjax import errors, readers

KINDS = {"dit": dict(prediction="eps_vp", time_scale=1.0),
         "sit": dict(prediction="velocity", time_scale=1.0)}
# DiT/SiT width -> heads (their Table 1); other widths need --heads.
HEADS_BY_WIDTH = {384: 6, 768: 12, 1024: 16, 1152: 16}


def load_state_dict(src: str | Mapping[str, Any], key: str = "",
                    where: str = "") -> Mapping[str, np.ndarray]:
  """A DiT/SiT state dict: tensor name -> numpy array in the file's dtype (float32, float16 or
  ml_dtypes.bfloat16), read lazily where the file allows. `src` is a path (a `.pt`/`.pth`
  read with weights_only=True, or a `.safetensors` file, told apart by their bytes) or a
  mapping of arrays or torch tensors. `key` picks a sub-dict (a DiT training checkpoint holds
  "model" and "ema"; without `key` its "ema" is read, as DiT samples from it). Every file that
  cannot be read is one UserError naming `where` (default: the path)."""
  where = where or (f"--src={src}" if isinstance(src, str) else "the state dict")
  if isinstance(src, str):
    src = readers.tensor_file(src, where, readers.STATE_DICT_ALLOWED)
  if key:
    if key not in src:
      raise errors.UserError(f"--key={key}", f"is not in {where}",
                             f"it holds {sorted(src)[:8]}")
    src = src[key]
  elif "pos_embed" not in src and "ema" in src:
    src = src["ema"]  # A DiT training checkpoint: sample from its EMA weights, as DiT does.
  if not isinstance(src, Mapping):
    raise errors.UserError(where, f"holds a {type(src).__name__}, not a state dict",
                           readers.STATE_DICT_ALLOWED)
  return _Arrays(src)


class _Arrays(Mapping):
  """A state dict's values as numpy arrays, each converted when read (torch tensors share
  their memory), so a memory-mapped file is never copied whole."""

  def __init__(self, source: Mapping[str, Any]):
    self._source = source

  def __getitem__(self, name: str) -> np.ndarray:
    return readers.to_numpy(self._source[name])

  def __iter__(self):
    return iter(self._source)

  def __len__(self) -> int:
    return len(self._source)


def _shape(sd: Mapping[str, Any], name: str) -> tuple[int, ...]:
  return tuple(np.shape(sd[name]))  # A view (or torch tensor): nothing is read.


def architecture(sd: Mapping[str, np.ndarray], heads: int | None = None,
                 where: str = "the state dict") -> dict[str, Any]:
  """Model dimensions read off the state dict's shapes (heads from the width unless given)."""
  allowed = "pass an official DiT/SiT checkpoint"
  for k in ("x_embedder.proj.weight", "pos_embed", "final_layer.linear.weight",
            "y_embedder.embedding_table.weight", "blocks.0.mlp.fc1.weight"):
    if k not in sd:
      raise errors.UserError(where, f"no {k!r}: not a DiT/SiT state dict "
                             f"(keys: {sorted(sd)[:8]} ...)", allowed)
  width, channels, patch, _ = _shape(sd, "x_embedder.proj.weight")
  tokens = _shape(sd, "pos_embed")[-2]
  grid = int(round(tokens ** 0.5))
  if grid * grid != tokens:
    raise errors.UserError(where, f"pos_embed has {tokens} tokens: not a square grid", allowed)
  depth = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k)))
  out_channels = _shape(sd, "final_layer.linear.weight")[0] // (patch * patch)
  if out_channels not in (channels, 2 * channels):
    raise errors.UserError(where, f"final_layer.linear has {out_channels} channels per pixel",
                           f"expected {channels} or {2 * channels} (learn_sigma) for "
                           f"{channels} input channels")
  if heads is None:
    if width not in HEADS_BY_WIDTH:
      raise errors.UserError(where, f"width {width} is not a DiT/SiT size "
                             f"{sorted(HEADS_BY_WIDTH)}", "pass the number of heads (--heads)")
    heads = HEADS_BY_WIDTH[width]
  if not isinstance(heads, int) or heads < 1 or width % heads:
    divisors = [h for h in range(1, width + 1) if width % h == 0]
    raise errors.UserError(f"--heads={heads}", f"does not divide the width {width}",
                           f"pass one of {divisors[:12]}{' ...' if len(divisors) > 12 else ''} "
                           "(DiT/SiT use 64-wide heads)")
  return dict(depth=depth, width=int(width), heads=int(heads), patch_size=int(patch),
              mlp_ratio=_shape(sd, "blocks.0.mlp.fc1.weight")[0] / width,
              channels=int(channels), image_size=grid * int(patch),
              # The table has a row for the null label (DiT trains with label dropout 0.1).
              num_classes=_shape(sd, "y_embedder.embedding_table.weight")[0] - 1,
              learn_sigma=out_channels == 2 * channels)


def linear_names(depth: int) -> dict[str, str]:
  """Our param path ("a/b") of each Linear -> the torch module prefix it comes from (the export
  to the official layout reads it the other way)."""
  table = {"t_embed1": "t_embedder.mlp.0", "t_embed2": "t_embedder.mlp.2",
           "final_adaLN": "final_layer.adaLN_modulation.1"}
  for i in range(depth):
    table.update({f"block{i}/adaLN": f"blocks.{i}.adaLN_modulation.1",
                  f"block{i}/attn/qkv": f"blocks.{i}.attn.qkv",
                  f"block{i}/attn/proj": f"blocks.{i}.attn.proj",
                  f"block{i}/fc1": f"blocks.{i}.mlp.fc1",
                  f"block{i}/fc2": f"blocks.{i}.mlp.fc2"})
  return table


def _plan(arch: Mapping[str, Any]) -> dict[str, tuple[str, Any]]:
  """Our param path ("a/b/kernel") -> (state-dict key, layout change torch -> ours)."""
  p, c = arch["patch_size"], arch["channels"]
  same, transpose = (lambda v: v), (lambda v: v.T)
  plan = {}
  for ours_name, prefix in linear_names(arch["depth"]).items():  # Linear (out, in) -> (in, out).
    plan[f"{ours_name}/kernel"] = (prefix + ".weight", transpose)
    plan[f"{ours_name}/bias"] = (prefix + ".bias", same)
  # Conv2d (out, in, kh, kw) -> flax Conv (kh, kw, in, out); tokens are raster order in both.
  plan["patch_embed/kernel"] = ("x_embedder.proj.weight", lambda v: v.transpose(2, 3, 1, 0))
  plan["patch_embed/bias"] = ("x_embedder.proj.bias", same)
  plan["y_embed/embedding"] = ("y_embedder.embedding_table.weight", same)
  # Output rows are (row-in-patch, col-in-patch, channel), channel fastest, in both unpatchify
  # orders; with learn_sigma there are 2C channels and the first C are the prediction (ε or v),
  # the rest DDPM's variance interpolation, which an ODE sampler does not use.
  out_c = 2 * c if arch["learn_sigma"] else c
  rows = np.array([r for r in range(p * p * out_c) if r % out_c < c])
  plan["final_proj/kernel"] = ("final_layer.linear.weight", lambda v: v[rows].T)
  plan["final_proj/bias"] = ("final_layer.linear.bias", lambda v: v[rows])
  return plan


def pos_embed_tolerance(dtype: Any) -> float:
  """How far a stored sin-cos table may be from ours: 1e-5 in float32, one unit in the last
  place at 1.0 for narrower floats (float16 rounds |x| <= 1 by up to 4.9e-4, bfloat16 3.9e-3);
  a table of another layout is off by O(1)."""
  dtype = np.dtype(dtype)
  if not np.issubdtype(dtype, np.floating) and dtype != ml_dtypes.bfloat16:
    return 1e-5
  return max(1e-5, float(ml_dtypes.finfo(dtype).eps))


def _float32(sd: Mapping[str, Any], name: str, where: str) -> np.ndarray:
  """One tensor as float32 numpy (a view where it already is), refused if not finite."""
  value = np.asarray(readers.to_numpy(sd[name]), np.float32)
  finite = np.isfinite(value)
  if not finite.all():
    raise errors.UserError(where, f"tensor {name!r} holds {int(value.size - finite.sum())} "
                           f"non-finite values (NaN or inf) of {value.size}",
                           "import a checkpoint saved before training diverged")
  return value


def convert(sd: Mapping[str, Any], heads: int | None = None, where: str = "the state dict",
            ) -> tuple[dict[str, Any], dict[str, Any]]:
  """(params, architecture): our linen params (nested dicts of float32 numpy arrays) from a
  DiT/SiT state dict (values: numpy arrays or torch tensors of any float dtype, as in the
  official layout). Refuses (UserError naming `where`) a state-dict entry with no place in our
  model, a param nothing fills, a shape that does not fit, a `pos_embed` that is not DiT's
  sin-cos table, and non-finite weights. Tensor by tensor: the peak holds the params once plus
  one tensor, beside the (memory-mapped) source."""
  from sgjax.models import dit  # Local: the module's CLI flags parse before jax loads.
  allowed = "pass an official DiT/SiT checkpoint (and --heads for other widths)"
  arch = architecture(sd, heads, where)
  plan = _plan(arch)
  unused = sorted(set(sd) - {k for k, _ in plan.values()} - {"pos_embed"})
  missing = sorted({k for k, _ in plan.values()} - set(sd))
  if unused or missing:
    parts = [f"{title} ({len(keys)}): {keys[:8]}" for title, keys in (
        ("state-dict keys with no place in our model", unused),
        ("keys our model needs that it lacks", missing)) if keys]
    raise errors.UserError(where, "; ".join(parts), allowed)
  # Shapes first, on zero-byte stand-ins: nothing is read before the whole layout fits.
  expected = _expected_shapes(arch)
  shapes = {ours: np.broadcast_to(np.float32(0), _shape(sd, key)) for ours, (key, _) in
            plan.items()}
  got = {ours: tuple(change(shapes[ours]).shape) for ours, (_, change) in plan.items()}
  wrong = sorted(f"{plan[k][0]} {_shape(sd, plan[k][0])} gives {got[k]}, ours {expected[k]}"
                 for k in set(got) & set(expected) if got[k] != expected[k])
  unfilled = sorted(set(expected) - set(got))
  if wrong or unfilled:
    parts = [f"{title} ({len(items)}): {items[:4]}" for title, items in (
        ("shapes that do not fit", wrong), ("params not filled", unfilled)) if items]
    raise errors.UserError(where, "; ".join(parts), allowed)
  # pos_embed is a fixed buffer; ours is computed, so the two must agree (to the file's dtype).
  grid = arch["image_size"] // arch["patch_size"]
  ours = dit.sincos_pos_embed_2d(arch["width"], grid)
  stored = readers.to_numpy(sd["pos_embed"])
  err = float(np.abs(_float32(sd, "pos_embed", where).reshape(ours.shape) - ours).max())
  tolerance = pos_embed_tolerance(stored.dtype)
  if err > tolerance:
    raise errors.UserError(where, f"pos_embed differs from our 2-D sin-cos embedding by "
                           f"{err:.3g} (more than {tolerance:.1g} for {stored.dtype}): this "
                           "checkpoint's position layout is not DiT's", allowed)
  params: dict[str, Any] = {}
  for path, (key, change) in plan.items():
    node = params
    *parents, leaf = path.split("/")
    for name in parents:
      node = node.setdefault(name, {})
    # A fresh C-order copy per tensor: the params own their memory, the source can close.
    node[leaf] = np.array(change(_float32(sd, key, where)), np.float32, order="C")
  return params, arch


def model(arch: Mapping[str, Any], kind: str):
  """Our DiT for an imported architecture (float32)."""
  from sgjax.models import dit
  if kind not in KINDS:
    raise errors.UserError(f"--kind={kind}", "no such kind", f"allowed: {sorted(KINDS)}")
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

  from sgjax import state as state_lib
  from sgjax import workdir as workdir_lib
  check_out(out)
  config = imported_config(arch, kind, base_config)
  tx = state_lib.make_optimizer(config.train)
  params = jax.tree.map(jnp.asarray, dict(params))
  state = dict(step=jnp.zeros((), jnp.int32), params=params, ema=params,
               opt_state=_initial_opt_state(tx, params),
               rng=jax.random.key_data(jax.random.key(config.seed)))
  os.makedirs(out, exist_ok=True)
  _save_step0(os.path.join(out, "checkpoints"), state)
  # Step 0 is an import: base_step 0 keeps it whatever train.keep_checkpoints says.
  workdir_lib.write(out, config, base_step=0, written_by="sgjax.convert.dit_checkpoint")
  path = os.path.join(out, "config.py")
  with open(path, "w") as f:
    f.write(_CONFIG_FILE.format(src=os.path.basename(src), kind=kind, arch=dict(arch),
                                base=(os.path.abspath(base_config) if os.path.exists(base_config)
                                      else base_config)))
  return path


def _to_jax_in_place(tree: dict[str, Any]) -> None:
  """Replaces each numpy leaf by a jax array, one at a time, so the host copy of each is freed
  as soon as it is on the device: never the model twice in memory."""
  import jax.numpy as jnp
  for k, v in tree.items():
    if isinstance(v, dict):
      _to_jax_in_place(v)
    else:
      tree[k] = jnp.asarray(v)
      del v


def _save_step0(directory: str, state: Any) -> None:
  """Saves `state` as step 0 in the layout of `sgjax.checkpoint.save` (item "state", read by
  its restores), with at most 1 GB in flight between the arrays and the files: orbax's
  default copies every leaf at once, four times the model for params, EMA and Adam's two
  moments (DiT-XL/2: 11 GB on top of its 2.7 GB). The manager deletes nothing: `out` was empty
  (`check_out`)."""
  import orbax.checkpoint as ocp
  handler = ocp.PyTreeCheckpointHandler(save_concurrent_gb=1, save_device_host_concurrent_gb=1)
  mngr = ocp.CheckpointManager(
      os.path.abspath(directory), item_names=("state", "data"), item_handlers={"state": handler},
      options=ocp.CheckpointManagerOptions(enable_async_checkpointing=False, create=True))
  mngr.save(0, args=ocp.args.Composite(state=ocp.args.PyTreeSave(state)), force=True)
  mngr.wait_until_finished()
  mngr.close()


def _initial_opt_state(tx, params: Any) -> Any:
  """`tx.init(params)`, with one zero buffer per (shape, dtype) shared by every leaf when
  the optimizer's initial state is all zeros (AdamW's is): orbax writes each leaf in full, but
  the import holds Adam's two moments in one block's worth of memory, not twice the model's."""
  import jax
  import jax.numpy as jnp
  probe = tx.init({"w": jnp.ones((2, 3)), "b": jnp.full((3,), 2.0)})
  if any(np.any(np.asarray(leaf)) for leaf in jax.tree.leaves(probe)):
    return tx.init(params)  # An optimizer whose state starts from the params: built in full.
  zeros: dict[tuple, Any] = {}
  return jax.tree.map(lambda s: zeros.setdefault((s.shape, s.dtype), jnp.zeros(s.shape, s.dtype)),
                      jax.eval_shape(tx.init, params))


def main(argv) -> None:
  del argv
  from absl import flags, logging
  logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO.
  f = flags.FLAGS
  check_out(f.out)  # Before the (slow) read of the weights.
  where = f"--src={f.src}"
  sd = load_state_dict(f.src, f.key, where)
  params, arch = convert(sd, f.heads, where)
  n = sum(int(np.prod(_shape(sd, k))) for k in sd)
  del sd  # The source (memory-mapped) closes before the workdir is written.
  _to_jax_in_place(params)
  path = write_workdir(params, arch, f.kind, f.out, f.base_config, f.src)
  print(f"{f.src}: {f.kind}, {arch}; {n / 1e6:.1f}M numbers -> {f.out}\n"
        f"sample: python -m sgjax.main --config={path} --workdir={f.out} --mode=sample")


def cli() -> None:
  """`python -m sgjax.convert.dit_checkpoint --src=… --out=…` (flags defined here)."""
  from absl import flags
  flags.DEFINE_string("src", None, "DiT/SiT weights: a .pt/.pth state dict or .safetensors.")
  flags.DEFINE_string("out", None, "Workdir to write (checkpoint at step 0 and config.py).")
  flags.DEFINE_enum("kind", "dit", sorted(KINDS), "dit: DDPM ε-prediction; sit: velocity.")
  flags.DEFINE_string("key", "", "Sub-dict of the .pt to read ('' = the state dict itself, or "
                      "its 'ema' entry for a DiT training checkpoint).")
  flags.DEFINE_integer("heads", None, "Attention heads (default: from the width, DiT sizes).")
  flags.DEFINE_string("base_config", "imagenet256",
                      "Config file the imported config starts from (data, sampling, mesh).")
  flags.mark_flags_as_required(["src", "out"])
  errors.run(main)


if __name__ == "__main__":
  cli()
