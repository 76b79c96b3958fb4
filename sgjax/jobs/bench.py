"""Benchmarks of the jitted train step and guided sampling step, with MFU against a measured peak.

  python -m sgjax.jobs.bench --config=imagenet256 --what=train [--config.…] [--json]
  python -m sgjax.jobs.bench --config=imagenet256 --what=sample --rules=dense,cfg,sg,cfg_sg
  python -m sgjax.jobs.bench --config=imagenet256 --what=input  # grain-fed vs synthetic
  python -m sgjax.jobs.bench --config=imagenet256 --what=profile  # time by kind of work

Every timing: compile (timed separately), warm-up, then `--steps` calls, each synchronised with
`block_until_ready`; we report the median and the 10th/90th percentiles. Inputs are synthetic
device-resident arrays of the config's shapes (random, never zeros). FLOPs come from the analytic
counter (sgjax.flops, attention included; a train step = 3 × forward), and MFU divides the
achieved rate by a bf16 matmul rate measured on the same device by this tool (`--what=peak`).
Runs on CPU too (tiny configs) so CI keeps it alive; numbers that matter come from the GPU.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import flags
from ml_collections import config_flags

from sgjax import (
  condition,
  errors,
  flops,
  guidance,
  models,
  platform,
  sampling,
  sharding,
  train,
  validation,
)
from sgjax import config as config_lib
from sgjax import sparsity as sp
from sgjax import state as state_lib
from sgjax.data import latents, pipeline, prefetch
from sgjax.jobs import profiling
from sgjax.sparsity import Sparsity

# Sampling steps benchmarked by `--what=sample`: name -> (rule, γ_strong, γ_weak); what each
# rule's branches are is guidance.RULE_BRANCHES' (γs a rule ignores do not matter).
SAMPLE_RULES = {"dense": ("none", 0.0, 0.0), "cfg": ("cfg", 0.0, 0.5), "sg": ("sg", 0.5, 0.9),
                "cfg_sg": ("cfg_sg", 0.0, 0.5)}


def time_calls(fn: Callable[[], object], steps: int, warmup: int) -> dict[str, float]:
  """Median and spread (seconds) of `fn()` calls, each synchronised."""
  for _ in range(warmup):
    jax.block_until_ready(fn())
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return dict(median_s=float(np.median(times)), p10_s=float(np.percentile(times, 10)),
              p90_s=float(np.percentile(times, 90)))


def peak_memory_gib() -> float | None:
  stats = jax.devices()[0].memory_stats() or {}
  peak = stats.get("peak_bytes_in_use")
  return None if peak is None else peak / 2**30


def matmul_peak(size: int = 8192, dtype=jnp.bfloat16, steps: int = 50) -> dict[str, float]:
  """Measured dense matmul rate (TFLOP/s): the denominator of MFU.

  A long warm-up first: an idle GPU sits at low clocks and needs a few hundred ms of load.
  """
  k1, k2 = jax.random.split(jax.random.key(0))
  a = jax.random.normal(k1, (size, size), dtype)
  b = jax.random.normal(k2, (size, size), dtype)
  mm = jax.jit(lambda a, b: a @ b)
  t_end = time.perf_counter() + 2.0  # Warm up by time: clocks ramp over ~1 s of load.
  while time.perf_counter() < t_end:
    jax.block_until_ready(mm(a, b))
  t = time_calls(lambda: mm(a, b), steps, 0)
  return dict(size=size, tflops=2 * size**3 / t["median_s"] / 1e12, **t)


def _with(config: ml_collections.ConfigDict, name: str) -> ml_collections.ConfigDict:
  """The config with the guidance of SAMPLE_RULES[name] (ω as configured)."""
  rule, gamma_strong, gamma_weak = SAMPLE_RULES[name]
  return config_lib.replace(config, {"sample.guidance.rule": rule,
                                     "sample.guidance.gamma_strong": gamma_strong,
                                     "sample.guidance.gamma_weak": gamma_weak})


def _train_setup(config: ml_collections.ConfigDict):
  """Mesh, fresh train state, one synthetic device-resident batch, and the compiled step."""
  mesh = sharding.build_mesh(config.mesh)
  model = models.from_config(config)
  tx = state_lib.make_optimizer(config.train)
  _, shardings = state_lib.abstract_state_and_shardings(model, tx, config.seed, mesh)
  bs, n, ch = config.train.batch_size, config.data.image_size, config.data.channels
  with jax.set_mesh(mesh):
    state = state_lib.fresh_state(model, tx, config.seed, shardings)
    k1, k2 = jax.random.split(jax.random.key(1))
    cond = condition.synthetic(model, bs, k2, config.data.num_classes)
    batch = dict(image=jax.random.normal(k1, (bs, n, n, ch)),
                 **({"label": cond} if isinstance(cond, jax.Array) else cond))
    batch = jax.device_put(batch, sharding.batch_sharding(mesh))
    step = jax.jit(train.make_train_step(config, model, tx, condition.synthetic_null(model)),
                   in_shardings=(shardings, sharding.batch_sharding(mesh)),
                   out_shardings=(shardings, None), donate_argnums=0)
    t0 = time.perf_counter()
    compiled = step.lower(state, batch).compile()
  return mesh, state, batch, compiled, time.perf_counter() - t0


def _stepper(compiled, state) -> Callable[[dict], jax.Array]:
  """batch -> loss: one call of the compiled step, carrying the (donated) state along."""
  holder = [state]

  def run(batch):
    holder[0], m = compiled(holder[0], batch)
    return m["loss"]
  return run


def bench_train(config: ml_collections.ConfigDict, steps: int, warmup: int) -> dict:
  """One optimizer step (forward, backward, AdamW, EMA) at config.train.batch_size."""
  mesh, state, batch, compiled, compile_s = _train_setup(config)
  bs = config.train.batch_size
  run = _stepper(compiled, state)
  with jax.set_mesh(mesh):
    t = time_calls(lambda: run(batch), steps, warmup)
  routed = Sparsity.from_config(config.sparsity)  # Routes or masking, as the train step runs.
  macs = flops.forward_macs(config, routed).with_attention * 3 * bs
  return dict(batch=bs, images_per_s=bs / t["median_s"], compile_s=compile_s,
              tflops=2 * macs / t["median_s"] / 1e12, peak_mem_gib=peak_memory_gib(),
              routes=[list(r) for r in config.sparsity.routes], remat=config.model.remat, **t)


def bench_profile(config: ml_collections.ConfigDict, steps: int, warmup: int,
                  trace_dir: str, top_groups: int = 15) -> dict:
  """A `jax.profiler` trace of `steps` train steps, its device time summed by kind of work
  (route gather/scatter, attention, matmul, optimizer, …; sgjax.jobs.profiling)."""
  mesh, state, batch, compiled, _ = _train_setup(config)
  run = _stepper(compiled, state)
  with jax.set_mesh(mesh):
    for _ in range(max(warmup, 1)):
      jax.block_until_ready(run(batch))
    out = profiling.profile_calls(lambda: run(batch), compiled.as_text(), steps, trace_dir,
                                  top_groups)
  return dict(batch=config.train.batch_size, routes=[list(r) for r in config.sparsity.routes],
              **out)


def profile(config: ml_collections.ConfigDict, steps: int, warmup: int, profile_dir: str = ""
            ) -> dict:
  """`bench_profile`'s summary; the trace kept in `profile_dir` (a TensorBoard log folder: it
  goes to <profile_dir>/plugins/profile/<run>/, viewable with xprof / tensorboard-plugin-profile)
  or, with '', written to a temporary folder that is removed after the summary (trace_dir None).
  """
  if profile_dir:
    return bench_profile(config, steps, warmup, profile_dir)
  with tempfile.TemporaryDirectory(prefix="sgjax_trace_") as scratch:
    return dict(bench_profile(config, steps, warmup, scratch), trace_dir=None)


def bench_input(config: ml_collections.ConfigDict, steps: int, warmup: int,
                scratch_dir: str) -> dict:
  """The train step fed by the real input pipeline vs. by one synthetic device-resident batch.

  Both loops run as the train loop does: no host sync until the last step, so reading overlaps
  compute (grain workers, `data.prefetch` batches placed ahead). The synthetic loop runs before
  and after the pipeline loop (drift shows as a difference between the two). `data.name =
  latents` without an encoded set writes a random one of the same layout in `scratch_dir`.
  """
  config = config.copy_and_resolve_references()
  dc = config.data
  if dc.name == "latents" and not os.path.exists(os.path.join(dc.dir, latents.METADATA)):
    dc.dir = latents.write_random(
        os.path.join(scratch_dir, "random_latents"), shape=(dc.image_size,) * 2 + (dc.channels,),
        num_records=max(8 * config.train.batch_size, 1024), num_classes=dc.num_classes)
  mesh, state, batch, compiled, _ = _train_setup(config)
  bs = config.train.batch_size
  host = pipeline.make_train_iterator(dc, bs, seed=config.seed,
                                      rows=sharding.process_batch_rows(mesh, bs))
  fed = prefetch.DevicePrefetch(host, lambda b: train.global_batch(b, mesh), dc.prefetch)
  run = _stepper(compiled, state)

  def loop(feed: Callable[[], dict], n: int) -> float:
    if n == 0:
      return 0.0
    t0 = time.perf_counter()
    for _ in range(n):
      loss = run(feed())
    jax.block_until_ready(loss)
    return time.perf_counter() - t0

  with jax.set_mesh(mesh):
    loop(lambda: batch, warmup)
    loop(lambda: next(fed), warmup)  # Fills the pipeline (and starts grain's workers).
    before = loop(lambda: batch, steps)
    real = loop(lambda: next(fed), steps)
    after = loop(lambda: batch, steps)
  synthetic = bs * steps / ((before + after) / 2)
  pipelined = bs * steps / real
  return dict(batch=bs, data=dc.name, worker_count=dc.worker_count, prefetch=dc.prefetch,
              steps=steps, synthetic_images_per_s=synthetic, pipeline_images_per_s=pipelined,
              synthetic_drift=after / before - 1.0, slowdown=synthetic / pipelined - 1.0)


def bench_sample(config: ml_collections.ConfigDict, rules: list[str], steps: int,
                 warmup: int, full_sampler: bool) -> dict:
  """Per rule: one guided step (image-steps/s) and, optionally, the whole sampler (images/s)."""
  mesh = sharding.build_mesh(config.mesh)
  model = models.from_config(config)
  bs, n, ch = config.sample.batch_size, config.data.image_size, config.data.channels
  out = {}
  with jax.set_mesh(mesh):
    # Laid out by the logical rules, as a sampling run restores them (sgjax.state).
    params = state_lib.fresh_params(model, config.seed, mesh)
    # Non-zero adaLN/final weights, so the step computes what a trained model would; cast to
    # the compute dtype once, as `sampling.sample` does before its loop.
    params = jax.tree.map(lambda a: (a + 0.01).astype(model.dtype), params)
    weights = {guidance.MAIN: params, guidance.GUIDE: params}
    k1, k2 = jax.random.split(jax.random.key(1))
    shard = sharding.batch_sharding(mesh)
    x = jax.device_put(jax.random.normal(k1, (bs, n, n, ch)), shard)
    y = jax.device_put(condition.synthetic(model, bs, k2, config.data.num_classes), shard)
    null = condition.synthetic_null(model)
    key = jax.random.key(2)
    for name in rules:
      c = _with(config, name)
      plan = guidance.config_plan(c)
      g = plan.segments[0].guidance

      step = jax.jit(sampling.guided_step(model, null, g))
      t0 = time.perf_counter()
      compiled = step.lower(weights, x, y, key).compile()
      compile_s = time.perf_counter() - t0
      t = time_calls(lambda compiled=compiled: compiled(weights, x, y, key), steps, warmup)
      macs = flops.step_macs(c, [b.sparsity for b in g.branches])
      row = dict(image_steps_per_s=bs / t["median_s"], compile_s=compile_s,
                 gmacs_linear=macs.linear_only / 1e9, gmacs_attention=macs.with_attention / 1e9,
                 tflops=2 * macs.with_attention * bs / t["median_s"] / 1e12, **t)
      if full_sampler:
        sampler = c.sample.sampler
        ts = time_calls(lambda plan=plan, sampler=sampler: sampling.sample(
            model, weights, y, key, plan=plan, sampler=sampler, null=null),
            max(3, steps // 10), 1)
        row.update(sampler_steps=plan.steps, sampler_images_per_s=bs / ts["median_s"],
                   sampler_median_s=ts["median_s"])
      out[name] = row
  base = out.get("cfg") or next(iter(out.values()))
  for row in out.values():
    row["flop_ratio_vs_" + ("cfg" if "cfg" in out else "first")] = (
        row["gmacs_attention"] / base["gmacs_attention"])
    row["time_ratio_vs_" + ("cfg" if "cfg" in out else "first")] = (
        row["median_s"] / base["median_s"])
  return dict(batch=bs, peak_mem_gib=peak_memory_gib(), rules=out)


def bench_route_cost(config: ml_collections.ConfigDict, steps: int, warmup: int) -> dict:
  """The token selection, gather and scatter of the train routes, forward and backward, alone.

  At the train step's shapes (batch, tokens, width, compute dtype); the blocks in between are
  replaced by a multiply so nothing but the routing's own data movement is timed. Divided by
  the train step's time, it bounds the routing overhead.
  """
  routes = Sparsity.from_routes(config.sparsity.routes)
  bs, width = config.train.batch_size, config.model.width
  n = (config.data.image_size // config.model.patch_size) ** 2
  dtype = jnp.dtype(config.dtype)

  def routed(x, key):
    for r in routes.routes:
      idx = sp.select_tokens(jax.random.fold_in(key, r.start), bs, n, r.num_keep(n))
      x = sp.scatter_tokens(x, 2.0 * sp.gather_tokens(x, idx), idx)
    return x

  @jax.jit
  def fwd_bwd(x, ct, key):
    out, vjp = jax.vjp(lambda x: routed(x, key), x)
    return out, vjp(ct)[0]

  k1, k2 = jax.random.split(jax.random.key(0))
  x = jax.random.normal(k1, (bs, n, width), dtype)
  ct = jax.random.normal(k2, (bs, n, width), dtype)
  t = time_calls(lambda: fwd_bwd(x, ct, jax.random.key(3)), steps, warmup)
  return dict(batch=bs, tokens=n, width=width, routes=[list(r) for r in config.sparsity.routes],
              **t)


def print_table(result: dict, peak_tflops: float | None = None) -> None:
  """A short human-readable table; `peak_tflops` (else the result's own peak) gives MFU."""
  if "peak" in result:
    p = result["peak"]
    print(f"bf16 matmul {p['size']}³: {p['tflops']:.0f} TFLOP/s (MFU denominator)")
  peak = peak_tflops or result.get("peak", {}).get("tflops")
  if "train" in result:
    r = result["train"]
    mfu = f"{100 * r['tflops'] / peak:.1f}%" if peak else "n/a"
    print(f"train  batch {r['batch']} routes {r['routes']} remat {r['remat']}: "
          f"{r['images_per_s']:.1f} img/s (median {1e3 * r['median_s']:.1f} ms, "
          f"p10–p90 {1e3 * r['p10_s']:.1f}–{1e3 * r['p90_s']:.1f}), {r['tflops']:.3g} TFLOP/s, "
          f"MFU {mfu}, peak mem {r['peak_mem_gib']} GiB, compile {r['compile_s']:.1f}s")
  if "input" in result:
    r = result["input"]
    print(f"input  batch {r['batch']} {r['data']} (workers {r['worker_count']}, prefetch "
          f"{r['prefetch']}), {r['steps']} steps: pipeline {r['pipeline_images_per_s']:.1f} img/s "
          f"vs synthetic {r['synthetic_images_per_s']:.1f} ({100 * r['slowdown']:+.1f}%; "
          f"synthetic drift {100 * r['synthetic_drift']:+.1f}%)")
  if "profile" in result:
    r = result["profile"]
    kept = (f"trace in {r['trace_dir']}/plugins/profile/, view: xprof --logdir={r['trace_dir']}"
            if r["trace_dir"] else "trace not kept: --profile_dir=DIR keeps it")
    print(f"profile batch {r['batch']} routes {r['routes']}: {r['wall_ms_per_step']:.1f} ms/step "
          f"wall, {r['matched_ms_per_step']:.1f} ms attributed device time, "
          f"{r['unmatched_ms_per_step']:.1f} ms unmatched ({kept})")
    for kind, ms in r["ms_per_step"].items():
      print(f"  {kind:10s} {ms:8.2f} ms {100 * r['share'][kind]:6.1f}%")
    for name, ms in r["top_unmatched"]:
      print(f"  unmatched {ms:8.2f} ms  {name[:80]}")
    print("  largest groups of ops (blocks merged):")
    for g in r["top_groups"]:
      print(f"  {g['ms_per_step']:8.2f} ms {g['kind']:10s} ×{g['launches_per_step']:<5.0f} "
            f"{g['op_name'][-75:]}")
  if "route_cost" in result:
    r = result["route_cost"]
    print(f"route gather/scatter alone, fwd+bwd, batch {r['batch']}, {r['tokens']} tokens, "
          f"width {r['width']}: {1e3 * r['median_s']:.3f} ms (p10–p90 "
          f"{1e3 * r['p10_s']:.3f}–{1e3 * r['p90_s']:.3f})")
  if "sample" in result:
    s = result["sample"]
    print(f"sample step, batch {s['batch']}:")
    print(f"  {'rule':8s} {'img·steps/s':>12s} {'ms':>8s} {'GMACs lin':>10s} {'FLOP ratio':>10s} "
          f"{'time ratio':>10s} {'sampler img/s':>14s}")
    for name, r in s["rules"].items():
      fr = next(v for k, v in r.items() if k.startswith("flop_ratio"))
      tr = next(v for k, v in r.items() if k.startswith("time_ratio"))
      full = f"{r['sampler_images_per_s']:.1f}" if "sampler_images_per_s" in r else "-"
      print(f"  {name:8s} {r['image_steps_per_s']:12.1f} {1e3 * r['median_s']:8.2f} "
            f"{r['gmacs_linear']:10.2f} {fr:10.3f} {tr:10.3f} {full:>14s}")


def main(argv) -> None:
  del argv
  f = flags.FLAGS
  platform.set_default_xla_flags(sampling=f.what == "sample")
  config = f.config
  validation.validate(config, jax.device_count(), job="bench")
  what = f.what.split(",")
  result = dict(device=str(jax.devices()[0].device_kind), backend=jax.default_backend(),
                jax=jax.__version__, dtype=config.dtype)
  if "peak" in what or "all" in what:
    result["peak"] = matmul_peak(f.matmul_size)
  if "train" in what or "all" in what:
    result["train"] = bench_train(config, f.steps, f.warmup)
  if "profile" in what or "all" in what:
    result["profile"] = profile(config, min(f.steps, 5), f.warmup, f.profile_dir)
  if "input" in what or "all" in what:
    with tempfile.TemporaryDirectory() as scratch:
      result["input"] = bench_input(config, f.steps, f.warmup, scratch)
  if "route_cost" in what or "all" in what:
    result["route_cost"] = bench_route_cost(config, f.steps, f.warmup)
  if "sample" in what or "all" in what:
    result["sample"] = bench_sample(config, f.rules.split(","), f.steps, f.warmup,
                                    f.full_sampler)
  if f.json:
    print(json.dumps(result, indent=2))
  else:
    print(f"device {result['device']} ({result['backend']}), jax {result['jax']}, "
          f"dtype {result['dtype']}")
    print_table(result)


def cli() -> None:
  """`python -m sgjax.jobs.bench` (flags defined here, only for this command)."""
  config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=False)
  flags.DEFINE_string("what", "peak,train",
                      "Comma list of peak, train, profile, input, route_cost, sample, all.")
  flags.DEFINE_string("rules", ",".join(SAMPLE_RULES), "Sampling rules to time.")
  flags.DEFINE_integer("steps", 20, "Timed calls per measurement.")
  flags.DEFINE_integer("warmup", 3, "Untimed calls after compilation.")
  flags.DEFINE_integer("matmul_size", 8192, "Side of the square bf16 matmul for the peak.")
  flags.DEFINE_bool("full_sampler", True, "Also time the whole sampler per rule.")
  flags.DEFINE_string("profile_dir", "", "Where --what=profile keeps its trace: a TensorBoard "
                      "log folder (e.g. <workdir>/tensorboard; the trace goes to plugins/profile/"
                      "<run>/ there, for xprof / tensorboard-plugin-profile, and its "
                      ".trace.json.gz opens in ui.perfetto.dev); '' = the summary only (the "
                      "trace is written to a temporary folder and removed).")
  flags.DEFINE_bool("json", False, "Print JSON.")
  flags.mark_flag_as_required("config")
  errors.run(main)


if __name__ == "__main__":
  cli()
