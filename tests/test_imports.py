"""The package's import graph, read from the source: no cycles, and the core never imports a job.

Jobs are what a command runs (sgjax/jobs/, the entry modules and the tools); everything else is
the core they build on. A core module importing a job would make the core depend on a CLI's
flags and outputs; a cycle makes import order matter.
"""

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JOB_PACKAGES = ("sgjax.jobs", "sgjax.tools", "sgjax.preflight")
# Entry modules outside sgjax/jobs/: `python -m` targets (no thin modules keep old paths).
JOB_MODULES = ("sgjax.main", "sgjax.aot")

def _modules() -> dict[str, str]:
  out = {}
  for folder, _, names in os.walk(os.path.join(ROOT, "sgjax")):
    for name in names:
      if name.endswith(".py"):
        rel = os.path.relpath(os.path.join(folder, name), ROOT)[:-3].replace(os.sep, ".")
        out[rel.removesuffix(".__init__")] = os.path.join(folder, name)
  return out


def _imports(path: str, modules: dict[str, str], package: str) -> set[str]:
  """The sgjax modules a file imports (at any level: function-level imports count)."""
  found = set()
  for node in ast.walk(ast.parse(open(path).read())):
    if isinstance(node, ast.Import):
      found |= {a.name for a in node.names if a.name in modules}
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:  # Relative: resolve against the file's package.
        parts = package.split(".")[:len(package.split(".")) - node.level + 1]
        base = ".".join(parts + ([base] if base else []))
      for a in node.names:
        full = f"{base}.{a.name}"
        found.add(full if full in modules else base)
  return {m for m in found if m in modules}


def _graph() -> dict[str, set[str]]:
  modules = _modules()
  graph = {}
  for name, path in modules.items():
    package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    graph[name] = _imports(path, modules, package) - {name}
  return graph


def _is_job(name: str) -> bool:
  return name in JOB_MODULES or any(name == p or name.startswith(p + ".") for p in JOB_PACKAGES)


def test_the_graph_is_read():
  graph = _graph()
  assert "sgjax.generate" in graph["sgjax.jobs.sample"]
  assert "sgjax.state" in graph["sgjax.train"]
  assert {"sgjax.jobs.demo", "sgjax.jobs.evaluate", "sgjax.jobs.sample"} <= graph["sgjax.main"]
  assert "sgjax.models" in graph["sgjax.workdir"]  # A function-level import is seen.
  assert graph["sgjax.config"] == set()  # The declarations are a leaf.


def test_no_core_module_imports_a_job():
  graph = _graph()
  bad = sorted(f"{m} -> {d}" for m, deps in graph.items() if not _is_job(m)
               for d in deps if _is_job(d))
  assert bad == []


def test_no_import_cycles():
  graph = _graph()  # Function-level imports included: no exception.
  cycles, state = [], {}

  def visit(m, stack):
    state[m] = "open"
    for d in sorted(graph[m]):
      if state.get(d) == "open":
        cycles.append(" -> ".join(stack[stack.index(d):] + [d]))
      elif d not in state:
        visit(d, stack + [d])
    state[m] = "done"

  for m in sorted(graph):
    if m not in state:
      visit(m, [m])
  assert cycles == []
