"""The TPU pre-flight: compile a run's steps for a Cloud TPU slice on a CPU and say whether they
fit and how fast they might run (`python -m sgjax.aot`, docs/scaling.md).

  tpu.py      chips (public specifications) and slice names -> abstract devices via libtpu
  hlo.py      the collectives of an optimised HLO module, counted and sized
  traffic.py  the step's analytic HBM traffic (weights, activations, state) from its jaxpr
  job.py      the job: compile, memory vs HBM, cost vs sgjax.flops, the roofline estimate,
              the table and --json; `cli()` is the command
"""
