"""Guidance rules on the velocity, their per-step schedule, and the guided velocity of one step.

Every rule is `v = ω·v_strong + (1 − ω)·v_weak` over two model evaluations ("branches"):

  rule     strong branch            weak branch
  none     v(c;  γ_strong)          —
  cfg      v(c)  (dense)            v(∅) (dense)
  sg       v(c;  γ_strong)          v(c; γ_weak)       both conditional, γ_strong < γ_weak
  cfg_sg   v(c;  γ_strong)          v(∅; γ_weak)       γ_strong < γ_weak
  ag_sg    v(c;  γ_strong)          v(c; γ_weak) of the guide weights (an earlier checkpoint)

Both branches of a step run inside one jitted function (one XLA program). Dense branches of the
same weights (CFG) are batched into a single forward over 2B samples. Routed branches run as two
forwards in the same program: their token counts differ, so static shapes forbid one batch, and
even at equal γ each branch must draw its own token subsets.

Over a sampler's steps the rule may change: outside the guidance interval [t_lo, t_hi] only the
strong branch runs (no weak-branch FLOPs), and γ may follow a schedule (constant or cosine).
Token counts must be static per compiled step, so `plan()` turns the schedule into segments of
consecutive steps that share one (token count strong, token count weak) pair; the sampler runs
one `fori_loop` per segment inside one jitted program. γ values that give the same token count
are merged (canonicalised), and `gamma_quantum` > 0 rounds γ to a grid first, which bounds the
number of distinct compiled step bodies when a schedule would otherwise produce one per step.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from sgjax import condition, errors, flow
from sgjax.sparsity import Sparsity

# (params, x_t, t, y, sparsity, token_key) -> velocity
VelocityFn = Callable[..., jax.Array]

SCHEDULES = ("constant", "cosine")
TOKEN_DRAWS = ("step", "trajectory")
# Which weights a branch evaluates: the model being sampled, or AG+SG's guide checkpoint.
MAIN, GUIDE = "main", "guide"


@dataclasses.dataclass(frozen=True)
class RuleBranches:
  """What a rule's two branches are (the table above, stated once; everything asks here)."""

  weak: bool  # A weak branch at all (`none` has only the strong one).
  sparse: bool  # Branches at their γ (False: CFG, dense whatever γ says).
  weak_conditional: bool = True  # The weak branch sees c (False: ∅).
  weak_weights: str = MAIN
  ordered: bool = False  # Same weights, so γ_strong < γ_weak (the weak one is the sparser).


RULE_BRANCHES = {
    "none": RuleBranches(weak=False, sparse=True),
    "cfg": RuleBranches(weak=True, sparse=False, weak_conditional=False),
    "sg": RuleBranches(weak=True, sparse=True, ordered=True),
    "cfg_sg": RuleBranches(weak=True, sparse=True, weak_conditional=False, ordered=True),
    "ag_sg": RuleBranches(weak=True, sparse=True, weak_weights=GUIDE),
}
RULES = tuple(RULE_BRANCHES)


def uses_guide(rule: str) -> bool:
  """Whether the rule's weak branch evaluates the guide checkpoint's weights (AG+SG)."""
  return RULE_BRANCHES[rule].weak_weights == GUIDE


def setting(rule: str, omega: float, gamma_strong: float, gamma_weak: float) -> dict | None:
  """A constant guidance setting with the fields its rule ignores set to one value (so settings
  that run the same sampler compare equal), or None where the rule refuses it (γ_strong ≥
  γ_weak for an ordered rule)."""
  b = RULE_BRANCHES[rule]
  if not b.sparse:
    gamma_strong = gamma_weak = 0.0
  if not b.weak:
    omega, gamma_weak = 1.0, 0.0
  if b.ordered and not gamma_strong < gamma_weak:
    return None
  return dict(rule=rule, omega=float(omega), gamma_strong=float(gamma_strong),
              gamma_weak=float(gamma_weak))


def strong_is_sparse(g: ml_collections.ConfigDict) -> bool:
  """Whether the configured guidance ever runs a branch at γ > 0 (then it needs routes or a
  masked model)."""
  b = RULE_BRANCHES[g.rule]
  if not b.sparse:
    return False
  if b.weak:
    return True
  return g.gamma_strong > 0 or (g.schedule == "cosine" and g.gamma_strong_end > 0)


@dataclasses.dataclass(frozen=True)
class Branch:
  """One model evaluation of a guided step."""

  conditional: bool
  sparsity: Sparsity
  weights: str = MAIN


@dataclasses.dataclass(frozen=True)
class Guidance:
  """A guidance rule with its weight; hashable, so it is a static jit argument.

  `omega` None: the weight is not part of the compiled step (`Plan.structure`); the sampler
  passes it as a traced value instead.
  """

  rule: str
  omega: float | None
  strong: Branch
  weak: Branch | None

  def mix(self) -> tuple[float, float]:
    """(ω, 1 − ω), both in double precision (what the step multiplies the branches by)."""
    return float(self.omega), 1.0 - float(self.omega)

  @property
  def branches(self) -> tuple[Branch, ...]:
    return (self.strong,) if self.weak is None else (self.strong, self.weak)


@dataclasses.dataclass(frozen=True)
class Segment:
  """Steps `start <= i < stop` of a sampler, all run with the same compiled guided step."""

  start: int
  stop: int
  guidance: Guidance


@dataclasses.dataclass(frozen=True)
class Plan:
  """A whole sampler: the time grid (steps + 1 values, 0 = noise) and its segments.

  `token_draw`: the weak branch draws its token subsets at every step ("step") or once per
  sample for the whole trajectory ("trajectory").
  """

  times: tuple[float, ...]
  segments: tuple[Segment, ...]
  token_draw: str = "step"

  @property
  def steps(self) -> int:
    return len(self.times) - 1

  def step_guidance(self) -> tuple[Guidance, ...]:
    """The guidance of every step, in order (what the FLOP counter sums)."""
    return tuple(s.guidance for s in self.segments for _ in range(s.start, s.stop))

  def mixes(self) -> np.ndarray:
    """(segments, 2) float32: each segment's (ω, 1 − ω), the values the sampler takes traced."""
    return np.array([s.guidance.mix() for s in self.segments], np.float32)

  def structure(self) -> Plan:
    """The plan without its weights ω: what a compiled sampler is specialised to, so samplers
    that differ only in ω share one executable (given `mixes()` at call time)."""
    return dataclasses.replace(self, segments=tuple(
        dataclasses.replace(s, guidance=dataclasses.replace(s.guidance, omega=None))
        for s in self.segments))


def gamma_at(start: float, end: float, schedule: str, step: int, steps: int) -> float:
  """γ of sampling step `step` (0-based): constant = start; cosine = start -> end over the steps."""
  if schedule == "constant" or steps == 1:
    return float(start)
  if schedule == "cosine":
    w = 0.5 * (1.0 + math.cos(math.pi * step / (steps - 1)))  # 1 at the first step, 0 at last.
    return float(end + (start - end) * w)
  raise errors.UserError(f"sample.guidance.schedule = {schedule!r}", f"allowed {SCHEDULES}")


def _sparsity(routes: Sparsity, gamma: float, num_tokens: int, quantum: float) -> Sparsity:
  """The training mechanism (routes, or masking: `Sparsity.with_gamma`) at γ, with γ replaced
  by the smallest value giving the same token count.

  Two γs that keep the same number of tokens then compare equal, so they share a compiled step.
  """
  if quantum > 0:
    gamma = round(gamma / quantum) * quantum
  drop = int(num_tokens * gamma)
  if drop <= 0:
    return Sparsity()
  canonical = drop / num_tokens
  while int(num_tokens * canonical) < drop:  # Guard against float rounding below the count.
    canonical = math.nextafter(canonical, 1.0)
  return routes.with_gamma(canonical)


def _check(cond: bool, field: str, value, allowed: str) -> None:
  errors.check(cond, f"sample.guidance.{field}", value, allowed)


def plan(g: ml_collections.ConfigDict, routes: Sparsity, num_tokens: int,
         times: tuple[float, ...]) -> Plan:
  """The per-step guidance of `config.sample.guidance` over the time grid `times`."""
  _check(g.rule in RULES, "rule", g.rule, f"allowed: {RULES}")
  _check(g.schedule in SCHEDULES, "schedule", g.schedule, f"allowed: {SCHEDULES}")
  _check(g.token_draw in TOKEN_DRAWS, "token_draw", g.token_draw, f"allowed: {TOKEN_DRAWS}")
  t_lo, t_hi = (float(v) for v in g.interval)
  _check(0.0 <= t_lo <= t_hi <= 1.0, "interval", tuple(g.interval),
         "must be (t_lo, t_hi) with 0 <= t_lo <= t_hi <= 1 (t = 0 is noise, 1 is data)")
  steps = len(times) - 1
  dense = Sparsity()
  rb = RULE_BRANCHES[g.rule]
  per_step = []
  for i in range(steps):
    gs = gamma_at(g.gamma_strong, g.gamma_strong_end, g.schedule, i, steps)
    gw = gamma_at(g.gamma_weak, g.gamma_weak_end, g.schedule, i, steps)
    for name, value in (("gamma_strong", gs), ("gamma_weak", gw)):
      _check(0.0 <= value < 1.0, name, value, f"must be in [0, 1) (value at sampling step {i})")
    # CFG is dense-vs-dense: its γ fields do not apply, also at steps outside its interval.
    strong = Branch(True, _sparsity(routes, gs, num_tokens, g.gamma_quantum) if rb.sparse
                    else dense)
    guided = rb.weak and t_lo <= times[i] <= t_hi
    if not guided:
      per_step.append(Guidance("none", 1.0, strong, None))
      continue
    if rb.ordered:
      # Same weights: the weak branch must be the sparser one, at every step.
      _check(gs < gw, "gamma_weak", gw,
             f"must be > gamma_strong = {gs} at step {i} for rule {g.rule!r} "
             "(gamma_strong < gamma_weak; the weak branch is the sparser one)")
    weak_sp = _sparsity(routes, gw, num_tokens, g.gamma_quantum) if rb.sparse else dense
    weak = Branch(rb.weak_conditional, weak_sp, rb.weak_weights)
    per_step.append(Guidance(g.rule, g.omega, strong, weak))

  segments, start = [], 0
  for i in range(1, steps + 1):
    if i == steps or per_step[i] != per_step[start]:
      segments.append(Segment(start, i, per_step[start]))
      start = i
  return Plan(tuple(float(t) for t in times), tuple(segments), g.token_draw)


def config_plan(config: ml_collections.ConfigDict) -> Plan:
  """The plan of `config.sample`: its guidance over its time grid, on the model's tokens, with
  the training mechanism (`config.sparsity`) as every sparse branch's template."""
  num_tokens = (config.data.image_size // config.model.patch_size) ** 2
  times = flow.time_grid(config.sample.steps, config.sample.time_shift)
  return plan(config.sample.guidance, Sparsity.from_config(config.sparsity), num_tokens, times)


def check_config(config: ml_collections.ConfigDict) -> None:
  """The `sample.guidance` section across fields (each field's own values, ω >= 0 and the
  like: its declaration, checked first): the whole schedule step by step, the tokens a sparse
  branch thins and AG+SG's guide step."""
  g = config.sample.guidance
  config_plan(config)  # Walks every step: rule, schedule, interval, γ ranges and order.
  if strong_is_sparse(g) and not (config.sparsity.routes or config.model.decoder_depth > 0):
    raise errors.UserError(f"sparsity.routes = {config.sparsity.routes!r}",
                           "sparse guidance needs at least one route (the layers whose tokens "
                           "γ thins) or a masked model (model.decoder_depth > 0)")
  if uses_guide(g.rule):
    _check(g.guide_step >= 0, "guide_step", g.guide_step,
           "rule 'ag_sg' needs the guide checkpoint's step (>= 0), e.g. an early checkpoint "
           "kept with train.keep_period")


def from_config(g: ml_collections.ConfigDict, routes: Sparsity, num_tokens: int) -> Guidance:
  """The guidance of the first step of `config.sample.guidance` (what a constant schedule runs
  at every step inside its interval)."""
  p = plan(g, routes, num_tokens, (0.0, 1.0))
  return p.segments[0].guidance


def guided_velocity(velocity_fn: VelocityFn, params: Mapping[str, object], x: jax.Array,
                    t: jax.Array, y: condition.Condition, null_label: condition.Null,
                    guidance: Guidance, keys: tuple[jax.Array, jax.Array],
                    mix: tuple[jax.Array | float, jax.Array | float] | None = None
                    ) -> jax.Array:
  """ω·v_strong + (1 − ω)·v_weak for one step.

  `params` maps a branch's `weights` name ("main", "guide") to its params; `keys` are the
  token-selection keys of the two branches. Dense branches of the same weights (CFG) share one
  forward over the concatenated batch: no tokens are drawn, so nothing changes but the batch
  size. Routed branches run as separate forwards, each drawing its own subsets from its own key.
  `y` is any condition pytree (labels, text features + mask) and `null_label` its null (the
  null class, or the empty prompt's features): see sgjax.condition. `mix` is (ω, 1 − ω), traced
  or not (default: `guidance.mix()`); both are cast to the velocity's dtype, as a Python float
  would be (measured against constant ω: routed rules bit-identical, CFG within 1.5e-6, where
  XLA fuses the batched branches' mix differently).
  """
  labels = lambda b: y if b.conditional else condition.null_like(y, null_label)
  strong, weak = guidance.strong, guidance.weak
  if weak is None:
    return velocity_fn(params[strong.weights], x, t, labels(strong), strong.sparsity, keys[0])
  if strong.sparsity.is_dense and weak.sparsity.is_dense and strong.weights == weak.weights:
    v = velocity_fn(params[strong.weights], jnp.concatenate([x, x]), jnp.concatenate([t, t]),
                    condition.concat(labels(strong), labels(weak)), strong.sparsity, keys[0])
    v_strong, v_weak = jnp.split(v, 2)
  else:
    v_strong = velocity_fn(params[strong.weights], x, t, labels(strong), strong.sparsity, keys[0])
    v_weak = velocity_fn(params[weak.weights], x, t, labels(weak), weak.sparsity, keys[1])
  w_strong, w_weak = guidance.mix() if mix is None else mix
  cast = lambda w: jnp.asarray(w, v_strong.dtype)
  return cast(w_strong) * v_strong + cast(w_weak) * v_weak
