"""Backends by target name: the registry, and the questions every caller asks of it.

Targets come from three places, in this order (a later one never replaces an earlier name):

1. every module or package in this folder (but base and torch_ref) that defines ``BACKEND``;
2. the entry-point group ``d2v_export.backends`` of installed distributions: ``NAME = "module"`` or
   ``NAME = "module:ATTRIBUTE"`` (a module's ``BACKEND`` by default);
3. ``D2V_BACKENDS``: module names, comma-separated, importable from ``sys.path`` (``PYTHONPATH``).

A plug-in that does not import, has no backend, or reuses a taken name is not a target; ``broken()``
says why (``doctor`` lists it), and asking for it by name gives that reason.

``reference()`` is the runtime d2v-export's own checks run plain ONNX graphs with on the CPU, whatever the
targets of a run are (the export check, the graph clean-up's check, the fusion check, the profiler): a
backend that is also a ``ReferenceRuntime``.
"""

from __future__ import annotations

import importlib
import os
import pkgutil
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from ..spec import D2VError, ExitCode, Precision
from .base import (
    Availability,
    Backend,
    BackendBase,
    BuildRequest,
    Devices,
    Opened,
    PlanContext,
    Planned,
    Runner,
    RunnerKey,
    Snippet,
    TargetOption,
    files_in,
    require_available,
    unavailable,
)

__all__ = [
    "DEFAULT",
    "ENTRY_POINTS",
    "ENV",
    "REFERENCE",
    "Availability",
    "Backend",
    "BackendBase",
    "BuildRequest",
    "Devices",
    "Opened",
    "PlanContext",
    "Planned",
    "ReferenceRuntime",
    "Runner",
    "RunnerKey",
    "Snippet",
    "TargetOption",
    "broken",
    "building",
    "files_in",
    "get",
    "int8_options",
    "names",
    "packages",
    "reference",
    "require",
    "unavailable",
]

DEFAULT = "onnxruntime"  # the --target when none is given: a core dependency, runs everywhere
ENTRY_POINTS = "d2v_export.backends"
ENV = "D2V_BACKENDS"
REFERENCE = DEFAULT  # the runtime of the tool's own checks (reference()): a core dependency, runs plain ONNX on CPU
_NOT_TARGETS = {"base", "torch_ref", "bundle_run"}


@runtime_checkable
class ReferenceRuntime(Backend, Protocol):
    """A backend that also runs any ONNX graph (a file or its bytes) as it is, on the CPU, for the tool's own checks."""

    display_name: str

    def onnx_runner(
        self, model: Path | bytes, *, threads: int, name: str = "reference", optimize: bool = True
    ) -> Runner:
        """A runner of ``model`` (``optimize=False``: no graph optimisations, a faithful float run of every node)."""
        ...

    def session_options(self, threads: int, *, optimize: bool = True) -> Any:
        """The runtime's session settings ``onnx_runner`` uses, to add to (e.g. profiling)."""
        ...

    def open_session(self, model: Path | bytes, options: Any) -> Any:
        """The runtime's own session of ``model`` on the CPU with ``options`` (for what a runner does not expose)."""
        ...

    def onnx_runner_key(self, model: Path, *, optimize: bool = True) -> RunnerKey:
        """The ``RunnerKey`` of ``onnx_runner(model, optimize=optimize)``: a target whose ``check_key`` equals it may reuse
        that runner's check of the file (the export check) instead of opening the file again."""
        ...


@lru_cache(maxsize=None)
def _load() -> tuple[dict[str, Backend], dict[str, str]]:
    found: dict[str, Backend] = {}
    failed: dict[str, str] = {}
    for info in pkgutil.iter_modules(__path__):
        if info.name in _NOT_TARGETS or info.name.startswith("_"):
            continue
        backend = getattr(importlib.import_module(f"{__name__}.{info.name}"), "BACKEND", None)
        if backend is not None:
            found[backend.name] = backend
    plugins = [(ep.name, ep.value) for ep in metadata.entry_points(group=ENTRY_POINTS)]
    plugins += [(name, name) for name in (n.strip() for n in os.environ.get(ENV, "").split(",")) if name]
    for label, where in plugins:
        try:
            backend = _plugin(where)
        except Exception as exc:  # noqa: BLE001 - a broken plug-in must not stop the tool; doctor shows why
            failed[label] = (
                f"plug-in '{where}' does not load ({exc.__class__.__name__}: {' '.join(str(exc).split())[:200]})"
            )
            continue
        if backend.name in found:
            if found[backend.name] is not backend:
                failed[label] = f"plug-in '{where}' names its target '{backend.name}', which is taken; rename it"
            continue
        found[backend.name] = backend
    return dict(sorted(found.items())), failed


def _plugin(where: str) -> Backend:
    module_name, _, attribute = where.partition(":")
    backend: Any = getattr(importlib.import_module(module_name.strip()), attribute.strip() or "BACKEND", None)
    if backend is None or not isinstance(getattr(backend, "name", None), str):
        raise TypeError(f"{where} defines no BACKEND with a name")
    return backend  # type: ignore[no-any-return]


def names() -> tuple[str, ...]:
    return tuple(_load()[0])


def broken() -> dict[str, str]:
    """Plug-ins that are not targets, and why (label -> reason)."""
    return dict(_load()[1])


def get(name: str) -> Backend:
    found, failed = _load()
    if name in found:
        return found[name]
    if name in failed:
        raise D2VError(f"target '{name}' is not usable: {failed[name]}", ExitCode.TARGET_UNAVAILABLE)
    raise D2VError(f"unknown target '{name}'; choose one of: {', '.join(names())}")


def reference() -> ReferenceRuntime:
    """The backend of ``REFERENCE``, which runs plain ONNX graphs on the CPU for the export check and the other checks."""
    backend = get(REFERENCE)
    if not isinstance(backend, ReferenceRuntime):
        raise D2VError(f"target '{REFERENCE}' cannot run plain ONNX graphs for the checks", ExitCode.TARGET_UNAVAILABLE)
    return backend


def require(name: str, *, defer_build: bool = False) -> Backend:
    """The backend of ``name`` if it can serve a run here, else D2VError(TARGET_UNAVAILABLE) saying why."""
    backend = get(name)
    require_available(backend, defer_build=defer_build)
    return backend


def building(precision: Precision) -> tuple[str, ...]:
    """The targets that build ``precision``."""
    return tuple(name for name, backend in _load()[0].items() if precision in backend.precisions)


def packages() -> tuple[str, ...]:
    """Every target's runtime distributions, once each, in target order (what the report and doctor record)."""
    return tuple(dict.fromkeys(p for backend in _load()[0].values() for p in backend.packages))


def int8_options() -> dict[str, TargetOption]:
    """Every target's own INT8 settings (``Backend.int8_options``) by name; the first target to declare a name owns it."""
    found: dict[str, TargetOption] = {}
    for backend in _load()[0].values():
        for option in getattr(backend, "int8_options", ()):
            found.setdefault(option.name, option)
    return found
