"""The models, and the one place a config picks one (`model.kind`)."""

from __future__ import annotations

KINDS = ("dit", "trdit")  # Class-conditional DiT/SiT; text-conditional TR-DiT.


def from_config(config):
  """The model a validated config describes: `model.kind` picks the class."""
  kind = config.model.get("kind", "dit")
  if kind == "dit":
    from sgjax.models import dit
    return dit.from_config(config)
  if kind == "trdit":
    from sgjax.models import trdit
    return trdit.from_config(config)
  raise ValueError(f"model.kind = {kind!r}: allowed: {KINDS}")
