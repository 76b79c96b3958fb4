"""TR-DiT FLOPs against a hand count, the 2.5B config's counts, and the bench on T2I (XLA's count:
test_flops, over both model kinds)."""

import pytest

from sgjax import flops
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
