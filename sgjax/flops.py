"""Analytic multiply-accumulate counts (the unit the DiT literature calls "GFLOPs").

The public entry: each model module counts its own forward pass (`forward_macs` of
sgjax.models.dit and .trdit); this module sums them over guidance branches, sampler steps and
the plan, and reports. Counted for one image and one forward pass, from the same config and
`Sparsity` the model uses (DiT below; TR-DiT's terms: sgjax.models.trdit.forward_macs):

  linear      per-token matmuls: patch embed C·p²·D, per block qkv 3D² + proj D² + MLP 2·r·D²,
              final projection D·p²·C; plus the adaLN modulation multiplies on tokens
              (scale and gate, twice per block: 4·D per token)
  per_sample  computed once per image: the adaLN MLPs (6D² per block, 2D² final)
  attention   QKᵀ and AV: 2·n²·D per block on the n tokens the block sees

Conventions that reproduce the published numbers (tested in tests/test_flops.py):
  * DiT paper, "with attention" = linear + per_sample + attention: XL/2 118.6, L/2 80.7,
    B/2 23.0, S/2 6.06 at 256² (32×32×4 latents).
  * Sparse Guidance paper, "linear only" = linear + per_sample: SiT-XL/2 dense 114.42,
    CFG 228.84, SG(γ 0.5/0.9, route 2→24) 97.67. The token-wise modulation multiplies are what
    makes both the dense and the routed figures come out to the shown digits.
  SG_FID (173.16): the paper's schedule is under-specified; our cosine AG+SG (guide γ 0.6 -> 0,
  main 0 -> 0.6 over 40 steps) averages 172.89 per step (docs/flops.md).
  Left out, as the published counts leave them out: the timestep MLP (256·D + D², 1.6M for
  XL), the final layer's modulation multiply (D per token), norms, softmax and other
  elementwise work. Counting them moves XL/2 to 118.65 and SG(0.5/0.9) to 97.68.

Masked models (model.decoder_depth > 0, docs/masking.md): the encoder blocks run on the
N − int(N·mask_gamma) kept tokens, `decoder_embed` (D·D_dec) on those, the decoder blocks
(width D_dec, their adaLN reading the D-wide condition: 6·D·D_dec per block) and the final
layer (2·D·D_dec adaLN, D_dec·p²·C projection) on all N tokens; patch embedding on all N.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import ml_collections

from sgjax import guidance, models, validation
from sgjax.models.macs import Macs
from sgjax.sparsity import DENSE, Sparsity


def forward_macs(config: ml_collections.ConfigDict, sparsity: Sparsity = DENSE) -> Macs:
  """MACs of one forward pass of one image at `sparsity`: the model module counts its own."""
  models.apply_preset(config.model)
  return models.forward_macs(config, sparsity)


def step_macs(config: ml_collections.ConfigDict, branches: Sequence[Sparsity]) -> Macs:
  """One guided sampling step: the sum over its branches' forward passes."""
  total = Macs(0.0, 0.0, 0.0)
  for s in branches:
    total = total + forward_macs(config, s)
  return total


def plan_macs(config: ml_collections.ConfigDict, plan) -> Macs:
  """MACs of a whole sampler (one image): every step's branches, twice per step for Heun."""
  per_eval = 2 if config.sample.sampler == "heun" else 1
  total = Macs(0.0, 0.0, 0.0)
  for g in plan.step_guidance():
    total = total + step_macs(config, [b.sparsity for b in g.branches]).scale(per_eval)
  return total


def xla_flops(fn, *args) -> float:
  """FLOPs that XLA's cost analysis reports for `jax.jit(fn)(*args)` (2 per MAC)."""
  import jax  # Local: the analytic part needs no jax.
  cost = jax.jit(fn).lower(*args).compile().cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0]
  return float(cost["flops"])


def report(config: ml_collections.ConfigDict) -> dict[str, dict[str, float]]:
  """GMACs per image: dense model, the first step's branches and guided step, the mean step and
  the whole sampler (schedules and guidance intervals make steps differ)."""
  plan = guidance.config_plan(config)
  first = plan.segments[0].guidance
  rows = {"dense model": forward_macs(config, Sparsity()),
          "strong branch": forward_macs(config, first.strong.sparsity)}
  if first.weak is not None:
    rows["weak branch"] = forward_macs(config, first.weak.sparsity)
  rows["guided step"] = step_macs(config, [b.sparsity for b in first.branches])
  total = plan_macs(config, plan)
  rows["mean step"] = total.scale(1.0 / plan.steps)
  rows["sampler per image"] = total
  return {k: {"with_attention": v.with_attention / 1e9, "linear_only": v.linear_only / 1e9}
          for k, v in rows.items()}


def main(argv) -> None:
  del argv
  from absl import flags  # Local: the CLI only.
  config = flags.FLAGS.config
  validation.validate(config, job="flops")
  table = report(config)
  if flags.FLAGS.json:
    print(json.dumps(table, indent=2))
    return
  g = config.sample.guidance
  sched = "" if g.schedule == "constant" else (
      f" -> {g.gamma_strong_end}/{g.gamma_weak_end} ({g.schedule})")
  print(f"GMACs per image (\"GFLOPs\" in the DiT literature); rule {g.rule}, ω {g.omega}, "
        f"γ {g.gamma_strong}/{g.gamma_weak}{sched}, interval {tuple(g.interval)}, "
        f"{config.sample.steps} {config.sample.sampler} steps; first step's branches shown")
  print(f"{'':20s} {'with attention':>15s} {'linear only':>12s}")
  for name, v in table.items():
    print(f"{name:20s} {v['with_attention']:15.2f} {v['linear_only']:12.2f}")


def cli() -> None:
  """`python -m sgjax.flops --config=…` (flags defined here)."""
  from absl import flags
  from ml_collections import config_flags

  from sgjax import errors
  config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=False)
  flags.DEFINE_bool("json", False, "Print JSON instead of a table.")
  flags.mark_flag_as_required("config")
  errors.run(main)


if __name__ == "__main__":
  cli()
