"""The models, and the one place a config picks one (`model.kind`).

Every model module exports the same surface: `from_config(config)` (the linen module), `TEXT`
(whether it is conditioned on text features rather than class labels), and on the module the
methods `example_condition(batch)` and `builtin_null()` that sgjax.condition reads.
"""

from __future__ import annotations

from types import ModuleType

from sgjax.models import dit, trdit

_MODULES = {"dit": dit, "trdit": trdit}  # Class-conditional DiT/SiT; text-conditional TR-DiT.
KINDS = tuple(_MODULES)


def module(config) -> ModuleType:
  """The model module of `model.kind`."""
  kind = config.model.get("kind", "dit")
  if kind not in _MODULES:
    raise ValueError(f"model.kind = {kind!r}: allowed: {KINDS}")
  return _MODULES[kind]


def from_config(config):
  """The model a validated config describes: `model.kind` picks the module."""
  return module(config).from_config(config)


def is_text(config) -> bool:
  """Whether the configured model is conditioned on text (prompts) rather than class labels."""
  return module(config).TEXT
