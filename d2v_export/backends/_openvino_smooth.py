"""SmoothQuant on an OpenVINO model, in place, before NNCF quantizes it (its own SmoothQuant step off).

    smoothed = smooth(model, calibration_feeds)      # how many MatMuls

SmoothQuant (Xiao et al., 2023) moves activation outliers into the weights: for a MatMul with constant
weights, each input channel ``j`` gets a scale ``s_j = max|x_j| ** alpha / max|w_j| ** (1 - alpha)``; the
activation is divided by ``s`` (a Multiply on the MatMul's input) and the weight's row ``j`` multiplied by
it, so the float result is unchanged and the int8 activation range is tamer. MatMuls reading the same tensor
(query, key and value) share one scale: the most even of those their own weights give.

Why here and not NNCF's own step (same method, same alpha 0.95 as its transformer preset, scales clipped the
same way so the artifacts match): NNCF applies every scaled weight to a second copy of the model while the
first stays referenced, 2.8x the fp32 weights on top of the model (docs/PERFORMANCE.md, "What a run itself
costs"); here each weight is replaced one at a time and the old one freed, so a large model builds within
4x its weights. Like NNCF's, it smooths the MatMuls a recipe keeps float too (exact
in f32; leaving them out changed one text answer of 240 through the bf16 remainder: not worth a second
numerics to validate). The activation statistics come from one pass of the calibration samples through a
model of the same graph that only outputs per-channel maxima (compiled once, f32).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import numpy as np

from ..measure.memory import release_memory

ALPHA = 0.95  # NNCF's transformer preset: mostly migrate (activations in transformers carry the outliers)
QUANTILE = 0.1  # scales below the 10th percentile are raised to it: no channel's weights shrink to nothing
CEILING = 100.0  # nor grow without bound
SUFFIX = "/d2v_smooth"


@dataclasses.dataclass(frozen=True)
class Group:
    """The MatMuls with constant weights that read one tensor, and that tensor's channel count."""

    source: Any  # ov.Output
    matmuls: tuple[Any, ...]
    channels: int


def smooth(model: Any, feeds: Sequence[Mapping[str, np.ndarray]], *, alpha: float = ALPHA) -> int:
    """Smooth every MatMul with constant f32 weights; how many were smoothed."""
    groups = find_groups(model)
    if not groups or not feeds:
        return 0
    maxima = activation_maxima(model, groups, feeds)
    for group, amax in zip(groups, maxima):
        apply(group, scales(amax, [_weight_of(m) for m in group.matmuls], [_k_axis(m) for m in group.matmuls], alpha))
    release_memory()  # the replaced weights (glibc would keep their pages resident under NNCF's peak)
    return sum(len(g.matmuls) for g in groups)


def find_groups(model: Any) -> list[Group]:
    """Weighted MatMuls grouped by the tensor they read; the channel count is the weights' input size (the
    tensor's own last dimension may be dynamic after a computed Reshape)."""
    by_source: dict[tuple[int, int], list[Any]] = {}
    sources: dict[tuple[int, int], Any] = {}
    for op in model.get_ordered_ops():
        if op.get_type_name() != "MatMul" or op.get_attributes().get("transpose_a") or _weight(op) is None:
            continue
        src = op.input(0).get_source_output()
        if src.get_partial_shape().rank.is_dynamic:
            continue
        key = (id(src.get_node()), src.get_index())
        sources[key] = src
        by_source.setdefault(key, []).append(op)
    groups = []
    for key, matmuls in by_source.items():
        channels = {_weight_of(m).shape[_k_axis(m)] for m in matmuls}
        if len(channels) == 1:
            groups.append(Group(sources[key], tuple(matmuls), channels.pop()))
    return groups


def activation_maxima(
    model: Any, groups: Sequence[Group], feeds: Sequence[Mapping[str, np.ndarray]]
) -> list[np.ndarray]:
    """max |x| per channel (the last axis) of each group's input over all samples, from one compiled pass."""
    import openvino as ov
    import openvino.opset13 as ops

    results = []
    for g in groups:
        rank = g.source.get_partial_shape().rank.get_length()
        reduced = ops.reduce_max(ops.abs(g.source), np.arange(rank - 1, dtype=np.int64), keep_dims=False)
        results.append(ops.result(reduced))
    probe = ov.Model(results, model.get_parameters(), "d2v-smooth-statistics")
    compiled = ov.Core().compile_model(probe, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    maxima = [np.zeros(g.channels, np.float32) for g in groups]
    request = compiled.create_infer_request()
    for feed in feeds:
        request.infer(dict(feed))
        for i in range(len(groups)):
            np.maximum(maxima[i], np.asarray(request.get_output_tensor(i).data, np.float32), out=maxima[i])
    del request, compiled, probe, results  # the probe's nodes hang off the model's tensors until it goes
    return maxima


def scales(amax: np.ndarray, weights: Sequence[np.ndarray], k_axes: Sequence[int], alpha: float) -> np.ndarray:
    """The per-channel scale for one group (activation maxima, each MatMul's weight and its input-channel axis):
    of the scales each MatMul's own weights give, the most even one (largest smallest/largest ratio)."""
    best, best_ratio = None, -1.0
    for w, axis in zip(weights, k_axes):
        other = tuple(i for i in range(w.ndim) if i != axis % w.ndim)
        s = _scale(amax, np.max(np.abs(w), axis=other).reshape(-1), alpha)
        ratio = float(s.min() / (s.max() + np.finfo(np.float32).eps))
        if ratio > best_ratio:
            best, best_ratio = s, ratio
    assert best is not None
    return best


def _scale(amax: np.ndarray, wmax: np.ndarray, alpha: float) -> np.ndarray:
    eps = np.finfo(np.float32).eps
    s = np.power(amax.astype(np.float32), alpha) / (np.power(wmax.astype(np.float32), 1.0 - alpha) + eps)
    return np.clip(s, np.quantile(s, QUANTILE), CEILING).astype(np.float32)


def apply(group: Group, s: np.ndarray) -> None:
    """Weights times ``s`` on their input channels, one at a time; the input divided by ``s`` (one Multiply)."""
    import openvino.opset13 as ops

    rank = group.source.get_partial_shape().rank.get_length()
    inverse = (1.0 / s).astype(np.float32).reshape([1] * (rank - 1) + [s.size])
    mul = ops.multiply(group.source, ops.constant(inverse))
    mul.set_friendly_name(group.source.get_node().get_friendly_name() + SUFFIX)
    for matmul in group.matmuls:
        w = _weight_of(matmul)
        axis = _k_axis(matmul) % w.ndim
        shape = [1] * w.ndim
        shape[axis] = s.size
        scaled = ops.constant((w * s.reshape(shape)).astype(w.dtype, copy=False))
        scaled.set_friendly_name(matmul.input(1).get_source_output().get_node().get_friendly_name())
        matmul.input(1).replace_source_output(scaled.output(0))
        matmul.input(0).replace_source_output(mul.output(0))
        del w, scaled  # the old constant is freed with its last reader


def _weight(matmul: Any) -> np.ndarray | None:
    """The MatMul's own constant f32 weight; None for anything else, and (as NNCF) for a weight that other
    operations read too (a language-model decoder tied to the embedding table)."""
    node = matmul.input(1).get_source_output().get_node()
    if node.get_type_name() != "Constant" or node.get_element_type().get_type_name() != "f32":
        return None
    if len(node.output(0).get_target_inputs()) > 1:
        return None
    data = node.get_data()
    return data if data.ndim >= 2 else None


def _weight_of(matmul: Any) -> np.ndarray:
    w = _weight(matmul)
    assert w is not None, "find_groups keeps only MatMuls with constant weights"
    return w


def _k_axis(matmul: Any) -> int:
    """The weight's input-channel axis: the last with transpose_b ([N, K]), else the one before it ([K, N])."""
    return -1 if matmul.get_attributes().get("transpose_b") else -2
