"""OpenVINO target: the fp32 ONNX converted to OpenVINO IR (`openvino_model.xml` + `.bin`), optionally
quantized or weight-compressed by NNCF, run by an OpenVINO device plugin (CPU by default).

    folder/openvino_model.xml    the IR graph (the name optimum-intel's OVModelFor* classes load)
    folder/openvino_model.bin    its weights
    folder/openvino_config.json  how to load it: device, INFERENCE_PRECISION_HINT, threads, output names

Precisions (see docs/openvino.md):

- fp32: f32 IR, run with INFERENCE_PRECISION_HINT=f32. Without the hint OpenVINO runs "fp32" models in
  bf16 on a CPU with AMX/AVX512-BF16, which is not an fp32 reference.
- bf16: f32 IR, run with the hint bf16; only where the device lists BF16 in OPTIMIZATION_CAPABILITIES.
- fp16: IR weights stored in f16 (half the file). GPUs run it in f16; a CPU without native f16 decompresses
  the weights and runs at its own default precision (said in the artifact's notes).
- int8: static (``QuantRecipe.mode == "static"``): ``nncf.quantize`` with model_type=TRANSFORMER on the
  calibration feeds (FakeQuantize nodes in the IR), the PERFORMANCE preset (symmetric activations) for
  vision and audio and MIXED for text (``recipe_choices``). SmoothQuant runs before it, in place
  (``_openvino_smooth``: NNCF's own step would copy the model; same method and alpha). Dynamic: ``nncf.compress_weights``,
  INT8 weight-only compression; activations stay float (said in the notes, since it is not ORT's dynamic
  quantization). The float parts run with INFERENCE_PRECISION_HINT=f32 under the MIXED preset (text: the CPU default is
  bf16 on AMX Xeons, whose rounding alone broke the trained text example's budget) and with the device default under the
  PERFORMANCE preset (vision, audio: f32 cost 23 % on AMX); the notes record which.

``quantize_with_accuracy_control`` wraps ``nncf.quantize_with_accuracy_control`` for a later
``--fallback auto``: it returns the quantized model and the operations NNCF reverted to float.

openvino and nncf are imported inside functions: without them the target is "not available", not a crash.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..spec import Artifact, D2VError, Drift, ExitCode, ExportedGraph, Precision, QuantRecipe
from ..int8.quantize import MATMUL_OPS, RecipeTemplate
from ..int8.recipe_choice import Choice
from .base import (
    Availability,
    Backend,
    BackendBase,
    BuildRequest,
    Devices,
    Lever,
    Recovery,
    RunnerBase,
    ServingLayout,
    Snippet,
    files_in,
    require_available,
)
from ._openvino_smooth import ALPHA as SMOOTH_ALPHA, smooth

MODEL_FILE = "openvino_model.xml"  # optimum-intel's OV_XML_FILE_NAME
WEIGHTS_FILE = "openvino_model.bin"
CONFIG_FILE = "openvino_config.json"
CONFIG_VERSION = 1
INSTALL = "pip install 'd2v-export[openvino]'"

# The INFERENCE_PRECISION_HINT each float precision runs with; None leaves the device's default.
_HINT = {Precision.FP32: "f32", Precision.BF16: "bf16", Precision.FP16: "f16"}


# --------------------------------------------------------------------------------------- runner


class OVRunner(RunnerBase):
    """One compiled model and one infer request, reused: latency-oriented, one stream."""

    def __init__(self, xml: Path, threads: int, name: str = "openvino") -> None:
        import openvino as ov

        settings = read_config(xml.parent)
        device, config = compile_config(settings, threads)
        self.name = name
        self.device = device
        self.config = config
        core = ov.Core()
        self.compiled = core.compile_model(str(xml), device, config)
        self.request = self.compiled.create_infer_request()
        self._inputs = [(port.get_any_name(), port.get_element_type().to_dtype()) for port in self.compiled.inputs]
        self._outputs = _output_map(self.compiled.outputs, settings.get("outputs") or ())

    def infer(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        missing = [name for name, _dtype in self._inputs if name not in feed]
        if missing:
            raise D2VError(
                f"the feed lacks input(s) {', '.join(missing)} of this model; it has {', '.join(feed) or 'none'}"
            )
        inputs = {name: np.ascontiguousarray(feed[name], dtype=dtype) for name, dtype in self._inputs}
        # share_outputs: no copy inside OpenVINO; the request reuses those buffers, so copy once here.
        result = self.request.infer(inputs, share_inputs=True, share_outputs=True)
        return {name: np.array(result[index], copy=True) for name, index in self._outputs}

    def close(self) -> None:
        self.request = None
        self.compiled = None


def _output_map(ports: Sequence[Any], onnx_names: Sequence[str]) -> list[tuple[str, int]]:
    """(ONNX output name, output index) in the ONNX order; the IR's outputs keep the ONNX tensor names."""
    pairs: list[tuple[str, int]] = []
    left = list(range(len(ports)))
    for name in onnx_names:
        index = next((i for i in left if name in ports[i].get_names()), None)
        if index is not None:
            pairs.append((name, index))
            left.remove(index)
    pairs.extend((ports[i].get_any_name(), i) for i in left)
    return pairs


def compile_config(settings: Mapping[str, Any], threads: int) -> tuple[str, dict[str, Any]]:
    """(device, compile_model config) for the settings ``compile`` wrote: what the runner measures with,
    and what the bundle README tells a user to pass (fp32 needs INFERENCE_PRECISION_HINT=f32)."""
    device = str(settings.get("device") or "CPU")
    config: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1}
    if device.startswith("CPU") and threads > 0:
        config["INFERENCE_NUM_THREADS"] = int(threads)
    hint = settings.get("inference_precision_hint")
    if hint:
        config["INFERENCE_PRECISION_HINT"] = str(hint)
    return device, config


def read_config(folder: Path) -> dict[str, Any]:
    """The load settings written by ``compile`` (empty when the folder has none: OpenVINO defaults)."""
    path = folder / CONFIG_FILE
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise D2VError(f"'{path}' is not valid JSON ({exc}); rebuild the openvino artifact") from None
    return data if isinstance(data, dict) else {}


# --------------------------------------------------------------------------------------- backend


# Measured on the trained example models (docs/quantization.md, "Default recipe per modality").
HEAD_STAYS_FLOAT = Choice(
    ("input", "head"),
    "NNCF: the task head (last GEMM before the outputs) stays float; measured on the trained audio example it carried "
    "~90 % of the INT8 output error (1 - logit cosine 1.4e-3 -> 1.5e-4, top-1 agreement 0.975 -> 0.994), "
    "no change on vision and text; one small GEMM",
)
# Vision and audio also take symmetric int8 activations (NNCF's PERFORMANCE preset): 1.02-1.11x faster than MIXED's
# asymmetric ones on this session's peers.py run (audio 1 s 29.3 -> 26.4 ms, 2-core EPYC with AVX-512 VNNI) with the
# trained examples' accuracy kept (vision n=300: no answer changed; audio n=160: +1.25 points, like MIXED). Text stays
# MIXED: symmetric activations cost it 2 of 240 answers (0.83 points, over the 0.5 budget; MIXED 0.42), the one-sided
# GELU outputs losing half their range (TensorRT text's ffn_out rule is the same mechanism).
HEAD_STAYS_FLOAT_SYMMETRIC = Choice(
    HEAD_STAYS_FLOAT.float_rules,
    HEAD_STAYS_FLOAT.why
    + "; symmetric int8 activations (NNCF PERFORMANCE preset): 1.02-1.11x faster than MIXED, the trained "
    "example's accuracy kept (text keeps MIXED: it lost 2 of 240 answers with symmetric activations)",
    symmetric_activations=True,
)


# What --pick tries besides fp32 (each judged on the evaluation split, then timed interleaved).
PICK_LEVERS = (
    Lever("static", description="NNCF TRANSFORMER, the modality's preset (recipe_choice), SmoothQuant, graph clean-up"),
    Lever("static", "-raw", rewrites=(), description="NNCF TRANSFORMER, the modality's preset, the export as it is"),
    # the preset the modality's default does not use (a duplicate of the default is dropped)
    Lever(
        "static",
        "-sym",
        preset="performance",
        description="NNCF TRANSFORMER, PERFORMANCE preset (symmetric activations)",
    ),
    Lever("static", "-asym", preset="mixed", description="NNCF TRANSFORMER, MIXED preset (asymmetric activations)"),
    Lever("dynamic", description="NNCF INT8 weight-only compression"),
)


def _resolve_device(backend: OpenVinoBackend, device: str, *, defer_build: bool = False) -> str:
    """``device`` upper-cased, once ``devices`` takes it (exit 2) and this machine has it (exit 6)."""
    if not backend.devices.accepts(device.strip()):
        raise backend.devices.refuse(backend.name, device)
    require_available(backend)
    import openvino as ov

    return _check_device(ov.Core(), device)


def _precision_problem(backend: OpenVinoBackend, precision: Precision, device: str) -> str | None:
    """The declared precisions, and bf16 only where ``device`` lists BF16 in its OPTIMIZATION_CAPABILITIES."""
    problem = BackendBase.precision_problem(backend, precision, device)
    if problem is not None or precision is not Precision.BF16 or not backend.available().ok:
        return problem
    import openvino as ov

    return _bf16_problem(ov.Core(), device.strip().upper())


class OpenVinoBackend(BackendBase):
    name = "openvino"
    display_name = "OpenVINO"  # how messages and docs write it
    extra = "openvino"
    install_hint = INSTALL
    packages = ("openvino", "nncf")
    precisions = (Precision.FP32, Precision.BF16, Precision.FP16, Precision.INT8)
    # OpenVINO never runs quantize_onnx: NNCF quantizes; these templates say what it does, for the report.
    int8_recipes = {
        "static": RecipeTemplate(
            "NNCF transformer preset: int8 activations and per-channel weights on MatMul/Gemm/Conv",
            "static",
            MATMUL_OPS,
            tool="nncf",
        ),
        "dynamic": RecipeTemplate(
            "NNCF weight compression: int8 weights only", "dynamic", ("MatMul", "Gemm"), tool="nncf"
        ),
    }
    # layers its INT8 keeps float by rule, and the activation encoding, per modality (recipe_choice)
    recipe_choices = {"*": HEAD_STAYS_FLOAT, "vision": HEAD_STAYS_FLOAT_SYMMETRIC, "audio": HEAD_STAYS_FLOAT_SYMMETRIC}
    devices = Devices("CPU", r"(CPU|GPU|NPU|AUTO)(\.\d+)?", "CPU, GPU, GPU.1, NPU or AUTO")
    standalone_runner = True  # bundle_run.py runs its bundles with openvino + numpy (backends/bundle_run.py)
    # Triton's OpenVINO backend reads 1/model.xml + model.bin; OpenVINO Model Server the IR as it is
    serving = ServingLayout(("backend", "openvino"), (("{name}", "model.xml"), ("{stem}.bin", "model.bin")), ovms=True)
    # Exact graph clean-up before convert_model (d2v_export.int8.rewrite), on by default: measured on the base
    # presets' NNCF INT8 IRs, 1.04x (text) and 1.12x (audio: no transposes around the channel LayerNorms),
    # vision unchanged; docs/PERFORMANCE.md.
    rewrites = ("fold_constants", "fold_layer_scale", "fold_query_scale", "channel_layernorm")
    pick_levers = PICK_LEVERS
    # 'CPU', 'GPU.1', 'AUTO' ...: one openvino.Core().available_devices has (exit 6 when not)
    resolve_device = _resolve_device
    precision_problem = _precision_problem  # the declared precisions; bf16 only where the device lists BF16

    def available(self) -> Availability:
        try:
            import openvino as ov
        except ModuleNotFoundError as exc:
            if (exc.name or "").split(".")[0] == "openvino":
                return Availability(False, INSTALL)
            return Availability(False, f"openvino does not import ({exc}); {INSTALL}")
        except ImportError as exc:
            return Availability(False, f"openvino does not import ({' '.join(str(exc).split())}); {INSTALL}")
        try:
            devices = tuple(ov.Core().available_devices)
        except RuntimeError as exc:
            return Availability(False, f"OpenVINO finds no device ({' '.join(str(exc).split())[:200]})", ov.__version__)
        return Availability(True, version=ov.__version__, devices=devices)

    def compile(
        self, graph: ExportedGraph, folder: Path, request: BuildRequest, *, control: Recovery | None = None
    ) -> Artifact:
        """Build the IR; with ``control`` (from ``recover``), static INT8 runs NNCF's accuracy control."""
        require_available(self)
        return _build(self, graph, folder, request, control)

    def recover(
        self, graph: ExportedGraph, folder: Path, request: BuildRequest, recovery: Recovery
    ) -> tuple[Artifact, Drift, tuple[str, ...]]:
        """Static INT8 again, through nncf.quantize_with_accuracy_control driven by the task's primary metric."""
        if request.quant is None or request.quant.mode != "static":
            raise D2VError(
                "openvino fallback applies to static INT8 (weight-only compression has nothing to revert); use --quant static",
                ExitCode.BAD_INPUT,
            )
        artifact = self.compile(graph, folder, request, control=recovery)
        drift = recovery.evaluate(artifact)
        return artifact, drift, ()

    def runner(self, artifact: Artifact, *, threads: int) -> OVRunner:
        return OVRunner(artifact.model_file, threads, name=f"{self.name}-{artifact.precision.value}")

    def readme_snippet(self, bundle: str, model_file: str, folder: Path | None) -> Snippet:
        """Compiled the way d2v-export measured it (openvino_config.json: device, precision hint, threads)."""
        device, config = "CPU", dict[str, Any]()
        if folder is not None:
            settings = read_config(folder)
            device, config = compile_config(settings, int(settings.get("threads") or 0))
        comment = "  # as d2v-export measured it (openvino_config.json)"
        if config.get("INFERENCE_PRECISION_HINT") == "f32":
            comment = "  # as measured; without the f32 hint OpenVINO may run fp32 in bf16"
        return Snippet(
            (
                "import openvino as ov",
                "",
                f"config = {json.dumps(dict(config))}{comment}",
                f'compiled = ov.Core().compile_model("{bundle}/{model_file}", "{device}", config)',
                "outputs = compiled(feed)",
            )
        )

    def diagnose(self) -> dict[str, Any]:
        """Every OpenVINO device with its full name, capabilities and default precision."""
        return _diagnose()

    def diagnosis_lines(self, details: Mapping[str, Any]) -> list[str]:
        return _diagnosis_lines(details)


def _diagnose() -> dict[str, Any]:
    try:
        import openvino as ov
    except Exception as exc:  # noqa: BLE001 - doctor reports every failure
        return {"available": False, "reason": f"openvino does not import ({_one_line(exc)}); {INSTALL}", "devices": []}
    try:
        core = ov.Core()
        names = list(core.available_devices)
    except Exception as exc:  # noqa: BLE001
        return {"available": False, "reason": f"OpenVINO finds no device ({_one_line(exc)})", "devices": []}
    devices = []
    for name in names:
        row: dict[str, Any] = {"name": name}
        for key, prop in (
            ("full_name", "FULL_DEVICE_NAME"),
            ("capabilities", "OPTIMIZATION_CAPABILITIES"),
            ("precision_hint", "INFERENCE_PRECISION_HINT"),
        ):
            try:
                value = core.get_property(name, prop)
                row[key] = (
                    [str(v) for v in value]
                    if isinstance(value, (list, tuple))
                    else str(getattr(value, "type_name", None) or value)
                )
            except Exception:  # noqa: BLE001 - not every device has every property
                row[key] = None
        devices.append(row)
    return {"available": True, "version": ov.__version__, "devices": devices}


def _diagnosis_lines(details: Mapping[str, Any]) -> list[str]:
    if not details.get("available"):
        return []
    lines = ["", "OpenVINO devices:"]
    for dev in details.get("devices") or ():
        caps = ", ".join(dev.get("capabilities") or []) or "unknown"
        lines.append(
            f"  {dev['name']}: {dev.get('full_name') or '?'}; capabilities {caps}; default precision {dev.get('precision_hint') or '?'}"
        )
    return lines


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{exc.__class__.__name__}: {text[:200]}" if text else exc.__class__.__name__


# --------------------------------------------------------------------------------------- building


def _checked(core: Any, request: BuildRequest, precisions: Sequence[Precision]) -> tuple[str, tuple[str, ...]]:
    """(device, its OPTIMIZATION_CAPABILITIES) once the request is one this device can build."""
    device = _check_device(core, request.device)
    precision = request.precision
    if precision not in precisions:
        raise D2VError(
            f"openvino builds {', '.join(p.value for p in precisions)}, not {precision.value}; choose one of them",
            ExitCode.TARGET_UNAVAILABLE,
        )
    if precision is Precision.INT8 and (request.quant is None or request.quant.mode not in ("static", "dynamic")):
        raise D2VError("openvino int8 needs a quantization mode, static or dynamic; pass --quant static or dynamic")
    if (
        precision is Precision.INT8
        and request.quant is not None
        and request.quant.mode == "static"
        and not request.calibration
    ):
        raise D2VError(
            "static int8 for openvino needs calibration samples and got none; pass --calibration DATA, "
            "leave it out to use the bundled samples, or use --quant dynamic"
        )
    if precision is Precision.INT8:
        _require_nncf()
    caps = _capabilities(core, device)
    problem = _bf16_problem(core, device) if precision is Precision.BF16 else None
    if problem is not None:
        raise D2VError(
            f"{problem}; use --precision fp32, or a CPU with AVX512-BF16 or AMX", ExitCode.TARGET_UNAVAILABLE
        )
    return device, caps


def _bf16_problem(core: Any, device: str) -> str | None:
    """Why ``device`` cannot run bf16 (no BF16 in its OPTIMIZATION_CAPABILITIES), or None."""
    caps = _capabilities(core, device)
    return (
        None
        if "BF16" in caps
        else f"{device} has no native bf16 (OPTIMIZATION_CAPABILITIES: {', '.join(caps) or 'unknown'})"
    )


def _build(
    backend: OpenVinoBackend, graph: ExportedGraph, folder: Path, request: BuildRequest, control: Recovery | None
) -> Artifact:
    import openvino as ov

    core = ov.Core()
    device, caps = _checked(core, request, backend.precisions)
    precision = request.precision
    hint = _HINT.get(precision)
    notes = [
        f"converted from ONNX with openvino.convert_model (OpenVINO {ov.__version__.split('-')[0]}); device {device}"
    ]
    if precision is Precision.FP16 and "FP16" not in caps:
        hint = None  # the plugin rejects an f16 hint it cannot run; it decompresses f16 weights instead
        default = _default_hint(core, device) or "precision"
        notes.append(f"fp16 IR: {device} has no native f16, it runs the model in its default {default}")
    folder.mkdir(parents=True, exist_ok=True)
    # INT8: weights owned by the model, not mapped from the ONNX file, so the ones SmoothQuant replaces are
    # freed instead of staying resident in the mapping through NNCF (large sizes; docs/PERFORMANCE.md)
    model = ov.convert_model(str(graph.path), share_weights=precision is not Precision.INT8)
    quant = request.quant
    if precision is Precision.INT8:
        model, quant, hint = _int8(model, graph, request, control, notes, _default_hint(core, device), device)
    elif hint:
        notes.append(f"runtime precision hint: INFERENCE_PRECISION_HINT={hint}")
    if precision is Precision.FP32 and device.startswith("CPU") and "BF16" in caps:
        notes.append("without the f32 hint OpenVINO would run this model in bf16 on this CPU")
    threads = f"{request.threads} threads" if request.threads > 0 else "all cores"
    notes.append(f"runner: PERFORMANCE_HINT=LATENCY, 1 stream, {threads} (openvino_config.json)")
    compress = precision is Precision.FP16
    notes.append(f"IR weights stored as {'f16' if compress else 'f32'}" + (" (int8 where quantized)" if quant else ""))
    xml = folder / MODEL_FILE
    ov.save_model(model, str(xml), compress_to_fp16=compress)
    _write_config(folder, graph, precision, device, hint, request.threads)
    return Artifact(backend.name, precision, folder, xml, files_in(folder), quantization=quant, notes=tuple(notes))


def _int8(
    model: Any,
    graph: ExportedGraph,
    request: BuildRequest,
    control: Recovery | None,
    notes: list[str],
    default: str,
    device: str,
) -> tuple[Any, QuantRecipe, str | None]:
    """NNCF on the converted model: (quantized model, the recipe as applied, the precision hint to run it with)."""
    quant = request.quant
    assert quant is not None
    if quant.mode == "static" and control is not None:
        from ..int8.recipe_choice import float_nodes

        keep = float_nodes(graph.path, quant.float_rules, quant.op_types)
        ruled = _ov_names(model, keep, _onnx_outputs(graph.path, keep))  # as without control
        model, reverted = quantize_with_accuracy_control(
            model,
            request.calibration,
            control.feeds,
            control.score,
            control.max_drop,
            max_iterations=8,
            ignored=ruled,
            symmetric_activations=quant.symmetric_activations,
        )
        quant = dataclasses.replace(
            quant, excluded_nodes=(*ruled, *reverted), tool="nncf quantize_with_accuracy_control"
        )
        more = [
            f"NNCF accuracy control: {len(reverted)} operation(s) reverted to float"
            + (f": {', '.join(reverted[:12])}" if reverted else "")
        ]
    elif quant.mode == "static":
        from ..int8.recipe_choice import float_nodes

        keep = float_nodes(graph.path, quant.float_rules, quant.op_types)
        model, quant, more = _quantize_static(model, quant, request.calibration, keep, _onnx_outputs(graph.path, keep))
    else:
        model, quant, more = _compress_weights(model, quant)
    notes.extend(more)
    # The parts left in float: the device default is bf16 on Xeons with AMX. Measured there (docs/quantization.md): on
    # the trained text example bf16 changed 10 of 240 answers (top-1 0.958, logit cosine 0.963, over budget), f32 2,
    # for 3 % of latency; on vision base f32 costs 23 % (its float attention MatMuls run on AMX in bf16), and the trained
    # vision and audio examples hold in bf16. So the accuracy-first recipe (MIXED activations: text) and accuracy
    # control's reverted operations run in f32; the PERFORMANCE preset (vision, audio) keeps the device's default.
    hint = _HINT.get(Precision.FP32) if control is not None or not quant.symmetric_activations else None
    if hint is None:
        where = f"{default} on {device}" if default else f"whatever {device} picks"
        notes.append(f"runtime precision hint: none set, the device default ({where}) for the parts left in float")
    else:
        why = (
            "what accuracy control reverted to float"
            if control is not None
            else "the parts left in float (MIXED preset: accuracy first)"
        )
        notes.append(
            f"runtime precision hint: INFERENCE_PRECISION_HINT={hint} for {why}"
            + (f"; this device's default is {default}" if default and default != hint else "")
        )
    return model, quant, hint


def _write_config(
    folder: Path, graph: ExportedGraph, precision: Precision, device: str, hint: str | None, threads: int
) -> None:
    settings = {
        "format": CONFIG_VERSION,
        "precision": precision.value,
        "device": device,
        "inference_precision_hint": hint,
        "performance_hint": "LATENCY",
        "num_streams": 1,
        "threads": int(threads),
        "inputs": [t.name for t in graph.inputs],
        "outputs": [t.name for t in graph.outputs],
    }
    (folder / CONFIG_FILE).write_text(json.dumps(settings, indent=2) + "\n", encoding="utf-8")


# --------------------------------------------------------------------------------------- helpers


def _check_device(core: Any, wanted: str) -> str:
    """'CPU', 'GPU', 'GPU.1' or 'AUTO' (a virtual device: OpenVINO picks among the real ones)."""
    device = (wanted or "CPU").strip().upper()
    found = tuple(core.available_devices)
    if device == "AUTO" and found:
        return device
    if any(d == device or d.startswith(device + ".") for d in found):
        return device
    raise D2VError(
        f"OpenVINO device '{wanted}' is not available here (found: {', '.join(found) or 'none'}); use --device openvino=CPU",
        ExitCode.TARGET_UNAVAILABLE,
    )


def _require_nncf() -> None:
    try:
        import nncf  # noqa: F401
    except ImportError as exc:
        raise D2VError(
            f"int8 for openvino needs NNCF, which does not import ({' '.join(str(exc).split())}); {INSTALL}",
            ExitCode.TARGET_UNAVAILABLE,
        ) from None


def _capabilities(core: Any, device: str) -> tuple[str, ...]:
    try:
        return tuple(str(c) for c in core.get_property(device, "OPTIMIZATION_CAPABILITIES"))
    except RuntimeError:  # AUTO has none of its own
        return ()


def _default_hint(core: Any, device: str) -> str:
    try:
        value = core.get_property(device, "INFERENCE_PRECISION_HINT")
    except RuntimeError:  # AUTO: no precision of its own
        return ""
    return str(getattr(value, "type_name", None) or value)


def _quantize_static(
    model: Any,
    quant: QuantRecipe,
    calibration: Sequence[Mapping[str, np.ndarray]],
    keep_float: Sequence[str] = (),
    outputs: Mapping[str, Sequence[str]] | None = None,
) -> tuple[Any, QuantRecipe, list[str]]:
    """``keep_float``: ONNX node names the recipe's float rules keep float (``recipe_choice.float_nodes``)."""
    import nncf

    feeds = list(calibration)
    present = _ov_names(model, keep_float, outputs)
    smoothed = smooth(model, feeds)  # in place, one weight at a time (NNCF's copies the model)
    with _nncf_quiet():
        quantized = nncf.quantize(
            model,
            nncf.Dataset(feeds),
            model_type=nncf.ModelType.TRANSFORMER,
            # MIXED: NNCF's own choice for transformers; PERFORMANCE (symmetric activations): the vision and
            # audio default (recipe_choices), a --pick candidate for text
            preset=nncf.QuantizationPreset.PERFORMANCE
            if quant.symmetric_activations
            else nncf.QuantizationPreset.MIXED,
            subset_size=len(feeds),
            ignored_scope=nncf.IgnoredScope(names=present) if present else None,
            advanced_parameters=_without_smoothquant(),
        )
    recipe = dataclasses.replace(
        quant,
        method="minmax",
        samples=len(feeds),
        per_channel=True,
        tool=f"nncf {nncf.__version__}",
        excluded_nodes=tuple(dict.fromkeys([*quant.excluded_nodes, *present])),
    )
    notes = [
        (
            f"NNCF {nncf.__version__} quantize: model_type=TRANSFORMER (attention kept accurate), "
            + (
                "preset=PERFORMANCE (symmetric per-channel weights, symmetric activations)"
                if quant.symmetric_activations
                else "preset=MIXED (symmetric per-channel weights, asymmetric activations)"
            )
            + f", {len(feeds)} calibration samples"
        ),
        f"SmoothQuant (alpha {SMOOTH_ALPHA}) on {smoothed} MatMuls by d2v-export, in place before NNCF (its own step off)",
    ]
    if present:
        notes.append(f"kept float by rule ({', '.join(quant.float_rules)}): {', '.join(present)}")
    return quantized, recipe, notes


def _without_smoothquant() -> Any:
    """NNCF's parameters with its SmoothQuant step off: ``_openvino_smooth.smooth`` ran it already."""
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, AdvancedSmoothQuantParameters

    return AdvancedQuantizationParameters(smooth_quant_alphas=AdvancedSmoothQuantParameters(convolution=-1, matmul=-1))


def _ov_names(model: Any, onnx_names: Sequence[str], outputs: Mapping[str, Sequence[str]] | None = None) -> list[str]:
    """The OpenVINO operations converted from these ONNX nodes (a Conv or Gemm with bias becomes "<name>/WithoutBiases";
    one that writes a graph output, itself or through its bias Add, is named after that output: ``outputs`` maps
    node name -> those tensor names, from ``_onnx_outputs``)."""
    ops = {op.get_friendly_name() for op in model.get_ops()}
    found = []
    for n in onnx_names:
        named = [candidate for candidate in (n, f"{n}/WithoutBiases") if candidate in ops]
        found += named or [o for o in (outputs or {}).get(n, ()) if o in ops][:1]
    return found


def _onnx_outputs(onnx_path: Path, names: Sequence[str]) -> dict[str, list[str]]:
    """Node name -> its output tensor and the outputs of Add nodes reading it (a MatMul's bias)."""
    import onnx

    nodes = onnx.load(str(onnx_path), load_external_data=False).graph.node
    wanted = set(names)
    out: dict[str, list[str]] = {n.name: [n.output[0]] for n in nodes if n.name in wanted and n.output}
    for reader in nodes:
        if reader.op_type == "Add":
            for tensors in out.values():
                if tensors[0] in reader.input:
                    tensors.append(reader.output[0])
    return out


def _compress_weights(model: Any, quant: QuantRecipe) -> tuple[Any, QuantRecipe, list[str]]:
    import nncf

    with _nncf_quiet():
        compressed = nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT8_ASYM)
    recipe = dataclasses.replace(
        quant,
        method="weight-only",
        samples=0,
        per_channel=True,
        symmetric_activations=False,
        tool=f"nncf {nncf.__version__} compress_weights",
    )
    notes = [
        "INT8 weight-only compression (activations stay float)",
        "NNCF compress_weights mode=INT8_ASYM: per-channel u8 weights, dequantized on the fly",
    ]
    return compressed, recipe, notes


def _nncf_quiet() -> contextlib.AbstractContextManager[None]:
    """NNCF prints progress bars and INFO lines meant for its own users; keep the console clean."""
    from ..console import quiet

    return quiet(("nncf",), logging.WARNING)


# --------------------------------------------------------------------------------------- accuracy control


MetricFn = Callable[[Sequence[int], Sequence[dict[str, np.ndarray]]], float]


def quantize_with_accuracy_control(
    ov_model: Any,
    calibration: Sequence[Mapping[str, np.ndarray]],
    validation_feeds: Sequence[Mapping[str, np.ndarray]],
    metric_fn: MetricFn,
    max_drop: float,
    *,
    max_iterations: int | None = None,
    ignored: Sequence[str] = (),
    symmetric_activations: bool = False,
) -> tuple[Any, tuple[str, ...]]:
    """Static INT8 with NNCF's accuracy control: quantize, then revert the most harmful layers to float
    until ``metric(int8) >= metric(fp32) - max_drop`` (absolute drop) or nothing is left to revert.

    ``metric_fn(indices, outputs)`` scores the model's outputs on ``validation_feeds[i] for i in indices``
    (same order; each output dict is keyed by the OpenVINO/ONNX output name); higher is better. A usual
    one is top-1 agreement with reference outputs the caller computed once. NNCF calls it on the whole
    set and on single items (to rank layers), with the models compiled at f32 precision.

    ``ignored``: OpenVINO operation names left float from the start (the recipe's float rules).
    ``symmetric_activations``: NNCF's PERFORMANCE preset instead of MIXED (the recipe's activation encoding).

    Returns the (maybe partly reverted) quantized ``ov.Model`` and the names of the operations reverted
    to float. NNCF does not return its report: the names come from its INFO log record
    ("... were reverted back to the floating-point precision:"), empty when none were reverted.
    """
    import nncf
    from nncf.quantization.advanced_parameters import AdvancedAccuracyRestorerParameters

    calib = list(calibration)
    feeds = [dict(f) for f in validation_feeds]
    if not calib or not feeds:
        raise D2VError("accuracy-controlled int8 needs calibration and validation samples; pass both")

    def validation_fn(compiled: Any, items: Any) -> float:
        indices = [int(i) for i in items]
        names = _output_map(compiled.outputs, ())
        request = compiled.create_infer_request()
        outs = []
        for i in indices:
            result = request.infer(feeds[i])
            outs.append({name: np.array(result[index], copy=True) for name, index in names})
        return float(metric_fn(indices, outs))

    params = AdvancedAccuracyRestorerParameters()
    if max_iterations is not None:
        params.max_num_iterations = max_iterations
    smooth(ov_model, calib)  # as _quantize_static does
    with _capture_reverted() as reverted:
        quantized = nncf.quantize_with_accuracy_control(
            ov_model,
            nncf.Dataset(calib),
            nncf.Dataset(list(range(len(feeds))), lambda i: feeds[i]),
            validation_fn,
            max_drop=max_drop,
            drop_type=nncf.DropType.ABSOLUTE,
            model_type=nncf.ModelType.TRANSFORMER,
            preset=nncf.QuantizationPreset.PERFORMANCE if symmetric_activations else nncf.QuantizationPreset.MIXED,
            subset_size=len(calib),
            ignored_scope=nncf.IgnoredScope(names=list(ignored)) if ignored else None,
            advanced_quantization_parameters=_without_smoothquant(),
            advanced_accuracy_restorer_parameters=params,
        )
    return quantized, tuple(reverted)


class _capture_reverted:
    """Collect the operation names of NNCF's "N out of M were reverted ..." INFO record."""

    MARK = "were reverted back to the floating-point precision:"

    def __enter__(self) -> list[str]:
        self.names: list[str] = []
        names = self.names
        mark = self.MARK

        class Grab(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                text = record.getMessage()
                if mark in text:
                    names.extend(line.strip() for line in text.split(mark, 1)[1].splitlines() if line.strip())

        self._logger = logging.getLogger("nncf")
        self._level = self._logger.level
        self._quieted = [(h, h.level) for h in self._logger.handlers]
        for h, level in self._quieted:  # its own console handlers: warnings only, as elsewhere
            h.setLevel(max(level, logging.WARNING))
        self._handler = Grab(level=logging.INFO)
        self._logger.addHandler(self._handler)
        self._logger.setLevel(logging.INFO)
        self._stdout = contextlib.redirect_stdout(io.StringIO())  # its rich progress bars
        self._stdout.__enter__()
        return names

    def __exit__(self, *exc: object) -> None:
        self._stdout.__exit__(None, None, None)
        self._logger.removeHandler(self._handler)
        self._logger.setLevel(self._level)
        for h, level in self._quieted:
            h.setLevel(level)


def fake_quantize_count(xml: Path | Any) -> int:
    """How many FakeQuantize / FakeConvert nodes an IR (path or ov.Model) holds: 0 means not quantized."""
    import openvino as ov

    model = ov.Core().read_model(str(xml)) if isinstance(xml, (str, Path)) else xml
    return sum(op.get_type_name() in ("FakeQuantize", "FakeConvert") for op in model.get_ops())


BACKEND: Backend = OpenVinoBackend()
