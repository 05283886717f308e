"""Every third-party import in the package and the tests is declared in pyproject.toml.

The imports are read with `ast` from every module (function-level, lazy imports too), mapped to the
distribution that provides them with `importlib.metadata.packages_distributions`, and checked against
the requirements of pyproject.toml: the package, the tests and benchmarks, the Space entry (`space/`) and
the CI helpers (`.ci/*.py`). The second half tests `.ci/floors.py`, which `.ci/min-deps` uses to install
every requirement at its declared floor.
"""

from __future__ import annotations

import ast
import functools
import importlib.metadata as md
import importlib.util
import json
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

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


def test_space_and_ci_helper_imports_are_declared():
    """The Space entry and the CI helpers (`.ci/floors.py` runs in both venvs) import only what is declared."""
    files = _py_files("space", ".ci")
    assert REPO / ".ci" / "floors.py" in files
    problems = _undeclared(files, set().union(*_requirements().values()))
    assert not problems, "undeclared imports in space/ or .ci/:\n" + "\n".join(problems)


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


# --- .ci/floors.py: the floors .ci/min-deps installs ---------------------------------------------------


@functools.lru_cache(maxsize=1)
def _floors_module():
    spec = importlib.util.spec_from_file_location("ci_floors", REPO / ".ci" / "floors.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _pyproject(tmp_path: Path, deps: list[str], optional: dict[str, list[str]]) -> Path:
    # a JSON list of strings is a TOML array
    lines = ["[project]", 'name = "probe"', f"dependencies = {json.dumps(deps)}"]
    lines += ["[project.optional-dependencies]"] + [f"{k} = {json.dumps(v)}" for k, v in optional.items()]
    path = tmp_path / "pyproject.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_floors_reads_every_requirement_with_its_floor(tmp_path):
    f = _floors_module()
    pyproject = _pyproject(
        tmp_path,
        ["Foo_Bar>=1.2", "baz~=2.0", "qux==3.1.*", "never>=9; python_version < '3'"],
        {"test": ["foo-bar[extra]>=1.5", "pin==0.4"], "unused": ["other>=7"]},
    )
    got = {k: str(v) for k, v in f.floors(pyproject, ["test"]).items()}
    # the highest floor of a name given twice; names normalized as pip does; false markers left out
    assert got == {"baz": "2.0", "foo-bar": "1.5", "pin": "0.4", "qux": "3.1"}
    assert "other" in f.floors(pyproject, ["unused"])


@pytest.mark.parametrize(
    ("deps", "extras", "message"),
    [
        (["capped<2"], [], "has no floor"),
        (["strict>1"], [], "has no floor"),
        (["ok>=1"], ["nope"], "'nope' is not in pyproject.toml"),
    ],
)
def test_floors_refuses_what_it_cannot_install(tmp_path, deps, extras, message):
    """A requirement with no floor, or an extra that does not exist, is an error, not silently skipped."""
    f = _floors_module()
    with pytest.raises(f.FloorError, match=message):
        f.floors(_pyproject(tmp_path, deps, {"test": []}), extras)


def test_floors_of_this_project_cover_every_requirement():
    """Every requirement of pyproject.toml (core and the extras CI installs) gets a floor in .ci/min-deps."""
    f = _floors_module()
    extras = (REPO / ".ci" / "extras").read_text().strip().split(",")
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    declared = {_norm(Requirement(r).name) for r in project["dependencies"]}
    for extra in extras:
        declared |= {_norm(Requirement(r).name) for r in project["optional-dependencies"][extra]}
    assert set(f.floors(REPO / "pyproject.toml", extras)) == declared


def test_floors_check_reports_versions_other_than_the_floor(tmp_path):
    f = _floors_module()
    constraints = tmp_path / "floors.txt"
    have = Version(md.version("pytest")).base_version
    constraints.write_text(f"pytest=={have}\n")
    assert f.check_installed(constraints) == []
    constraints.write_text("pytest==0.1\n_no-such-distribution==1\n")
    problems = f.check_installed(constraints)
    assert problems[0].startswith("pytest: floor 0.1, installed ")
    assert problems[1] == "_no-such-distribution: floor 1, not installed"


def _commands(script: Path) -> list[str]:
    """The shell lines of a CI script, comments and blank lines left out."""
    lines = (line.split(" #")[0].strip() for line in script.read_text().splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def test_ci_runs_the_readme_test_command_and_the_floors():
    """`.ci/run` runs the README's test command and then `.ci/min-deps`, which runs pytest at the floors;
    in both, pytest's exit code 5 (no tests collected) is a failure."""
    readme = (REPO / "README.md").read_text()
    assert ".venv/bin/python -m pytest -q" in readme
    run = _commands(REPO / ".ci" / "run")
    assert ".venv/bin/python -m pytest -q" in run and "bash .ci/min-deps" in run
    assert run.index("bash .ci/min-deps") > run.index(".venv/bin/python -m pytest -q")
    min_deps = _commands(REPO / ".ci" / "min-deps")
    assert any(line.startswith('"$V/bin/python" -m pytest -q') for line in min_deps)
    for lines in (run, min_deps):
        assert any('"$rc" -eq 5' in line for line in lines)
