"""INT8 through onnxruntime.quantization: dynamic and static, with one recipe per target, as data.

    recipe = make_recipe(backends.get(name), "static", method="minmax", samples=len(feeds))
    qgraph = quantize_onnx(graph, Path("out/model.onnx"), recipe, feeds)

What a recipe means (measured on this package's Data2Vec graphs; see docs/quantization.md):

- ``op_types`` are the only ops whose inputs get quantized: MatMul, Gemm, Conv. Every other op
  (LayerNormalization, Softmax, the GELU's Erf, residual Adds, embedding Gathers) stays float and
  reads float inputs. onnxruntime's QDQ quantizer shares one Q/DQ pair between all readers of a
  tensor (a LayerNorm output that feeds Q/K/V *and* the residual Add), so after quantizing, every
  reader that is not a quantized node is wired back to the float tensor (``_float_readers``).
- Static mode calibrates once, writes onnxruntime's own range cache and quantizes from it: the
  fallback re-quantizes with different excluded nodes without re-running calibration. Calibration
  runs one shape group at a time, which is what makes the histogram methods (entropy, percentile)
  work on inputs of varied lengths.
- ``excluded_nodes`` are node names of the *pre-processed* graph (onnxruntime's optimizer keeps
  the exporter's node names for MatMul/Gemm/Conv); the QuantizedGraph's recipe lists every node
  that stayed float: the recipe's own plus those ``excluded_for_transformer`` picks.

Nothing here passes string-keyed ``extra_options`` to callers: QuantRecipe fields map to them here.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from .recipe_choice import excluded_for_transformer as excluded_for_transformer  # re-exported: the 'input' rule
from ..spec import (
    CALIBRATION_METHODS,
    QUANT_MODES,
    D2VError,
    ExitCode,
    ExportedGraph,
    IgnoredScope,
    QuantConfig,
    QuantizedGraph,
    QuantRecipe,
)

MODES = QUANT_MODES
METHODS = CALIBRATION_METHODS
TOOL = "onnxruntime.quantization"  # the recipe's ``tool`` of every graph this module quantizes
MATMUL_OPS = ("MatMul", "Gemm", "Conv")

# Op types that must read float values whatever the target: normalisation, attention probabilities,
# the GELU, embedding look-ups (a quantized table loses rare tokens), residual and bias additions.
# They are outside every recipe's op_types and ``_float_readers`` guarantees no DequantizeLinear
# feeds them; tests check it.
FLOAT_OPS = ("LayerNormalization", "Softmax", "Erf", "Gather", "Add")


@dataclass(frozen=True)
class RecipeTemplate:
    """What one target wants from INT8 in one mode. Data only: each backend declares its own
    (``Backend.int8_recipes``, mode -> template) and ``make_recipe`` turns one into a QuantRecipe."""

    description: str
    mode: str  # "static" | "dynamic"
    op_types: tuple[str, ...]  # ops whose inputs are quantized (static: Q/DQ pairs; dynamic: integer ops)
    symmetric_activations: bool = False  # int8 activations with zero point 0 (NNCF's "performance" preset)
    per_channel: bool = True  # one weight scale per output channel, symmetric int8
    tool: str = ""  # what quantizes it (the recipe's ``tool`` until the quantizer that runs stamps its own)


class Recipes(Protocol):
    """What ``make_recipe`` reads from a backend (``backends.base.Backend``): its name and INT8 templates."""

    @property
    def name(self) -> str: ...

    @property
    def int8_recipes(self) -> Mapping[str, RecipeTemplate]: ...

    @property
    def recipe_choices(self) -> Mapping[str, Any]: ...


def make_recipe(
    target: Recipes,
    mode: str | QuantConfig,
    *,
    method: str = "minmax",
    samples: int = 0,
    excluded: Sequence[str] = (),
    modality: str = "",
) -> QuantRecipe:
    """The QuantRecipe of a target (its backend: ``backends.get(name)``) for a ``QuantConfig`` (or a mode, with
    ``method``, ``samples`` and ``excluded`` node names).

    ``modality`` ("vision", "text", "audio") picks the layers that stay float by rule and, where the backend says so,
    the activation encoding (``Backend.recipe_choices``); the config's preset and ignored scope come on top."""
    from .recipe_choice import choose

    config = mode if isinstance(mode, QuantConfig) else _config(mode, method, samples, excluded)
    templates = target.int8_recipes
    if not templates:
        raise D2VError(f"target '{target.name}' builds no INT8; leave out --int8 for it", ExitCode.TARGET_UNAVAILABLE)
    template = templates.get(config.mode)
    if template is None:
        raise D2VError(
            f"target '{target.name}' has no {config.mode} INT8; use --quant {next(iter(templates))}",
            ExitCode.TARGET_UNAVAILABLE,
        )
    choice = choose(target, modality)
    symmetric = template.symmetric_activations if choice.symmetric_activations is None else choice.symmetric_activations
    if config.preset is not None:
        symmetric = config.preset == "performance"
    op_types = template.op_types if config.op_types is None else config.op_types
    static = config.mode == "static"
    return QuantRecipe(
        mode=config.mode,
        method=config.method if static else "none",
        samples=config.samples if static else 0,
        per_channel=template.per_channel,
        symmetric_activations=symmetric,
        op_types=tuple(t for t in op_types if t not in config.ignored.types),
        excluded_nodes=tuple(config.ignored.names),
        tool=template.tool,
        float_rules=tuple(dict.fromkeys([*choice.float_rules, *config.ignored.rules])),
        choice=choice.why,
    )


def _config(mode: str, method: str, samples: int, excluded: Sequence[str]) -> QuantConfig:
    """A QuantConfig from ``make_recipe``'s plain arguments; a bad mode or method is a one-line error."""
    if mode not in MODES:
        raise D2VError(f"unknown quantization mode '{mode}'; choose one of: {', '.join(MODES)}")
    if method not in METHODS:
        raise D2VError(f"unknown calibration method '{method}'; choose one of: {', '.join(METHODS)}")
    return QuantConfig(mode=mode, method=method, samples=samples, ignored=IgnoredScope(names=tuple(excluded)))


# x86 instruction sets whose INT8 dot product accumulates u8 x s8 in 32 bits (no 16-bit saturation).
EXACT_INT8_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})


def saturates(flags: Iterable[str] | None = None, machine: str | None = None) -> bool:
    """Whether ONNX Runtime's u8 x s8 MatMul can saturate on a CPU with these /proc/cpuinfo flags (default: this CPU's).

    x86 without VNNI/AMX runs U8S8 through VPMADDUBSW, which adds two u8 x s8 products into a saturating
    int16: 2 x 255 x 127 = 64770 > 32767. Measured on an AVX2-only AMD EPYC (onnxruntime 1.32): full-range
    operands gave errors up to 10 % of the output range; 7-bit weights (|w| <= 64) were exact. Arm kernels
    (SDOT/UDOT, NEON widening) do not saturate.
    """
    import platform

    arch = (machine or platform.machine()).lower()
    if arch not in ("x86_64", "amd64", "i686", "x86"):
        return False
    if flags is None:
        from ..cpu import cpu_flags

        flags = cpu_flags()
    return not (EXACT_INT8_FLAGS & set(flags))


# ------------------------------------------------------------------------------- public entry


def quantize_onnx(
    graph: ExportedGraph,
    target: Path,
    recipe: QuantRecipe,
    calibration: Sequence[Mapping[str, np.ndarray]] = (),
) -> QuantizedGraph:
    """Write the INT8 model of ``graph`` to ``target`` following ``recipe``; only ``target`` is written."""
    if recipe.mode not in MODES:
        raise D2VError(f"unknown quantization mode '{recipe.mode}'; choose one of: {', '.join(MODES)}")
    if recipe.mode == "static" and not calibration:
        raise D2VError(
            "static INT8 needs calibration samples and got none; pass --calibration DIR (or use --quant dynamic)"
        )
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="d2v-quant-") as tmp:
        session = QuantSession(graph.path, Path(tmp), recipe)
        if recipe.mode == "static":
            session.calibrate(calibration)
        excluded = session.write(target, recipe.excluded_nodes)
    return QuantizedGraph(path=target, graph=graph, recipe=replace(recipe, excluded_nodes=excluded, tool=TOOL))


class QuantSession:
    """Pre-processes once and (static) calibrates once; ``write`` then quantizes any number of times.

    This is what the fallback uses: each step only re-runs the cheap quantizer with more nodes excluded.
    """

    def __init__(self, source: Path, workdir: Path, recipe: QuantRecipe) -> None:
        self.recipe = recipe
        self.workdir = workdir
        self.source = Path(source)
        self.prepared = workdir / "prepared.onnx"
        self.cache = workdir / "ranges.json"
        self.large = _size(self.source) > 1_800_000_000
        # The working files (pre-processed, augmented for calibration, raw quantized) keep their weights as
        # external data when the export did (export.EXTERNAL_DATA_BYTES): inline, quant_pre_process alone held
        # 5x the fp32 weights at once (measured on vision base: 1.9 GB for 0.38 GB). The artifact written by
        # ``_finish`` stays one file (and checked) up to ``large``.
        self.external = self.large or self.source.with_name(self.source.name + ".data").is_file()
        _preprocess(self.source, self.prepared, self.external)
        from .recipe_choice import float_nodes

        self.rule_excluded = float_nodes(self.prepared, recipe.float_rules, recipe.op_types)

    @property
    def method(self) -> Any:
        from onnxruntime.quantization import CalibrationMethod

        return {
            "minmax": CalibrationMethod.MinMax,
            "entropy": CalibrationMethod.Entropy,
            "percentile": CalibrationMethod.Percentile,
        }[self.recipe.method]

    def calibrate(self, feeds: Sequence[Mapping[str, np.ndarray]]) -> None:
        """Measure activation ranges on ``feeds`` (one shape group at a time) into the range cache."""
        from onnxruntime.quantization.calibrate import (
            create_calibrator,
            save_tensors_data,
        )

        if self.recipe.method not in METHODS:
            raise D2VError(f"unknown calibration method '{self.recipe.method}'; choose one of: {', '.join(METHODS)}")
        options: dict[str, Any] = {"symmetric": self.recipe.symmetric_activations}
        if self.recipe.method == "percentile":
            options |= {"percentile": 99.999, "num_bins": 2048}
        with _quiet():
            calibrator = create_calibrator(
                self.prepared,
                list(self.recipe.op_types),
                augmented_model_path=str(self.workdir / "augmented.onnx"),
                calibrate_method=self.method,
                use_external_data_format=self.external,
                extra_options=options,
            )
            try:
                for group in _shape_groups(feeds):
                    calibrator.collect_data(_Reader(group))
                ranges = calibrator.compute_data()
            except ValueError as exc:  # numpy's "Too many bins for data range" and friends
                raise D2VError(
                    f"{self.recipe.method} calibration failed ({str(exc).splitlines()[0][:200]}); use --calib-method minmax"
                ) from exc
            finally:
                del calibrator
        _check_ranges(ranges)
        save_tensors_data(ranges, self.cache)

    def write(self, target: Path, excluded: Sequence[str] = ()) -> tuple[str, ...]:
        """Quantize the prepared graph into ``target`` with ``excluded`` (plus the rule's picks) left float."""
        names = _node_names(self.prepared)
        unknown = [n for n in excluded if n not in names]
        if unknown:
            raise D2VError(
                f"excluded node(s) not in the graph: {', '.join(unknown[:5])}; list node names with `python -m onnx` or Netron"
            )
        keep_float = tuple(dict.fromkeys([*excluded, *self.rule_excluded]))
        raw = self.workdir / "quantized.onnx"
        if self.recipe.mode != "dynamic" and not self.cache.is_file():
            raise D2VError("static INT8 needs calibration first; pass --calibration DIR")
        with _quiet():
            (_write_dynamic if self.recipe.mode == "dynamic" else _write_static)(self, raw, keep_float)
        _finish(raw, target, self.prepared, set(self.recipe.op_types), set(keep_float), self.large)
        return keep_float


def _write_dynamic(session: QuantSession, raw: Path, keep_float: tuple[str, ...]) -> None:
    """onnxruntime's dynamic quantizer on the prepared graph (MatMulInteger)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(
        session.prepared,
        raw,
        op_types_to_quantize=list(session.recipe.op_types),
        per_channel=session.recipe.per_channel,
        reduce_range=session.recipe.reduce_range,
        weight_type=QuantType.QInt8,
        # quantize_dynamic first rewrites a Gemm X into a MatMul named "X_MatMul" and then
        # checks exclusions against the new name: exclude both (measured, onnxruntime 1.32).
        nodes_to_exclude=[*keep_float, *(f"{n}_MatMul" for n in keep_float)],
        use_external_data_format=session.external,
        extra_options={"MatMulConstBOnly": True},
    )


def _write_static(session: QuantSession, raw: Path, keep_float: tuple[str, ...]) -> None:
    """onnxruntime's QDQ quantizer on the prepared graph, from the range cache."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    quantize_static(
        session.prepared,
        raw,
        calibration_data_reader=None,
        quant_format=QuantFormat.QDQ,
        op_types_to_quantize=list(session.recipe.op_types),
        per_channel=session.recipe.per_channel,
        reduce_range=session.recipe.reduce_range,
        activation_type=QuantType.QInt8 if session.recipe.symmetric_activations else QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        nodes_to_exclude=list(keep_float),
        use_external_data_format=session.external,
        calibrate_method=session.method,
        calibration_cache_path=session.cache,
        extra_options={
            "ActivationSymmetric": session.recipe.symmetric_activations,
            "WeightSymmetric": True,
            "MatMulConstBOnly": False,
            # A Gemm's output is a classifier's logits or a pooler's output: rounding it to
            # 8 bits clamps logits to the calibration range (measured: -5.12 came out -4.28).
            "OpTypesToExcludeOutputQuantization": ["Gemm"],
        },
    )


# ------------------------------------------------------------------------------- float nodes


# Ops that only move or reshape data: a node reached from a graph input through these reads raw input.
# ------------------------------------------------------------------------------- helpers


class _Reader:
    """onnxruntime's CalibrationDataReader over a list of feeds."""

    def __init__(self, feeds: Sequence[Mapping[str, np.ndarray]]) -> None:
        self._it: Iterator[Mapping[str, np.ndarray]] = iter(feeds)
        self._n = len(feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        feed = next(self._it, None)
        return None if feed is None else {k: np.ascontiguousarray(v) for k, v in feed.items()}

    def __iter__(self) -> _Reader:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        item = self.get_next()
        if item is None:
            raise StopIteration
        return item

    def __len__(self) -> int:
        return self._n


def _shape_groups(feeds: Sequence[Mapping[str, np.ndarray]]) -> list[list[Mapping[str, np.ndarray]]]:
    """Feeds grouped by their shapes (first appearance order): the histogram collectors stack arrays."""
    groups: dict[tuple[Any, ...], list[Mapping[str, np.ndarray]]] = {}
    for feed in feeds:
        key = tuple((k, np.shape(v)) for k, v in sorted(feed.items()))
        groups.setdefault(key, []).append(feed)
    return list(groups.values())


def _check_ranges(ranges: Any) -> None:
    for name, data in ranges.items():
        values = np.asarray(data.range_value, dtype=np.float64) if hasattr(data, "range_value") else np.asarray(data)
        if not np.all(np.isfinite(values)):
            raise D2VError(
                f"calibration gave a non-finite range for tensor '{name}'; check the calibration samples for NaN/inf"
            )


def _preprocess(source: Path, target: Path, large: bool) -> None:
    """onnxruntime's quantization pre-processing: graph optimisation and ONNX shape inference.

    Symbolic shape inference fails on these graphs ("Incomplete symbolic shape inference"): skipped.
    """
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with _quiet():
        try:
            quant_pre_process(str(source), str(target), skip_symbolic_shape=True, save_as_external_data=large)
        except Exception as exc:  # onnxruntime raises many types; one line is what the user needs
            raise D2VError(
                f"quantization pre-processing of '{source.name}' failed: {str(exc).splitlines()[0][:200]}",
                ExitCode.INTERNAL,
            ) from exc


def _finish(raw: Path, target: Path, prepared: Path, quantized_ops: set[str], excluded: set[str], large: bool) -> None:
    import onnx

    model = onnx.load(str(raw))
    _float_readers(model, onnx.load(str(prepared)), quantized_ops, excluded)
    if not large:  # the checker cannot take a protobuf over 2 GB in memory
        onnx.checker.check_model(model)
    if large:
        onnx.save_model(
            model, str(target), save_as_external_data=True, all_tensors_to_one_file=True, location=target.name + ".data"
        )
    else:
        onnx.save_model(model, str(target))


def _float_readers(model: Any, original: Any, quantized_ops: set[str], excluded: set[str]) -> None:
    """Give every reader of a DequantizeLinear output that is not a quantized node the float tensor back.

    onnxruntime's QDQ quantizer rewires *all* readers of a quantized tensor to its DequantizeLinear
    (a LayerNorm output read by Q/K/V and by the residual Add; a weight shared by an excluded node).
    """

    graph = model.graph
    producers = {o: n for n in graph.node for o in n.output}
    inits = {i.name for i in graph.initializer}
    originals = {i.name: i for i in original.graph.initializer}
    suffix = "_DequantizeLinear_Output"
    dq_source: dict[str, str] = {}
    for node in graph.node:
        if node.op_type != "DequantizeLinear":
            continue
        q = producers.get(node.input[0])
        if q is not None and q.op_type == "QuantizeLinear":
            dq_source[node.output[0]] = q.input[0]
        elif node.output[0].endswith(suffix) and node.output[0][: -len(suffix)] in originals:
            dq_source[node.output[0]] = node.output[0][: -len(suffix)]
    for node in graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            continue
        if node.op_type in quantized_ops and node.name not in excluded:
            continue
        for i, name in enumerate(node.input):
            if name in dq_source:
                src = dq_source[name]
                if src not in inits and src not in producers and src in originals:
                    graph.initializer.append(originals[src])
                    inits.add(src)
                node.input[i] = src
    _prune(model)


def _prune(model: Any) -> None:
    """Drop nodes and initializers nothing reads any more."""
    graph = model.graph
    while True:
        used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
        dead = [n for n in graph.node if not any(o in used for o in n.output)]
        if not dead:
            break
        for n in dead:
            graph.node.remove(n)
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    for init in [i for i in graph.initializer if i.name not in used]:
        graph.initializer.remove(init)


def _node_names(path: Path) -> set[str]:
    import onnx

    return {n.name for n in onnx.load(str(path), load_external_data=False).graph.node}


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in [path, *path.parent.glob(path.name + ".data")] if p.is_file())


def _quiet() -> contextlib.AbstractContextManager[None]:
    """onnxruntime.quantization prints progress and logs advice at WARNING; keep the console clean."""
    from ..console import quiet

    return quiet(("",), logging.ERROR)
