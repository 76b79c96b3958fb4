"""Process-wide XLA settings the project turns on by default, before any backend starts.

Measured on one H100 (docs/perf-notes.md): with XLA's Triton GEMMs off (cuBLAS only) the
SiT-XL/2 sampling step ran 5–7% faster (dense 2010 -> 2106-2139 image-steps/s, CFG 1008 ->
1085-1092), while the train step ran 1.5–3% slower (routed b128 943 -> 930 img/s). So the flag
is a default for sampling processes only. A user's own XLA_FLAGS win: a flag already set there
is never overridden.
"""

from __future__ import annotations

import os

SAMPLING_GPU_XLA_FLAGS = ("--xla_gpu_enable_triton_gemm=false",)


def set_default_xla_flags(*, sampling: bool) -> None:
  """Appends our default flags to XLA_FLAGS unless the user set the same flag.

  `sampling`: the process only samples (its flags differ from a training process's).

  Must run before the first JAX computation (flags are read when the backend starts); the
  flags are GPU-only, so other backends ignore them.
  """
  current = os.environ.get("XLA_FLAGS", "")
  names = {f.split("=")[0] for f in current.split()}
  wanted = SAMPLING_GPU_XLA_FLAGS if sampling else ()
  extra = [f for f in wanted if f.split("=")[0] not in names]
  if extra:
    os.environ["XLA_FLAGS"] = " ".join([current, *extra]).strip()
