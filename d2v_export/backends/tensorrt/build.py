"""Writing a TensorRT bundle: the portable half (graph, recipe, script, device module) and, with TensorRT and
a GPU here, the engine; ``--fallback auto`` on the Q/DQ graph."""

from __future__ import annotations

import dataclasses
import functools
import shutil
import stat
from pathlib import Path

from ...spec import Artifact, D2VError, Drift, ExitCode, ExportedGraph, Precision, QuantRecipe
from ..base import BuildRequest, Recovery, copy_onnx, files_in
from . import device as trt_device
from .graph import (
    _check_recipe,
    _fix_and_check,
    _fixups,
    _fp16_and_check,
    _with_placement_rules,
    fp16_remainder,
    split_residual,
)
from .recipe import (
    BUILDS,
    DEFER_HINT,
    DEVICE_SCRIPT,
    NAME,
    NOT_BUILT,
    ONNX_FILE,
    PLAN_FILE,
    RECIPE_FILE,
    SCRIPT_FILE,
    SIMULATED_FLOAT,
    SIMULATED_FP16,
    SIMULATED_INT8,
    SIMULATED_LATENCY,
    TIMING_CACHE,
    build_script,
    make_build_recipe,
    settings_from,
)


@dataclasses.dataclass(frozen=True)
class TensorRTRequest(BuildRequest):
    """TensorRT's build request (``TensorRTBackend.request``): ``defer_build`` writes the portable half only."""

    defer_build: bool = False  # --defer-build: no TensorRT or GPU needed here; the engine is built on the device


def _probe(request: BuildRequest) -> tuple[int, bool]:
    """(CUDA device index, whether the engine is built here); D2VError(TARGET_UNAVAILABLE) when it must be and cannot."""
    device = trt_device.device_index(request.device)
    probe = trt_device.probe(device)
    defer = isinstance(request, TensorRTRequest) and request.defer_build
    if not probe.ok and not defer:  # fail before the (slow) quantization
        raise D2VError(
            f"tensorrt cannot build an engine here: {probe.reason} — {DEFER_HINT}", ExitCode.TARGET_UNAVAILABLE
        )
    return device, probe.ok and not defer


def compile_bundle(graph: ExportedGraph, folder: Path, request: BuildRequest) -> Artifact:
    precision = request.precision
    if precision not in BUILDS:
        raise D2VError(
            f"tensorrt builds {', '.join(p.value for p in BUILDS)}, not {precision.value}", ExitCode.TARGET_UNAVAILABLE
        )
    device, build_here = _probe(request)
    folder.mkdir(parents=True, exist_ok=True)
    onnx_path = folder / ONNX_FILE
    quant = None
    if precision is Precision.INT8:
        quant = _quantize(graph, onnx_path, request)
    elif precision is Precision.FP16:
        _fp16_graph(graph.path, onnx_path)
    else:
        copy_onnx(graph.path, onnx_path)
    return _bundle(graph, folder, precision, quant, build_here, device)


def recover(
    graph: ExportedGraph, folder: Path, request: BuildRequest, recovery: Recovery
) -> tuple[Artifact, Drift, tuple[str, ...]]:
    """``--fallback auto``: the Q/DQ graph with the most sensitive nodes left float until the budget holds.

    Candidates are judged as ``compile`` ships them (TensorRT fix-ups and fp16 remainder applied) on the
    ONNX Runtime simulation (an engine build per candidate would take minutes). With TensorRT here the
    engine is then built once from the chosen graph and the returned drift is judged *on that engine*,
    the same footing as the plain INT8 variant, whose drift the pipeline measured on its engine.
    """
    from ...int8.fallback import copy_model, describe, fallback

    device, build_here = _probe(request)
    recipe = _with_placement_rules(graph, _check_recipe(request.quant))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / PLAN_FILE).unlink(missing_ok=True)  # an engine of the first build must not answer for the candidates
    onnx_path = folder / ONNX_FILE

    def evaluate(candidate: Path) -> Drift:
        copy_model(candidate, onnx_path)  # the runner reads the bundle's model.onnx
        _fp16_and_check(onnx_path)  # judged as shipped; the candidate itself stays fp32 for the node ranking
        return recovery.evaluate(
            Artifact(NAME, Precision.INT8, folder, onnx_path, files_in(folder), quantization=recipe)
        )

    for_ort, residual = split_residual(recipe)
    fixups = functools.partial(_fixups, feeds=recovery.calibration, residual=residual)
    result = fallback(
        graph, for_ort, recovery.calibration, evaluate, target=onnx_path, progress=recovery.progress, postprocess=fixups
    )
    _fp16_and_check(onnx_path)  # the chosen candidate, copied to the bundle by fallback(), gets its fp16 remainder
    chosen = dataclasses.replace(result.quantized.recipe, op_types=recipe.op_types)
    artifact = _bundle(graph, folder, Precision.INT8, chosen, build_here, device)
    drift = result.drift
    if build_here:
        recovery.progress(f"{folder.name}: judging the engine built from the chosen graph")
        drift = recovery.evaluate(artifact)  # the runner is the engine now
    return artifact, drift, describe(result)


def _bundle(
    graph: ExportedGraph,
    folder: Path,
    precision: Precision,
    quant: QuantRecipe | None,
    build_here: bool,
    device: int = 0,
) -> Artifact:
    """Recipe, script, device module and (with TensorRT here) the engine, around the bundle's model.onnx."""
    onnx_path = folder / ONNX_FILE
    recipe = make_build_recipe(graph, precision, quant)
    trt_device.atomic_write_json(folder / RECIPE_FILE, recipe)
    script = folder / SCRIPT_FILE
    trt_device.atomic_write(script, build_script(recipe).encode("utf-8"))
    script.chmod(script.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    shutil.copyfile(Path(trt_device.__file__), folder / DEVICE_SCRIPT)

    if build_here:
        cache = folder / TIMING_CACHE
        manifest = trt_device.build(
            onnx_path, folder / PLAN_FILE, settings_from(recipe, timing_cache=cache, device=device)
        )
        trt_device.write_engine_manifest(folder, manifest, onnx_path)
        model_file = folder / PLAN_FILE
        notes: tuple[str, ...] = (
            (
                f"engine built with TensorRT {manifest['tensorrt']} on {manifest['gpu']} (compute {manifest['compute_capability']}); "
                "it runs only on that GPU model and TensorRT version"
            ),
            "latency: end to end, including host/device copies (engine-only GPU time: `d2v-export build-engine`)",
        )
    else:
        model_file = onnx_path
        accuracy = {Precision.INT8: SIMULATED_INT8, Precision.FP16: SIMULATED_FP16}.get(
            precision, SIMULATED_FLOAT.format(p=precision.value.upper())
        )
        notes = (NOT_BUILT, accuracy, SIMULATED_LATENCY)
    return Artifact(NAME, precision, folder, model_file, files_in(folder), quantization=quant, notes=notes)


def _fp16_graph(source: Path, target: Path) -> None:
    """The fp16 bundle's graph: the fp32 export with fp16 weights and compute, fp32 inputs and outputs with casts at
    the boundaries, ``FP32_OPS`` between casts (``fp16_remainder``), so that a strongly typed build with no
    precision flag gives an fp16 engine on TensorRT 10 and 11 alike. Written to a new file: the export's own file
    (possibly hard-linked elsewhere) is never rewritten."""
    target.unlink(missing_ok=True)
    shutil.copyfile(source, target)  # a copy, not a link: fp16_remainder rewrites it in place
    data = source.with_name(source.name + ".data")
    if data.exists():
        shutil.copyfile(data, target.with_name(target.name + ".data"))
    fp16_remainder(target)  # loads any external data and saves one file (fp16 halves the weights)
    target.with_name(target.name + ".data").unlink(missing_ok=True)


def _quantize(graph: ExportedGraph, target: Path, request: BuildRequest) -> QuantRecipe:
    from ...int8.quantize import quantize_onnx

    recipe = _with_placement_rules(graph, _check_recipe(request.quant))
    for_ort, residual = split_residual(recipe)
    qgraph = quantize_onnx(graph, target, for_ort, request.calibration)
    _fix_and_check(target, request.calibration, residual)
    return dataclasses.replace(qgraph.recipe, op_types=recipe.op_types)
