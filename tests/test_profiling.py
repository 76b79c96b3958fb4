"""The profile summary: HLO instructions sorted into kinds of work, trace time summed by kind."""

import gzip
import json
import os

import pytest

from sgjax.jobs import bench, profiling
from tests.builders import tiny_config

# Post-optimisation HLO in XLA's text format: a fusion whose gather sits inside (route), a GEMM
# call (matmul), a fused-attention call, an optimizer update, a collective and a plain add.
HLO = open(os.path.join(os.path.dirname(__file__), "golden", "profile_step.hlo")).read()


def test_instructions_are_sorted_into_kinds_of_work():
  kinds = profiling.instruction_kinds(HLO)
  assert kinds["loop_gather_fusion.4"] == "route"  # By the gather inside, not its own name.
  assert kinds["custom-call.5"] == "matmul"
  assert kinds["custom-call.6"] == "attention"
  assert kinds["adam_fusion"] == "optimizer"
  assert kinds["all-reduce.1"] == "collective"
  assert kinds["add.8"] == "other"


def _write_trace(tmp_path, events):
  folder = tmp_path / "plugins" / "profile" / "run"
  folder.mkdir(parents=True)
  with gzip.open(folder / "host.trace.json.gz", "wt") as f:
    json.dump({"traceEvents": events}, f)


def test_trace_time_is_summed_per_kind_on_device_streams_only(tmp_path):
  meta = [dict(ph="M", pid=1, name="process_name", args=dict(name="/host:CPU")),
          dict(ph="M", pid=2, name="process_name", args=dict(name="/device:GPU:0"))]
  x = lambda pid, name, dur, **args: dict(ph="X", pid=pid, tid=0, ts=0, dur=dur, name=name,
                                          args=args)
  events = meta + [
      x(2, "loop_gather_fusion_4", 300.0),  # XLA's kernel spelling of the fusion's name.
      x(2, "sm90_xmma_gemm_bf16", 5000.0, hlo_op="custom-call.5"),
      x(2, "cudnn_generated_fort_native_sdpa", 1000.0),  # Library kernel, no hlo_op.
      x(2, "adam_fusion", 1200.0),
      x(2, "add.8", 500.0),
      x(2, "mystery_kernel", 40.0),
      x(1, "loop_gather_fusion.4", 9999.0),  # Host-side launch event: not device time.
  ]
  _write_trace(tmp_path, events)
  s = profiling.summarize_trace(str(tmp_path), HLO, steps=2)
  assert s["ms_per_step"] == pytest.approx(dict(route=0.15, attention=0.5, collective=0.0,
                                                matmul=2.5, optimizer=0.6, other=0.25))
  assert s["matched_ms_per_step"] == pytest.approx(4.0)
  assert s["share"]["route"] == pytest.approx(0.15 / 4.0)
  assert s["unmatched_ms_per_step"] == pytest.approx(0.02)
  assert s["top_unmatched"] == [("mystery_kernel", pytest.approx(0.02))]
  top = s["top_groups"]
  assert [(g["kind"], g["op_name"]) for g in top[:2]] == [
      ("matmul", "jit(step)/jvp(DiT)/dot_general"), ("optimizer", "jit(step)/optimizer/add")]
  assert top[1]["ms_per_step"] == pytest.approx(0.6)
  assert top[1]["launches_per_step"] == pytest.approx(0.5)


def test_profile_of_a_routed_train_step_finds_every_kind_it_runs(tmp_path):
  c = tiny_config()  # Routed (1 -> 1, γ 0.5), data-parallel over the 8 test devices.
  # Every group listed: which ones make the top 15 depends on the machine's load.
  r = bench.bench_profile(c, steps=2, warmup=1, trace_dir=str(tmp_path), top_groups=10_000)
  # The trace stays where it was asked for, in TensorBoard's layout (xprof reads .xplane.pb).
  assert r["trace_dir"] == str(tmp_path)
  assert len(list((tmp_path / "plugins" / "profile").glob("*/*.xplane.pb"))) == 1
  ms = r["ms_per_step"]
  assert all(ms[k] > 0 for k in profiling.KINDS), ms  # Gradient all-reduces: collectives.
  assert sum(r["share"].values()) == pytest.approx(1.0)
  assert r["matched_ms_per_step"] > 0 and r["wall_ms_per_step"] > 0
  # Every block's ops are grouped under block*/…: a group launches once per block (and device).
  blocks = [g for g in r["top_groups"] if "/block*/" in g["op_name"] and g["kind"] == "matmul"]
  assert blocks and all(g["launches_per_step"] >= c.model.depth for g in blocks)

  dense = tiny_config()
  dense.sparsity.routes = ()
  _, _, _, compiled, _ = bench._train_setup(dense)
  assert "route" not in set(profiling.instruction_kinds(compiled.as_text()).values())


def test_an_empty_device_process_does_not_hide_the_host_events(tmp_path):
  # libtpu loaded in the process (a TPU pre-flight) adds a "/device:TPU:0" process with no
  # events to a CPU trace; the host's events are still the program's.
  events = [dict(ph="M", name="process_name", pid=1, args=dict(name="/host:CPU")),
            dict(ph="M", name="process_name", pid=2, args=dict(name="/device:TPU:0")),
            dict(ph="X", name="fusion.1", pid=1, ts=0, dur=5)]
  with gzip.open(tmp_path / "a.trace.json.gz", "wt") as f:
    json.dump(dict(traceEvents=events), f)
  assert [e["name"] for e in profiling._events(str(tmp_path))] == ["fusion.1"]


def test_bench_keeps_the_trace_in_profile_dir_or_removes_its_temporary_one(tmp_path, monkeypatch):
  def fake_profile(config, steps, warmup, trace_dir):  # What bench_profile leaves behind.
    os.makedirs(os.path.join(trace_dir, "plugins", "profile", "run"))
    open(os.path.join(trace_dir, "plugins", "profile", "run", "host.xplane.pb"), "w").close()
    written.append(trace_dir)
    return dict(trace_dir=trace_dir, steps=steps)

  written = []
  monkeypatch.setattr(bench, "bench_profile", fake_profile)
  kept = bench.profile(tiny_config(), 2, 1, str(tmp_path / "tb"))
  assert kept == dict(trace_dir=str(tmp_path / "tb"), steps=2)
  assert (tmp_path / "tb" / "plugins" / "profile" / "run" / "host.xplane.pb").exists()
  summary_only = bench.profile(tiny_config(), 2, 1, "")
  assert summary_only == dict(trace_dir=None, steps=2)
  assert not os.path.exists(written[-1])  # The temporary trace is gone; the summary stays.
