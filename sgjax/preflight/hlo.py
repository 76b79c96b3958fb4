"""What an optimised HLO module says about communication: its collectives, counted and sized.

Reads the text of `jax.jit(...).lower(...).compile().as_text()`. Every collective instruction is
counted where it stands (inside fusions and loop bodies too: a static count, not a trace), with
the bytes of the array it produces and the size of its device group. Async pairs
(`all-gather-start`/`-done`) count once, at the start; the TPU compiler clones one collective
into several fusions of an async step (same `channel_id` and
shape): those count once too.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import re

KINDS = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "bf16": 2, "f16": 2, "s32": 4,
               "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16,
               "f8e4m3fn": 1, "f8e5m2": 1}
_INSTR = re.compile(r"^\s*(?:ROOT )?%[\w.-]+ = (.+?) (" + "|".join(KINDS) + r")(-start)?\(")
_ARRAY = re.compile(r"\b([a-z]+\d*(?:e\dm\d(?:fn)?)?)\[([\d,]*)\]")


@dataclasses.dataclass
class Collective:
  kind: str
  dtype: str  # Element type of the (largest) array it produces.
  shape: tuple[int, ...]  # Shape of that array.
  bytes: int  # Bytes it produces (all arrays of a combined op).
  group: int  # Devices taking part (the replica group's size).
  is_async: bool

  @property
  def wire_bytes(self) -> float:
    """Bytes each device sends, for ring algorithms: the cost model of the estimate."""
    n = max(self.group, 1)
    if self.kind == "all-reduce":
      return 2.0 * self.bytes * (n - 1) / n
    if self.kind == "reduce-scatter":
      return float(self.bytes * (n - 1))  # Output is 1/n of the input.
    if self.kind == "collective-permute":
      return float(self.bytes)
    return self.bytes * (n - 1) / n  # all-gather (output), all-to-all.


def _arrays(shape_text: str) -> list[tuple[str, tuple[int, ...]]]:
  out = []
  for dtype, dims in _ARRAY.findall(shape_text):
    if dtype in DTYPE_BYTES:
      out.append((dtype, tuple(int(d) for d in dims.split(",") if d)))
  return out


def _group_size(line: str, num_devices: int) -> int:
  if m := re.search(r"replica_groups=\{\{([\d,]*)\}", line):
    return len(m.group(1).split(","))
  if m := re.search(r"replica_groups=\[(\d+),(\d+)\]<=", line):  # Iota: [groups, size].
    return int(m.group(2))
  if m := re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", line):
    sizes = dict(re.findall(r"'(\w+)'=(\d+)", m.group(1)))
    axes = re.findall(r"'(\w+)'", m.group(2))
    return math.prod(int(sizes[a]) for a in axes if a in sizes)
  if "source_target_pairs=" in line:
    return 2
  return num_devices


def collectives(hlo_text: str, num_devices: int) -> list[Collective]:
  """Every collective instruction of the module."""
  found, channels = [], set()
  for line in hlo_text.splitlines():
    m = _INSTR.match(line)
    if not m:
      continue
    shape_text, kind, start = m.group(1), m.group(2), bool(m.group(3))
    if ch := re.search(r"channel_id=(\d+)", line):
      key = (kind, ch.group(1), re.sub(r"\{[^}]*\}", "", shape_text))  # Layouts aside.
      if key in channels:
        continue
      channels.add(key)
    arrays = _arrays(shape_text)
    if start and len(arrays) >= 2:
      # `-start` ops produce (operands, results[, contexts]): keep the results half.
      half = arrays[len(arrays) // 2:] if kind != "collective-permute" else arrays[1:2]
      arrays = [a for a in half if a[1]] or half
    if not arrays:
      continue
    sizes = [DTYPE_BYTES[d] * math.prod(s) for d, s in arrays]
    dtype, shape = arrays[max(range(len(arrays)), key=sizes.__getitem__)]
    found.append(Collective(kind, dtype, shape, sum(sizes), _group_size(line, num_devices),
                            start))
  return found


def summary(found: list[Collective]) -> dict[str, dict[str, float]]:
  """kind -> {count, async, bytes, wire_bytes} (kinds absent from the module are left out)."""
  out: dict[str, dict[str, float]] = collections.defaultdict(
      lambda: dict(count=0, async_count=0, bytes=0, wire_bytes=0.0))
  for c in found:
    row = out[c.kind]
    row["count"] += 1
    row["async_count"] += int(c.is_async)
    row["bytes"] += c.bytes
    row["wire_bytes"] += c.wire_bytes
  return dict(out)
