"""ONNX Runtime Mobile target: the ORT-format model (``model.ort``) and its reduced-operator build config.

The whole target is this one file, written against the public protocol (``backends.base``) only; nothing
outside it names it (docs/ort-mobile.md). The export (fp32) or the shared quantizer's INT8 ONNX is converted
with ONNX Runtime's own tool, ``onnxruntime.tools.convert_onnx_models_to_ort``, with the "Fixed"
optimisation style for Arm: the graph optimisations an Arm phone or board would run are applied once and
saved in the flatbuffers file, which a minimal ONNX Runtime build (no ONNX parser, no optimiser) loads.
The tool also writes the operators the model uses; a runtime built with
``--minimal_build --include_ops_by_config required_operators.config`` has kernels for those only.

The runner opens the ``.ort`` file the way such a device does: the ORT format, no optimisation at load
time (a minimal build has no optimiser), the CPU execution provider, no spinning workers.
"""

from __future__ import annotations

import contextlib
import io
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from ..int8.quantize import MATMUL_OPS, RecipeTemplate
from ..spec import Artifact, D2VError, ExitCode, ExportedGraph, Precision, QuantRecipe
from .base import Availability, Backend, BackendBase, BuildRequest, Devices, Lever, RunnerBase, Snippet, files_in

NAME = "ort-mobile"
MODEL_FILE = "model.ort"
CONFIG_FILE = "required_operators.config"
PLATFORM = "arm"  # the conversion's target platform: Arm's Q/DQ handling and layouts, not x86's
FLATBUFFERS_LIMIT = 2**31 - 1  # an ORT-format file is one flatbuffer: no external data, under 2 GiB in all
INSTALL_HINT = "pip install 'd2v-export[ort-mobile]'"
CONVERTER = "onnxruntime.tools.convert_onnx_models_to_ort"


def session_options(threads: int) -> Any:
    """How a device opens the ``.ort`` file: ORT format, no load-time optimisation, one inter-op thread, no spinning."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # a minimal build applies none: the conversion applied them for Arm (x86's would differ from the device's)
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.log_severity_level = 3
    opts.add_session_config_entry("session.load_model_format", "ORT")
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return opts


class OrtFormatRunner(RunnerBase):
    """Runs a ``.ort`` file; feeds the inputs the graph declares, whatever they are, and nothing else."""

    def __init__(self, path: Path, threads: int, name: str) -> None:
        import onnxruntime as ort

        self.name = name
        self.session = ort.InferenceSession(str(path), session_options(threads), providers=["CPUExecutionProvider"])
        self.inputs = tuple(i.name for i in self.session.get_inputs())
        self.outputs = [o.name for o in self.session.get_outputs()]

    def infer(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        missing = [name for name in self.inputs if name not in feed]
        if missing:
            raise D2VError(
                f"{self.name}: the model needs input(s) {', '.join(missing)}, which the feed lacks", ExitCode.BAD_INPUT
            )
        ran = self.session.run(self.outputs, {name: feed[name] for name in self.inputs})
        return dict(zip(self.outputs, ran))

    def close(self) -> None:
        self.session = None


class OrtMobileBackend(BackendBase):
    name = NAME
    extra = "ort-mobile"
    install_hint = INSTALL_HINT
    packages = ("onnxruntime", "flatbuffers")
    precisions = (Precision.FP32, Precision.INT8)
    # The shared quantizer's recipes, with 8-bit weights: Arm's INT8 kernels (SDOT/UDOT, NEON widening) do not
    # saturate, so x86's 7-bit work-around (--reduce-range) does not apply to a file made for Arm.
    int8_recipes = {
        "static": RecipeTemplate(
            "QDQ: uint8 activations calibrated per tensor, int8 weights per channel, on MatMul/Gemm/Conv inputs; "
            "converted to the ORT format for Arm",
            "static",
            MATMUL_OPS,
        ),
        "dynamic": RecipeTemplate(
            "MatMulInteger: uint8 activation ranges measured at run time, int8 weights per channel, MatMul/Gemm only; "
            "converted to the ORT format for Arm",
            "dynamic",
            ("MatMul", "Gemm"),
        ),
    }
    devices = Devices("CPU", "CPU", "CPU")
    pick_levers = (
        Lever("static", description="QDQ, uint8 activations, per-channel int8 weights, ORT format"),
        Lever("dynamic", description="MatMulInteger, activation ranges at run time, ORT format"),
    )

    def available(self) -> Availability:
        """The runtime imported; the converter and flatbuffers only found (importing onnxruntime.tools costs a second)."""
        import importlib.util

        try:
            import onnxruntime as ort
        except ImportError as exc:
            return Availability(False, f"onnxruntime does not import ({exc}); {self.install_hint}")
        converter = Path(ort.__file__).parent / "tools" / "convert_onnx_models_to_ort.py"
        if not converter.is_file() or importlib.util.find_spec("flatbuffers") is None:
            return Availability(
                False, f"onnxruntime {ort.__version__} lacks {CONVERTER} or flatbuffers; {self.install_hint}"
            )
        return Availability(True, version=ort.__version__, devices=("CPU",))

    def compile(self, graph: ExportedGraph, folder: Path, request: BuildRequest) -> Artifact:
        if request.precision not in self.precisions or (request.precision is Precision.INT8 and request.quant is None):
            raise D2VError(
                f"{self.name} builds fp32 or int8 (ORT format for Arm CPUs), not {request.precision.value}",
                ExitCode.TARGET_UNAVAILABLE,
            )
        folder.mkdir(parents=True, exist_ok=True)
        recipe = request.quant
        with tempfile.TemporaryDirectory(prefix=".ort-mobile-", dir=folder) as tmp:
            work = Path(tmp)
            source = graph.path
            if request.quant is not None:
                from ..int8.quantize import quantize_onnx

                source = work / "model.onnx"
                recipe = quantize_onnx(graph, source, request.quant, request.calibration).recipe
            _check_size(source)
            _convert(source, work / "converted")
            shutil.move(str(work / "converted" / (source.stem + ".ort")), str(folder / MODEL_FILE))
            _write_config(work / "converted" / (source.stem + "." + CONFIG_FILE), folder / CONFIG_FILE)
        notes = (_build_note(folder / CONFIG_FILE), *_weight_notes(recipe))
        return Artifact(
            self.name,
            request.precision,
            folder,
            folder / MODEL_FILE,
            files_in(folder),
            quantization=recipe,
            notes=notes,
        )

    def runner(self, artifact: Artifact, *, threads: int) -> OrtFormatRunner:
        return OrtFormatRunner(artifact.model_file, threads, f"{self.name}-{artifact.precision.value}")

    def readme_snippet(self, bundle: str, model_file: str, folder: Path | None) -> Snippet:
        code = (
            "import onnxruntime as ort",
            "",
            "opts = ort.SessionOptions()",
            'opts.add_session_config_entry("session.load_model_format", "ORT")',
            'opts.add_session_config_entry("session.intra_op.allow_spinning", "0")  # as d2v-export measured it',
            "opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # optimised for Arm already",
            f'session = ort.InferenceSession("{bundle}/{model_file}", opts, providers=["CPUExecutionProvider"])',
            "names = [i.name for i in session.get_inputs()]",
            "outputs = dict(zip([o.name for o in session.get_outputs()], session.run(None, {n: feed[n] for n in names})))",
        )
        count = (
            _operator_count(folder / CONFIG_FILE) if folder is not None and (folder / CONFIG_FILE).is_file() else None
        )
        after = (
            f"On the device: copy `{model_file}` (the Android AAR `onnxruntime-android` and the iOS pod "
            "`onnxruntime-c` load it as is, from Java/Kotlin, Objective-C or C/C++ with the same session settings).",
            f"A smaller runtime: build ONNX Runtime with `--minimal_build --include_ops_by_config {CONFIG_FILE}`"
            + (f" ({count} operators)" if count is not None else "")
            + "; it has kernels for this model's operators only.",
        )
        return Snippet(code, after)

    def diagnose(self) -> Mapping[str, Any] | None:
        if not self.available().ok:
            return None
        import flatbuffers

        return {"converter": CONVERTER, "platform": PLATFORM, "flatbuffers": getattr(flatbuffers, "__version__", "")}

    def diagnosis_lines(self, details: Mapping[str, Any]) -> list[str]:
        return [
            f"converter {details.get('converter')} (optimisations for {details.get('platform')}), "
            f"flatbuffers {details.get('flatbuffers') or '?'}"
        ]


def _check_size(source: Path) -> None:
    data = source.with_name(source.name + ".data")
    size = source.stat().st_size + (data.stat().st_size if data.is_file() else 0)
    if size > FLATBUFFERS_LIMIT:
        raise D2VError(
            f"{NAME}: the model is {size / 2**30:.1f} GiB; an ORT-format file holds at most 2 GiB (one flatbuffer, "
            "no external data); use --int8 (4x smaller weights) or another target",
            ExitCode.TARGET_UNAVAILABLE,
        )


def _convert(source: Path, output: Path) -> None:
    """ONNX Runtime's own converter on one file: ``<stem>.ort`` and ``<stem>.required_operators.config`` in ``output``."""
    from onnxruntime.tools.convert_onnx_models_to_ort import OptimizationStyle, convert_onnx_models_to_ort

    quiet = logging.getLogger("ort_format_model.utils")  # "Created config in <temporary folder>"
    level = quiet.level
    quiet.setLevel(logging.WARNING)
    try:
        with contextlib.redirect_stdout(io.StringIO()) as said:
            convert_onnx_models_to_ort(
                source, output_dir=output, optimization_styles=[OptimizationStyle.Fixed], target_platform=PLATFORM
            )
    except Exception as exc:  # noqa: BLE001 - the converter raises many kinds; the user gets one line
        tail = " ".join(str(exc).split())[:300] or exc.__class__.__name__
        raise D2VError(
            f"{NAME}: ONNX Runtime's ORT-format converter failed on {source.name}: {tail}", ExitCode.TARGET_UNAVAILABLE
        ) from None
    finally:
        quiet.setLevel(level)
    if not (output / (source.stem + ".ort")).is_file():
        raise D2VError(
            f"{NAME}: the ORT-format converter wrote no model for {source.name}: {' '.join(said.getvalue().split())[-300:]}"
        )


def _write_config(written: Path, config: Path) -> None:
    """The converter's config, its header naming the shipped file (it names the temporary one it converted)."""
    import onnxruntime as ort

    lines = [line for line in written.read_text(encoding="utf-8").splitlines() if not line.startswith("#")]
    header = f"# {MODEL_FILE}: {CONVERTER} (onnxruntime {ort.__version__}), style Fixed, platform {PLATFORM}"
    config.write_text("\n".join([header, *lines]) + "\n", encoding="utf-8")


def _operators(config: Path) -> list[str]:
    """``domain;opset;Op,Op`` lines of a required-operators config as ``domain:Op`` names."""
    names = []
    for line in config.read_text(encoding="utf-8").splitlines():
        parts = line.strip().split(";")
        if len(parts) == 3 and not line.startswith("#"):
            names += [f"{parts[0]}:{op}" for op in parts[2].split(",") if op]
    return names


def _operator_count(config: Path) -> int:
    return len(set(_operators(config)))


def _build_note(config: Path) -> str:
    return (
        f"ORT format, optimised for {PLATFORM} ({CONVERTER}, style Fixed); {CONFIG_FILE} lists its "
        f"{_operator_count(config)} operators for a minimal ONNX Runtime build (--include_ops_by_config)"
    )


def _weight_notes(recipe: QuantRecipe | None) -> tuple[str, ...]:
    """8-bit weights are exact on Arm; on an x86 host without VNNI the drift measured here can be worse than the device's."""
    from ..int8.quantize import saturates

    if recipe is None or not saturates():
        return ()
    return (
        "8-bit weights, made for Arm (whose INT8 kernels do not saturate); this x86 CPU has no VNNI, so the drift "
        "measured here may include 16-bit saturation the device does not have",
    )


BACKEND: Backend = OrtMobileBackend()
