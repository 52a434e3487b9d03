"""The small protocol every runtime implements: available(), compile(), runner().

A backend module lives in this folder, defines ``BACKEND`` and imports its optional runtime package
inside its functions, so that a missing package is a clear "not available" rather than an ImportError
at start-up. backends/__init__.py discovers the modules: adding a target is adding one file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Callable, Mapping, Protocol, Sequence, runtime_checkable

import numpy as np

from ..spec import Artifact, Drift, ExportedGraph, Precision, QuantRecipe


@dataclass(frozen=True)
class Availability:
    ok: bool
    reason: str = ""  # why not, and how to fix it: "pip install 'd2v-export[openvino]'"
    version: str = ""
    devices: tuple[str, ...] = ()


@dataclass(frozen=True)
class BuildRequest:
    """What the pipeline asks a backend to build."""

    precision: Precision = Precision.FP32
    quant: QuantRecipe | None = None  # the recipe for INT8, None for float precisions
    calibration: tuple[Mapping[str, np.ndarray], ...] = ()  # calibration feeds for static INT8
    threads: int = 1
    device: str = "CPU"
    defer_build: bool = False  # TensorRT: write the portable half only


@dataclass(frozen=True)
class Lever:
    """One INT8 candidate a backend offers ``--pick``: a recipe variation and whether the graph clean-up runs.

    ``None`` fields keep the run's own choice. ``suffix`` names the variant folder (``openvino-int8-static``
    + suffix); the default recipe of a mode has suffix "".
    """

    mode: str  # "static" | "dynamic"
    suffix: str = ""
    rewrite: bool | None = None  # graph clean-up (d2v_export.rewrite); None: the backend's default
    reduce_range: bool | None = None  # ONNX Runtime 7-bit weights; None: --reduce-range's choice
    symmetric_activations: bool | None = None  # OpenVINO: NNCF's PERFORMANCE preset (symmetric activations)
    description: str = ""


@dataclass(frozen=True)
class Recovery:
    """What the pipeline hands a backend whose INT8 artifact broke its drift budget (``--fallback auto``)."""

    evaluate: Callable[[Artifact], Drift]  # task-aware drift of a built artifact against the reference
    feeds: tuple[Mapping[str, np.ndarray], ...]  # the evaluation samples
    reference: tuple[Mapping[str, np.ndarray], ...]  # PyTorch fp32 outputs on them
    score: Callable[[Sequence[int], Sequence[Mapping[str, np.ndarray]]], float]  # primary metric on a subset, higher is better
    max_drop: float  # how far the score may fall below the reference's (which scores 1.0 against itself)
    calibration: tuple[Mapping[str, np.ndarray], ...] = ()  # calibration samples (also for dynamic mode)
    progress: Callable[[str], None] = lambda _msg: None


@runtime_checkable
class Recovers(Protocol):
    """A backend that can return the most sensitive parts of an INT8 model to float."""

    def recover(self, graph: ExportedGraph, folder: Path, request: "BuildRequest", recovery: Recovery) -> tuple[Artifact, Drift, tuple[str, ...]]: ...


@runtime_checkable
class Runner(Protocol):
    """Executes an artifact. Used as a context manager; ``infer`` is what the benchmark times."""

    name: str

    def __enter__(self) -> "Runner": ...

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None: ...

    def infer(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]: ...


@runtime_checkable
class Backend(Protocol):
    name: str  # the --target value
    extra: str  # the pip extra that provides the runtime ("" if a core dependency)
    precisions: tuple[Precision, ...]

    def available(self) -> Availability: ...

    def compile(self, graph: ExportedGraph, folder: Path, request: BuildRequest) -> Artifact: ...

    def runner(self, artifact: Artifact, *, threads: int) -> Runner: ...


class RunnerBase:
    """Context-manager plumbing shared by runners; subclasses implement ``infer`` and ``close``."""

    name = "runner"

    def __enter__(self) -> Any:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        pass
