"""The jobs: what a command runs (`--mode=sample|demo|eval`, the sweep, the benchmarks).

Jobs sit above the core (state, generate, train, models, guidance, …) and import it; no core
module imports a job (tests/test_imports.py). The entry modules `sgjax.main`, `sgjax.sweep`,
`sgjax.bench`, `sgjax.aot` and `sgjax.tools.*` are jobs too.
"""
