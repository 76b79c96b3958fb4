"""The models, and the one place a config picks one (`model.kind`).

Every model module exports the same surface, and the rest of sgjax sees a model only through it:

  CONDITIONING                 what it is conditioned on: "labels" (class labels) or "text"
                               (prompt features); what a job asks to know whether it takes prompts
  from_config(config)          the linen module; on it `example_condition(batch)` (zeros of the
                               condition's shapes, what init traces with), `builtin_null()` (CFG's
                               ∅, or None where the data bring it), `num_tokens` and `masked`
  forward_macs(config, sparsity)  the analytic MACs of one forward pass (sgjax.flops' unit, Macs)
  check_config(config)         the config fields only this kind reads (the shared ones, the
                               preset and `dtype`: here)

Weights from elsewhere (DiT/SiT checkpoints, the SD-VAE) are loaded by sgjax.convert, not here.
"""

from __future__ import annotations

from types import ModuleType

import ml_collections

from sgjax import errors
from sgjax import sparsity as sp
from sgjax.models import dit, trdit
from sgjax.models.macs import Macs

_MODULES = {"dit": dit, "trdit": trdit}  # Class-conditional DiT/SiT; text-conditional TR-DiT.
KINDS = tuple(_MODULES)
# DiT/SiT sizes (Peebles & Xie, Table 1). A preset "XL/2" is size XL with patch 2.
MODEL_SIZES = {
    "S": dict(depth=12, width=384, heads=6),
    "B": dict(depth=12, width=768, heads=12),
    "L": dict(depth=24, width=1024, heads=16),
    "XL": dict(depth=28, width=1152, heads=16),
}
PATCH_SIZES = (2, 4, 8)
PRESETS = tuple(f"{s}/{p}" for s in MODEL_SIZES for p in PATCH_SIZES)
DTYPES = ("float32", "bfloat16")  # `dtype`: the compute dtype; params stay float32.


def apply_preset(model: ml_collections.ConfigDict) -> None:
  """Fills depth/width/heads/patch_size from `model.preset` (empty preset: explicit fields)."""
  if not model.preset:
    return
  if model.preset not in PRESETS:
    raise errors.UserError(f"model.preset = {model.preset!r}", "unknown",
                           f"allowed: {', '.join(PRESETS)} or '' for explicit "
                           "depth/width/heads/patch_size")
  size, patch = model.preset.split("/")
  for k, v in MODEL_SIZES[size].items():
    model[k] = v
  model.patch_size = int(patch)


def module(config: ml_collections.ConfigDict) -> ModuleType:
  """The model module of `model.kind`."""
  kind = config.model.get("kind", "dit")
  errors.check(kind in _MODULES, "model.kind", kind, f"allowed: {KINDS}")
  return _MODULES[kind]


def from_config(config: ml_collections.ConfigDict):
  """The model a validated config describes: `model.kind` picks the module."""
  return module(config).from_config(config)


def conditioning(config: ml_collections.ConfigDict) -> str:
  """"labels" or "text": what the configured model is conditioned on."""
  return module(config).CONDITIONING


def forward_macs(config: ml_collections.ConfigDict, sparsity: sp.Sparsity = sp.DENSE) -> Macs:
  """MACs of one forward pass of one image at `sparsity` (model dims resolved: a preset is
  applied)."""
  return module(config).forward_macs(config, sparsity)


def check_config(config: ml_collections.ConfigDict) -> None:
  """The `model` section (a preset already applied; each field's own values: its declaration):
  what depends on other fields, every kind's, then the kind's own."""
  m, check = config.model, errors.check
  kind = module(config)
  check(m.width % m.heads == 0, "model.width", m.width,
        f"must be a positive multiple of model.heads = {m.heads}")
  check(config.data.image_size % m.patch_size == 0, "model.patch_size", m.patch_size,
        f"must divide data.image_size = {config.data.image_size}")
  kind.check_config(config)
