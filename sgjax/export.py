"""Trained weights as safetensors files: our own tree, or the official DiT/SiT state-dict layout.

  sgjax-export --workdir=DIR [--step=N] --layout=sit|dit|sgjax --out=FILE.safetensors

(the command: sgjax.jobs.export). Three layouts of the same (EMA) weights:

  sgjax  our parameter tree flattened, "block0/attn/qkv/kernel" -> array in flax's shapes;
         `sgjax.load(FILE)` opens it directly (any model: DiT, TR-DiT, masked).
  sit    the official SiT/DiT PyTorch state dict: "blocks.0.attn.qkv.weight" (out, in),
  dit    the patch-embedding Conv2d (out, in, kh, kw), `pos_embed` (1, T, D), the null class as
         the label table's last row, `final_layer.linear` with learn_sigma's 2C output channels
         per pixel (the variance half zero: an ODE sampler never reads it; SiT drops it).
         This is the inverse of sgjax.convert.dit_checkpoint, which reads these files back.
         `sit` holds a velocity network, `dit` a DDPM ε-network (model.prediction = "eps_vp"),
         what each repository's sampler expects the output to be.

Routing (TREAD routes, SG's γ) is a train- and sample-time choice: the exported network is the
plain one. A layout that cannot hold the model is refused with one line (a TR-DiT or a masked
model's decoder as sit/dit). The metadata (safetensors' string map) holds the layout, the
model's flat config (JSON), its architecture, the time convention (`prediction`, `time_scale`:
the network's time input is time_scale·t, t in [0, 1] with 0 = noise, 1 = data) and the step;
docs/python.md says where the files go next.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import ml_collections
import numpy as np

from sgjax import errors, files
from sgjax import workdir as workdir_lib
from sgjax.convert import dit_checkpoint

LAYOUTS = ("sit", "dit", "sgjax")
OFFICIAL = ("sit", "dit")
# The prediction each official repository's sampler reads the network's output as.
OFFICIAL_PREDICTION = {"sit": "velocity", "dit": "eps_vp"}
SEP = "/"  # Our flattened keys: "block0/attn/qkv/kernel" (flax.traverse_util's path, joined).
FORMAT = "sgjax.export/1"


def paths(tree: Mapping[str, Any]) -> dict[str, Any]:
  """A nested tree -> {"a/b/kernel": leaf} (sorted keys; leaves as they are)."""
  out: dict[str, Any] = {}

  def walk(node, path):
    for key in sorted(node):
      value = node[key]
      if isinstance(value, Mapping):
        walk(value, path + [key])
      else:
        out[SEP.join(path + [key])] = value
  walk(tree, [])
  return out


def flatten(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """Our nested params -> {"a/b/kernel": numpy array} (sorted keys)."""
  return {k: np.ascontiguousarray(np.asarray(v)) for k, v in paths(params).items()}


def unflatten(flat: Mapping[str, np.ndarray]) -> dict[str, Any]:
  """{"a/b/kernel": array} -> nested dicts (the inverse of `flatten`)."""
  params: dict[str, Any] = {}
  for path, value in flat.items():
    node = params
    *parents, leaf = path.split(SEP)
    for name in parents:
      node = node.setdefault(name, {})
    node[leaf] = value
  return params


def architecture(config: ml_collections.ConfigDict, learn_sigma: bool = False) -> dict[str, Any]:
  """What an official loader must be told besides the shapes (heads), as the converter reads
  it back (sgjax.convert.dit_checkpoint.architecture)."""
  m, d = config.model, config.data
  return dict(depth=int(m.depth), width=int(m.width), heads=int(m.heads),
              patch_size=int(m.patch_size), mlp_ratio=float(m.mlp_ratio),
              channels=int(d.channels), image_size=int(d.image_size),
              num_classes=int(d.num_classes), learn_sigma=bool(learn_sigma))


def check_layout(config: ml_collections.ConfigDict, layout: str) -> None:
  """Refuses (UserError, one line) a layout that cannot hold the configured model."""
  errors.check(layout in LAYOUTS, "--layout", layout, f"allowed: {', '.join(LAYOUTS)}")
  if layout not in OFFICIAL:
    return
  m, keep = config.model, "--layout=sgjax keeps every model"
  if m.kind != "dit":
    raise errors.UserError(f"--layout={layout}", f"model.kind = {m.kind!r} is not a "
                           "class-conditional DiT/SiT (its text layers have no place in the "
                           f"official {layout.upper()} state dict)", keep)
  if m.decoder_depth > 0:
    raise errors.UserError(f"--layout={layout}", f"model.decoder_depth = {m.decoder_depth}: a "
                           "masked model's decoder has no place in the official "
                           f"{layout.upper()} state dict", keep)
  want = OFFICIAL_PREDICTION[layout]
  if m.prediction != want:
    other = next(k for k, v in OFFICIAL_PREDICTION.items() if v == m.prediction)
    raise errors.UserError(f"--layout={layout}", f"model.prediction = {m.prediction!r}, but "
                           f"{layout.upper()}'s sampler reads the network's output as "
                           f"{want!r}", f"export this model with --layout={other} or sgjax")


def official_state_dict(params: Mapping[str, Any], config: ml_collections.ConfigDict, *,
                        learn_sigma: bool = True) -> dict[str, np.ndarray]:
  """Our DiT params -> the official DiT/SiT state dict (float32 numpy, torch's shapes).

  `learn_sigma`: 2C output channels per pixel as DiT/SiT build their models by default, the
  variance half zero; False: C channels (`learn_sigma=False` in their constructors)."""
  from sgjax.models import dit  # Local: the position table is the model's.
  flat = {k: np.asarray(v, np.float32) for k, v in flatten(params).items()}
  m = config.model
  sd: dict[str, np.ndarray] = {}
  used = set()
  for ours, prefix in dit_checkpoint.linear_names(m.depth).items():
    sd[prefix + ".weight"] = flat[ours + "/kernel"].T  # flax (in, out) -> torch (out, in).
    sd[prefix + ".bias"] = flat[ours + "/bias"]
    used |= {ours + "/kernel", ours + "/bias"}
  # flax Conv (kh, kw, in, out) -> torch Conv2d (out, in, kh, kw).
  sd["x_embedder.proj.weight"] = flat["patch_embed/kernel"].transpose(3, 2, 0, 1)
  sd["x_embedder.proj.bias"] = flat["patch_embed/bias"]
  sd["y_embedder.embedding_table.weight"] = flat["y_embed/embedding"]
  grid = config.data.image_size // m.patch_size
  sd["pos_embed"] = np.asarray(dit.sincos_pos_embed_2d(m.width, grid), np.float32)[None]
  # Output rows: (row-in-patch, col-in-patch, channel), channel fastest; with learn_sigma each
  # pixel's 2C channels are the prediction's C, then the variance's C.
  kernel, bias = flat["final_proj/kernel"].T, flat["final_proj/bias"]
  used |= {"patch_embed/kernel", "patch_embed/bias", "y_embed/embedding", "final_proj/kernel",
           "final_proj/bias"}
  if learn_sigma:
    c = config.data.channels
    rows = np.array([r for r in range(kernel.shape[0] * 2) if r % (2 * c) < c])
    wide = np.zeros((2 * kernel.shape[0], kernel.shape[1]), np.float32)
    wide[rows] = kernel
    kernel, bias = wide, np.zeros((2 * bias.shape[0],), np.float32)
    bias[rows] = flat["final_proj/bias"]
  sd["final_layer.linear.weight"], sd["final_layer.linear.bias"] = kernel, bias
  unplaced = sorted(set(flat) - used)
  if unplaced:  # A parameter this layout has no key for: refuse rather than drop it.
    raise errors.UserError("--layout", f"params with no place in the official state dict: "
                           f"{unplaced[:4]}", "--layout=sgjax keeps every model")
  return {k: np.ascontiguousarray(v, np.float32) for k, v in sorted(sd.items())}


def metadata(config: ml_collections.ConfigDict, layout: str, step: int,
             learn_sigma: bool = False) -> dict[str, str]:
  """safetensors' string map: the layout, the config, architecture, time convention, step."""
  m = config.model
  return {
      "format": "pt" if layout in OFFICIAL else "flax",  # What the keys and shapes follow.
      "sgjax.format": FORMAT,
      "sgjax.layout": layout,
      "sgjax.weights": "ema",
      "sgjax.step": str(int(step)),
      "sgjax.config": json.dumps(workdir_lib.flat_config(config), sort_keys=True),
      "architecture": json.dumps(architecture(config, learn_sigma), sort_keys=True),
      "prediction": str(m.prediction),
      "time_scale": repr(float(m.time_scale)),
      "time": "t in [0, 1], 0 = noise, 1 = data; the network's time input is time_scale * t",
  }


def tensors(params: Mapping[str, Any], config: ml_collections.ConfigDict, layout: str,
            learn_sigma: bool = True) -> dict[str, np.ndarray]:
  """The arrays a file of `layout` holds (checked with `check_layout` first)."""
  check_layout(config, layout)
  if layout in OFFICIAL:
    return official_state_dict(params, config, learn_sigma=learn_sigma)
  return {k: np.ascontiguousarray(v, np.float32) for k, v in flatten(params).items()}


def check_out(path: str) -> None:
  """Refuses an --out that is not a new FILE.safetensors (nothing is ever overwritten)."""
  if not path.endswith(".safetensors"):
    raise errors.UserError(f"--out={path}", "not a .safetensors path",
                           "name the file FILE.safetensors")
  if files.exists(path):
    raise errors.UserError(f"--out={path}", "exists", "export to a new file; nothing is "
                           "overwritten")


def write(path: str, params: Mapping[str, Any], config: ml_collections.ConfigDict, layout: str,
          step: int, *, learn_sigma: bool = True) -> dict[str, np.ndarray]:
  """Writes `path` (atomically; an existing file is refused, never replaced); its tensors."""
  from safetensors.numpy import save  # Local: the writer only.
  check_out(path)
  arrays = tensors(params, config, layout, learn_sigma)
  sigma = learn_sigma and layout in OFFICIAL
  data = save(arrays, metadata=metadata(config, layout, step, sigma))
  parent = os.path.dirname(path)
  if parent:
    files.makedirs(parent)
  files.write_bytes(path, data)
  return arrays


def read(path: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
  """(tensors, metadata) of an exported file (local or in a bucket); one UserError naming it
  if it is not one."""
  from safetensors import SafetensorError
  from safetensors.numpy import load
  if not files.exists(path) or files.isdir(path):
    raise errors.UserError(path, "no such file", "pass a workdir or an exported .safetensors")
  data = files.read_bytes(path)
  try:
    # The header: 8 bytes of little-endian length, then JSON whose "__metadata__" is the map.
    size = int.from_bytes(data[:8], "little")
    if len(data) < 8 or size > len(data) - 8:
      raise ValueError("shorter than its header says")
    meta = dict(json.loads(data[8:8 + size]).get("__metadata__") or {})
    arrays = load(data)
  except (SafetensorError, ValueError, UnicodeDecodeError, AttributeError) as err:
    raise errors.UserError(path, f"not a safetensors file ({errors.first_line(err)})",
                           "pass a file written by sgjax-export") from err
  if meta.get("sgjax.format") != FORMAT or "sgjax.config" not in meta:
    raise errors.UserError(path, "holds no sgjax export metadata",
                           "pass a file written by sgjax-export (a DiT/SiT state dict: "
                           "import it with sgjax-convert-dit)")
  return arrays, meta
