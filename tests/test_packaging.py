"""pyproject.toml declares every third-party package the product imports, pinned at the version
installed, so `pip install .` gives a working imagefab and not one that fails on first use."""

from __future__ import annotations

import ast
import importlib.metadata as md
import re
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PRODUCT = ("app", "jobs", "analysis")


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def imported_top_level(folders=PRODUCT) -> dict[str, str]:
    """Third-party top-level module -> one file that imports it (for the failure message)."""
    found: dict[str, str] = {}
    for folder in folders:
        for path in sorted((REPO / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    top = name.split(".")[0]
                    if top not in sys.stdlib_module_names and top not in PRODUCT:
                        found.setdefault(top, str(path.relative_to(REPO)))
    return found


def declared() -> dict[str, str]:
    """Declared distribution (normalised) -> its requirement string."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"])
    return {normalise(re.match(r"[A-Za-z0-9._-]+", r).group()): r for r in reqs}


def test_every_imported_package_is_declared():
    deps = declared()
    owners = md.packages_distributions()
    missing = {}
    for module, where in sorted(imported_top_level().items()):
        dists = {normalise(d) for d in owners.get(module, [])}
        if not dists:
            missing[module] = f"imported by {where}, but no installed distribution provides it"
        elif not dists & deps.keys():
            missing[module] = f"imported by {where}; declare one of {sorted(dists)}"
    assert not missing, missing


def test_the_scan_sees_the_imports_it_must():
    modules = imported_top_level()
    # Imported inside functions as well as at the top: the scan walks the whole tree.
    assert {"ray", "fastapi", "prometheus_client", "huggingface_hub", "yaml", "PIL"} <= modules.keys()
    assert "json" not in modules and "app" not in modules


def test_pins_match_the_installed_versions():
    wrong = {}
    for name, req in declared().items():
        pin = re.search(r"==\s*([^\s;,]+)", req)
        assert pin, f"{req}: dependencies are pinned with =="
        installed = md.version(name)
        if installed != pin.group(1):
            wrong[name] = f"pinned {pin.group(1)}, installed {installed}"
    assert not wrong, wrong
