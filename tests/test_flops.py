"""The FLOP counter reproduces the published numbers and agrees with XLA's cost analysis."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from sgjax import config as config_lib
from sgjax import flops, models
from sgjax.sparsity import Sparsity
from tests.builders import tiny_t2i_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROUTE = Sparsity.from_routes([(2, 24, 0.5)])


def _imagenet(preset):
  c = config_lib.base_config()
  c.model.preset = preset
  c.data.update(image_size=32, channels=4, num_classes=1000)
  return c


@pytest.mark.parametrize("preset, published, digits", [
    ("XL/2", 118.6, 1), ("L/2", 80.7, 1), ("B/2", 23.0, 1), ("S/2", 6.06, 2)])
def test_dit_paper_gflops_with_attention(preset, published, digits):
  assert round(flops.forward_macs(_imagenet(preset)).with_attention / 1e9, digits) == published


def test_sparse_guidance_paper_gflops_linear_only():
  c = _imagenet("XL/2")
  dense = flops.step_macs(c, [Sparsity()]).linear_only / 1e9
  cfg = flops.step_macs(c, [Sparsity(), Sparsity()]).linear_only / 1e9
  sg = flops.step_macs(c, [ROUTE.with_gamma(0.5), ROUTE.with_gamma(0.9)]).linear_only / 1e9
  assert (round(dense, 2), round(cfg, 2), round(sg, 2)) == (114.42, 228.84, 97.67)


def test_more_sparsity_fewer_macs_and_gamma_zero_is_dense():
  c = _imagenet("XL/2")
  values = [flops.forward_macs(c, ROUTE.with_gamma(g)).with_attention for g in (0.0, 0.3, 0.6, 0.9)]
  assert values[0] == flops.forward_macs(c).with_attention
  assert all(a > b for a, b in zip(values[:-1], values[1:], strict=True))


def test_cli_json_on_the_imagenet_config():
  out = subprocess.run(
      [sys.executable, "-m", "sgjax.flops", "--config=configs/imagenet256.py", "--json",
       "--config.sample.guidance.rule=sg", "--config.sample.guidance.gamma_strong=0.5",
       "--config.sample.guidance.gamma_weak=0.9", "--config.sample.steps=40"],
      cwd=ROOT, capture_output=True, text=True, check=True)
  table = json.loads(out.stdout)
  assert round(table["dense model"]["linear_only"], 2) == 114.42
  assert round(table["guided step"]["linear_only"], 2) == 97.67
  assert table["sampler per image"]["linear_only"] == pytest.approx(
      40 * table["guided step"]["linear_only"])


def test_xla_flops_of_a_known_matmul():
  a = jnp.ones((64, 32))
  b = jnp.ones((32, 16))
  assert flops.xla_flops(lambda x, y: x @ y, a, b) == 2 * 64 * 32 * 16


def _small_config(kind: str):
  """A small model of each kind, wide enough that the matmuls dominate XLA's count."""
  if kind == "trdit":
    c = tiny_t2i_config()
    c.model.update(width=128, depth=2)
    c.text.update(max_tokens=8)
    return c
  c = config_lib.base_config()
  c.model.update(depth=4, width=256, heads=4, patch_size=2)
  c.data.update(image_size=16, channels=4, num_classes=10)
  return c


@pytest.mark.parametrize("kind, route", [("dit", (1, 2, 0.5)), ("trdit", (1, 1, 0.5))])
def test_analytic_count_matches_xla_cost_analysis(kind, route):
  c = _small_config(kind)
  model = models.from_config(c.copy_and_resolve_references())
  x = jnp.zeros((1, c.data.image_size, c.data.image_size, c.data.channels))
  t, cond = jnp.zeros((1,)), model.example_condition(1)
  params = model.init(jax.random.key(0), x, t, cond)
  ratios = {}
  for name, s in (("dense", Sparsity()), ("routed", Sparsity.from_routes([route]))):
    xla = flops.xla_flops(lambda p, s=s: model.apply(p, x, t, cond, sparsity=s,
                                                      token_key=jax.random.key(0)), params)
    ratios[name] = xla / (2 * flops.forward_macs(c, s).with_attention)
  # XLA also counts norms, softmax and elementwise ops: a few percent above the matmuls.
  print(f"XLA / analytic FLOPs ({kind}):", ratios)
  assert 1.0 <= ratios["dense"] < 1.15, ratios
  assert abs(ratios["routed"] - ratios["dense"]) < 0.05, ratios
