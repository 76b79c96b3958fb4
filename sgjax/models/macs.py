"""The unit of the analytic cost each model module counts (`forward_macs`; see sgjax.flops)."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Macs:
  """Multiply-accumulates of one image: per-token matmuls, once-per-image work, attention."""

  linear: float
  per_sample: float
  attention: float

  @property
  def linear_only(self) -> float:
    return self.linear + self.per_sample

  @property
  def with_attention(self) -> float:
    return self.linear + self.per_sample + self.attention

  def __add__(self, other: Macs) -> Macs:
    return Macs(self.linear + other.linear, self.per_sample + other.per_sample,
                self.attention + other.attention)

  def scale(self, k: float) -> Macs:
    return Macs(k * self.linear, k * self.per_sample, k * self.attention)
