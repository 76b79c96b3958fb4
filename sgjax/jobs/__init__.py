"""The jobs: what a command runs (`--mode=sample|demo|eval`, the sweep, the study, the
benchmarks, the text demo, the export).

Jobs sit above the core (state, generate, pipeline, train, models, guidance, …) and import it;
no core module imports a job (tests/test_imports.py). A job with a command of its own runs as
`python -m sgjax.jobs.<name>` (and its console script, pyproject.toml). The entry modules
`sgjax.main`, `sgjax.aot` and `sgjax.tools.*` are jobs too.
"""
