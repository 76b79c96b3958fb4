"""diffusers AutoencoderKL weights (`diffusion_pytorch_model.safetensors`) -> sgjax.models.vae.

The file is one the user already has (e.g. from `stabilityai/sd-vae-ft-ema`); nothing is
downloaded. Our Flax module names mirror diffusers' (`down_blocks_0` <-> `down_blocks.0`), so the
mapping is a rename plus layout changes:
  * conv kernels: PyTorch OIHW -> Flax HWIO;
  * linear weights: (out, in) -> (in, out); old files (pre-0.14 diffusers `AttentionBlock`, or
    1x1 convs) hold the attention projections as (out, in[, 1, 1]) under `query/key/value/
    proj_attn` instead of `to_q/to_k/to_v/to_out.0` — both are read;
  * GroupNorm `weight` -> `scale`.
Coverage is checked both ways: a param the file lacks, a tensor nothing reads, or a shape that
does not fit fails loudly, naming every such key.

Check a file against a config's VAE architecture:
  python -m third_party.sd_vae --config=configs/imagenet256.py --config.vae.weights=PATH
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Mapping
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import flags, logging
from ml_collections import config_flags

from sgjax import errors, readers, sharding
from sgjax.models import vae

# New diffusers attention names -> the ones older files use.
_OLD_ATTENTION_NAMES = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}


def torch_names(flax_path: tuple[str, ...]) -> list[str]:
  """The state-dict keys that may hold a Flax param, the new diffusers name first."""
  *modules, leaf = flax_path
  modules = [re.sub(r"_(\d+)$", r".\1", m) for m in modules]  # down_blocks_0 -> down_blocks.0
  leaf = "bias" if leaf == "bias" else "weight"  # kernel, scale -> weight
  names = [".".join(modules + [leaf])]
  if modules and modules[-1] in _OLD_ATTENTION_NAMES:
    names.append(".".join(modules[:-1] + [_OLD_ATTENTION_NAMES[modules[-1]], leaf]))
  return names


def _to_flax(value: np.ndarray, flax_shape: tuple[int, ...]) -> np.ndarray:
  """One tensor from PyTorch layout to Flax layout (shape checked by the caller)."""
  value = np.asarray(value, np.float32)
  if len(flax_shape) == 4:  # Conv: OIHW -> HWIO.
    return value.transpose(2, 3, 1, 0) if value.ndim == 4 else value
  if len(flax_shape) == 2:  # Linear (out, in) or a 1x1 conv (out, in, 1, 1) -> (in, out).
    if value.ndim == 4 and value.shape[2:] == (1, 1):
      value = value[:, :, 0, 0]
    return value.T if value.ndim == 2 else value
  return value


def _flatten(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
  out = {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      out.update(_flatten(v, prefix + (k,)))
    else:
      out[prefix + (k,)] = v
  return out


def _unflatten(flat: Mapping[tuple[str, ...], Any]) -> dict[str, Any]:
  tree: dict[str, Any] = {}
  for path, v in flat.items():
    node = tree
    for k in path[:-1]:
      node = node.setdefault(k, {})
    node[path[-1]] = v
  return tree


def _listing(title: str, items: list[str], limit: int = 20) -> str:
  more = f"\n    ... and {len(items) - limit} more" if len(items) > limit else ""
  return f"  {title} ({len(items)}):\n    " + "\n    ".join(items[:limit]) + more


WEIGHTS_ALLOWED = ("pass the diffusers AutoencoderKL file (e.g. sd-vae-ft-ema/"
                   "diffusion_pytorch_model.safetensors) of the vae.* architecture")


def convert(state: Mapping[str, np.ndarray], abstract_params: Mapping[str, Any],
            where: str = "the VAE state dict") -> dict:
  """A diffusers state dict -> the Flax param tree shaped like `abstract_params` (float32).

  Raises a UserError naming `where` that lists every missing key, unused key and shape
  mismatch (the first lines of each list in the one line; all of them with --verbose).
  """
  missing, mismatched, used, flat = [], [], set(), {}
  for path, leaf in _flatten(abstract_params).items():
    shape = tuple(leaf.shape)
    names = [n for n in torch_names(path) if n in state]
    if not names:
      missing.append(" or ".join(torch_names(path)) + f"  (for {'/'.join(path)}, {shape})")
      continue
    used.add(names[0])
    value = _to_flax(state[names[0]], shape)
    if value.shape != shape:
      mismatched.append(f"{names[0]}: file {tuple(np.shape(state[names[0]]))}, "
                        f"expected {shape} in Flax layout for {'/'.join(path)}")
      continue
    flat[path] = value
  unused = sorted(set(state) - used)
  if missing or mismatched or unused:
    lists = [(t, items) for t, items in (
        ("missing from the file", missing), ("shape mismatches", mismatched),
        ("in the file but read by nothing (another architecture?)", unused)) if items]
    detail = ValueError("SD-VAE weights do not fit the configured architecture:\n"
                        + "\n".join(_listing(t, items) for t, items in lists))
    short = "; ".join(f"{t} ({len(items)}): " + ", ".join(items[:3])
                      + (" ..." if len(items) > 3 else "") for t, items in lists)
    raise errors.UserError(where, f"does not fit the configured SD-VAE: {short}",
                           "check the vae.* config fields (--verbose lists it all)") from detail
  return _unflatten(flat)


def load(path: str, abstract_params: Mapping[str, Any], where: str = "") -> dict:
  """Reads a diffusers safetensors file (lazily, via sgjax.readers: one line naming the file if
  it cannot be read) and converts it (see `convert`)."""
  where = where or f"vae.weights = {path!r}"
  return convert(readers.SafetensorsFile(path, where, WEIGHTS_ALLOWED), abstract_params, where)


def main(argv) -> None:
  del argv
  logging.set_verbosity(logging.WARNING)
  vc = flags.FLAGS.config.vae
  params = load_params(vc)
  count = sum(int(np.prod(np.shape(v))) for v in _flatten(params).values())
  print(f"{vc.weights}: OK, {count:,} parameters fill the configured SD-VAE "
        f"(channels {tuple(vc.block_out_channels)}, {vc.layers_per_block} layers per block, "
        f"{vc.latent_channels} latent channels, downsampling "
        f"x{2 ** (len(vc.block_out_channels) - 1)})")


def load_params(vc: ml_collections.ConfigDict) -> Any:
  """Params from `vc.weights`, a diffusers `diffusion_pytorch_model.safetensors` (nothing is
  downloaded); every key and shape is checked against the configured architecture."""
  return load(vc.weights, vae.abstract_params(vae.from_config(vc)))


_ARCH_FIELDS = ("block_out_channels", "layers_per_block", "latent_channels", "in_channels",
                "norm_groups")


@functools.lru_cache(maxsize=2)
def _decoder(weights: str, mtime: float, arch: tuple, scale: float, chunk: int, mesh):
  """The jitted decode with its weights on the mesh; cached per file (and its mtime) and mesh."""
  del mtime  # Only part of the cache key: a rewritten file is read again.
  vc = ml_collections.ConfigDict(dict(zip(_ARCH_FIELDS, arch, strict=True)))
  vc.weights = weights
  params = jax.device_put(load_params(vc), sharding.replicated(mesh))
  fn = vae.make_decode_fn(vae.from_config(vc), scale, mesh, chunk)
  return lambda z: fn(params, z)


def to_pixels(config: ml_collections.ConfigDict, mesh, x: jax.Array) -> jax.Array:
  """Samples in model units -> pixels in [-1, 1]: the SD-VAE decode when `vae.weights` is set,
  the identity for pixel-space models. The weights load once per (file, mesh)."""
  vc = config.vae
  if not vc.weights:
    if config.data.name == "latents":
      raise errors.UserError("vae.weights = ''", "a model trained on latents needs the SD-VAE "
                             "file to decode its samples",
                             "--config.vae.weights=.../diffusion_pytorch_model.safetensors")
    return x
  arch = tuple(tuple(vc[k]) if k == "block_out_channels" else vc[k] for k in _ARCH_FIELDS)
  mtime = os.path.getmtime(vc.weights) if os.path.exists(vc.weights) else 0.0
  return _decoder(vc.weights, mtime, arch, float(vc.scale), int(vc.chunk), mesh)(x)


def cli() -> None:
  """`python -m sgjax.convert.sd_vae --config=…`: checks a weights file fits the vae.* fields."""
  config_flags.DEFINE_config_file("config", None, "Config file (its vae.* fields).")
  errors.run(main)


if __name__ == "__main__":
  cli()
