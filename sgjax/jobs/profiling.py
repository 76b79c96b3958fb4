"""Where a compiled step's device time goes: a `jax.profiler` trace summed by kind of work.

The compiled program's HLO says what each executed instruction (mostly fusions) contains; the
trace says how long each ran. Kinds, first match wins:
  route      contains an op from `sparsity.ROUTE_SCOPE` (token selection, gather, scatter and
             their backward). A fusion that also holds other work counts whole, so this is an
             upper bound on the routing's share.
  attention  the score/softmax/value part (`dit.ATTENTION_SCOPE`, or a cuDNN fused-attention call)
  collective all-reduce, all-gather, reduce-scatter, all-to-all, collective-permute
  matmul     dot or convolution (XLA's or a cuBLAS/Triton GEMM call)
  optimizer  the AdamW and EMA updates (`train.OPTIMIZER_SCOPE`)
  other      everything else (norms, adaLN modulation, activations, copies, the loss)
Events are matched to instructions by name (also XLA's kernel spelling, '.' and '-' as '_') or
by their `hlo_op` argument; library kernels that match no instruction but name their work
(cuBLAS/CUTLASS GEMMs, fused attention) go to matmul or attention; the rest is reported as
"unmatched" with its largest names, so nothing disappears from the account.
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re
import time
from collections.abc import Callable

import jax

from sgjax import sparsity, train
from sgjax.models import dit

KINDS = ("route", "attention", "collective", "matmul", "optimizer", "other")
_COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_HEADER = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s+(?:\(.*\)\s+->\s+.*)?\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_OPCODE = re.compile(r"\s([a-z][a-z0-9\-_]*)\(")
_CALLS = re.compile(r"\b(?:calls|to_apply|body|condition)=%?([\w.\-]+)")
_BRANCHES = re.compile(r"\bbranch_computations=\{([^}]*)\}")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_TARGET = re.compile(r'custom_call_target="([^"]*)"')


def _parse(hlo_text: str) -> dict[str, list[tuple[str, str, str, str, list[str]]]]:
  """computation -> [(instruction, opcode, op_name, custom-call target, called computations)]."""
  computations: dict[str, list] = {}
  current = None
  for line in hlo_text.splitlines():
    header = _HEADER.match(line)
    if header and "=" not in line.split("{")[0]:
      current = computations.setdefault(header.group(1), [])
      continue
    m = _INSTRUCTION.match(line)
    if current is None or m is None:
      continue
    rhs = m.group(2)
    opcode = _OPCODE.search(" " + rhs.split(", metadata=")[0])
    op_name = _OP_NAME.search(rhs)
    target = _TARGET.search(rhs)
    calls = _CALLS.findall(rhs) + [c.strip().lstrip("%") for found in _BRANCHES.findall(rhs)
                                   for c in found.split(",")]
    current.append((m.group(1), opcode.group(1) if opcode else "", op_name.group(1) if op_name
                    else "", target.group(1) if target else "", calls))
  return computations


def _scope_in(scope: str, op_name: str) -> bool:
  return f"/{scope}/" in f"/{op_name}/"


def instruction_kinds(hlo_text: str) -> dict[str, str]:
  """Instruction name -> kind (see the module docstring) for every instruction of the program."""
  return {name: kind for name, (kind, _) in _instruction_table(hlo_text).items()}


def _instruction_table(hlo_text: str) -> dict[str, tuple[str, str]]:
  """Instruction name -> (kind, the JAX op name it came from)."""
  computations = _parse(hlo_text)
  memo: dict[str, set[str]] = {}

  def features(comp: str) -> set[str]:
    """What a computation and everything it calls contain, as kind tags."""
    if comp not in memo:
      memo[comp] = set()  # Guards against cycles.
      tags = set()
      for _, opcode, op_name, target, calls in computations.get(comp, []):
        tags |= _tags(opcode, op_name, target)
        for c in calls:
          tags |= features(c)
      memo[comp] = tags
    return memo[comp]

  def _tags(opcode: str, op_name: str, target: str) -> set[str]:
    tags = set()
    if _scope_in(sparsity.ROUTE_SCOPE, op_name):
      tags.add("route")
    if _scope_in(dit.ATTENTION_SCOPE, op_name) or "fmha" in target or "flash" in target:
      tags.add("attention")
    if any(opcode.startswith(c) for c in _COLLECTIVES):
      tags.add("collective")
    if opcode in ("dot", "convolution") or "gemm" in target.lower() or "matmul" in target:
      tags.add("matmul")
    if _scope_in(train.OPTIMIZER_SCOPE, op_name):
      tags.add("optimizer")
    return tags

  kinds = {}
  for instructions in computations.values():
    for name, opcode, op_name, target, calls in instructions:
      tags = _tags(opcode, op_name, target)
      if opcode in ("fusion", "custom-call", "call", "async-start"):
        for c in calls:
          tags |= features(c)
      kinds[name] = (next((k for k in KINDS if k in tags), "other"), op_name)
  return kinds


def _events(trace_dir: str) -> list[dict]:
  paths = sorted(glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True))
  if not paths:
    raise FileNotFoundError(f"no *.trace.json.gz under {trace_dir} (was the trace written with "
                            "create_perfetto_trace=True?)")
  with gzip.open(paths[-1]) as f:
    data = json.load(f)
  events = data["traceEvents"] if isinstance(data, dict) else data
  # On GPU the kernels are on "/device:…" processes; host threads also carry launch events with
  # the same names, which must not be counted twice. On CPU the host runs the program. Device
  # processes without events don't count: a loaded plugin (libtpu, after a TPU pre-flight in the
  # same process) adds an empty "/device:TPU…" process to a CPU trace.
  ran = {e.get("pid") for e in events if e.get("ph") == "X"}
  devices = {e["pid"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"
             and str(e.get("args", {}).get("name", "")).startswith("/device:")
             and e["pid"] in ran}
  return [e for e in events if e.get("ph") == "X" and (not devices or e.get("pid") in devices)]


def _library_kind(kernel: str) -> str | None:
  name = kernel.lower()
  if any(k in name for k in ("fmha", "flash", "sdpa")):
    return "attention"
  if any(k in name for k in ("gemm", "xmma", "cutlass", "cublas")):
    return "matmul"
  return None


def summarize_trace(trace_dir: str, hlo_text: str, steps: int, top_groups: int = 15) -> dict:
  """Device time per step by kind, in ms, with each kind's share of the matched time."""
  table = _instruction_table(hlo_text)
  table.update({re.sub(r"[.\-]", "_", n): v for n, v in list(table.items())})
  per_kind: dict[str, float] = collections.defaultdict(float)
  per_group: dict[tuple[str, str], list[float]] = collections.defaultdict(lambda: [0.0, 0])
  unmatched: dict[str, float] = collections.defaultdict(float)
  for e in _events(trace_dir):
    args = e.get("args") or {}
    names = (e.get("name", ""), args.get("hlo_op", ""),
             str(args.get("long_name", "")).split(" ")[0])
    found = next((n for n in names if n in table), None)
    kind, op_name = table[found] if found else (_library_kind(names[0]), "")
    dur_ms = float(e.get("dur", 0.0)) / 1e3  # Trace durations are in microseconds.
    if kind is None:
      if names[0].startswith("$"):  # Python frames of the host thread, not device work.
        continue
      unmatched[e.get("name", "")] += dur_ms
    else:
      per_kind[kind] += dur_ms
      # Grouped by where in the model they come from, every block alike: "block*/fc1/…".
      group = per_group[(kind, re.sub(r"block\d+", "block*", op_name) or names[0])]
      group[0] += dur_ms
      group[1] += 1
  matched = sum(per_kind.values())
  top = sorted(per_group.items(), key=lambda x: -x[1][0])[:top_groups]
  return dict(
      steps=steps,
      ms_per_step={k: per_kind.get(k, 0.0) / steps for k in KINDS},
      share={k: (per_kind.get(k, 0.0) / matched if matched else 0.0) for k in KINDS},
      matched_ms_per_step=matched / steps,
      unmatched_ms_per_step=sum(unmatched.values()) / steps,
      top_unmatched=sorted(((n, d / steps) for n, d in unmatched.items()),
                           key=lambda x: -x[1])[:5],
      # Where the time goes inside a kind: the largest groups of ops by JAX op name, blocks
      # merged (an op with no op name is grouped under its kernel name).
      top_groups=[dict(kind=k, op_name=o, ms_per_step=d / steps, launches_per_step=c / steps)
                  for (k, o), (d, c) in top])


def profile_calls(fn: Callable[[], object], compiled_text: str, steps: int,
                  trace_dir: str, top_groups: int = 15) -> dict:
  """Traces `steps` synchronised calls of `fn` into `trace_dir` and summarises them."""
  jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
  try:
    t0 = time.perf_counter()
    for _ in range(steps):
      jax.block_until_ready(fn())
    wall_s = time.perf_counter() - t0
  finally:
    jax.profiler.stop_trace()
  return dict(trace_dir=trace_dir, wall_ms_per_step=1e3 * wall_s / steps,
              **summarize_trace(trace_dir, compiled_text, steps, top_groups))
