"""Backends by target name. Each module here (but base and torch_ref) defines ``BACKEND``."""

from __future__ import annotations

import importlib
import pkgutil
from functools import lru_cache

from ..spec import D2VError
from .base import Availability, Backend, BuildRequest, Runner

__all__ = ["Availability", "Backend", "BuildRequest", "Runner", "get", "names"]

_NOT_TARGETS = {"base", "torch_ref"}


@lru_cache(maxsize=None)
def _registry() -> dict[str, Backend]:
    found: dict[str, Backend] = {}
    for info in pkgutil.iter_modules(__path__):
        if info.name in _NOT_TARGETS or info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        backend = getattr(module, "BACKEND", None)
        if backend is not None:
            found[backend.name] = backend
    return dict(sorted(found.items()))


def names() -> tuple[str, ...]:
    return tuple(_registry())


def get(name: str) -> Backend:
    try:
        return _registry()[name]
    except KeyError:
        raise D2VError(f"unknown target '{name}'; choose one of: {', '.join(names())}") from None
