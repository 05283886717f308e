"""The plugin host: entry points, failures kept local, in-process plugins."""

from __future__ import annotations

import textwrap

import pytest

import p2pz_directions
from p2pz_directions import editors
from p2pz_directions.editing import plugins
from p2pz_directions.editing.editors import Editor, EditResult
from p2pz_directions.editing.hookspecs import ENTRY_POINT_GROUP, hookimpl


@pytest.fixture(autouse=True)
def fresh_host():
    plugins.reset()
    yield
    plugins.reset()


def _fake_distribution(root, name: str, entry_points: dict[str, str], modules: dict[str, str]) -> None:
    """A dist-info folder plus modules on ``root`` (prepended to sys.path by the caller)."""
    info = root / f"{name}-0.3.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.3\n", "utf-8")
    lines = [f"[{ENTRY_POINT_GROUP}]"] + [f"{k} = {v}" for k, v in entry_points.items()]
    (info / "entry_points.txt").write_text("\n".join(lines) + "\n", "utf-8")
    for mod, src in modules.items():
        (root / f"{mod}.py").write_text(textwrap.dedent(src), "utf-8")


GOOD = """
from p2pz_directions.editing.editors import Editor, EditResult
from p2pz_directions.editing.hookspecs import hookimpl

class Echo(Editor):
    name = "echo"
    description = "returns the input"
    def run(self, image, direction, *, seed=0):
        return EditResult(image=image, original=image)

@hookimpl
def p2pz_register_editors():
    return [Echo]
"""

RAISING = """
from p2pz_directions.editing.hookspecs import hookimpl

@hookimpl
def p2pz_register_editors():
    raise RuntimeError("boom in hook")
"""


def test_builtin_editors_come_through_the_entry_point_group():
    report = {p.name: p for p in plugins.plugin_report()}
    p = report["pix2pix-zero"]
    assert p.ok, p.error
    assert p.editors == ["pix2pix-zero"]
    assert p.image_captioners == ["blip"]
    assert p.module == "p2pz_plugins.pix2pix_zero"
    assert p.distribution == "p2pz-directions"
    assert p.version == p2pz_directions.__version__
    assert "pix2pix-zero" in editors.available()


def test_broken_plugin_is_reported_and_others_keep_working(tmp_path, monkeypatch):
    _fake_distribution(
        tmp_path,
        "fake_p2pz_plugins",
        {
            "zz-broken": "zz_missing_module_xyz",
            "zz-echo": "zz_echo_plugin",
            "zz-raising": "zz_raising_plugin",
        },
        {"zz_echo_plugin": GOOD, "zz_raising_plugin": RAISING},
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    report = {p.name: p for p in plugins.plugin_report()}
    broken = report["zz-broken"]
    assert not broken.ok
    assert "ModuleNotFoundError" in broken.error and "zz_missing_module_xyz" in broken.error
    assert broken.version == "0.3" and broken.distribution == "fake_p2pz_plugins"
    assert "Traceback" in broken.detail
    raising = report["zz-raising"]
    assert raising.load_error is None and "boom in hook" in raising.error
    assert report["zz-echo"].ok and report["zz-echo"].editors == ["echo"]
    assert report["pix2pix-zero"].ok
    assert {"echo", "pix2pix-zero"} <= set(editors.available())
    # an unknown editor names the installed ones and the plugins that failed
    with pytest.raises(LookupError) as ei:
        editors.get("ech0", model="x")
    msg = str(ei.value)
    assert "installed editors" in msg and "echo" in msg and "zz-broken" in msg
    assert "Did you mean 'echo'" in msg


def test_disable_plugins_by_name(monkeypatch):
    monkeypatch.setenv("P2PZ_DISABLE_PLUGINS", "pix2pix-zero")
    report = {p.name: p for p in plugins.plugin_report()}
    assert report["pix2pix-zero"].error == "disabled by P2PZ_DISABLE_PLUGINS"
    assert "pix2pix-zero" not in editors.available()


class _Twin(Editor):
    name = "pix2pix-zero"  # clashes with the built-in

    def run(self, image, direction):
        return EditResult(image=image)


class _Mine:
    @hookimpl
    def p2pz_register_editors(self):
        return [_Twin, object()]


def test_name_clash_and_nameless_items_are_reported():
    plugins.register(_Mine(), name="mine")
    report = {p.name: p for p in plugins.plugin_report()}
    errs = report["mine"].hook_errors
    assert any("already provided by another plugin" in e for e in errs)
    assert any("no `name` attribute" in e for e in errs)
    # the built-in keeps its name
    assert plugins.editors()["pix2pix-zero"].__module__ == "p2pz_plugins.pix2pix_zero"


def test_register_and_unregister_in_process_plugin(tiny_sd1):
    class Flip(Editor):
        name = "flip-test"

        def run(self, image, direction, *, seed: int = 0):
            return EditResult(image=image.transpose(0), original=image)

    class P:
        @hookimpl
        def p2pz_register_editors(self):
            return [Flip]

    plugins.register(P(), name="flipper")
    assert "flip-test" in editors.available()
    ed = editors.get("flip-test", model=str(tiny_sd1), device="cpu")
    assert isinstance(ed, Flip) and ed.dtype.is_floating_point
    plugins.unregister("flipper")
    assert "flip-test" not in editors.available()


def test_factories_may_be_plain_callables(tiny_sd1):
    class Inner(Editor):
        name = "inner"

        def run(self, image, direction):
            return EditResult(image=image)

    def factory(**kw):
        return Inner(**kw)

    factory.name = "made-by-factory"

    class P:
        @hookimpl
        def p2pz_register_editors(self):
            return [factory]

    plugins.register(P(), name="factory-plugin")
    ed = editors.get("made-by-factory", model=str(tiny_sd1), device="cpu")
    assert isinstance(ed, Inner)
