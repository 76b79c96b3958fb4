"""Guidance rules on the velocity, and the guided velocity of one sampling step.

Every rule is `v = ω·v_strong + (1 − ω)·v_weak` over two model evaluations ("branches"):

  rule     strong branch            weak branch
  none     v(c;  γ_strong)          —
  cfg      v(c)  (dense)            v(∅) (dense)
  sg       v(c;  γ_strong)          v(c; γ_weak)       both conditional, γ_strong < γ_weak
  cfg_sg   v(c;  γ_strong)          v(∅; γ_weak)

Both branches of a step run inside one jitted function (one XLA program). Dense branches (CFG)
are batched into a single forward over 2B samples. Routed branches (SG, CFG+SG) run as two
forwards in the same program: their token counts differ, so static shapes forbid one batch, and
even at equal γ each branch must draw its own token subsets.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections

from sgjax.sparsity import Sparsity

# (params, x_t, t, y, sparsity, token_key) -> velocity
VelocityFn = Callable[..., jax.Array]


@dataclasses.dataclass(frozen=True)
class Branch:
  """One model evaluation of a guided step."""

  conditional: bool
  sparsity: Sparsity


@dataclasses.dataclass(frozen=True)
class Guidance:
  """A guidance rule with its weight; hashable, so it is a static jit argument."""

  rule: str
  omega: float
  strong: Branch
  weak: Branch | None

  @property
  def branches(self) -> tuple[Branch, ...]:
    return (self.strong,) if self.weak is None else (self.strong, self.weak)


def from_config(g: ml_collections.ConfigDict, routes: Sparsity) -> Guidance:
  """Builds the rule of `config.sample.guidance`; `routes` is the model's route layout."""
  dense = Sparsity()
  strong_sp = routes.with_gamma(g.gamma_strong) if g.gamma_strong > 0 else dense
  weak_sp = routes.with_gamma(g.gamma_weak) if g.gamma_weak > 0 else dense
  if g.rule == "none":
    return Guidance("none", 1.0, Branch(True, strong_sp), None)
  if g.rule == "cfg":
    return Guidance("cfg", g.omega, Branch(True, dense), Branch(False, dense))
  if g.rule == "sg":
    if not g.gamma_strong < g.gamma_weak:
      raise ValueError(f"sample.guidance: sg needs gamma_strong < gamma_weak, got "
                       f"{g.gamma_strong} >= {g.gamma_weak}")
    return Guidance("sg", g.omega, Branch(True, strong_sp), Branch(True, weak_sp))
  if g.rule == "cfg_sg":
    return Guidance("cfg_sg", g.omega, Branch(True, strong_sp), Branch(False, weak_sp))
  raise ValueError(f"sample.guidance.rule = {g.rule!r}: allowed none, cfg, sg, cfg_sg")


def guided_velocity(velocity_fn: VelocityFn, params, x: jax.Array, t: jax.Array,
                    y: jax.Array, null_label: int, guidance: Guidance,
                    keys: tuple[jax.Array, jax.Array]) -> jax.Array:
  """ω·v_strong + (1 − ω)·v_weak for one step. `keys` = token-selection keys of the two branches.

  Dense branches (CFG) share one forward over the concatenated batch: no tokens are drawn, so
  nothing changes but the batch size. Routed branches run as separate forwards, each drawing its
  own subsets from its own key, as the method prescribes.
  """
  labels = lambda b: y if b.conditional else jnp.full_like(y, null_label)
  strong, weak = guidance.strong, guidance.weak
  if weak is None:
    return velocity_fn(params, x, t, labels(strong), strong.sparsity, keys[0])
  if strong.sparsity.is_dense and weak.sparsity.is_dense:
    v = velocity_fn(params, jnp.concatenate([x, x]), jnp.concatenate([t, t]),
                    jnp.concatenate([labels(strong), labels(weak)]), strong.sparsity, keys[0])
    v_strong, v_weak = jnp.split(v, 2)
  else:
    v_strong = velocity_fn(params, x, t, labels(strong), strong.sparsity, keys[0])
    v_weak = velocity_fn(params, x, t, labels(weak), weak.sparsity, keys[1])
  return guidance.omega * v_strong + (1.0 - guidance.omega) * v_weak
