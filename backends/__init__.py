"""Backend registry: one thin adapter module per framework, found by array type.

A backend is a module (or object) with a ``name``, a ``array_types()`` function
that returns the array types it handles (empty when its framework is not
imported), ``grad_stats(...)`` and ``devices()``. Built-ins are ``numpy``,
``torch``, ``jax`` and ``tensorflow``; third parties register through the
``cabs.backends`` entry-point group or :func:`register`.

Detection never imports a framework the user has not imported.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from importlib.metadata import entry_points
from types import ModuleType
from typing import Any

__all__ = ["available", "get_backend", "load", "register", "unregister", "BUILTIN"]

# name -> (module path, framework module whose presence makes it importable)
BUILTIN: dict[str, tuple[str, str]] = {
    "numpy": ("cabs.backends.numpy", "numpy"),
    "torch": ("cabs.backends.torch", "torch"),
    "jax": ("cabs.backends.jax", "jax"),
    "tensorflow": ("cabs.backends.tensorflow", "tensorflow"),
}

_registered: dict[str, Any] = {}
_type_cache: dict[type, Any] = {}


def register(name: str, backend: Any) -> None:
    """Register a backend object or module path under ``name`` (replaces one of that name)."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"`name` must be a non-empty string, got name={name!r}.")
    _registered[name] = backend
    _type_cache.clear()


def unregister(name: str) -> None:
    """Remove a backend added with :func:`register` (built-ins and entry points stay)."""
    if name not in _registered:
        raise KeyError(
            f"no backend {name!r} was registered with cabs.backends.register; registered: {sorted(_registered)}."
        )
    del _registered[name]
    _type_cache.clear()


def _entry_point_backends() -> dict[str, Any]:
    return {ep.name: ep for ep in entry_points(group="cabs.backends")}


def _names() -> list[str]:
    return list(dict.fromkeys([*BUILTIN, *_entry_point_backends(), *_registered]))


def load(name: str) -> Any:
    """Import and return the backend ``name`` (this imports its framework)."""
    if name in _registered:
        backend = _registered[name]
        return importlib.import_module(backend) if isinstance(backend, str) else backend
    if name in BUILTIN:
        module_path, framework = BUILTIN[name]
        if importlib.util.find_spec(framework) is None:
            raise ModuleNotFoundError(
                f"backend {name!r} needs the {framework!r} package, which is not installed. "
                f"Install it with: pip install 'cabs[{name}]'."
            )
        return importlib.import_module(module_path)
    eps = _entry_point_backends()
    if name in eps:
        return eps[name].load()
    raise ValueError(
        f"unknown backend {name!r}; known backends: {', '.join(_names())}. Register a third-party one with cabs.backends.register(name, module)."
    )


def available() -> list[str]:
    """Names of the backends whose framework is installed (imports nothing)."""
    names = []
    for name in _names():
        if name in BUILTIN and name not in _registered:
            if importlib.util.find_spec(BUILTIN[name][1]) is None:
                continue
        names.append(name)
    return names


def get_backend(array: Any) -> ModuleType | Any:
    """The backend that handles ``array``'s type; never imports a framework."""
    kind = type(array)
    if kind in _type_cache:
        return _type_cache[kind]
    for name in _names():
        if name in BUILTIN and name not in _registered and BUILTIN[name][1] not in sys.modules:
            continue
        try:
            backend = load(name)
        except (ImportError, ValueError):
            continue
        if isinstance(array, tuple(backend.array_types())):
            _type_cache[kind] = backend
            return backend
    raise TypeError(
        f"no cabs backend handles arrays of type {kind.__module__}.{kind.__qualname__}. "
        f"Installed backends: {', '.join(available())}. Import your framework before calling "
        f"cabs, or register an adapter with cabs.backends.register(name, module)."
    )
