"""Module -> ONNX, then ONNX Runtime checked against PyTorch at several shapes.

Exporter choice (measured, see docs/DESIGN.md): torch.onnx's dynamo exporter with eager attention
works for all 15 heads, including semantic segmentation with a dynamic batch, where the TorchScript
exporter fails. Every wrapper is put in eval mode (a wrapper left in train mode turns dropout on).
"""

from __future__ import annotations

import contextlib
import io
import logging
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .heads import Head, dummy_inputs, dynamic_axes, input_specs, trace_point
from .layouts import export_layouts
from .models import LoadedModel
from .spec import D2VError, Drift, ExitCode, ExportedGraph, Modality, ShapeProfile, TensorSpec
from .validate import shape_check

OPSET = 18


def make_wrapper(model: LoadedModel) -> Any:
    """An eval-mode module with named inputs that returns the head's outputs as a tuple."""
    import torch

    head = model.head

    def pick(out: Any) -> tuple[Any, ...]:
        return tuple(getattr(out, name) for name in head.outputs)

    class VisionWrapper(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
            return pick(self.inner(pixel_values=pixel_values, return_dict=True))

    class TextWrapper(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
            return pick(self.inner(input_ids=input_ids, attention_mask=attention_mask, return_dict=True))

    class AudioWrapper(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, input_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
            return pick(self.inner(input_values=input_values, return_dict=True))

    cls = {Modality.VISION: VisionWrapper, Modality.TEXT: TextWrapper, Modality.AUDIO: AudioWrapper}[head.modality]
    return cls(model.module).eval()


def torch_forward(wrapper: Any, feeds: dict[str, np.ndarray], names: tuple[str, ...]) -> dict[str, np.ndarray]:
    import torch

    with torch.inference_mode():
        out = wrapper(**{k: torch.from_numpy(v) for k, v in feeds.items()})
    return {name: t.detach().float().numpy() for name, t in zip(names, out)}


def export(
    model: LoadedModel,
    profile: ShapeProfile,
    path: Path,
    *,
    progress: Callable[[str], None] = lambda _msg: None,
) -> ExportedGraph:
    """Export to ONNX at ``path``, check it with onnx.checker and against PyTorch in ONNX Runtime."""
    import onnx
    import torch

    head = model.head
    wrapper = make_wrapper(model)
    sizes = trace_point(profile)
    feeds = dummy_inputs(head, model.config, sizes, seed=1)
    # An axis whose min equals its max is static: the exporter bakes the size in (fastest for fixed-size edge use).
    dims = {d.name: torch.export.Dim(d.name, min=d.min, max=d.max) if d.min < d.max else None for d in profile.dims}
    dyn = {
        name: {i: dims[a] for i, a in enumerate(_spec(head, name).shape) if a in axes and a in dims and dims[a] is not None}
        for name, axes in dynamic_axes(head).items()
    }
    started = time.perf_counter()
    path.parent.mkdir(parents=True, exist_ok=True)
    progress(f"exporting {head.class_name} to ONNX (opset {OPSET}, dynamo)")
    large = model.parameters * 4 > 1_800_000_000
    with _quiet(), export_layouts(model.module) as layouts:
        try:
            torch.onnx.export(
                wrapper,
                args=(),
                kwargs={k: torch.from_numpy(v) for k, v in feeds.items()},
                f=str(path),
                input_names=[t.name for t in input_specs(head)],
                output_names=list(head.outputs),
                dynamic_shapes=dyn,
                opset_version=OPSET,
                dynamo=True,
                optimize=True,
                external_data=large,
                verbose=False,
            )
        except Exception as exc:  # the exporter raises many types; one line is what the user needs
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
            raise D2VError(f"ONNX export of {head.class_name} failed: {first[:300]}", ExitCode.EXPORT_MISMATCH) from exc
    onnx.checker.check_model(str(path), full_check=True)
    export_seconds = time.perf_counter() - started
    outputs = _output_specs(path)
    drift = check_against_torch(model, wrapper, path, profile, progress=progress)
    return ExportedGraph(
        path=path,
        inputs=input_specs(head),
        outputs=outputs,
        profile=profile,
        opset=OPSET,
        exporter=f"torch.onnx dynamo (torch {torch.__version__})" + "".join(f"; {layout}" for layout in layouts),
        check=drift,
        seconds=export_seconds,
    )


def check_against_torch(
    model: LoadedModel,
    wrapper: Any,
    path: Path,
    profile: ShapeProfile,
    *,
    progress: Callable[[str], None] = lambda _msg: None,
) -> Drift:
    """ONNX Runtime against PyTorch at every shape point of the profile."""
    from .backends.onnxruntime import OrtRunner

    with OrtRunner(path, threads=0, name="onnxruntime-check") as runner:
        return shape_check(model, wrapper, runner.infer, profile, progress=progress)


def _spec(head: Head, name: str) -> TensorSpec:
    return next(t for t in input_specs(head) if t.name == name)


def _output_specs(path: Path) -> tuple[TensorSpec, ...]:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    specs = []
    for out in model.graph.output:
        dtype = onnx.helper.tensor_dtype_to_np_dtype(out.type.tensor_type.elem_type).name
        shape = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in out.type.tensor_type.shape.dim)
        specs.append(TensorSpec(out.name, dtype, shape))
    return tuple(specs)


@contextlib.contextmanager
def _quiet() -> Any:
    """The exporter prints progress and warnings meant for its own developers; keep the console clean."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch._dynamo", "torch.export", "torch.fx", "onnxscript")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)
