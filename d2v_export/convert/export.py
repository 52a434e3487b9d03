"""Module -> ONNX. ``write_onnx`` exports and runs onnx.checker; the check against PyTorch at several
shapes is ``validate.check_export`` (the pipeline calls it next); ``export`` does both.

Exporter choice (measured, see docs/DESIGN.md): torch.onnx's dynamo exporter with eager attention
works for all 15 heads, including semantic segmentation with a dynamic batch, where the TorchScript
exporter fails. Every wrapper is put in eval mode (a wrapper left in train mode turns dropout on).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

from ..backends.torch_ref import make_wrapper, torch_forward
from ..console import quiet
from ..heads import Head, audio_mask_note, dummy_inputs, dynamic_axes, input_specs, trace_point
from ..int8.layouts import export_layouts
from ..models import LoadedModel
from ..spec import REFERENCE, D2VError, Drift, ExitCode, ExportedGraph, ShapeProfile, TensorSpec

__all__ = ["OPSET", "EXPORTER_LOGGERS", "NOT_CHECKED", "export", "make_wrapper", "torch_forward", "write_onnx"]

OPSET = 18
# The exporter prints progress and warnings meant for its own developers on these loggers (console.quiet).
EXPORTER_LOGGERS = ("torch.onnx", "torch._dynamo", "torch.export", "torch.fx", "onnxscript")

# fp32 weights over this size are exported as external data (``model.onnx.data`` beside ``model.onnx``;
# ONNX Runtime, OpenVINO and optimum load it as they are). Saved inline, the whole protobuf is built in
# memory and read back by onnx.checker: measured on vision base, 3.6x the weights resident at once during
# the export and 2x in the checker, against 1x with external data, which is written tensor by tensor.
# The base presets (0.35-0.5 GB) stay one file; the large ones (1.2-1.4 GB) need it to stay within 4x
# their weights (benchmarks/scale.py). Over 2 GB a protobuf cannot hold them at all.
EXTERNAL_DATA_BYTES = 1_000_000_000


# What ``write_onnx`` records before the graph is checked against PyTorch: a failed check, so an
# unchecked graph can never pass a gate by mistake.
NOT_CHECKED = Drift(
    REFERENCE, 0, {}, {}, passed=False, detail="not checked against PyTorch yet (validate.check_export)"
)


def export(
    model: LoadedModel,
    profile: ShapeProfile,
    path: Path,
    *,
    progress: Callable[[str], None] = lambda _msg: None,
    reference_outputs: dict[Any, Any] | None = None,
) -> ExportedGraph:
    """``write_onnx`` then ``validate.check_export``: the graph with its check against PyTorch in ONNX Runtime."""
    from .validate import check_export

    return check_export(
        model,
        write_onnx(model, profile, path, progress=progress),
        make_wrapper(model),
        progress=progress,
        reference_outputs=reference_outputs,
    )


def write_onnx(
    model: LoadedModel,
    profile: ShapeProfile,
    path: Path,
    *,
    progress: Callable[[str], None] = lambda _msg: None,
) -> ExportedGraph:
    """Export to ONNX at ``path`` and run onnx.checker; ``check`` is ``NOT_CHECKED`` until validate.check_export."""
    import onnx
    import torch

    head = model.head
    wrapper = make_wrapper(model)
    sizes = trace_point(profile)
    feeds = dummy_inputs(head, model.config, sizes, seed=1)
    # An axis whose min equals its max is static: the exporter bakes the size in (fastest for fixed-size edge use).
    dims = {d.name: torch.export.Dim(d.name, min=d.min, max=d.max) if d.min < d.max else None for d in profile.dims}
    dyn = {
        name: {
            i: dims[a] for i, a in enumerate(_spec(head, name).shape) if a in axes and a in dims and dims[a] is not None
        }
        for name, axes in dynamic_axes(head).items()
    }
    started = time.perf_counter()
    path.parent.mkdir(parents=True, exist_ok=True)
    progress(f"exporting {head.class_name} to ONNX (opset {OPSET}, dynamo)")
    note = audio_mask_note(model.config, model.processor) if head.modality.value == "audio" else None
    if note:
        progress(note)
    large = model.parameters * 4 > EXTERNAL_DATA_BYTES
    with (
        quiet(EXPORTER_LOGGERS, python_warnings=True),
        export_layouts(model.module) as layouts,
        batched_xvector_pooling(model.module),
    ):
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
    _forget_exported_graph()
    onnx.checker.check_model(str(path), full_check=True)
    export_seconds = time.perf_counter() - started
    outputs = _output_specs(path)
    return ExportedGraph(
        path=path,
        inputs=input_specs(head),
        outputs=outputs,
        profile=profile,
        opset=OPSET,
        exporter=f"torch.onnx dynamo (torch {torch.__version__})" + "".join(f"; {layout}" for layout in layouts),
        check=NOT_CHECKED,
        seconds=export_seconds,
    )


@contextlib.contextmanager
def batched_xvector_pooling(module: Any) -> Iterator[None]:
    """For the export only: the x-vector head's statistics pooling over each row's valid frames as masked sums.

    transformers pools a masked batch row by row in a Python loop (``hidden_states[i, :length]``), which the exporter
    unrolls for the traced batch size: the graph then refuses any other batch. The same mean and (unbiased) standard
    deviation over the same frames, as sums under a frame mask, export with a dynamic batch; the export check compares
    the graph with the original module, loop included.
    """
    if type(module).__name__ != "Data2VecAudioForXVector":
        yield
        return
    module.forward = _xvector_forward(module)
    try:
        yield
    finally:
        del module.forward


def _xvector_forward(module: Any) -> Callable[..., Any]:
    import torch
    from transformers.modeling_outputs import XVectorOutput

    def forward(input_values: Any, attention_mask: Any = None, **_kwargs: Any) -> Any:
        weighted = module.config.use_weighted_layer_sum
        outputs = module.data2vec_audio(input_values, attention_mask=attention_mask, output_hidden_states=weighted)
        if weighted:
            stacked = torch.stack(outputs.hidden_states, dim=1)
            hidden = (stacked * torch.nn.functional.softmax(module.layer_weights, dim=-1).view(-1, 1, 1)).sum(dim=1)
        else:
            hidden = outputs.last_hidden_state
        hidden = module.projector(hidden)
        for tdnn_layer in module.tdnn:
            hidden = tdnn_layer(hidden)
        if attention_mask is None:
            lengths = torch.full((hidden.shape[0],), hidden.shape[1], dtype=torch.long)
        else:
            lengths = module._get_tdnn_output_lengths(
                module._get_feat_extract_output_lengths(attention_mask.sum(dim=1))
            )
        valid = (torch.arange(hidden.shape[1])[None, :] < lengths[:, None]).unsqueeze(-1).to(hidden.dtype)
        count = lengths.to(hidden.dtype)[:, None]
        mean = (hidden * valid).sum(dim=1) / count
        std = torch.sqrt((((hidden - mean[:, None]) ** 2) * valid).sum(dim=1) / (count - 1))
        embeddings = module.feature_extractor(torch.cat([mean, std], dim=-1))
        return XVectorOutput(logits=module.classifier(embeddings), embeddings=embeddings)

    return forward


def _forget_exported_graph() -> None:
    """Drop what the exporter's optimizer keeps of the last graph it rewrote.

    onnxscript's rewrite rules are module-level objects whose pattern matchers keep the last graph they
    matched (``SimplePatternMatcher._graph``, onnxscript 0.7): the whole ONNX IR of the export, whose
    initializers wrap the PyTorch parameters themselves. So the exported graph outlived the export, and
    the parameters could never be freed while the process lived (the pipeline's offload of PyTorch's
    weights freed nothing at vision large). Reset to the state a new matcher starts in.
    """
    import gc

    try:
        from onnxscript.rewriter._matcher import SimplePatternMatcher
    except ImportError:  # another onnxscript layout: nothing known to drop
        return
    for obj in gc.get_objects():
        if isinstance(obj, SimplePatternMatcher):
            for name in ("_graph", "_match", "_tracer"):
                obj.__dict__.pop(name, None)
            obj._current_node = None


def _spec(head: Head, name: str) -> TensorSpec:
    return next(t for t in input_specs(head) if t.name == name)


def _output_specs(path: Path) -> tuple[TensorSpec, ...]:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    specs = []
    for out in model.graph.output:
        dtype = onnx.helper.tensor_dtype_to_np_dtype(out.type.tensor_type.elem_type).name
        shape = tuple(
            d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in out.type.tensor_type.shape.dim
        )
        specs.append(TensorSpec(out.name, dtype, shape))
    return tuple(specs)
