"""The shape of the code's dependencies: no import cycles among first-party modules, and stages
that import no Ray, MLflow or DuckDB.

The import graph is built statically with `ast`, so every import counts: at module level, inside
functions (a lazy import that dodges a cycle is still a cycle) and under `TYPE_CHECKING`. An
import of `a.b.c` also runs the packages `a` and `a.b` (their `__init__`), except the importer's
own packages, which are running already; `from a.b import name` reads `a.b`'s namespace even
when `name` is a submodule, so a module inside `a.b` imports its siblings by their full path.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FIRST_PARTY = ("app", "jobs", "analysis", "benchmarks")
HEAVY = ("ray", "mlflow", "duckdb")


@dataclass(frozen=True)
class Edge:
    target: str
    where: str  # "path:line" of the import


def module_files(root: Path, packages: Iterable[str]) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file under the given top-level packages."""
    modules = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


def import_graph(root: Path, packages: Iterable[str] = FIRST_PARTY) -> dict[str, list[Edge]]:
    """module -> the first-party modules it imports (each once, at its first import)."""
    modules = module_files(root, packages)

    def known(name: str) -> str | None:
        """`name`, or the longest enclosing module of it that exists (`a.b.func` -> `a.b`)."""
        parts = name.split(".")
        while parts and ".".join(parts) not in modules:
            parts.pop()
        return ".".join(parts) or None

    def enclosing_packages(name: str) -> list[str]:
        parts = name.split(".")
        return [".".join(parts[:i]) for i in range(1, len(parts))]

    graph: dict[str, list[Edge]] = {}
    for module, path in modules.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        own = set(enclosing_packages(module))
        edges: dict[str, Edge] = {}
        imports = [
            n for n in ast.walk(ast.parse(path.read_text(), str(path))) if isinstance(n, ast.Import | ast.ImportFrom)
        ]
        for node in imports:
            targets: list[str] = []
            if isinstance(node, ast.Import):
                for alias in node.names:
                    target = known(alias.name)
                    if target:
                        targets += [p for p in enclosing_packages(target) if p not in own] + [target]
            else:
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                target = known(source)
                if target:
                    targets += [p for p in enclosing_packages(target) if p not in own] + [target]
                    targets += [f"{source}.{a.name}" for a in node.names if f"{source}.{a.name}" in modules]
            for target in targets:
                if target != module and target not in edges:
                    edges[target] = Edge(target, f"{path.relative_to(root)}:{node.lineno}")
        graph[module] = list(edges.values())
    return graph


def find_cycle(graph: Mapping[str, list[Edge]]) -> list[tuple[str, Edge]] | None:
    """One import cycle as [(module, the edge it leaves by), ...], or None when there is none."""
    done: set[str] = set()
    path: list[tuple[str, Edge]] = []
    on_path: dict[str, int] = {}

    def visit(module: str) -> list[tuple[str, Edge]] | None:
        on_path[module] = len(path)
        for edge in graph.get(module, []):
            if edge.target in on_path:
                return [*path[on_path[edge.target] :], (module, edge)]
            if edge.target not in done:
                path.append((module, edge))
                cycle = visit(edge.target)
                if cycle:
                    return cycle
                path.pop()
        del on_path[module]
        done.add(module)
        return None

    for module in sorted(graph):
        if module not in done and (cycle := visit(module)):
            return cycle
    return None


def describe(cycle: list[tuple[str, Edge]]) -> str:
    return "\n".join(f"  {module} -> {edge.target}   ({edge.where})" for module, edge in cycle)


def test_first_party_modules_import_no_cycle() -> None:
    graph = import_graph(REPO)
    assert "app.stages" in graph and "benchmarks.gpu_bench" in graph  # the walk found the tree
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle:\n" + describe(cycle)


def test_the_graph_sees_lazy_relative_and_package_imports(tmp_path: Path) -> None:
    """The checker itself: each kind of import it must see closes a cycle of its own."""
    files = {
        "pkg/__init__.py": "from pkg.judge import verdict\n",
        "pkg/judge.py": "from pkg import checks\n",  # through the package's namespace
        "pkg/checks.py": "",
        "pkg/spec.py": "def check():\n    from .expand import fields  # lazy and relative\n",
        "pkg/expand.py": "import pkg.spec\n",
        "pkg/alone.py": "from pkg.checks import *\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    graph = import_graph(tmp_path, ["pkg"])
    assert {e.target for e in graph["pkg.spec"]} == {"pkg.expand"}
    assert {e.target for e in graph["pkg.expand"]} == {"pkg.spec"}  # not its own package
    assert {e.target for e in graph["pkg.judge"]} == {"pkg", "pkg.checks"}
    assert {e.target for e in graph["pkg.alone"]} == {"pkg.checks"}

    cycle = find_cycle(graph)
    assert cycle is not None
    assert [module for module, _ in cycle] in (["pkg", "pkg.judge"], ["pkg.expand", "pkg.spec"])
    assert "pkg/" in describe(cycle)
    del graph["pkg"]
    cycle = find_cycle(graph)
    assert cycle is not None and describe(cycle) == (
        "  pkg.expand -> pkg.spec   (pkg/expand.py:1)\n  pkg.spec -> pkg.expand   (pkg/spec.py:2)"
    )
    del graph["pkg.spec"]
    assert find_cycle(graph) is None


def heavy_imports(modules: list[str]) -> dict[str, list[str]]:
    """Import `modules` one after another in a fresh interpreter; module -> the HEAVY packages
    that were first loaded by its import."""
    code = (
        "import importlib, json, sys\n"
        f"heavy, seen, blamed = {HEAVY!r}, set(), {{}}\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        "    new = [h for h in heavy if h in sys.modules and h not in seen]\n"
        "    seen.update(new)\n"
        "    if new:\n"
        "        blamed[name] = new\n"
        "print(json.dumps(blamed))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=600)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_generator_and_stages_import_no_ray_mlflow_or_duckdb() -> None:
    """The generator also runs alone on a GPU machine (benchmarks); the stages are plain callables."""
    generator = [m for m in module_files(REPO, ["app"]) if m.startswith("app.generat")]  # a module or a package
    assert generator, "no generator module under app/"
    assert heavy_imports([*generator, "app.stages"]) == {}


@pytest.mark.slow
def test_only_the_serve_app_imports_ray_mlflow_or_duckdb() -> None:
    """Stages import no Ray: jobs/ and app/serve/ wire them to it; MLflow and DuckDB load lazily."""
    modules = [m for m in module_files(REPO, ["app"]) if not (m + ".").startswith("app.serve.")]
    assert heavy_imports(modules) == {}
