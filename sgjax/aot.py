"""TPU pre-flight: compile the real train and sampling steps for a Cloud TPU slice, on a CPU.

  python -m sgjax.aot --config=configs/imagenet256.py --topology=v5p-64 [--slices=N]
      [--mode=train|sample|all] [--json=PATH] [--dump_hlo=DIR] [--config.mesh.fsdp=8 …]

XLA's TPU compiler (libtpu, `pip install "jax[tpu]==<jax>"`) runs on any machine: the abstract
devices of the named slice are meshed by the same code and `config.mesh` as a real run, and the
same jitted functions are lowered with their shardings and donation, then compiled. Per function
it reports the compiler's memory analysis against the chip's HBM (FITS / DOES NOT FIT), its cost
analysis beside the analytic FLOP counter, the collectives of the optimised HLO, and a roofline
estimate of the step time. Estimates are estimates: no TPU ran anything.
"""

from __future__ import annotations

import os

# Before jax is imported: compile for the TPU topology from a CPU host process, whatever
# accelerators this machine has (a pre-flight on a TPU VM must not take its chips).
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import dataclasses  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from sgjax import condition, errors, flops, guidance, hlo, models, sampling, sharding, tpu  # noqa: E402
from sgjax import config as config_lib  # noqa: E402
from sgjax import state as state_lib  # noqa: E402
from sgjax import train as train_lib  # noqa: E402
from sgjax.sparsity import Sparsity  # noqa: E402

MODES = ("train", "sample", "all")


def estimate(flops_compiled: float, flops_analytic: float, bytes_accessed: float,
             wire_bytes: float, chip: tpu.Chip, batch: int,
             repeats: int = 1) -> dict[str, float]:
  """The roofline estimate of one call, per chip.

  Compute time takes the larger of the compiled and the analytic FLOPs: on v5e and v6e the
  cost analysis reports 15–48% fewer FLOPs than the matmuls the program must do (docs/scaling.md),
  and an estimate should not get faster by undercounting. Where XLA really does less (SG's
  layers before the route, computed once for both branches) this errs on the slow side.
  `repeats`: trips of a loop (gradient accumulation) that the counts saw once; every count is
  scaled by it, an upper bound (the update after the loop runs once).
  """
  t_compute = max(repeats * flops_compiled, flops_analytic) / (chip.bf16_tflops * 1e12)
  t_memory = repeats * bytes_accessed / (chip.hbm_gbps * 1e9)
  t_comm = repeats * wire_bytes / (chip.ici_gbps * 1e9)
  t = max(t_compute, t_memory) + t_comm
  return dict(compute_s=t_compute, hbm_s=t_memory, collectives_s=t_comm, step_s=t,
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
                    self.batch, self.repeats)

  def as_dict(self) -> dict[str, Any]:
    return dict(name=self.name, batch=self.batch, compile_s=self.compile_s,
                compiled=self.compiled, repeats=self.repeats,
                memory_bytes=dict(self.memory, peak=self.peak_bytes),
                hbm_bytes=self.chip.hbm_bytes, fits=self.fits,
                flops_per_chip=self.flops, analytic_flops_per_chip=self.analytic_flops,
                bytes_accessed_per_chip=self.bytes_accessed, collectives=self.collectives,
                estimate=self.estimate)


def _memory(compiled) -> dict[str, int]:
  m = compiled.memory_analysis()
  return dict(argument=int(m.argument_size_in_bytes), output=int(m.output_size_in_bytes),
              alias=int(m.alias_size_in_bytes), temp=int(m.temp_size_in_bytes),
              code=int(m.generated_code_size_in_bytes))


def _cost(compiled) -> tuple[float, float]:
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost.get("flops", 0.0)), float(cost.get("bytes accessed", 0.0))


def _per_chip_bytes(tree: Any) -> int:
  """Bytes one chip holds of a tree of sharded abstract arrays (its largest shards)."""
  return sum(int(np.prod(a.sharding.shard_shape(a.shape))) * jnp.dtype(a.dtype).itemsize
             for a in jax.tree.leaves(tree))


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
    memory = dict(argument=_per_chip_bytes(args), output=0, alias=0, temp=refused_temp, code=0)
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
  return report


def _rule_config(config: ml_collections.ConfigDict, rule: str) -> ml_collections.ConfigDict:
  """The config with sample.guidance.rule = rule (CFG: dense branches, the configured ω)."""
  c = config.copy_and_resolve_references()
  with c.unlocked():
    c.sample.guidance.rule = rule
  return c


def compile_sample(config: ml_collections.ConfigDict, mesh, topology: tpu.Topology,
                   dump_hlo: str | None = None) -> Report:
  """One guided sampling step of the configured rule at sample.batch_size: the weights (EMA,
  and the guide's for AG+SG) in the compute dtype, laid out by the logical rules as a sampling
  run restores them; the step with the most work if a schedule makes steps differ."""
  model = models.from_config(config)
  abstract, shardings = state_lib.abstract_params_and_shardings(model, config.seed, mesh)
  dtype = jnp.dtype(config.dtype)
  params = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, dtype, sharding=s),
                        abstract, shardings)
  g_cfg = config.sample.guidance
  weights = {guidance.MAIN: params}
  if guidance.uses_guide(g_cfg.rule):
    weights[guidance.GUIDE] = params
  plan = config_lib.sampling_plan(config)
  g = max((s.guidance for s in plan.segments),
          key=lambda g: flops.step_macs(config, [b.sparsity for b in g.branches]).with_attention)
  bs, n, ch = config.sample.batch_size, config.data.image_size, config.data.channels
  shard = sharding.batch_sharding(mesh)
  x = jax.ShapeDtypeStruct((bs, n, n, ch), jnp.float32, sharding=shard)
  y = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=shard),
                   jax.eval_shape(lambda: condition.example(model, bs)))
  key = jax.eval_shape(lambda: jax.random.key(0))
  null = condition.synthetic_null(model)  # Concrete arrays: made on the host, not the mesh.
  with jax.set_mesh(mesh):
    step = jax.jit(sampling.guided_step(model, null, g),
                   out_shardings=shard)
    compiled, compile_s, refused = _compile(step, weights, x, y, key)
  macs = bs * flops.step_macs(config, [b.sparsity for b in g.branches]).with_attention
  name = f"sample_step_{g_cfg.rule}"
  return _analyse(name, compiled, bs, macs, topology, compile_s, dump_hlo, (weights, x, y),
                  refused)


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
  devices = tpu.devices(topology) if devices is None else list(devices)
  config_lib.validate(config, len(devices), job="sample" if mode == "sample" else "train")
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
  lines += ["", f"{'function':24s} {'FLOPs/chip':>10s} {'analytic':>10s} {'ratio':>6s} "
            f"{'bytes/chip':>10s}   (compiled cost analysis; analytic: sgjax.flops)"]
  for r in reports:
    if not r.compiled:
      lines.append(f"{r.name:24s} (not compiled: out of HBM)")
      continue
    ratio = r.repeats * r.flops / r.analytic_flops if r.analytic_flops else float("nan")
    lines.append(f"{r.name:24s} {r.flops:10.3e} {r.analytic_flops:10.3e} {ratio:6.3f} "
                 f"{r.bytes_accessed:10.3e}")
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
  lines += ["", "estimate (roofline, NOT a measurement): max(FLOPs/peak, bytes/HBM BW) + "
            "collective bytes sent/ICI BW", f"{'function':24s} {'compute ms':>10s} "
            f"{'HBM ms':>8s} {'comm ms':>8s} {'step ms':>8s} {'images/s':>9s}  bound"]
  for r in reports:
    if not r.compiled:
      continue
    e = r.estimate
    lines.append(f"{r.name:24s} {e['compute_s'] * 1e3:10.2f} {e['hbm_s'] * 1e3:8.2f} "
                 f"{e['collectives_s'] * 1e3:8.2f} {e['step_s'] * 1e3:8.2f} "
                 f"{e['images_per_s']:9.1f}  {e['bound']}")
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


_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (get_config()).",
                                          lock_config=True)
_TOPOLOGY = flags.DEFINE_string("topology", None, "gcloud accelerator type (v5p-64, "
                                "v5litepod-16, v6e-256, v4-32) or topology (v5p:4x4x2).")
_SLICES = flags.DEFINE_integer("slices", 1, "Slices joined over DCN (the data axis spans them).")
_MODE = flags.DEFINE_enum("mode", "all", MODES, "train: the train step; sample: the guided "
                          "sampling step and CFG's; all: both.")
_JSON = flags.DEFINE_string("json", None, "Also write the reports here as JSON.")
_DUMP_HLO = flags.DEFINE_string("dump_hlo", None, "Write each optimised HLO module here.")
_SUMMARIZE = flags.DEFINE_multi_string("summarize", [], "Instead of compiling: print a markdown "
                                       "table of these --json reports (docs/scaling.md).")


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
           "| verdict | compiled / analytic FLOPs | collectives MiB sent | est. step ms "
           "| est. img/s | bound |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
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
        e = estimate(r["flops_per_chip"], r["analytic_flops_per_chip"],
                     r["bytes_accessed_per_chip"], wire, tpu.Chip(**doc["chip"]), r["batch"],
                     repeats)
        est = (f"{repeats * wire / 2**20:,.0f} | {e['step_s'] * 1e3:,.1f} "
               f"| {e['images_per_s']:,.0f} | {e['bound']}")
      else:
        ratio, est = "not compiled", "– | – | – | –"
      lines.append(f"| {name} | {doc['accelerator_type']} ({doc['chips']}) | {mesh} | "
                   f"{r['name']} | {r['batch']} | {peak:.2f} | {doc['chip']['hbm_gib']:g} | "
                   f"{verdict} | {ratio} | {est} |")
  return "\n".join(lines)


def main(argv) -> None:
  del argv
  if _SUMMARIZE.value:
    paths = sorted(_SUMMARIZE.value)
    docs = []
    for path in paths:
      with open(path) as f:
        docs.append(json.load(f))
    print(markdown_table(docs, [os.path.splitext(os.path.basename(p))[0] for p in paths]))
    return
  if _CONFIG.value is None:
    raise errors.UserError("--config", "missing", "e.g. --config=configs/imagenet256.py")
  if not _TOPOLOGY.value:
    raise errors.UserError("--topology", "missing", f"e.g. {', '.join(tpu.EXAMPLES[:4])}")
  topology = tpu.parse(_TOPOLOGY.value, _SLICES.value)
  config = _CONFIG.value
  reports = preflight(config, topology, _MODE.value, _DUMP_HLO.value)
  print()
  print(format_table(reports, topology), flush=True)
  if _JSON.value:
    os.makedirs(os.path.dirname(os.path.abspath(_JSON.value)), exist_ok=True)
    with open(_JSON.value, "w") as f:
      json.dump(report_doc(config, topology, reports), f, indent=2)
  check_fit(reports, topology)


if __name__ == "__main__":
  errors.run(main)
