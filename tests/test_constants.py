"""One place for every environment variable: constants.py, read at call time, documented in docs/."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

from p2pz_directions.core import constants
from p2pz_directions.core.constants import ConfigError

REPO = Path(__file__).resolve().parent.parent
SOURCES = ["p2pz_directions", "plugins", "registry", "space"]
#: reads of a P2PZ_ variable outside constants.py that are not settings: (file, why)
NOT_SETTINGS = {"p2pz_directions/editing/demo.py": "saves P2PZ_HOME to restore it after the demo"}


def _files():
    return sorted(p for d in SOURCES for p in (REPO / d).rglob("*.py"))


def _env_reads(path: Path) -> list[str]:
    """``os.environ.get("P2PZ_X")``, ``os.getenv("P2PZ_X")`` and ``os.environ["P2PZ_X"]`` (loaded)."""
    out = []
    for node in ast.walk(ast.parse(path.read_text("utf-8"))):
        key = None
        if isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            f = ast.unparse(node.func)
            if f in ("os.environ.get", "os.getenv", "environ.get", "getenv"):
                key = node.args[0].value
        elif isinstance(node, ast.Subscript) and isinstance(node.ctx, ast.Load):
            if ast.unparse(node.value) in ("os.environ", "environ") and isinstance(node.slice, ast.Constant):
                key = node.slice.value
        if isinstance(key, str) and key.startswith("P2PZ_"):
            out.append(f"{path.relative_to(REPO)}:{node.lineno}: reads {key}")
    return out


def test_only_constants_reads_p2pz_variables():
    problems = []
    for f in _files():
        rel = str(f.relative_to(REPO))
        if rel == "p2pz_directions/core/constants.py" or rel in NOT_SETTINGS:
            continue
        problems += _env_reads(f)
    assert not problems, "read these through p2pz_directions.core.constants:\n" + "\n".join(problems)


def test_the_check_finds_a_stray_read(tmp_path):
    probe = REPO / "tests" / "_probe_env_read.py"
    probe.write_text('import os\nx = os.environ.get("P2PZ_NEW", "1")\ny = os.environ["P2PZ_OTHER"]\n')
    try:
        found = _env_reads(probe)
    finally:
        probe.unlink()
    assert [s.split(": ")[1] for s in found] == ["reads P2PZ_NEW", "reads P2PZ_OTHER"]


def test_every_variable_named_in_the_code_is_defined_and_documented():
    named = set()
    for f in _files():
        named |= set(re.findall(r"\bP2PZ_[A-Z0-9_]+\b", f.read_text("utf-8")))
    defined = {v.name for v in constants.VARIABLES}
    assert named <= defined, f"not in constants.VARIABLES: {sorted(named - defined)}"
    doc = (REPO / "docs" / "configuration.md").read_text("utf-8")
    rows = {}
    for line in doc.splitlines():
        m = re.match(r"\| `(P2PZ_[A-Z0-9_]+)` \| (.*?) \| (.*) \|$", line)
        if m:
            rows[m.group(1)] = m.group(2).replace("`", "")
    assert set(rows) == defined, "docs/configuration.md and constants.VARIABLES differ"
    for v in constants.VARIABLES:
        assert rows[v.name] == v.default, f"{v.name}: docs say {rows[v.name]!r}, code {v.default!r}"
    assert "docs/configuration.md" in (REPO / "README.md").read_text("utf-8")


def test_values_are_read_at_call_time_with_their_defaults(monkeypatch, tmp_path):
    for name in ("P2PZ_LOCK_TIMEOUT", "P2PZ_MAX_DOWNLOAD_BYTES", "P2PZ_DEBUG", "P2PZ_DISABLE_PLUGINS"):
        monkeypatch.delenv(name, raising=False)
    assert constants.lock_timeout_s() == 120.0
    assert constants.max_download_bytes() == 64 * 1024 * 1024
    assert constants.debug() is False and constants.disabled_plugins() == set()
    monkeypatch.setenv("P2PZ_LOCK_TIMEOUT", "2.5")
    monkeypatch.setenv("P2PZ_DEBUG", "Yes")
    monkeypatch.setenv("P2PZ_DISABLE_PLUGINS", " sdedit, ,diffedit ")
    monkeypatch.setenv("P2PZ_HOME", str(tmp_path / "reg"))
    assert constants.lock_timeout_s() == 2.5 and constants.debug() is True
    assert constants.disabled_plugins() == {"sdedit", "diffedit"}
    assert constants.home() == tmp_path / "reg"
    monkeypatch.delenv("P2PZ_HOME")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert constants.home() == tmp_path / "xdg" / "p2pz"


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("P2PZ_LOCK_TIMEOUT", "soon", r"P2PZ_LOCK_TIMEOUT='soon' is not a number; unset it \(default 120\)"),
        ("P2PZ_MAX_DOWNLOAD_BYTES", "1.5", "is not an integer"),
        ("P2PZ_PULL_DEADLINE", "-1", "must be above 0"),
        ("P2PZ_SEMANTIC_SUGGEST", "maybe", "neither 1/true/yes/on nor 0/false/no/off"),
    ],
)
def test_a_bad_value_names_the_variable(monkeypatch, name, value, message):
    monkeypatch.setenv(name, value)
    fn = {
        "P2PZ_LOCK_TIMEOUT": constants.lock_timeout_s,
        "P2PZ_MAX_DOWNLOAD_BYTES": constants.max_download_bytes,
        "P2PZ_PULL_DEADLINE": constants.pull_deadline_s,
        "P2PZ_SEMANTIC_SUGGEST": constants.semantic_suggest,
    }[name]
    with pytest.raises(ConfigError, match=message):
        fn()


def test_offline_is_huggingface_hubs_constant(monkeypatch):
    from huggingface_hub import constants as hf

    monkeypatch.setattr(hf, "HF_HUB_OFFLINE", False)
    assert constants.hf_offline() is False
    monkeypatch.setattr(hf, "HF_HUB_OFFLINE", True)
    assert constants.hf_offline() is True


def test_constants_imports_nothing_heavy():
    code = (
        "import sys, p2pz_directions.core.constants as c; c.home(); c.debug(); "
        "heavy = [m for m in ('torch', 'huggingface_hub', 'numpy', 'diffusers', 'transformers') if m in sys.modules]; "
        "print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_the_debug_switch_never_fails(monkeypatch):
    for value, want in [("", False), ("0", False), ("off", False), ("1", True), ("maybe", True)]:
        monkeypatch.setenv("P2PZ_DEBUG", value)
        assert constants.debug() is want, value


def test_a_bad_setting_is_one_cli_error_line(monkeypatch, tmp_path):
    from p2pz_directions.core.errors import P2PZError

    assert issubclass(ConfigError, P2PZError)  # the CLI prints P2PZError as `error: ...`, exit 1
    monkeypatch.setenv("P2PZ_LOCK_TIMEOUT", "soon")
    from p2pz_directions.core.store import LocalStore

    with pytest.raises(ConfigError, match="P2PZ_LOCK_TIMEOUT"):
        with LocalStore(tmp_path / "reg").lock():
            pass
