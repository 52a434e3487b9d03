"""Which layers of a Data2Vec graph stay float by rule, and which activation encoding, per target and modality:
data the backends declare.

    choice = choose(backends.get(name), "audio")    # Choice(float_rules=("input", "head"), why=...)
    names = float_nodes(onnx_path, choice.float_rules, ("MatMul", "Gemm", "Conv"))

``quantize.make_recipe(..., modality=...)`` copies the choice into the QuantRecipe (``float_rules``,
``choice``), so report.json says which rules were used and why; the ONNX Runtime / TensorRT quantizer
(``quantize.QuantSession``) and the OpenVINO backend (NNCF's ignored scope) turn the rules into node names
with ``float_nodes``. Each backend declares its choices (``Backend.recipe_choices``: modality, or "*"
for every modality, -> Choice); unlisted: ``BASE``. A rule is structural (it finds the nodes by their place in the graph, not by
exporter names), so it applies to every checkpoint of the modality.

The entries were chosen by measurement on the trained example models (examples/, docs/FIDELITY.md):
plain static INT8 without fallback, judged on each model's whole held-out split, compared by logit
cosine (continuous) as well as top-1 agreement and accuracy (a few samples each). Calibration
method (MinMax / Percentile / Entropy) and NNCF's SmoothQuant strength were measured too and stay at
their defaults: no setting won on more than one modality (docs/quantization.md, "Default recipe per
modality"). Only choices with a clear mechanism and no measurable latency cost are in the table, and one that
is a latency gain: OpenVINO's symmetric activations where the trained examples kept their accuracy with them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

RULES = ("input", "head", "ffn_out")


@dataclass(frozen=True)
class Choice:
    float_rules: tuple[str, ...]  # RULES that stay float (besides what the target's own placement keeps)
    why: str  # one line for the report
    # int8 activations with zero point 0 (OpenVINO: NNCF's PERFORMANCE preset); None: the target's template decides
    symmetric_activations: bool | None = None


BASE = Choice(("input",), "the layer that reads the raw input stays float (every target, every modality)")


def choose(backend: Any, modality: str = "") -> Choice:
    """The float-by-rule choice ``backend`` declares for ``modality`` ("vision", "text", "audio")."""
    choices = backend.recipe_choices
    return choices.get(modality) or choices.get("*") or BASE


def float_nodes(onnx_path: Path, rules: Sequence[str], op_types: Sequence[str]) -> tuple[str, ...]:
    """Names of the ``op_types`` nodes the ``rules`` keep float, in graph order.

    - ``input``: the layer that reads the raw model input (``excluded_for_transformer``).
    - ``head``: the last MatMul/Gemm with a constant weight, when nothing but element-wise and shape ops
      lie between it and a graph output (a classifier, CTC or QA head); a feature-extraction graph,
      whose last GEMM is followed by a LayerNorm or another GEMM, has none.
    - ``ffn_out``: MatMul/Gemm nodes with a constant weight whose input is a GELU's output (Erf or Gelu
      within three producers): the FFN output projections of the transformer layers.
    """
    import onnx

    unknown = [r for r in rules if r not in RULES]
    if unknown:
        raise ValueError(f"unknown float rule(s) {unknown}; known: {RULES}")
    found: list[str] = list(excluded_for_transformer(onnx_path, op_types)) if "input" in rules else []
    if not ({"head", "ffn_out"} & set(rules)):
        return tuple(found)
    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    inits = {i.name for i in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for n in graph.node:
        for i in n.input:
            readers.setdefault(i, []).append(n)
    gemms = [
        n
        for n in graph.node
        if n.op_type in ("MatMul", "Gemm") and n.op_type in op_types and len(n.input) > 1 and n.input[1] in inits
    ]
    if "ffn_out" in rules:
        for n in gemms:
            if _after_gelu(n.input[0], producer, 3):
                found.append(n.name)
    if "head" in rules and gemms and _feeds_output_directly(gemms[-1], readers, {o.name for o in graph.output}):
        found.append(gemms[-1].name)
    return tuple(dict.fromkeys(found))


def _after_gelu(tensor: str, producer: dict, depth: int) -> bool:
    node = producer.get(tensor)
    if node is None:
        return False
    if node.op_type in ("Erf", "Gelu", "FastGelu", "BiasGelu"):
        return True
    if depth == 0 or node.op_type not in ("Mul", "Add", "Div"):
        return False
    return any(_after_gelu(i, producer, depth - 1) for i in node.input if i)


_HEAVY = frozenset({"MatMul", "Gemm", "Conv", "LayerNormalization", "Softmax"})


def _feeds_output_directly(node: object, readers: dict, outputs: set[str]) -> bool:
    """Whether a graph output is reached from ``node`` without another GEMM, Conv, LayerNorm or Softmax."""
    todo = list(node.output)  # type: ignore[attr-defined]
    seen: set[str] = set()
    while todo:
        t = todo.pop()
        if t in seen:
            continue
        seen.add(t)
        if t in outputs:
            return True
        for r in readers.get(t, ()):
            if r.op_type not in _HEAVY:
                todo.extend(r.output)
    return False


# ops that only move the raw input (the time-major waveform windows: Slice, Reshape, Concat)
_SHAPE_OPS = (
    "Unsqueeze",
    "Squeeze",
    "Reshape",
    "Transpose",
    "Cast",
    "Identity",
    "Flatten",
    "Expand",
    "Slice",
    "Concat",
)


def excluded_for_transformer(onnx_path: Path, op_types: Sequence[str] = ("MatMul", "Gemm", "Conv")) -> tuple[str, ...]:
    """Nodes of ``op_types`` that stay float although the recipe quantizes their op type.

    One rule, measured: the layer that reads the raw model input (the waveform convolution of audio
    models, the patch convolution of vision models) stays float. An 8-bit per-tensor waveform is what
    broke static INT8 on audio (CTC frame agreement 0.78 -> 0.93 with this one node float, tiny
    preset); the layer is a fraction of a percent of the FLOPs. Text reads its input through
    embedding Gathers, which are not quantized at all.

    Everything else that must stay float is an op type outside ``op_types`` (LayerNormalization,
    Softmax, the GELU's Erf, Gather, residual Adds): the quantizer never touches those, and
    ``_float_readers`` makes sure no quantized value reaches them.
    """
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    raw = {i.name for i in graph.input}
    found: list[str] = []
    for node in graph.node:  # topological order
        data = [i for i in node.input[:1] if i]
        if not data or data[0] not in raw:
            continue
        if node.op_type in _SHAPE_OPS:
            raw.update(node.output)
        elif node.op_type in op_types:
            found.append(node.name)
    return tuple(found)
