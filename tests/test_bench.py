"""The benchmark tool runs end to end on CPU (tiny config) and its FLOP bookkeeping is right."""

import os

import pytest

from sgjax import flops, platform
from sgjax.data import latents
from sgjax.jobs import bench
from sgjax.sparsity import Sparsity
from tests.builders import latent_config, tiny_config


def test_train_and_sample_benchmarks_run_and_count_flops():
  c = tiny_config()
  c.sample.update(batch_size=8, steps=2)
  train = bench.bench_train(c, steps=2, warmup=1)
  assert train["images_per_s"] > 0 and train["p10_s"] <= train["median_s"] <= train["p90_s"]
  sample = bench.bench_sample(c, ["dense", "cfg", "sg"], steps=2, warmup=1, full_sampler=True)
  rows = sample["rules"]
  # CFG runs two dense branches: exactly twice the dense model's MACs; SG(0.5/0.9) fewer.
  assert rows["cfg"]["gmacs_attention"] == pytest.approx(2 * rows["dense"]["gmacs_attention"])
  assert rows["dense"]["flop_ratio_vs_cfg"] == pytest.approx(0.5)
  routes = Sparsity.from_routes(c.sparsity.routes)
  sg = flops.step_macs(c, [routes.with_gamma(0.5), routes.with_gamma(0.9)]).with_attention
  assert rows["sg"]["gmacs_attention"] == pytest.approx(sg / 1e9)
  assert rows["sg"]["flop_ratio_vs_cfg"] < 1.0
  assert all(r["sampler_images_per_s"] > 0 and r["sampler_steps"] == 2 for r in rows.values())


def test_matmul_peak_counts_two_flops_per_mac():
  p = bench.matmul_peak(size=64, steps=2)
  assert p["tflops"] == pytest.approx(2 * 64**3 / p["median_s"] / 1e12)


def test_sampling_xla_flags_never_override_the_user(monkeypatch):
  monkeypatch.setenv("XLA_FLAGS", "--xla_gpu_enable_triton_gemm=true --foo=1")
  platform.set_default_xla_flags(sampling=True)
  assert os.environ["XLA_FLAGS"] == "--xla_gpu_enable_triton_gemm=true --foo=1"
  monkeypatch.setenv("XLA_FLAGS", "--foo=1")
  platform.set_default_xla_flags(sampling=True)
  assert os.environ["XLA_FLAGS"] == "--foo=1 --xla_gpu_enable_triton_gemm=false"
  monkeypatch.delenv("XLA_FLAGS")
  platform.set_default_xla_flags(sampling=False)
  assert "XLA_FLAGS" not in os.environ


def test_input_benchmark_feeds_the_step_from_grain_and_writes_random_latents(tmp_path):
  c = latent_config(data_dir=str(tmp_path / "missing"))
  r = bench.bench_input(c, steps=3, warmup=1, scratch_dir=str(tmp_path))
  assert r["data"] == "latents" and r["prefetch"] == c.data.prefetch
  assert r["pipeline_images_per_s"] > 0 and r["synthetic_images_per_s"] > 0
  assert r["slowdown"] == pytest.approx(
      r["synthetic_images_per_s"] / r["pipeline_images_per_s"] - 1)
  # The random set has the encoder's layout and the config's shapes; the pipeline reads it.
  src = latents.LatentSource(str(tmp_path / "random_latents"))
  assert len(src) == 1024 and src[5]["mean"].shape == (16, 16, 1)
  assert 0 <= src[5]["label"] < 4
