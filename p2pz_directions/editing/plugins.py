"""The plugin host: one pluggy `PluginManager` loading the entry-point group.

Every plugin, the built-in editors included, is announced in the entry-point group
``p2pz_directions.editing.editors`` and loaded the same way. Each entry point is loaded on its own: one
that fails to import (a missing dependency, a syntax error) is recorded by name with the reason,
and the others keep working. The same holds for a hook that raises.

>>> from p2pz_directions import plugins
>>> sorted(plugins.editors())                       # doctest: +SKIP
['diffedit', 'pix2pix-zero', 'sdedit']
>>> for p in plugins.plugin_report(): print(p.name, p.version, p.error)   # doctest: +SKIP

Environment: ``P2PZ_DISABLE_PLUGINS=name1,name2`` blocks the named entry points.
"""

from __future__ import annotations

import importlib.metadata
import threading
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import pluggy

from p2pz_directions.core import constants
from p2pz_directions.editing import hookspecs
from p2pz_directions.editing.hookspecs import ENTRY_POINT_GROUP, PROJECT

__all__ = [
    "PluginInfo",
    "get_plugin_manager",
    "plugin_report",
    "editors",
    "image_captioners",
    "captioners",
    "encoders",
    "scorers",
    "register",
    "unregister",
    "reset",
]


@dataclass
class PluginInfo:
    """One plugin as ``p2pz plugins`` shows it."""

    name: str
    module: str
    distribution: str | None = None
    version: str | None = None
    editors: list[str] = field(default_factory=list)
    image_captioners: list[str] = field(default_factory=list)
    captioners: list[str] = field(default_factory=list)
    encoders: list[str] = field(default_factory=list)
    scorers: list[str] = field(default_factory=list)
    load_error: str | None = None  # why it failed to load
    hook_errors: list[str] = field(default_factory=list)  # why one of its hooks failed
    detail: str | None = None  # the traceback, for --verbose

    @property
    def error(self) -> str | None:
        """Everything that went wrong with this plugin, or None."""
        errs = ([self.load_error] if self.load_error else []) + self.hook_errors
        return "; ".join(errs) if errs else None

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "module": self.module,
            "distribution": self.distribution,
            "version": self.version,
            "editors": self.editors,
            "image_captioners": self.image_captioners,
            "captioners": self.captioners,
            "encoders": self.encoders,
            "scorers": self.scorers,
            "ok": self.ok,
            "error": self.error,
        }


class _Host:
    """The manager plus what we learned while loading (failures, versions, registries)."""

    def __init__(self) -> None:
        self.pm = pluggy.PluginManager(PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self.infos: dict[str, PluginInfo] = {}
        self._registries: dict[str, dict[str, Any]] | None = None

    # -- loading --------------------------------------------------------------------------------
    def load_entrypoints(self, group: str = ENTRY_POINT_GROUP) -> None:
        blocked = constants.disabled_plugins()
        seen: set[str] = set()
        for dist in importlib.metadata.distributions():
            for ep in dist.entry_points:
                if ep.group != group or ep.name in seen:
                    continue
                seen.add(ep.name)
                dist_name = dist.metadata["Name"] if dist.metadata else None
                info = PluginInfo(ep.name, ep.value, dist_name, dist.version)
                self.infos[ep.name] = info
                if ep.name in blocked:
                    self.pm.set_blocked(ep.name)
                    info.load_error = "disabled by P2PZ_DISABLE_PLUGINS"
                    continue
                try:
                    # pluggy's own loader, one entry point at a time so one failure stays local
                    self.pm.load_setuptools_entrypoints(group, name=ep.name)
                except Exception as e:  # noqa: BLE001 - any import failure is reported, not raised
                    info.load_error = f"failed to load: {type(e).__name__}: {e}"
                    info.detail = traceback.format_exc()
                    if self.pm.has_plugin(ep.name):
                        self.pm.unregister(name=ep.name)

    def register(self, plugin: Any, name: str | None = None) -> str:
        name = self.pm.register(plugin, name=name) or name or str(id(plugin))
        mod = getattr(plugin, "__name__", type(plugin).__name__)
        self.infos[name] = PluginInfo(name, mod)
        self._registries = None
        return name

    def unregister(self, name: str) -> None:
        if self.pm.has_plugin(name):
            self.pm.unregister(name=name)
        self.infos.pop(name, None)
        self._registries = None

    # -- registries -----------------------------------------------------------------------------
    def registries(self) -> dict[str, dict[str, Any]]:
        if self._registries is None:
            for info in self.infos.values():
                info.editors, info.image_captioners, info.captioners, info.encoders = [], [], [], []
                info.scorers = []
                info.hook_errors = []
            self._registries = {
                kind: self._collect(kind)
                for kind in ("editors", "image_captioners", "captioners", "encoders", "scorers")
            }
        return self._registries

    def _collect(self, kind: str) -> dict[str, Any]:
        caller = getattr(self.pm.hook, f"p2pz_register_{kind}")
        out: dict[str, Any] = {}
        for impl in caller.get_hookimpls():
            pname = self.pm.get_name(impl.plugin) or impl.plugin_name
            info = self.infos.setdefault(pname, PluginInfo(pname, getattr(impl.plugin, "__name__", "?")))
            try:
                items = impl.function() or []
                items = list(items) if isinstance(items, Iterable) else [items]
            except Exception as e:  # noqa: BLE001 - a broken hook must not take the others down
                info.hook_errors.append(f"p2pz_register_{kind} failed: {type(e).__name__}: {e}")
                info.detail = traceback.format_exc()
                continue
            for item in items:
                iname = getattr(item, "name", None)
                if not isinstance(iname, str) or not iname:
                    info.hook_errors.append(
                        f"p2pz_register_{kind} returned {item!r}, which has no `name` attribute"
                    )
                    continue
                if iname in out:  # first come (built-ins load first by name order) wins; say so
                    info.hook_errors.append(
                        f"{kind[:-1]} name {iname!r} is already provided by another plugin"
                    )
                    continue
                out[iname] = item
                getattr(info, kind).append(iname)
        return dict(sorted(out.items()))


_lock = threading.Lock()
_host: _Host | None = None


def _get_host() -> _Host:
    global _host
    with _lock:
        if _host is None:
            host = _Host()
            host.load_entrypoints()
            _host = host
        return _host


def get_plugin_manager() -> pluggy.PluginManager:
    """The process-wide `pluggy.PluginManager`, with every entry point of the group loaded."""
    return _get_host().pm


def reset() -> None:
    """Forget every loaded plugin; the next call loads the entry points again (for tests)."""
    global _host
    with _lock:
        _host = None


def register(plugin: Any, name: str | None = None) -> str:
    """Register an in-process plugin (a module or object with hook implementations).

    >>> class Mine:
    ...     @hookimpl
    ...     def p2pz_register_editors(self):
    ...         return [MyEditor]                 # doctest: +SKIP
    >>> plugins.register(Mine(), name="mine")     # doctest: +SKIP
    """
    return _get_host().register(plugin, name)


def unregister(name: str) -> None:
    """Remove a plugin registered under ``name``."""
    _get_host().unregister(name)


def editors() -> dict[str, Callable[..., Any]]:
    """``{name: Editor class or factory}`` over every loaded plugin."""
    return dict(_get_host().registries()["editors"])


def image_captioners() -> dict[str, Callable[..., Any]]:
    """``{name: captioner class or factory}`` (image -> text)."""
    return dict(_get_host().registries()["image_captioners"])


def captioners() -> dict[str, Callable[..., Any]]:
    """``{name: caption generator class or factory}`` (concept -> captions)."""
    return dict(_get_host().registries()["captioners"])


def encoders() -> dict[str, Callable[..., Any]]:
    """``{name: text encoder class or factory}``."""
    return dict(_get_host().registries()["encoders"])


def scorers() -> dict[str, Callable[..., Any]]:
    """``{name: scorer class or factory}`` (see `p2pz_directions.eval.scorers`)."""
    return dict(_get_host().registries()["scorers"])


def plugin_report() -> list[PluginInfo]:
    """Every discovered plugin, with its version, what it provides, and why it failed if it did."""
    host = _get_host()
    host.registries()
    return sorted(host.infos.values(), key=lambda p: p.name)
