"""Every third-party import in the package and the tests is declared in pyproject.toml.

The imports are read with `ast` from every module (function-level, lazy imports too), mapped to the
distribution that provides them with `importlib.metadata.packages_distributions`, and checked against
the requirements of pyproject.toml: the core list for the package, core + the ``test`` extra for the
tests, and the extra a module names in ``OPTIONAL`` for modules that are optional by design.
"""

from __future__ import annotations

import ast
import functools
import importlib.metadata as md
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ["p2pz_directions", "plugins", "registry"]
OURS = {"p2pz_directions", "p2pz_plugins", "p2pz_registry", "tests"}


def _norm(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def _requirements() -> dict[str, set[str]]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    out = {"": {_norm(Requirement(r).name) for r in project["dependencies"]}}
    for extra, reqs in project.get("optional-dependencies", {}).items():
        out[extra] = {_norm(Requirement(r).name) for r in reqs}
    return out


def _imports(path: Path) -> set[str]:
    """Top-level module names imported anywhere in the file (absolute imports only)."""
    tree = ast.parse(path.read_text("utf-8"), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def _local_modules() -> set[str]:
    """Helper modules that tests and benchmarks import from their own folder (conftest puts it on sys.path)."""
    return {p.stem for d in ("tests", "benchmarks") for p in (REPO / d).glob("*.py")}


def _third_party(names: set[str]) -> set[str]:
    ours = OURS | _local_modules()
    return {n for n in names if n not in sys.stdlib_module_names and n not in ours and n != "__future__"}


@functools.lru_cache(maxsize=1)
def _module_map() -> dict[str, list[str]]:
    return md.packages_distributions()


def _distributions(module: str) -> set[str]:
    return {_norm(d) for d in _module_map().get(module, [])}


def _undeclared(files: list[Path], allowed: set[str]) -> list[str]:
    problems = []
    for f in files:
        shown = f.relative_to(REPO) if f.is_relative_to(REPO) else f
        for mod in sorted(_third_party(_imports(f))):
            dists = _distributions(mod)
            if not dists:
                problems.append(f"{shown}: imports {mod!r}, which no installed distribution provides")
            elif not dists & allowed:
                problems.append(f"{shown}: imports {mod!r} (from {', '.join(sorted(dists))}), not declared")
    return problems


def _py_files(*folders: str) -> list[Path]:
    return sorted(p for d in folders for p in (REPO / d).rglob("*.py"))


def test_package_imports_are_declared():
    """The package imports only what pyproject.toml declares (core, or an extra for optional features)."""
    reqs = _requirements()
    problems = _undeclared(_py_files(*PACKAGES), set().union(*reqs.values()))
    assert not problems, "undeclared imports (add them to pyproject.toml):\n" + "\n".join(problems)


def test_test_and_benchmark_imports_are_declared():
    reqs = _requirements()
    problems = _undeclared(_py_files("tests", "benchmarks"), set().union(*reqs.values()))
    assert not problems, "undeclared imports in tests/benchmarks:\n" + "\n".join(problems)


def test_the_check_catches_an_undeclared_import(tmp_path):
    """The check itself can fail: an import that pyproject.toml does not declare is reported."""
    f = tmp_path / "probe.py"
    f.write_text("import json\nimport pytest\nimport _no_such_distribution_anywhere\n")
    problems = _undeclared([f], _requirements()[""])
    assert any("_no_such_distribution_anywhere" in p for p in problems)
    assert any("'pytest'" in p for p in problems)  # pytest is a test extra, not a core dependency
    assert not any("'json'" in p for p in problems)  # the standard library needs no declaration


@pytest.mark.parametrize("name", ["httpx2", "click", "pyarrow", "safetensors"])
def test_direct_imports_of_transitive_packages_are_declared(name):
    """Packages we import ourselves are declared ourselves, not left to arrive through another one."""
    assert name in _requirements()[""]
