"""Cloud TPU chips and slice names: what the pre-flight's `--topology=…` accepts.

Names a user types: gcloud accelerator types (`v5p-64`, `v5litepod-16`, `v6e-256`, `v4-32`) and
topology strings (`v5p:4x4x2`, `v5e:4x4`). v4 and v5p types count TensorCores (2 per chip:
v5p-64 is 32 chips), v5e and v6e types count chips. Abstract devices come from libtpu through
`jax.experimental.topologies` on any machine; no TPU and no network needed.

The chip figures are the public per-chip specifications (each row names its source page). They
feed the pre-flight's roofline estimate only; nothing here is measured.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import re
from typing import Any

import jax
from jax.experimental import topologies

from sgjax.errors import UserError

GIB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
  name: str
  bf16_tflops: float  # Peak dense bf16 TFLOP/s per chip.
  hbm_gib: float  # HBM per chip.
  hbm_gbps: float  # HBM bandwidth per chip, GB/s.
  ici_gbps: float  # Bidirectional inter-chip interconnect bandwidth per chip, GB/s.
  dcn_gbps: float  # Data-center network bandwidth per chip, GB/s (multi-slice traffic).
  torus_dims: int  # 2 (v5e, v6e) or 3 (v4, v5p).
  cores_per_chip: int  # TensorCores per chip: what the gcloud type's number counts on v4/v5p.
  source: str

  @property
  def hbm_bytes(self) -> int:
    return int(self.hbm_gib * GIB)


# DCN: v5p's page gives 50 Gbps per chip; v5e's 2×100 Gbps NICs per 8-chip host is 25 Gbps per
# chip, and we assume the same per chip for v6e and v4 (their pages give no per-chip figure).
CHIPS = {
    "v4": Chip("v4", 275.0, 32.0, 1200.0, 600.0, 25 / 8, 3, 2,
               "cloud.google.com/tpu/docs/v4 (275 TFLOPs, 32 GiB at 1200 GBps); ICI 2400 Gbps "
               "per direction from the v5p launch comparison"),
    "v5e": Chip("v5e", 197.0, 16.0, 819.0, 400.0, 25 / 8, 2, 1,
                "cloud.google.com/tpu/docs/v5e (197 TFLOPs, 16 GB at 819 GBps, ICI 400 GBps)"),
    "v5p": Chip("v5p", 459.0, 95.0, 2765.0, 1200.0, 50 / 8, 3, 2,
                "cloud.google.com/tpu/docs/v5p (459 TFLOPs, 95 GiB at 2765 GBps, ICI 1200 "
                "GBps, DCN 50 Gbps per chip)"),
    "v6e": Chip("v6e", 918.0, 32.0, 1638.0, 800.0, 25 / 8, 2, 1,
                "cloud.google.com/tpu/docs/v6e (918 TFLOPs, 32 GB at 1638 GBps, ICI 800 GBps)"),
}
# Spellings of the generations in gcloud names and libtpu topology strings.
ALIASES = {"v4": "v4", "v5p": "v5p", "v5e": "v5e", "v5litepod": "v5e", "v5lite": "v5e",
           "v6e": "v6e"}

# Slice shapes gcloud gives a chip count (the default topology of an accelerator type).
SHAPES_2D = {1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8),
             128: (8, 16), 256: (16, 16)}
SHAPES_3D = {4: (2, 2, 1), 8: (2, 2, 2), 16: (2, 2, 4), 32: (2, 4, 4), 64: (4, 4, 4),
             128: (4, 4, 8), 256: (4, 8, 8), 512: (8, 8, 8), 1024: (8, 8, 16),
             2048: (8, 16, 16), 4096: (16, 16, 16)}
# What TPU devices call themselves (`device.device_kind`) -> generation.
DEVICE_KINDS = {"TPU v4": "v4", "TPU v5 lite": "v5e", "TPU v5e": "v5e", "TPU v5": "v5p",
                "TPU v5p": "v5p", "TPU v6 lite": "v6e", "TPU v6e": "v6e"}
EXAMPLES = ("v5p-8", "v5p-64", "v5litepod-16", "v5e-8", "v6e-8", "v6e-256", "v4-32",
            "v5p:4x4x2", "v5e:4x4", "v6e:2x4")


@dataclasses.dataclass(frozen=True)
class Topology:
  chip: Chip
  shape: tuple[int, ...]  # Chips along each torus axis.
  slices: int = 1

  @property
  def chips_per_slice(self) -> int:
    return math.prod(self.shape)

  @property
  def chips(self) -> int:
    return self.chips_per_slice * self.slices

  @property
  def name(self) -> str:
    """The libtpu topology string, e.g. "v5p:2x2x1"."""
    return f"{self.chip.name}:{'x'.join(map(str, self.shape))}"

  @property
  def accelerator_type(self) -> str:
    """The gcloud accelerator type of one slice, e.g. "v5p-8"."""
    prefix = "v5litepod" if self.chip.name == "v5e" else self.chip.name
    return f"{prefix}-{self.chips_per_slice * self.chip.cores_per_chip}"

  @property
  def chips_per_host_bounds(self) -> tuple[int, int, int]:
    """The chips one host drives: single-host v5e/v6e slices up to 8 chips, else 2x2x1."""
    shape3 = tuple(self.shape) + (1,) * (3 - len(self.shape))
    if self.chip.torus_dims == 2 and self.chips_per_slice <= 8:
      return shape3  # v5litepod-1/4/8, v6e-1/4/8: one host.
    if self.chips_per_slice < 4:
      return shape3
    return (2, 2, 1)


def for_devices(devices: list[Any]) -> Topology | None:
  """The slice these (real) devices form, e.g. a Colab or TPU VM runtime's; None if they are
  not TPU chips of a known generation or count."""
  gen = DEVICE_KINDS.get(devices[0].device_kind) if devices else None
  if gen is None or devices[0].platform != "tpu":
    return None
  chip = CHIPS[gen]
  shapes = SHAPES_3D if chip.torus_dims == 3 else SHAPES_2D
  # Megacore chips (v4, v5p) show one device per chip.
  return Topology(chip, shapes[len(devices)]) if len(devices) in shapes else None


def _unknown(name: str, what: str) -> UserError:
  return UserError("--topology", f"{name!r}: {what}",
                   f"known: gcloud types like {', '.join(EXAMPLES[:7])} or topology strings "
                   f"like {', '.join(EXAMPLES[7:])} (generations {', '.join(sorted(CHIPS))})")


def parse(name: str, slices: int = 1) -> Topology:
  """A Topology from a gcloud accelerator type or a topology string; UserError if unknown."""
  if slices < 1:
    raise UserError("--slices", f"{slices}: must be >= 1", "1 = one slice, N = N slices over DCN")
  text = name.strip().lower()
  if m := re.fullmatch(r"([a-z0-9]+):(\d+(?:x\d+){1,2})", text):
    gen, dims = m.group(1), tuple(int(d) for d in m.group(2).split("x"))
    if gen not in ALIASES:
      raise _unknown(name, f"unknown TPU generation {gen!r}")
    chip = CHIPS[ALIASES[gen]]
    if len(dims) != chip.torus_dims or min(dims) < 1:
      raise _unknown(name, f"{chip.name} slices have {chip.torus_dims} axes (e.g. "
                     f"{'2x2x1' if chip.torus_dims == 3 else '2x4'})")
    return Topology(chip, dims, slices)
  if m := re.fullmatch(r"([a-z0-9]+)-(\d+)", text):
    gen, count = m.group(1), int(m.group(2))
    if gen not in ALIASES:
      raise _unknown(name, f"unknown TPU generation {gen!r}")
    chip = CHIPS[ALIASES[gen]]
    if count % chip.cores_per_chip:
      raise _unknown(name, f"{chip.name} types count TensorCores, {chip.cores_per_chip} per chip")
    chips = count // chip.cores_per_chip
    shapes = SHAPES_3D if chip.torus_dims == 3 else SHAPES_2D
    if chips not in shapes:
      sizes = ", ".join(str(c * chip.cores_per_chip) for c in shapes)
      raise _unknown(name, f"no default {chip.name} slice of {chips} chips (sizes: {sizes}); "
                     "give the topology string instead")
    return Topology(chip, shapes[chips], slices)
  raise _unknown(name, "not a TPU name")


def libtpu_missing() -> UserError | None:
  """The install hint when libtpu (jax's TPU compiler) is not installed, else None."""
  if importlib.util.find_spec("libtpu") is not None:
    return None
  return UserError("libtpu", "not installed: the TPU compiler is needed to compile for a TPU",
                   f'pip install "jax[tpu]=={jax.__version__}" (runs on a CPU machine, no TPU '
                   "needed)")


# What libtpu asks a TPU VM's metadata server for when it loads. A compile-only process opens
# no chip and (off a TPU VM) has no metadata server: without these libtpu prints a screen of
# "Failed to find host bounds…" / "unexpected worker hostname…" before any line of ours.
# Values the environment already holds win.
COMPILE_ONLY_ENV = {"TPU_SKIP_MDS_QUERY": "1", "TPU_WORKER_HOSTNAMES": "localhost",
                    "TPU_WORKER_ID": "0"}


def devices(topology: Topology, quiet: bool = True) -> list[Any]:
  """Abstract devices of the topology (all slices), for lowering and compiling; no TPU needed.

  `quiet`: tell libtpu, before it loads, what it would ask the metadata server (the slice's
  accelerator type, one local worker) so it starts silently; False leaves its start-up
  messages (`--verbose`). Only the process's first load reads them.
  """
  if (err := libtpu_missing()) is not None:
    raise err
  # Other processes may hold libtpu at the same time (parallel tests, a second pre-flight): no
  # real chip is opened, so its single-process lock only gets in the way.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  if quiet:
    for name, value in {**COMPILE_ONLY_ENV,
                        "TPU_ACCELERATOR_TYPE": topology.accelerator_type}.items():
      os.environ.setdefault(name, value)
  desc = topologies.get_topology_desc(
      platform="tpu", topology_name=topology.name, chip_config_name="default",
      chips_per_host_bounds=topology.chips_per_host_bounds, num_slices=topology.slices)
  return list(desc.devices)
