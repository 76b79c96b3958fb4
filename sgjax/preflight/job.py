"""The TPU pre-flight job: compile the real train and sampling steps for a Cloud TPU slice, on a
CPU, and report memory, cost, collectives and a roofline estimate.

  python -m sgjax.aot --config=configs/imagenet256.py --topology=v5p-64 [--slices=N]
      [--mode=train|sample|all] [--json=PATH] [--dump_hlo=DIR] [--verbose] [--config.mesh.fsdp=8 …]

XLA's TPU compiler (libtpu, `pip install "jax[tpu]==<jax>"`) runs on any machine: the abstract
devices of the named slice are meshed by the same code and `config.mesh` as a real run, and the
same jitted functions are lowered with their shardings and donation, then compiled. Per function
it reports the compiler's memory analysis against the chip's HBM (FITS / DOES NOT FIT), its cost
analysis beside the analytic FLOP counter, the step's analytic HBM traffic beside XLA's bytes
accessed (sgjax.preflight.traffic), the collectives of the optimised HLO, and a roofline
estimate of the step time. Estimates are estimates: no TPU ran anything.

`sgjax.aot` is the command's entry module; it sets JAX_PLATFORMS=cpu before jax is imported
(a pre-flight on a TPU VM must not take its chips).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from absl import flags
from ml_collections import config_flags

from sgjax import condition, errors, flops, guidance, models, sampling, sharding, validation
from sgjax import state as state_lib
from sgjax import train as train_lib
from sgjax.preflight import hlo, tpu, traffic
from sgjax.sparsity import Sparsity

MODES = ("train", "sample", "all")


def estimate(flops_compiled: float, flops_analytic: float, bytes_accessed: float,
             wire_bytes: float, chip: tpu.Chip, batch: int, repeats: int = 1,
             traffic_bytes: float | None = None) -> dict[str, float]:
  """The roofline estimate of one call, per chip.

  Compute time takes the larger of the compiled and the analytic FLOPs: on v5e and v6e the
  cost analysis reports 15–48% fewer FLOPs than the matmuls the program must do (docs/scaling.md),
  and an estimate should not get faster by undercounting. Where XLA really does less (SG's
  layers before the route, computed once for both branches) this errs on the slow side.

  HBM time is the analytic traffic (`traffic_bytes`, sgjax.preflight.traffic: weights,
  activations, state), not XLA's bytes accessed, a sum over its operations that is no HBM
  figure (1.4-6× the floor) and called compute-bound steps HBM-bound; `hbm_xla_s` is what XLA's
  count would give (a ceiling). A report without the analytic count (saved before it existed)
  falls back to XLA's.
  `repeats`: trips of a loop (gradient accumulation) that the compiler's counts saw once;
  they are scaled by it, an upper bound (the update after the loop runs once). The analytic
  count already holds every trip.
  """
  t_compute = max(repeats * flops_compiled, flops_analytic) / (chip.bf16_tflops * 1e12)
  t_memory_xla = repeats * bytes_accessed / (chip.hbm_gbps * 1e9)
  t_memory = t_memory_xla if traffic_bytes is None else traffic_bytes / (chip.hbm_gbps * 1e9)
  t_comm = repeats * wire_bytes / (chip.ici_gbps * 1e9)
  t = max(t_compute, t_memory) + t_comm
  return dict(compute_s=t_compute, hbm_s=t_memory, hbm_xla_s=t_memory_xla,
              collectives_s=t_comm, step_s=t,
              images_per_s=batch / t if t > 0 else float("inf"),
              bound="compute" if t_compute >= t_memory else "HBM")


@dataclasses.dataclass
class Report:
  """One compiled function on one slice: memory, cost, collectives and the estimate."""
  name: str
  batch: int  # Global images per call.
  compile_s: float
  memory: dict[str, int]  # Bytes per chip, from the compiler's memory analysis.
  flops: float  # Per chip, compiled cost analysis.
  bytes_accessed: float  # Per chip, compiled cost analysis.
  analytic_flops: float  # Per chip, sgjax.flops (2 per MAC).
  collectives: dict[str, dict[str, float]]
  chip: tpu.Chip
  chips: int
  compiled: bool = True  # False: the compiler refused it for HBM (memory from its message).
  # Trips of the gradient-accumulation loop per call: cost analysis and the HLO count a loop
  # body once, so the estimate multiplies the counted work by this.
  repeats: int = 1
  traffic: traffic.Traffic | None = None  # Analytic HBM bytes per chip (the estimate's).

  @property
  def peak_bytes(self) -> int:
    """Live at once: arguments, outputs not aliased to a donated argument, temporaries, code."""
    m = self.memory
    return m["argument"] + m["output"] - m["alias"] + m["temp"] + m["code"]

  @property
  def fits(self) -> bool:
    return self.compiled and self.peak_bytes <= self.chip.hbm_bytes

  @property
  def estimate(self) -> dict[str, float]:
    """Roofline: max(compute, HBM) + collectives over ICI; seconds per call and images/s."""
    return estimate(self.flops, self.analytic_flops, self.bytes_accessed,
                    sum(row["wire_bytes"] for row in self.collectives.values()), self.chip,
                    self.batch, self.repeats,
                    None if self.traffic is None else self.traffic.total)

  def as_dict(self) -> dict[str, Any]:
    return dict(name=self.name, batch=self.batch, compile_s=self.compile_s,
                compiled=self.compiled, repeats=self.repeats,
                memory_bytes=dict(self.memory, peak=self.peak_bytes),
                hbm_bytes=self.chip.hbm_bytes, fits=self.fits,
                flops_per_chip=self.flops, analytic_flops_per_chip=self.analytic_flops,
                bytes_accessed_per_chip=self.bytes_accessed,
                traffic_per_chip=None if self.traffic is None else self.traffic.as_dict(),
                collectives=self.collectives, estimate=self.estimate)


def _memory(compiled) -> dict[str, int]:
  m = compiled.memory_analysis()
  return dict(argument=int(m.argument_size_in_bytes), output=int(m.output_size_in_bytes),
              alias=int(m.alias_size_in_bytes), temp=int(m.temp_size_in_bytes),
              code=int(m.generated_code_size_in_bytes))


def _cost(compiled) -> tuple[float, float]:
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost.get("flops", 0.0)), float(cost.get("bytes accessed", 0.0))


def _compile(jitted, *args) -> tuple[Any, float, int | None]:
  """(compiled or None, seconds, bytes of temporaries the compiler refused) for `jitted(*args)`.

  The TPU compiler itself refuses a program whose temporaries exceed the chip's HBM; that is a
  DOES NOT FIT verdict, not a crash.
  """
  t0 = time.perf_counter()
  try:
    return jitted.lower(*args).compile(), time.perf_counter() - t0, None
  except jax.errors.JaxRuntimeError as e:
    m = re.search(r"HLO temporaries \(([\d.]+)([KMGT])\) exceeds available HBM", str(e))
    if "RESOURCE_EXHAUSTED" not in str(e) or not m:
      raise
    scale = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}[m.group(2)]
    return None, time.perf_counter() - t0, int(float(m.group(1)) * scale)


def _analyse(name: str, compiled, batch: int, analytic_macs: float, topology: tpu.Topology,
             compile_s: float, dump_hlo: str | None, args: Any = None,
             refused_temp: int | None = None) -> Report:
  if compiled is None:  # Refused by the compiler: arguments and the temporaries it reported.
    memory = dict(argument=traffic.per_chip_bytes(args), output=0, alias=0, temp=refused_temp,
                  code=0)
    return Report(name, batch, compile_s, memory, 0.0, 0.0, 2.0 * analytic_macs / topology.chips,
                  {}, topology.chip, topology.chips, compiled=False)
  text = compiled.as_text()
  if dump_hlo:
    os.makedirs(dump_hlo, exist_ok=True)
    with open(os.path.join(dump_hlo, f"{name}.hlo"), "w") as f:
      f.write(text)
  f, b = _cost(compiled)
  found = hlo.collectives(text, topology.chips)
  return Report(name, batch, compile_s, _memory(compiled), f, b,
                2.0 * analytic_macs / topology.chips, hlo.summary(found), topology.chip,
                topology.chips)


def _batch_spec(model, batch: int, image_size: int, channels: int, shard) -> dict[str, Any]:
  """Abstract train batch as the data pipeline makes it: float32 NHWC images, the condition."""
  cond = jax.eval_shape(lambda: condition.example(model, batch))
  cond = {"label": cond} if not isinstance(cond, dict) else cond
  spec = dict(image=jax.ShapeDtypeStruct((batch, image_size, image_size, channels),
                                         jnp.float32), **cond)
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=shard), spec)


def compile_train(config: ml_collections.ConfigDict, mesh, topology: tpu.Topology,
                  dump_hlo: str | None = None) -> Report:
  """The train step exactly as `sgjax.train.train` jits it: state donated, shardings pinned."""
  model = models.from_config(config)
  tx = state_lib.make_optimizer(config.train)
  abstract, state_shardings = state_lib.abstract_state_and_shardings(model, tx, config.seed,
                                                                     mesh)
  shard = sharding.batch_sharding(mesh)
  bs = config.train.batch_size
  batch = _batch_spec(model, bs, config.data.image_size, config.data.channels, shard)
  null = condition.synthetic_null(model)  # Concrete arrays: made on the host, not the mesh.
  with jax.set_mesh(mesh):
    step = jax.jit(train_lib.make_train_step(config, model, tx, null),
                   in_shardings=(state_shardings, shard),
                   out_shardings=(state_shardings, sharding.replicated(mesh)),
                   donate_argnums=(0,))
    compiled, compile_s, refused = _compile(step, abstract, batch)
  routed = Sparsity.from_config(config.sparsity)
  macs = 3 * bs * flops.forward_macs(config, routed).with_attention  # Forward + backward.
  report = _analyse("train_step", compiled, bs, macs, topology, compile_s, dump_hlo,
                    (abstract, batch), refused)
  report.repeats = config.train.grad_accum
  report.traffic = train_traffic(config, mesh)
  return report


def _unsharded(tree: Any) -> Any:
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), tree)


def _chip_batch(config: ml_collections.ConfigDict, mesh, batch: int) -> int:
  return batch // (mesh.shape["data"] * mesh.shape["fsdp"])


def train_traffic(config: ml_collections.ConfigDict, mesh) -> traffic.Traffic:
  """The train step's analytic HBM traffic per chip (sgjax.preflight.traffic): its jaxpr at one
  chip's batch with the whole weights, the state's shard on `mesh`."""
  model = models.from_config(config)
  tx = state_lib.make_optimizer(config.train)
  abstract, state_shardings = state_lib.abstract_state_and_shardings(model, tx, config.seed,
                                                                     mesh)
  step = train_lib.make_train_step(config, model, tx, condition.synthetic_null(model))
  state = _unsharded(abstract)
  n, ch = config.data.image_size, config.data.channels

  def jaxpr_at(b):
    return jax.make_jaxpr(step)(state, _unsharded(_batch_spec(model, b, n, ch, None)))

  sharded = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                         abstract, state_shardings)
  grads = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, jnp.float32,
                                                      sharding=a.sharding), sharded["params"])
  return traffic.train_traffic(jaxpr_at, _chip_batch(config, mesh, config.train.batch_size),
                               mesh.shape["tensor"], traffic.per_chip_bytes(sharded),
                               traffic.per_chip_bytes(grads))


def _rule_config(config: ml_collections.ConfigDict, rule: str) -> ml_collections.ConfigDict:
  """The config with sample.guidance.rule = rule (CFG: dense branches, the configured ω)."""
  c = config.copy_and_resolve_references()
  with c.unlocked():
    c.sample.guidance.rule = rule
  return c


@dataclasses.dataclass
class _SampleStep:
  """What one guided sampling step is compiled from (and its traffic traced from)."""
  model: Any
  weights: dict[str, Any]  # {MAIN: params[, GUIDE: params]}, abstract, sharded.
  guidance: guidance.Guidance  # The plan's step with the most work.
  null: Any

  def fn(self):
    return sampling.guided_step(self.model, self.null, self.guidance)


def _sample_step(config: ml_collections.ConfigDict, mesh) -> _SampleStep:
  """The weights (EMA, and the guide's for AG+SG) in the compute dtype, laid out by the logical
  rules as a sampling run restores them; the step with the most work if a schedule makes steps
  differ."""
  model = models.from_config(config)
  abstract, shardings = state_lib.abstract_params_and_shardings(model, config.seed, mesh)
  dtype = jnp.dtype(config.dtype)
  params = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, dtype, sharding=s),
                        abstract, shardings)
  weights = {guidance.MAIN: params}
  if guidance.uses_guide(config.sample.guidance.rule):
    weights[guidance.GUIDE] = params
  plan = guidance.config_plan(config)
  g = max((s.guidance for s in plan.segments),
          key=lambda g: flops.step_macs(config, [b.sparsity for b in g.branches]).with_attention)
  # The null: concrete arrays, made on the host, not the mesh.
  return _SampleStep(model, weights, g, condition.synthetic_null(model))


def _sample_inputs(config: ml_collections.ConfigDict, model, batch: int, shard) -> tuple:
  """Abstract (x, condition, key) of a sampling step at `batch` images."""
  n, ch = config.data.image_size, config.data.channels
  x = jax.ShapeDtypeStruct((batch, n, n, ch), jnp.float32, sharding=shard)
  y = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=shard),
                   jax.eval_shape(lambda: condition.example(model, batch)))
  return x, y, jax.eval_shape(lambda: jax.random.key(0))


def sample_traffic(config: ml_collections.ConfigDict, mesh) -> traffic.Traffic:
  """The sampling step's analytic HBM traffic per chip: its jaxpr at one chip's batch."""
  s = _sample_step(config, mesh)
  fn, weights = s.fn(), _unsharded(s.weights)

  def jaxpr_at(b):
    return jax.make_jaxpr(fn)(weights, *_sample_inputs(config, s.model, b, None))
  return traffic.sample_traffic(jaxpr_at, _chip_batch(config, mesh, config.sample.batch_size),
                                mesh.shape["tensor"])


def compile_sample(config: ml_collections.ConfigDict, mesh, topology: tpu.Topology,
                   dump_hlo: str | None = None) -> Report:
  """One guided sampling step of the configured rule at sample.batch_size (`_sample_step`)."""
  s = _sample_step(config, mesh)
  bs = config.sample.batch_size
  shard = sharding.batch_sharding(mesh)
  x, y, key = _sample_inputs(config, s.model, bs, shard)
  with jax.set_mesh(mesh):
    step = jax.jit(s.fn(), out_shardings=shard)
    compiled, compile_s, refused = _compile(step, s.weights, x, y, key)
  macs = bs * flops.step_macs(config, [b.sparsity for b in s.guidance.branches]).with_attention
  report = _analyse(f"sample_step_{config.sample.guidance.rule}", compiled, bs, macs, topology,
                    compile_s, dump_hlo, (s.weights, x, y), refused)
  report.traffic = sample_traffic(config, mesh)
  return report


def check_tpu_config(config: ml_collections.ConfigDict) -> None:
  """What compiles on CPU and GPU but not for a TPU, refused before compiling."""
  if config.model.attention == "cudnn":
    raise errors.UserError("model.attention", "'cudnn' is GPU-only",
                           "use 'auto' or 'xla' for a TPU (XLA attention)")


def preflight(config: ml_collections.ConfigDict, topology: tpu.Topology, mode: str = "all",
              dump_hlo: str | None = None, log=print, devices=None) -> list[Report]:
  """Compiles the run's functions for `topology`; one Report per function.

  `devices`: the slice's real devices when this process runs on it (a TPU VM, a Colab TPU
  runtime); default its abstract devices from libtpu.
  """
  check_tpu_config(config)
  devices = (tpu.devices(topology, quiet=not errors.verbose()) if devices is None
             else list(devices))
  validation.validate(config, len(devices), job="sample" if mode == "sample" else "train")
  mesh = sharding.build_mesh(config.mesh, devices)
  log(f"pre-flight for {topology.accelerator_type} ({topology.name}, {topology.chips} chips"
      f"{f' in {topology.slices} slices' if topology.slices > 1 else ''}); mesh "
      f"{dict(mesh.shape)}; libtpu compiling on this host's CPU …")
  reports = []
  if mode in ("train", "all"):
    reports.append(compile_train(config, mesh, topology, dump_hlo))
    log(f"  compiled train_step in {reports[-1].compile_s:.0f} s")
  if mode in ("sample", "all"):
    rules = [config.sample.guidance.rule]
    if "cfg" not in rules:
      rules.append("cfg")  # CFG beside the configured rule: the baseline cost.
    for rule in rules:
      reports.append(compile_sample(_rule_config(config, rule), mesh, topology, dump_hlo))
      log(f"  compiled {reports[-1].name} in {reports[-1].compile_s:.0f} s")
  return reports


def add_traffic(config: ml_collections.ConfigDict, topology: tpu.Topology,
                doc: dict[str, Any]) -> dict[str, Any]:
  """A saved report (`--json`) with the analytic traffic of each of its functions added and
  its estimate recomputed, traced (not compiled) from `config`: the command the report was
  made with, for reports saved before the count existed (`--traffic_only`)."""
  check_tpu_config(config)
  devices = tpu.devices(topology, quiet=not errors.verbose())
  modes = {"sample" if r["name"].startswith("sample_step_") else "train" for r in doc["reports"]}
  validation.validate(config, len(devices), job="sample" if modes == {"sample"} else "train")
  mesh = sharding.build_mesh(config.mesh, devices)
  chip = tpu.Chip(**doc["chip"])
  for r in doc["reports"]:
    if r["name"] == "train_step":
      t = train_traffic(config, mesh)
    else:
      t = sample_traffic(_rule_config(config, r["name"].removeprefix("sample_step_")), mesh)
    r["traffic_per_chip"] = t.as_dict()
    if r.get("compiled", True):
      wire = sum(c["wire_bytes"] for c in r["collectives"].values())
      r["estimate"] = estimate(r["flops_per_chip"], r["analytic_flops_per_chip"],
                               r["bytes_accessed_per_chip"], wire, chip, r["batch"],
                               r.get("repeats", 1), t.total)
  return doc


def _gib(b: float) -> str:
  return f"{b / tpu.GIB:7.2f}"


def format_table(reports: list[Report], topology: tpu.Topology) -> str:
  chip = topology.chip
  lines = [f"per chip on {topology.accelerator_type} ({topology.chips} × TPU {chip.name}: "
           f"{chip.hbm_gib:g} GiB HBM, {chip.bf16_tflops:g} bf16 TFLOP/s, {chip.hbm_gbps:g} "
           f"GB/s HBM, {chip.ici_gbps:g} GB/s ICI)", "",
           f"{'function':24s} {'args':>7s} {'out':>7s} {'alias':>7s} {'temp':>7s} {'code':>7s} "
           f"{'peak':>7s}  GiB   verdict (headroom)"]
  for r in reports:
    m = r.memory
    head = (chip.hbm_bytes - r.peak_bytes) / tpu.GIB
    verdict = "FITS" if r.fits else (
        "DOES NOT FIT" + ("" if r.compiled else ": the compiler refused its temporaries"))
    lines.append(f"{r.name:24s} {_gib(m['argument'])} {_gib(m['output'])} {_gib(m['alias'])} "
                 f"{_gib(m['temp'])} {_gib(m['code'])} {_gib(r.peak_bytes)}        "
                 f"{verdict} ({head:+.2f} GiB of {chip.hbm_gib:g})")
  lines += ["", f"{'function':24s} {'FLOPs/chip':>10s} {'analytic':>10s} {'ratio':>6s}   "
            "(compiled cost analysis; analytic: sgjax.flops)"]
  for r in reports:
    if not r.compiled:
      lines.append(f"{r.name:24s} (not compiled: out of HBM)")
      continue
    ratio = r.repeats * r.flops / r.analytic_flops if r.analytic_flops else float("nan")
    lines.append(f"{r.name:24s} {r.flops:10.3e} {r.analytic_flops:10.3e} {ratio:6.3f}")
  lines += ["", f"{'function':24s} {'weights':>8s} {'activ.':>8s} {'state':>8s} "
            f"{'analytic':>8s} {'XLA':>8s}  HBM GB/chip (sgjax.preflight.traffic; XLA: bytes "
            "accessed)"]
  for r in reports:
    if r.compiled and r.traffic is not None:
      t = r.traffic
      lines.append(f"{r.name:24s} {t.weights / 1e9:8.3g} {t.activations / 1e9:8.3g} "
                   f"{t.state / 1e9:8.3g} {t.total / 1e9:8.3g} "
                   f"{r.repeats * r.bytes_accessed / 1e9:8.3g}")
  lines += ["", f"{'function':24s} {'collective':18s} {'count':>6s} {'async':>6s} "
            f"{'MiB out':>9s} {'MiB sent':>9s}"]
  for r in reports:
    for kind in hlo.KINDS:
      if kind in r.collectives:
        c = r.collectives[kind]
        lines.append(f"{r.name:24s} {kind:18s} {c['count']:6d} {c['async_count']:6d} "
                     f"{c['bytes'] / 2**20:9.1f} {c['wire_bytes'] / 2**20:9.1f}")
    if not r.collectives:
      lines.append(f"{r.name:24s} (none)")
  for r in reports:
    if r.repeats > 1:
      lines.append(f"({r.name}: the compiler counts the gradient-accumulation loop's body once; "
                   f"ratio and estimate multiply it by its {r.repeats} trips)")
  lines += ["", "estimate (roofline, NOT a measurement): max(FLOPs/peak, analytic traffic/HBM "
            "BW) + collective bytes sent/ICI BW; HBM ms from the analytic floor, (XLA) from "
            "XLA's bytes accessed, no HBM figure: a ceiling",
            f"{'function':24s} {'compute ms':>10s} {'HBM ms':>8s} {'(XLA)':>8s} {'comm ms':>8s} "
            f"{'step ms':>8s} {'images/s':>9s}  bound"]
  for r in reports:
    if not r.compiled:
      continue
    e = r.estimate
    lines.append(f"{r.name:24s} {e['compute_s'] * 1e3:10.2f} {e['hbm_s'] * 1e3:8.2f} "
                 f"{e['hbm_xla_s'] * 1e3:8.2f} {e['collectives_s'] * 1e3:8.2f} "
                 f"{e['step_s'] * 1e3:8.2f} {e['images_per_s']:9.1f}  {e['bound']}")
  if topology.slices > 1:
    lines.append("(collectives across slices travel over DCN, "
                 f"{chip.dcn_gbps:g} GB/s per chip; the estimate prices all at ICI speed)")
  return "\n".join(lines)


def check_fit(reports: list[Report], topology: tpu.Topology) -> None:
  """UserError naming the first function that does not fit."""
  for r in reports:
    if not r.fits:
      raise errors.UserError(
          r.name, f"needs {r.peak_bytes / tpu.GIB:.2f} GiB per chip, TPU {topology.chip.name} "
          f"has {topology.chip.hbm_gib:g} GiB HBM",
          "use more chips (or a larger mesh.fsdp), model.remat='full', train.grad_accum > 1, or "
          "a smaller batch")


def report_doc(config: ml_collections.ConfigDict, topology: tpu.Topology,
               reports: list[Report]) -> dict[str, Any]:
  """What --json writes: the slice, the mesh, the versions and every report."""
  return dict(topology=topology.name, accelerator_type=topology.accelerator_type,
              slices=topology.slices, chips=topology.chips, jax=jax.__version__,
              chip=dataclasses.asdict(topology.chip),
              mesh=sharding.mesh_shape(config.mesh, topology.chips),
              reports=[r.as_dict() for r in reports])


def markdown_table(docs: list[dict[str, Any]], names: list[str]) -> str:
  """One row per function of each saved report: slice, mesh, memory, verdict, estimate."""
  lines = ["| row | slice (chips) | mesh d×f×t | function | batch | peak GiB/chip | HBM "
           "| verdict | compiled / analytic FLOPs | HBM GB/chip analytic (XLA) "
           "| collectives MiB sent | est. step ms | est. img/s | bound |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for name, doc in zip(names, docs, strict=True):
    mesh = "×".join(str(doc["mesh"][a]) for a in sharding.AXES)
    for r in doc["reports"]:
      verdict = "FITS" if r["fits"] else "DOES NOT FIT"
      peak = r["memory_bytes"]["peak"] / tpu.GIB
      if r.get("compiled", True):
        repeats = r.get("repeats", 1)
        ratio = f"{repeats * r['flops_per_chip'] / r['analytic_flops_per_chip']:.3f}"
        wire = sum(c["wire_bytes"] for c in r["collectives"].values())
        # Recomputed from the saved counts: the table follows the current estimate's rule.
        analytic = (r.get("traffic_per_chip") or {}).get("total")
        e = estimate(r["flops_per_chip"], r["analytic_flops_per_chip"],
                     r["bytes_accessed_per_chip"], wire, tpu.Chip(**doc["chip"]), r["batch"],
                     repeats, analytic)
        xla_gb = repeats * r["bytes_accessed_per_chip"] / 1e9
        hbm = f"{analytic / 1e9:,.1f} ({xla_gb:,.0f})" if analytic else f"– ({xla_gb:,.0f})"
        est = (f"{hbm} | {repeats * wire / 2**20:,.0f} | {e['step_s'] * 1e3:,.1f} "
               f"| {e['images_per_s']:,.0f} | {e['bound']}")
      else:
        ratio, est = "not compiled", "– | – | – | – | –"
      lines.append(f"| {name} | {doc['accelerator_type']} ({doc['chips']}) | {mesh} | "
                   f"{r['name']} | {r['batch']} | {peak:.2f} | {doc['chip']['hbm_gib']:g} | "
                   f"{verdict} | {ratio} | {est} |")
  return "\n".join(lines)


def main(argv) -> None:
  del argv
  f = flags.FLAGS
  if f.summarize:
    paths = sorted(f.summarize)
    docs = []
    for path in paths:
      with open(path) as doc:
        docs.append(json.load(doc))
    print(markdown_table(docs, [os.path.splitext(os.path.basename(p))[0] for p in paths]))
    return
  if f.config is None:
    raise errors.UserError("--config", "missing", "e.g. --config=configs/imagenet256.py")
  if not f.topology:
    raise errors.UserError("--topology", "missing", f"e.g. {', '.join(tpu.EXAMPLES[:4])}")
  topology = tpu.parse(f.topology, f.slices)
  config = f.config
  if f.traffic_only:
    if not f.json or not os.path.exists(f.json):
      raise errors.UserError("--traffic_only", "needs --json=PATH of a saved report",
                             "the report this command wrote (docs/preflight/<row>.json)")
    with open(f.json) as saved:
      doc = add_traffic(config, topology, json.load(saved))
    with open(f.json, "w") as out:
      json.dump(doc, out, indent=2)
    print(markdown_table([doc], [os.path.splitext(os.path.basename(f.json))[0]]), flush=True)
    return
  reports = preflight(config, topology, f.mode, f.dump_hlo,
                      log=functools.partial(print, flush=True))
  print()
  print(format_table(reports, topology), flush=True)
  if f.json:
    os.makedirs(os.path.dirname(os.path.abspath(f.json)), exist_ok=True)
    with open(f.json, "w") as out:
      json.dump(report_doc(config, topology, reports), out, indent=2)
  check_fit(reports, topology)


def cli() -> None:
  """`python -m sgjax.aot` (sgjax/aot.py) and `python -m sgjax.preflight` (flags defined here,
  only for this command)."""
  config_flags.DEFINE_config_file("config", None, "Config file (get_config()).",
                                  lock_config=True)
  flags.DEFINE_string("topology", None, "gcloud accelerator type (v5p-64, v5litepod-16, "
                      "v6e-256, v4-32) or topology (v5p:4x4x2).")
  flags.DEFINE_integer("slices", 1, "Slices joined over DCN (the data axis spans them).")
  flags.DEFINE_enum("mode", "all", MODES, "train: the train step; sample: the guided sampling "
                    "step and CFG's; all: both.")
  flags.DEFINE_string("json", None, "Also write the reports here as JSON.")
  flags.DEFINE_string("dump_hlo", None, "Write each optimised HLO module here.")
  flags.DEFINE_multi_string("summarize", [], "Instead of compiling: print a markdown table of "
                            "these --json reports (docs/scaling.md).")
  flags.DEFINE_bool("traffic_only", False, "Instead of compiling: add the analytic HBM traffic "
                    "to the saved --json report of this command (traced, not compiled).")
  flags.DEFINE_bool("verbose", False, "Also show libtpu's start-up messages, and on an error "
                    "its traceback.")
  errors.run(main)
