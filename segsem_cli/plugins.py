"""Plugin discovery: one pluggy manager, entry points of group ``segsem``.

* Every plugin, built-in or third-party, is an entry point of group ``segsem``.
* ``SEGSEM_BLOCK_PLUGINS="name1,name2"`` blocks plugins by entry-point name
  (or by distribution name, which blocks all its entry points).
* A plugin that fails to import gives one warning naming it; the CLI goes on.
* Two plugins registering the same backbone, fallback or exporter name is an
  error naming both (block one of them to resolve it).
"""
from __future__ import annotations

import os
import sys
import warnings
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

import pluggy

from . import hookspecs
from .errors import SegsemError

GROUP = "segsem"
BLOCK_ENV = "SEGSEM_BLOCK_PLUGINS"
KINDS = ("backbone", "fallback", "exporter")


class PluginWarning(UserWarning):
    """A plugin could not be loaded; segsem goes on without it."""


@dataclass(frozen=True)
class Provider:
    """Who provides a registered object: entry point, distribution and version."""

    plugin: str
    dist: str
    version: str

    def __str__(self) -> str:
        return f"{self.plugin} ({self.dist} {self.version})"


@dataclass
class Registry:
    """Registered objects by kind and name, with the provider of each."""

    objects: dict[str, dict[str, Any]] = field(default_factory=lambda: {k: {} for k in KINDS})
    providers: dict[str, dict[str, Provider]] = field(default_factory=lambda: {k: {} for k in KINDS})
    failed: dict[str, str] = field(default_factory=dict)

    def add(self, kind: str, obj: Any, provider: Provider) -> None:
        name = getattr(obj, "name", None)
        if not isinstance(name, str) or not name:
            raise SegsemError(f"plugin {provider}: registered {kind} {obj!r} has no 'name' string")
        if name in self.objects[kind]:
            other = self.providers[kind][name]
            raise SegsemError(
                f"{kind} '{name}' is registered twice: by {other} and by {provider}; "
                f"block one with {BLOCK_ENV}={provider.plugin}"
            )
        self.objects[kind][name] = obj
        self.providers[kind][name] = provider

    def get(self, kind: str, name: str) -> Any:
        try:
            return self.objects[kind][name]
        except KeyError:
            known = ", ".join(sorted(self.objects[kind])) or "none"
            raise SegsemError(f"unknown {kind} '{name}' (available: {known})") from None

    def names(self, kind: str) -> list[str]:
        return sorted(self.objects[kind])


def blocked_names() -> set[str]:
    return {s.strip() for s in os.environ.get(BLOCK_ENV, "").split(",") if s.strip()}


def make_manager() -> tuple[pluggy.PluginManager, dict[str, Provider]]:
    """Build the plugin manager and load every unblocked ``segsem`` entry point."""
    pm = pluggy.PluginManager(GROUP)
    pm.add_hookspecs(hookspecs)
    providers: dict[str, Provider] = {}
    blocked = blocked_names()
    seen: set[tuple[str, str]] = set()
    for ep in sorted(metadata.entry_points(group=GROUP), key=lambda e: e.name):
        dist = ep.dist.name if ep.dist is not None else "?"
        version = ep.dist.version if ep.dist is not None else "?"
        if (ep.name, ep.value) in seen:  # the same distribution seen twice on sys.path
            continue
        seen.add((ep.name, ep.value))
        if ep.name in blocked or dist in blocked:
            continue
        try:
            plugin = ep.load()
        except Exception as exc:  # noqa: BLE001 - any import failure of a plugin
            msg = f"{type(exc).__name__}: {exc}".splitlines()[0]
            warnings.warn(f"segsem plugin '{ep.name}' ({dist} {version}) failed to load: {msg}", PluginWarning, stacklevel=2)
            continue
        if pm.is_registered(plugin):
            continue
        pm.register(plugin, name=ep.name)
        providers[ep.name] = Provider(ep.name, dist, version)
    return pm, providers


def build_registry(pm: pluggy.PluginManager, providers: dict[str, Provider]) -> Registry:
    """Call the register hooks of each plugin separately so every object knows its provider."""
    reg = Registry()
    for kind in KINDS:
        hook = getattr(pm.hook, f"register_{kind}s")
        for impl in hook.get_hookimpls():
            provider = providers.get(impl.plugin_name) or Provider(impl.plugin_name, "?", "?")
            try:
                impl.function(register=lambda obj, _k=kind, _p=provider: reg.add(_k, obj, _p))
            except SegsemError:
                raise
            except Exception as exc:  # noqa: BLE001
                reg.failed[impl.plugin_name] = str(exc)
                warnings.warn(f"segsem plugin '{impl.plugin_name}' failed in register_{kind}s: {exc}", PluginWarning, stacklevel=2)
    return reg


_CACHE: tuple[pluggy.PluginManager, Registry] | None = None


def get_registry(refresh: bool = False) -> Registry:
    """The process-wide registry (built on first use)."""
    global _CACHE
    if _CACHE is None or refresh:
        pm, providers = make_manager()
        _CACHE = (pm, build_registry(pm, providers))
    return _CACHE[1]


def get_manager() -> pluggy.PluginManager:
    get_registry()
    assert _CACHE is not None
    return _CACHE[0]


def get_fallback(name: str):
    return get_registry().get("fallback", name)


def get_backbone(name: str):
    return get_registry().get("backbone", name)


def get_exporter(name: str):
    return get_registry().get("exporter", name)


def _warn_to_stderr(message, category, filename, lineno, file=None, line=None):
    if issubclass(category, PluginWarning):
        print(f"warning: {message}", file=sys.stderr)
    else:
        _orig_showwarning(message, category, filename, lineno, file, line)


_orig_showwarning = warnings.showwarning
warnings.showwarning = _warn_to_stderr
