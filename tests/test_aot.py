"""TPU pre-flight: names, meshes over abstract TPU devices, and real TPU compiles of small steps.

The compiles run XLA's TPU compiler (libtpu) on this CPU machine; no TPU is involved.
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sgjax import errors, flops, models, sharding
from sgjax import state as state_lib
from sgjax.preflight import job, tpu, traffic
from tests.builders import tiny_config, tiny_t2i_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("name, gen, shape, chips", [
    ("v5p-8", "v5p", (2, 2, 1), 4), ("v5p-64", "v5p", (2, 4, 4), 32),
    ("v5litepod-16", "v5e", (4, 4), 16), ("v5e-8", "v5e", (2, 4), 8),
    ("v6e-256", "v6e", (16, 16), 256), ("v4-32", "v4", (2, 2, 4), 16),
    ("v5p:4x4x2", "v5p", (4, 4, 2), 32), ("v5litepod:2x2", "v5e", (2, 2), 4)])
def test_topology_names(name, gen, shape, chips):
  t = tpu.parse(name)
  assert (t.chip.name, t.shape, t.chips) == (gen, shape, chips)


def test_topology_round_trip_and_hosts():
  assert tpu.parse("v5p-64").accelerator_type == "v5p-64"
  assert tpu.parse("v5e:4x4").accelerator_type == "v5litepod-16"
  assert tpu.parse("v5e-8").chips_per_host_bounds == (2, 4, 1)  # One 8-chip host.
  assert tpu.parse("v6e-16").chips_per_host_bounds == (2, 2, 1)
  assert tpu.parse("v5p-8", slices=2).chips == 8


@pytest.mark.parametrize("name, says", [
    ("v5p-7", "TensorCores, 2 per chip"), ("v7x-8", "unknown TPU generation 'v7x'"),
    ("v5e-12", "no default v5e slice of 12 chips"), ("v5p:2x2", "3 axes"),
    ("h100", "not a TPU name")])
def test_unknown_topology_lists_known_names(name, says):
  with pytest.raises(errors.UserError) as e:
    tpu.parse(name)
  assert says in str(e.value) and "v5p-64" in str(e.value) and "v5p:4x4x2" in str(e.value)


def test_missing_libtpu_gives_the_install_line(monkeypatch):
  real = tpu.importlib.util.find_spec
  monkeypatch.setattr(tpu.importlib.util, "find_spec",
                      lambda n, *a: None if n == "libtpu" else real(n, *a))
  with pytest.raises(errors.UserError) as e:
    tpu.devices(tpu.parse("v5e-4"))
  assert f'pip install "jax[tpu]=={jax.__version__}"' in str(e.value)


def test_the_slice_of_live_tpu_devices():
  v5e8 = tpu.devices(tpu.parse("v5e-8"))
  assert tpu.for_devices(v5e8).accelerator_type == "v5litepod-8"
  assert tpu.for_devices(tpu.devices(tpu.parse("v5p-64"))).shape == (2, 4, 4)
  assert tpu.for_devices(jax.devices()) is None  # CPU devices.
  assert tpu.for_devices(v5e8[:3]) is None  # No slice of 3 chips.


def test_multislice_mesh_puts_the_data_axis_across_slices():
  devices = tpu.devices(tpu.parse("v5e:2x2", slices=2))
  mesh = sharding.build_mesh(dict(data=2, fsdp=4, tensor=1), devices)
  slices = np.vectorize(lambda d: d.slice_index)(mesh.devices)
  assert slices.shape == (2, 4, 1)
  assert (slices[0] == 0).all() and (slices[1] == 1).all()  # fsdp inside a slice (ICI).


def _fsdp_config():
  """Wide enough (384) that XLA would shard activations along the weights' width if left free."""
  c = tiny_config()
  c.dtype = "bfloat16"
  c.model.update(depth=2, width=384, heads=4, patch_size=2)
  c.sparsity.routes = ((1, 1, 0.5),)
  c.mesh.update(data=2, fsdp=4, tensor=1)
  c.sample.update(batch_size=16)
  return c


@pytest.fixture(scope="module")
def fsdp_reports():
  c = _fsdp_config()
  topology = tpu.parse("v5e:2x4")
  return c, topology, job.preflight(c, topology, "all", log=lambda *_: None)


def test_preflight_compiles_train_and_both_sampling_steps(fsdp_reports):
  _, topology, reports = fsdp_reports
  assert [r.name for r in reports] == ["train_step", "sample_step_sg", "sample_step_cfg"]
  for r in reports:
    assert r.fits and 0 < r.peak_bytes < topology.chip.hbm_bytes
    assert r.estimate["step_s"] > 0
  train = reports[0]
  assert train.memory["alias"] > 0.9 * train.memory["argument"]  # The state is donated.


def test_saved_reports_make_the_docs_table(fsdp_reports):
  c, topology, reports = fsdp_reports
  doc = json.loads(json.dumps(job.report_doc(c, topology, reports)))  # As --json writes it.
  rows = job.markdown_table([doc], ["tiny"]).splitlines()[2:]
  assert len(rows) == 3
  cells = [x.strip() for x in rows[0].split("|")[1:-1]]
  assert cells[:5] == ["tiny", "v5litepod-8 (8)", "2×4×1", "train_step", "16"]
  assert cells[7] == "FITS" and float(cells[5]) == round(reports[0].peak_bytes / tpu.GIB, 2)


def test_fsdp_collectives_are_the_intended_ones(fsdp_reports):
  """Weights gathered in bf16 over fsdp, gradients reduced once in bf16, activations never.

  Fails if activations lose their batch constraint (XLA then all-reduces activations and
  permutes them between chips) or if the gradients are reduced at fp32 or more than once.
  """
  c, _, reports = fsdp_reports
  train = reports[0]
  model = models.from_config(c)
  abstract, _ = state_lib.abstract_state_and_shardings(
      model, state_lib.make_optimizer(c.train), c.seed, sharding.build_mesh(
          c.mesh, tpu.devices(tpu.parse("v5e:2x4"))))
  bf16_param_bytes = 2 * sum(a.size for a in jax.tree.leaves(abstract["params"]))
  col = train.collectives
  assert set(col) <= {"all-gather", "all-reduce", "all-to-all"}, col
  assert "collective-permute" not in col
  # Forward and backward each gather every fsdp-sharded weight once, in bf16.
  assert 1.6 * bf16_param_bytes < col["all-gather"]["bytes"] < 2.2 * bf16_param_bytes
  # Every gradient reduced once over fsdp at full shape, in bf16 (this libtpu compiles even an
  # explicit psum_scatter to all-reduce + dynamic-slice; docs/scaling.md), then its fsdp shard
  # over data (1/4 of the bytes), plus scalars (loss, norms, RNG).
  expected = bf16_param_bytes * (1 + 1 / c.mesh.fsdp)
  assert 0.95 * expected < col["all-reduce"]["bytes"] < 1.05 * expected + 2**16
  assert col.get("all-to-all", {"bytes": 0})["bytes"] < 2**16  # Token indices only.


def test_matmul_traffic_by_hand():
  # y = x @ w, differentiated w.r.t. w: the forward reads x and w and writes y, the weight
  # gradient reads x and dy and writes dw; float32, batch b, 6 -> 5 features.
  def step(w, x):
    return jax.grad(lambda w: (x @ w).sum())(w)

  def jaxpr_at(b):
    return jax.make_jaxpr(step)(jax.ShapeDtypeStruct((6, 5), np.float32),
                                jax.ShapeDtypeStruct((b, 6), np.float32))
  assert traffic.matmul_bytes(jaxpr_at(3).jaxpr) == 4 * (3 * 6 + 6 * 5 + 3 * 5) * 2
  weights, activations = traffic.split_by_batch(lambda b: traffic.matmul_bytes(
      jaxpr_at(b).jaxpr), 3)
  assert (weights, activations) == (4 * 6 * 5 * 2, 4 * 3 * (6 + 5) * 2)
  # A loop's body counts once per trip.
  looped = jax.make_jaxpr(lambda w, xs: jax.lax.scan(lambda c, x: (c + step(w, x), None),
                                                     jnp.zeros((6, 5)), xs)[0])(
      jax.ShapeDtypeStruct((6, 5), np.float32), jax.ShapeDtypeStruct((4, 3, 6), np.float32))
  assert traffic.matmul_bytes(looped.jaxpr) == 4 * traffic.matmul_bytes(jaxpr_at(3).jaxpr)


def test_the_estimate_uses_the_analytic_traffic(fsdp_reports):
  # XLA's bytes accessed counts on-chip traffic too: the analytic floor is lower, and it is
  # what the HBM term uses; both are printed.
  _, topology, reports = fsdp_reports
  for r in reports:
    t = r.traffic
    assert 0 < t.total < r.bytes_accessed and t.weights > 0 and t.activations > 0, r.name
    assert np.isclose(r.estimate["hbm_s"], t.total / (topology.chip.hbm_gbps * 1e9))
  assert reports[0].traffic.state > 0 and reports[1].traffic.state == 0
  table = job.format_table(reports, topology)
  assert "analytic" in table and "XLA" in table


def test_compiled_flops_match_the_analytic_count(fsdp_reports):
  c, topology, reports = fsdp_reports
  by_name = {r.name: r for r in reports}
  # Matmuls dominate; the rest (norms, softmax, AdamW, the sampler's guidance arithmetic)
  # adds a few percent at this small width.
  for name in ("train_step", "sample_step_cfg"):
    assert 0.97 < by_name[name].flops / by_name[name].analytic_flops < 1.10, name
  # SG's two branches see the same input, label and weights until the route starts: XLA
  # computes block 0 once for both (common subexpressions), which the per-branch count does not
  # credit. Off by one dense block per image, the counts agree.
  one_block = c.copy_and_resolve_references()
  one_block.model.depth = 1
  no_block = c.copy_and_resolve_references()
  no_block.model.depth = 0
  block = (flops.forward_macs(one_block).with_attention
           - flops.forward_macs(no_block).with_attention)
  sg = by_name["sample_step_sg"]
  expected = sg.analytic_flops - 2 * block * c.sample.batch_size / topology.chips
  assert 0.97 < sg.flops / expected < 1.10, (sg.flops, expected, sg.analytic_flops)


def test_text_model_compiles_for_tpu():
  # TR-DiT's null condition is arrays (the empty prompt), made on the host beside the TPU mesh.
  c = tiny_t2i_config()
  c.dtype = "bfloat16"
  c.mesh.update(data=1, fsdp=4, tensor=1)
  reports = job.preflight(c, tpu.parse("v5e:2x2"), "all", log=lambda *_: None)
  assert [r.name for r in reports] == ["train_step", "sample_step_cfg_sg", "sample_step_cfg"]
  assert all(r.fits and r.flops > 0 for r in reports)


def test_gradient_accumulation_loop_is_counted_per_trip():
  c = _fsdp_config()
  c.train.grad_accum = 4
  c.mesh.update(data=1, fsdp=4)
  topology = tpu.parse("v5e:2x2")
  (r,) = job.preflight(c, topology, "train", log=lambda *_: None)
  assert r.repeats == 4
  # XLA's cost analysis sees the loop body (one micro-batch) once.
  assert 0.97 < 4 * r.flops / r.analytic_flops < 1.10
  e = r.estimate
  assert np.isclose(e["hbm_xla_s"], 4 * r.bytes_accessed / (topology.chip.hbm_gbps * 1e9))
  assert "multiply it by its 4 trips" in job.format_table([r], topology)
  # The analytic traffic holds every trip: the weights are read (and their gradients written)
  # once per micro-batch, the activations of the whole batch once, the state once.
  assert np.isclose(e["hbm_s"], r.traffic.total / (topology.chip.hbm_gbps * 1e9))
  mesh = sharding.build_mesh(c.mesh, tpu.devices(topology))
  c.train.grad_accum = 1
  once = job.train_traffic(c, mesh)
  assert r.traffic.weights == 4 * once.weights
  assert r.traffic.activations == once.activations and r.traffic.state == once.state


def test_too_big_for_the_chip_does_not_fit_and_exits_nonzero(tmp_path):
  # Two blocks of width 6144: ~1.4B params, 16 bytes each of fp32 state ≈ 22 GB
  # > one v5e chip's 16 GiB.
  out = tmp_path / "r.json"
  cmd = [sys.executable, "-m", "sgjax.aot", "--config=tests/configs/tiny.py",
         "--topology=v5litepod-1", "--mode=train", "--config.model.depth=2",
         "--config.model.width=6144", "--config.model.heads=16", "--config.mesh.data=1",
         "--config.train.batch_size=16", "--config.sample.batch_size=16", f"--json={out}"]
  run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": ROOT})
  assert run.returncode == 2, run.stderr[-2000:]
  assert "DOES NOT FIT" in run.stdout
  # The report is all a user sees: our first line first, no libtpu start-up messages.
  assert run.stdout.startswith("pre-flight for v5litepod-1 "), run.stdout[:300]
  assert len(run.stderr.strip().splitlines()) == 1, run.stderr[-2000:]
  last = run.stderr.strip().splitlines()[-1]
  assert last.startswith("error: train_step: needs ") and "v5e has 16 GiB HBM" in last, last
  assert "Traceback" not in run.stderr
  report = json.loads(out.read_text())["reports"][0]
  assert not report["fits"] and report["memory_bytes"]["peak"] > report["hbm_bytes"]
