"""TR-DiT FLOPs against a hand count and XLA, the 2.5B config's counts, and the bench on T2I."""

import jax
import jax.numpy as jnp
import pytest

from sgjax import flops, models
from sgjax.jobs import bench
from sgjax.sparsity import Sparsity
from tests.builders import load_config, tiny_t2i_config


def _tiny():
  return tiny_t2i_config()


def test_trdit_macs_by_hand():
  # D = 64, 16 image tokens (16², patch 4), L = 6 text tokens of width 24, 1 text layer,
  # SwiGLU hidden 256 (8/3·64 = 170, rounded up to 256); route (1, 1, 0.5): layer 1 sees 8.
  m = flops.forward_macs(_tiny(), Sparsity.from_routes([(1, 1, 0.5)]))
  per_token = 6 * 64 * 64 + 3 * 64 * 256 + 4 * 64  # qkv+proj, cross q+out, SwiGLU, modulation.
  assert m.linear == 2 * 16 * 16 * 64 + (16 + 8) * per_token == 1_808_384
  assert m.attention == (2 * 16 * 16 * 64 + 2 * 16 * 6 * 64  # Layer 0: self + cross.
                         + 2 * 8 * 8 * 64 + 2 * 8 * 6 * 64  # Layer 1 on 8 tokens.
                         + 2 * 6 * 6 * 64) == 64_000  # The text layer.
  assert m.per_sample == (6 * 24 * 64  # Text projection.
                          + 6 * (4 * 64 * 64 + 3 * 64 * 256)  # The text layer's matmuls.
                          + 2 * 2 * 6 * 64 * 64  # Cross-attention K/V, both blocks.
                          + 8 * 64 * 64) == 533_504  # adaLN-single and the final modulation.
  dense = flops.forward_macs(_tiny())
  assert dense.per_sample == m.per_sample  # The text path does not depend on routing.


def test_trdit_macs_match_xla_cost_analysis():
  c = _tiny()
  c.model.update(width=128, depth=2)
  c.text.update(max_tokens=8)
  model = models.from_config(c)
  x, t = jnp.zeros((1, 16, 16, 1)), jnp.zeros((1,))
  cond = model.example_condition(1)
  params = model.init(jax.random.key(0), x, t, cond)
  ratios = {}
  for name, s in (("dense", Sparsity()), ("routed", Sparsity.from_routes([(1, 1, 0.5)]))):
    xla = flops.xla_flops(lambda p, s=s: model.apply(p, x, t, cond, sparsity=s,
                                                      token_key=jax.random.key(0)), params)
    ratios[name] = xla / (2 * flops.forward_macs(c, s).with_attention)
  print("XLA / analytic FLOPs (TR-DiT):", ratios)
  assert 1.0 <= ratios["dense"] < 1.15, ratios
  assert abs(ratios["routed"] - ratios["dense"]) < 0.05, ratios


def test_2p5b_flops_run():
  c = load_config("t2i_2p5b")
  report = flops.report(c)
  dense = report["dense model"]["with_attention"]
  print("TR-DiT-2.5B GMACs per image:", {k: round(v["with_attention"], 1)
                                         for k, v in report.items()})
  # ≈ 2·params·tokens / 2 for the blocks' matmuls at 1024 tokens, plus attention: ~2.6 TMACs.
  assert 2.0e3 < dense < 3.5e3, dense
  assert report["weak branch"]["with_attention"] < report["strong branch"]["with_attention"]


def test_bench_runs_on_the_t2i_model():
  c = _tiny()
  c.sample.update(batch_size=8, steps=2)
  tr = bench.bench_train(c, steps=1, warmup=1)
  assert tr["images_per_s"] > 0
  rows = bench.bench_sample(c, ["cfg_sg"], steps=1, warmup=1, full_sampler=False)["rules"]
  routes = Sparsity.from_routes(c.sparsity.routes)
  want = flops.forward_macs(c).with_attention + flops.forward_macs(
      c, routes.with_gamma(0.5)).with_attention  # CFG+SG(0/0.5): dense + routed forward.
  assert rows["cfg_sg"]["gmacs_attention"] == pytest.approx(want / 1e9)
  assert rows["cfg_sg"]["image_steps_per_s"] > 0
