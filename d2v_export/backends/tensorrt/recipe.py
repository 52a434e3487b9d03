"""The portable half of a TensorRT bundle: the build recipe (build_recipe.json) and its trtexec script.

File names and the messages a bundle without an engine carries live here too: every other part of the
TensorRT target reads them.
"""

from __future__ import annotations

import dataclasses
import shlex
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ...heads import concrete_shape
from ...spec import ExportedGraph, Precision, QuantRecipe
from . import device as trt_device
from .device import JETPACK_TOO_OLD

NAME = "tensorrt"
ONNX_FILE = "model.onnx"
PLAN_FILE = trt_device.PLAN_FILE
RECIPE_FILE = trt_device.RECIPE_FILE
SCRIPT_FILE = "build_engine.sh"
DEVICE_SCRIPT = trt_device.DEVICE_SCRIPT
ENGINE_MANIFEST = trt_device.ENGINE_MANIFEST
TIMING_CACHE = trt_device.TIMING_CACHE
RECIPE_FORMAT = trt_device.RECIPE_FORMAT
RECIPE_VERSION = trt_device.RECIPE_VERSION
DEFAULT_WORKSPACE_GB = 4.0

DEFER_HINT = "use --defer-build to write the portable half here"
NOT_BUILT = "engine not built here: run `d2v-export build-engine <bundle>` (or build_engine.sh) on the target device"
SIMULATED_INT8 = (
    "accuracy: Q/DQ graph with its fp16 remainder, simulated on ONNX Runtime with graph optimisations off "
    "(Q/DQ kept as float fake-quantization, fp16 tensors rounded as in the graph) — not engine accuracy"
)
SIMULATED_FP16 = (
    "accuracy: the fp16 graph (fp32 I/O) on ONNX Runtime with graph optimisations off, checked against PyTorch with "
    "the half-precision tolerance — not engine accuracy"
)
SIMULATED_FLOAT = (
    "accuracy: the fp32 ONNX graph on ONNX Runtime — {p} engine accuracy is measured by build-engine on the device"
)
SIMULATED_LATENCY = "latency: ONNX Runtime on this CPU — not engine latency"


# Ops computed in fp32 inside the fp16 remainder (casts around them). LayerNormalization: its mean/variance
# over hundreds of channels is where fp16 loses most (TensorRT's INormalizationLayer also prefers fp32
# accumulation); Softmax: exp() of the attention scores. Measured on ONNX Runtime's simulation
# (docs/tensorrt.md): a few casts, no drift cost, and the rest of the network still fp16.
FP32_OPS = ("LayerNormalization", "Softmax")
FP16_REMAINDER_NOTE = (  # the INT8 graph's own islands: graph.INT8_FP32_OPS
    "int8 at the Q/DQ pairs; everything else fp16 (weights, activations, Q/DQ scales), graph inputs and outputs "
    "fp32 with casts at the boundaries, LayerNormalization computed in fp32 between casts, Softmax with fp16 input "
    "and output (computed in fp32 inside); the attention scale on Q before the first MatMul"
)


FP16_GRAPH_NOTE = (
    "fp16 everywhere (weights, activations), graph inputs and outputs fp32 with casts at the boundaries, "
    f"{' and '.join(FP32_OPS)} computed in fp32"
)


@dataclass(frozen=True)
class Build:
    """How one precision becomes an engine: builder settings and the matching trtexec flags.

    Every precision is built strongly typed with no precision flag, so one bundle builds on TensorRT 10.x
    and 11.x alike: TensorRT 11 removed weak typing (``BuilderFlag.FP16/INT8``, trtexec ``--fp16/--int8/--best``)
    and takes ``STRONGLY_TYPED`` / ``--stronglyTyped`` as a no-op (always on); 10.x needs them."""

    strongly_typed: bool
    builder_flags: tuple[str, ...]
    cleared_flags: tuple[str, ...]
    trtexec_flags: tuple[str, ...]
    why: str


BUILDS: dict[Precision, Build] = {
    Precision.FP32: Build(
        True, (), ("TF32",), ("--stronglyTyped", "--noTF32"), "fp32 graph, strongly typed, TF32 off: a true fp32 engine"
    ),
    Precision.FP16: Build(
        True,
        (),
        (),
        ("--stronglyTyped",),
        "fp16 graph (weights and compute fp16, fp32 I/O with casts at the boundaries, LayerNorm/Softmax in fp32), "
        "strongly typed: every tensor runs in the type the graph gives it (TensorRT 10 and 11 alike)",
    ),
    # TF32 is cleared in the Python build (harmless: no GEMM of this graph stays fp32); trtexec keeps its
    # default, so an fp32 GEMM left by hand in the graph may run in TF32 there.
    Precision.INT8: Build(
        True,
        (),
        ("TF32",),
        ("--stronglyTyped",),
        "explicit Q/DQ graph with an fp16 remainder (fp32 I/O, LayerNorm in fp32), strongly typed: "
        "int8 where the Q/DQ pairs are, fp16 elsewhere (TensorRT docs: no precision flags with Q/DQ)",
    ),
}
# trtexec flags TensorRT 11 removed (its trtexec migration guide): never in a bundle's script.
REMOVED_TRTEXEC_FLAGS = ("--fp16", "--int8", "--bf16", "--fp8", "--int4", "--best")
LAYER_INFO = trt_device.LAYER_INFO


# ------------------------------------------------------------------------------------ the recipe


def input_profiles(graph: ExportedGraph) -> tuple[trt_device.InputProfile, ...]:
    """Concrete min/opt/max shapes of every graph input, from the graph's shape profile."""
    out = []
    for spec in graph.inputs:
        shapes = []
        for which in ("min", "opt", "max"):
            sizes = graph.profile.point(which)
            if "image_size" in sizes:
                sizes = sizes | {"height": sizes["image_size"], "width": sizes["image_size"]}
            shapes.append(concrete_shape(spec, sizes))
        out.append(trt_device.InputProfile(spec.name, shapes[0], shapes[1], shapes[2]))
    return tuple(out)


def make_build_recipe(
    graph: ExportedGraph, precision: Precision, quant: QuantRecipe | None, *, workspace_gb: float = DEFAULT_WORKSPACE_GB
) -> dict[str, Any]:
    """The build recipe as plain JSON data (build_recipe.json)."""
    from ... import __version__

    build = BUILDS[precision]
    profiles = input_profiles(graph)
    doc: dict[str, Any] = {
        "format": RECIPE_FORMAT,
        "version": RECIPE_VERSION,
        "created_by": f"d2v-export {__version__}",
        "onnx": ONNX_FILE,
        "engine": PLAN_FILE,
        "precision": precision.value,
        "tensorrt": {
            # strongly typed networks and Q/DQ with fp16 scales parse from 10.0 (onnx-tensorrt 10.0 GA); no upper bound:
            # no precision flag is used, so TensorRT 11 (no weak typing) builds the same graph
            "min_version": "{}.{}".format(
                *(trt_device.INT8_MIN_VERSION if precision is Precision.INT8 else trt_device.MIN_VERSION)
            ),
            "max_version_exclusive": None,
            "verified_versions": list(trt_device.VERIFIED_VERSIONS),
        },
        "device_script": DEVICE_SCRIPT,
        "strongly_typed": build.strongly_typed,
        "builder_flags": list(build.builder_flags),
        "cleared_flags": list(build.cleared_flags),
        "why": build.why,
        "workspace_bytes": int(workspace_gb * (1 << 30)),
        "timing_cache": TIMING_CACHE,
        "inputs": [
            {
                "name": p.name,
                "dtype": spec.dtype,
                "axes": [a if isinstance(a, int) else str(a) for a in spec.shape],
                "min": list(p.min),
                "opt": list(p.opt),
                "max": list(p.max),
            }
            for p, spec in zip(profiles, graph.inputs)
        ],
        "outputs": [t.name for t in graph.outputs],
        "quantization": dataclasses.asdict(quant) if quant is not None else None,
        "float_remainder": FP16_REMAINDER_NOTE
        if precision is Precision.INT8
        else (FP16_GRAPH_NOTE if precision is Precision.FP16 else None),
    }
    doc["trtexec"] = shlex.join(trtexec_command(doc))
    return doc


def trtexec_command(
    recipe: Mapping[str, Any],
    *,
    workspace_bytes: int | None = None,
    timing_cache: str | None = None,
    engine: str | None = None,
) -> list[str]:
    """``trtexec`` arguments equivalent to the Python build of ``recipe`` (it also benchmarks the engine and
    writes each layer's precision and fusion to layers.json)."""

    def shapes(which: str) -> str:
        return ",".join(f"{i['name']}:{'x'.join(str(d) for d in i[which])}" for i in recipe["inputs"])

    build = BUILDS[Precision(recipe["precision"])]
    mib = max(1, int((workspace_bytes or int(recipe["workspace_bytes"])) // (1 << 20)))
    return [
        "trtexec",
        f"--onnx={recipe['onnx']}",
        f"--saveEngine={engine or recipe['engine']}",
        f"--minShapes={shapes('min')}",
        f"--optShapes={shapes('opt')}",
        f"--maxShapes={shapes('max')}",
        *build.trtexec_flags,
        f"--memPoolSize=workspace:{mib}M",
        f"--timingCacheFile={timing_cache or recipe['timing_cache']}",
        "--profilingVerbosity=detailed",
        f"--exportLayerInfo={LAYER_INFO}",
    ]


def build_script(recipe: Mapping[str, Any]) -> str:
    """build_engine.sh: refuses TensorRT 8.x in one line (exit 6, as trt_device.py does), builds with trtexec into
    a temporary name, moves the plan into place and records it (``trt_device.py record``: engine_manifest.json,
    manifest.json relisted), so the bundle still verifies afterwards."""
    partial = f".{recipe['engine']}.partial"
    cmd = trtexec_command(recipe, engine=partial)
    args = " \\\n    ".join(shlex.quote(a) for a in cmd[1:])
    engine = shlex.quote(str(recipe["engine"]))
    return f"""#!/usr/bin/env bash
# Build (and benchmark) the TensorRT engine of this bundle on the device that will run it:
# engines are tied to the GPU, the TensorRT and the CUDA version they were built with.
# Needs TensorRT {recipe["tensorrt"]["min_version"]} or newer (10.x or 11.x: strongly typed, no precision flag);
# trtexec from $TRTEXEC, PATH or /usr/src/tensorrt/bin (JetPack).
# The same build from Python: python3 {DEVICE_SCRIPT} build  (TensorRT + numpy, Python 3.10+),
# or d2v-export build-engine <this folder>; both also write {ENGINE_MANIFEST}.
# Precision {recipe["precision"]}: {recipe["why"]}.
set -euo pipefail
cd "$(dirname "$0")"
TRTEXEC="${{TRTEXEC:-$(command -v trtexec || echo /usr/src/tensorrt/bin/trtexec)}}"
PYTHON="${{PYTHON:-$(command -v python3 || true)}}"
# trtexec's banner names its version: [TensorRT v8602] = 8.6.2, [TensorRT v100300] = 10.3.0
code=$("$TRTEXEC" --help 2>&1 | grep -o 'TensorRT v[0-9]*' | head -n 1 | tr -dc '0-9' || true)
version=""
if [ -n "$code" ]; then
    if [ "$code" -lt 10000 ]; then
        echo "error: TensorRT $((code / 1000)).$((code % 1000 / 100)) is older than 10.0, which this bundle needs; {JETPACK_TOO_OLD}" >&2
        exit 6
    fi
    version="$((code / 10000)).$((code % 10000 / 100)).$((code % 100))"
fi
trap 'rm -f {shlex.quote(partial)}' EXIT
"$TRTEXEC" \\
    {args} \\
    "$@"
mv -f {shlex.quote(partial)} {engine}
if [ -n "$PYTHON" ]; then
    "$PYTHON" {DEVICE_SCRIPT} record --tensorrt "$version"
else
    echo "warning: no python3 here: run 'python3 {DEVICE_SCRIPT} record' before copying or running this bundle" >&2
fi
"""


read_recipe = trt_device.read_recipe
settings_from = trt_device.settings_from
