"""Data2Vec graph clean-up: exact rewrites of the exported fp32 ONNX, applied before quantization.

    model = onnx.load(path)
    done = clean_up(model)          # {"fold_constants": 348, "fold_layer_scale": 24, ...}: what each rewrite changed
    onnx.save(model, target)

Each rewrite keeps the graph's function (checked by ``max_difference`` where it is used) and changes only
how much work the runtime does:

- ``fold_constants``: every node whose inputs are all constants is computed once (ONNX Runtime) and
  replaced by its value. On vision this removes the relative-position-bias machinery the exporter leaves
  (about 400 Gather/Scatter/Resize/Unsqueeze nodes per model) and leaves one [heads, tokens, tokens]
  bias per layer.
- ``fold_layer_scale``: ``MatMul(x, W) + b`` followed by ``* gamma`` (BEiT's layer scale, the lambdas
  of data2vec-vision) becomes ``MatMul(x, W * gamma) + b * gamma``: one elementwise pass over the
  hidden states less per residual branch, and nothing for INT8 to get wrong (per-channel weight scales
  absorb gamma).
- ``fold_query_scale``: the ``1 / sqrt(head_dim)`` applied to the query (or to the scores) is folded
  into the query projection's weights and bias.
- ``channel_layernorm``: ``Transpose -> LayerNormalization(last axis) -> Transpose`` over a
  (batch, channels, time) tensor (the audio feature encoder and positional convolution) becomes the
  same normalisation over axis 1 written as ReduceMean / Sub / Mul / Sqrt / Div, which OpenVINO fuses
  into one MVN over channels: two transposes (and their reorders) less per layer.
- ``merge_qkv``: the three projections that read the same hidden states become one MatMul with the
  weights side by side, then Split: one larger GEMM instead of three (better kernel efficiency at
  batch 1).

Which rewrites a target gets is data (``REWRITES`` and the backends' choice); ``benchmarks/peers.py``
measures each one, including when it gives nothing.
"""

from __future__ import annotations

import collections
from typing import Any, Callable, Iterable

import numpy as np

LAYOUT_OPS = ("Reshape", "Transpose")


class _Graph:
    """Producer / consumer indexes over an onnx GraphProto, and constant values by name."""

    def __init__(self, model: Any) -> None:
        from onnx import numpy_helper

        self.model = model
        self.g = model.graph
        self.inits = {t.name: t for t in self.g.initializer}
        self.const_nodes = {n.output[0]: n for n in self.g.node if n.op_type == "Constant" and len(n.output) == 1}
        self.producer: dict[str, Any] = {o: n for n in self.g.node for o in n.output}
        self.consumers: dict[str, list[Any]] = collections.defaultdict(list)
        for n in self.g.node:
            for i in n.input:
                self.consumers[i].append(n)
        self.outputs = {o.name for o in self.g.output}
        self.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 18)
        self._np = numpy_helper

    def value(self, name: str) -> np.ndarray | None:
        if name in self.inits:
            return self._np.to_array(self.inits[name])
        node = self.const_nodes.get(name)
        if node is not None:
            for a in node.attribute:
                if a.name == "value":
                    return self._np.to_array(a.t)
        return None

    def only_consumer(self, name: str) -> Any:  # a NodeProto or None
        users = self.consumers.get(name, [])
        return users[0] if len(users) == 1 and name not in self.outputs else None

    def set_initializer(self, name: str, array: np.ndarray) -> str:
        """A new initializer (a fresh name: the old one may be shared)."""
        new = self.fresh(name)
        self.g.initializer.append(self._np.from_array(np.ascontiguousarray(array), new))
        self.inits[new] = self.g.initializer[-1]
        return new

    def replace(self, old: list[Any], new: list[Any]) -> None:
        """Remove the ``old`` nodes and insert ``new`` where the first of them stood (topological order kept)."""
        at = min(list(self.g.node).index(n) for n in old)
        for n in old:
            self.g.node.remove(n)
        for k, n in enumerate(new):
            self.g.node.insert(at + k, n)

    def fresh(self, base: str) -> str:
        taken = set(self.inits) | set(self.producer) | {i.name for i in self.g.input}
        i = 0
        while f"{base}_d2v{i}" in taken:
            i += 1
        return f"{base}_d2v{i}"


def _prune(model: Any) -> None:
    """Drop nodes whose outputs nobody reads, then initializers nobody reads."""
    g = model.graph
    needed = {o.name for o in g.output}
    drop = []
    for k in range(len(g.node) - 1, -1, -1):
        n = g.node[k]
        if any(o in needed for o in n.output):
            needed.update(i for i in n.input if i)
            for a in n.attribute:  # subgraphs (If/Loop) read names from outside
                if a.g is not None and a.g.node:
                    needed.update(i for sn in a.g.node for i in sn.input)
        else:
            drop.append(k)
    _delete(g.node, drop)
    _delete(g.initializer, [k for k, t in enumerate(g.initializer) if t.name not in needed])


def _delete(repeated: Any, indexes: Iterable[int]) -> None:
    """Remove the items at ``indexes`` from a repeated protobuf field in place.

    Not ``del field[:]`` + ``extend(kept)``: extend copies every kept message, and the copies of the
    initializers were a full copy of the weights per rewrite (measured on vision base: +0.35 GB resident
    per rewrite, 1.1 GB for the four, until the model is freed).
    """
    for k in sorted(set(indexes), reverse=True):
        del repeated[k]


# ------------------------------------------------------------------------------------------ rewrites


def fold_constants(model: Any) -> int:
    """Compute every node that depends on constants only (no graph input) with the reference runtime (no graph
    optimisations: each node as it is); returns the node count folded."""
    import onnx
    from onnx import helper, numpy_helper

    from .. import backends

    g = model.graph
    known = {t.name for t in g.initializer}
    skip = ("RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial")
    constant: list[Any] = []
    for n in g.node:  # topological order
        if n.op_type in skip or any(a.g is not None and a.g.node for a in n.attribute):
            continue
        if all((not i) or i in known for i in n.input):
            constant.append(n)
            known.update(n.output)
    if not any(n.op_type != "Constant" for n in constant):
        return 0
    const_ids = {id(n) for n in constant}
    const_names = {o for n in constant for o in n.output}
    boundary: list[str] = []  # constant values read by the rest of the graph or by its outputs
    for n in g.node:
        if id(n) not in const_ids:
            boundary.extend(i for i in n.input if i in const_names and i not in boundary)
    boundary.extend(o.name for o in g.output if o.name in const_names and o.name not in boundary)
    reads = {i for n in constant for i in n.input}
    types = _value_types(model)
    sub = helper.make_graph(
        constant,
        "const",
        [],
        [helper.make_tensor_value_info(b, types.get(b, onnx.TensorProto.FLOAT), None) for b in boundary],
        initializer=[t for t in g.initializer if t.name in reads],
    )
    sub_model = helper.make_model(sub, opset_imports=model.opset_import, ir_version=model.ir_version)
    values: dict[str, np.ndarray] = {}
    if boundary:
        with backends.reference().onnx_runner(
            sub_model.SerializeToString(), threads=0, name="constant folding", optimize=False
        ) as runner:
            values = runner.infer({})
    for name in boundary:
        g.initializer.append(numpy_helper.from_array(np.asarray(values[name]), name))
    _delete(g.node, [k for k, n in enumerate(g.node) if id(n) in const_ids])
    _prune(model)
    return sum(n.op_type != "Constant" for n in constant)


def _value_types(model: Any) -> dict[str, int]:
    """Element type of every value ONNX shape inference can name (the folded values need one)."""
    import onnx

    inferred = onnx.shape_inference.infer_shapes(_without_weights(model), strict_mode=False)
    g = inferred.graph
    return {
        v.name: v.type.tensor_type.elem_type
        for v in [*g.value_info, *g.output, *g.input]
        if v.type.tensor_type.elem_type
    }


def _without_weights(model: Any, limit: int = 4096) -> Any:
    """A copy of ``model`` for shape inference in which every initializer over ``limit`` bytes is a typed
    graph input instead (same name, type and shape; no data).

    Shape inference serialises the model, parses it in C++ and back: with the weights that was three
    transient copies of them (measured on vision base: +1.1 GB for 0.38 GB of weights). Only small
    constants (shapes, axes, scalars) carry values that inference reads.
    """
    import onnx
    from onnx import helper

    light = onnx.ModelProto()
    for field in ("ir_version", "producer_name", "producer_version", "domain", "model_version"):
        setattr(light, field, getattr(model, field))
    light.opset_import.extend(model.opset_import)
    light.functions.extend(model.functions)
    g, lg = model.graph, light.graph
    lg.name = g.name
    lg.node.extend(g.node)
    lg.input.extend(g.input)
    lg.output.extend(g.output)
    lg.value_info.extend(g.value_info)
    for t in g.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL or len(t.raw_data) > limit:
            lg.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
        else:
            lg.initializer.append(t)
    return light


def _weight_bias(gr: _Graph, add: Any) -> tuple[Any, int, int] | None:
    """For ``Add(MatMul(x, W), b)`` (either order) with constant W [K, N] and b [N]: (matmul, W input index, b input index)."""
    if add.op_type != "Add":
        return None
    for mi, bi in ((0, 1), (1, 0)):
        mm = gr.producer.get(add.input[mi])
        b = gr.value(add.input[bi])
        if mm is None or mm.op_type != "MatMul" or b is None or gr.only_consumer(mm.output[0]) is not add:
            continue
        w = gr.value(mm.input[1])
        if w is not None and w.ndim == 2 and b.ndim == 1 and b.shape[0] == w.shape[1]:
            return mm, 1, bi
    return None


def _scale_projection(gr: _Graph, add: Any, mm: Any, bias_index: int, scale: Any) -> None:
    w = gr.value(mm.input[1])
    b = gr.value(add.input[bias_index])
    assert w is not None and b is not None
    mm.input[1] = gr.set_initializer(mm.input[1], (w * scale).astype(w.dtype))
    add.input[bias_index] = gr.set_initializer(add.input[bias_index], (b * scale).astype(b.dtype))


def _bypass(gr: _Graph, node: Any, keep_input: str) -> None:
    """Remove ``node`` (one output) and let its readers read ``keep_input`` instead."""
    out = node.output[0]
    for user in gr.consumers.get(out, []):
        for k, name in enumerate(user.input):
            if name == out:
                user.input[k] = keep_input
    gr.consumers[keep_input].extend(gr.consumers.get(out, []))
    for o in gr.g.output:
        if o.name == out:  # a graph output keeps its name: rename the producer instead
            gr.producer[keep_input].output[list(gr.producer[keep_input].output).index(keep_input)] = out
    gr.g.node.remove(node)


def fold_layer_scale(model: Any) -> int:
    """``(MatMul(x, W) + b) * gamma`` with constant per-channel gamma -> ``MatMul(x, W*gamma) + b*gamma``."""
    gr = _Graph(model)
    count = 0
    for mul in [n for n in gr.g.node if n.op_type == "Mul"]:
        for xi, gi in ((0, 1), (1, 0)):
            gamma = gr.value(mul.input[gi])
            add = gr.producer.get(mul.input[xi])
            if gamma is None or add is None or gr.only_consumer(add.output[0]) is not mul:
                continue
            found = _weight_bias(gr, add)
            if found is None:
                continue
            mm, _, bi = found
            n_out = gr.value(mm.input[1]).shape[1]  # type: ignore[union-attr]
            if gamma.size not in (1, n_out) or gamma.ndim > 1 and any(d != 1 for d in gamma.shape[:-1]):
                continue
            _scale_projection(gr, add, mm, bi, gamma.reshape(-1).astype(np.float32))
            _bypass(gr, mul, add.output[0])
            count += 1
            break
    _prune(model)
    return count


def fold_query_scale(model: Any) -> int:
    """A scalar Mul/Div on the query (after its projection, through reshapes/transposes) or on the raw
    scores ``MatMul(q, k^T)`` is folded into the query projection. Returns the number folded."""
    gr = _Graph(model)
    count = 0
    for node in [n for n in gr.g.node if n.op_type in ("Mul", "Div")]:
        scalar = gr.value(node.input[1])
        if scalar is None or scalar.size != 1:
            continue
        factor = float(scalar.reshape(())) if node.op_type == "Mul" else 1.0 / float(scalar.reshape(()))
        src = gr.producer.get(node.input[0])
        if src is None:
            continue
        if src.op_type == "MatMul" and gr.only_consumer(src.output[0]) is node and gr.value(src.input[1]) is None:
            start = gr.producer.get(src.input[0])  # scores = q @ k^T: walk back from q
        else:
            start = src
        if start is None or gr.only_consumer(start.output[0]) not in (src, node):
            continue  # the query (or the projection) is read elsewhere too: scaling it would change that reader
        chain = _walk_to_projection(gr, start)
        if chain is None:
            continue
        add, mm, bi = chain
        _scale_projection(gr, add, mm, bi, np.float32(factor))
        _bypass(gr, node, node.input[0])
        count += 1
    _prune(model)
    return count


def _walk_to_projection(gr: _Graph, node: Any) -> tuple[Any, Any, int] | None:
    """Back through single-consumer Reshape/Transpose nodes to ``Add(MatMul(x, W), b)``."""
    while node is not None and node.op_type in LAYOUT_OPS:
        prev = gr.producer.get(node.input[0])
        if prev is None or gr.only_consumer(prev.output[0]) is not node:
            return None
        node = prev
    if node is None:
        return None
    if node.op_type != "Add":
        return None
    found = _weight_bias(gr, node)
    if found is None:
        return None
    mm, _, bi = found
    return node, mm, bi


def channel_layernorm(model: Any) -> int:
    """``Transpose(0,2,1) -> LayerNormalization(axis=-1) -> Transpose(0,2,1)`` -> normalisation over axis 1."""
    from onnx import helper

    gr = _Graph(model)
    count = 0
    for ln in [n for n in gr.g.node if n.op_type == "LayerNormalization"]:
        t1 = gr.producer.get(ln.input[0])
        t2 = gr.only_consumer(ln.output[0])
        if t1 is None or t2 is None or t1.op_type != "Transpose" or t2.op_type != "Transpose":
            continue
        if gr.only_consumer(t1.output[0]) is not ln or _perm(t1) != [0, 2, 1] or _perm(t2) != [0, 2, 1]:
            continue
        attrs = {a.name: a for a in ln.attribute}
        axis = attrs["axis"].i if "axis" in attrs else -1
        eps = attrs["epsilon"].f if "epsilon" in attrs else 1e-5
        gamma = gr.value(ln.input[1])
        beta = gr.value(ln.input[2]) if len(ln.input) > 2 and ln.input[2] else None
        if axis not in (-1, 2) or gamma is None or gamma.ndim != 1:
            continue
        x, y, p = t1.input[0], t2.output[0], ln.name or f"ln{count}"
        nodes = []

        def reduce_mean(inp: str, out: str) -> Any:
            if gr.opset >= 18:
                axes = gr.set_initializer(f"{p}_axes", np.array([1], np.int64))  # noqa: B023 - called at once, in this iteration
                return helper.make_node("ReduceMean", [inp, axes], [out], keepdims=1, name=out)
            return helper.make_node("ReduceMean", [inp], [out], axes=[1], keepdims=1, name=out)

        nodes.append(reduce_mean(x, f"{p}_mean"))
        nodes.append(helper.make_node("Sub", [x, f"{p}_mean"], [f"{p}_centered"], name=f"{p}_centered"))
        nodes.append(helper.make_node("Mul", [f"{p}_centered", f"{p}_centered"], [f"{p}_sq"], name=f"{p}_sq"))
        nodes.append(reduce_mean(f"{p}_sq", f"{p}_var"))
        eps_name = gr.set_initializer(f"{p}_eps", np.array(eps, np.float32))
        nodes.append(helper.make_node("Add", [f"{p}_var", eps_name], [f"{p}_vareps"], name=f"{p}_vareps"))
        nodes.append(helper.make_node("Sqrt", [f"{p}_vareps"], [f"{p}_std"], name=f"{p}_std"))
        nodes.append(helper.make_node("Div", [f"{p}_centered", f"{p}_std"], [f"{p}_normed"], name=f"{p}_normed"))
        g_name = gr.set_initializer(f"{p}_gamma", gamma.reshape(-1, 1).astype(np.float32))
        last = f"{p}_scaled" if beta is not None else y
        nodes.append(helper.make_node("Mul", [f"{p}_normed", g_name], [last], name=f"{p}_scaled"))
        if beta is not None:
            b_name = gr.set_initializer(f"{p}_beta", beta.reshape(-1, 1).astype(np.float32))
            nodes.append(helper.make_node("Add", [last, b_name], [y], name=f"{p}_shifted"))
        gr.replace([t1, ln, t2], nodes)
        count += 1
    _prune(model)
    return count


def _perm(node: Any) -> list[int]:
    for a in node.attribute:
        if a.name == "perm":
            return list(a.ints)
    return []


def merge_qkv(model: Any) -> int:
    """Three or more ``Add(MatMul(x, W_i), b_i)`` (or bias-less MatMuls) reading the same ``x`` with
    constant [K, N_i] weights -> ``Split(Add(MatMul(x, concat W), concat b))``. Returns groups merged."""
    from onnx import helper

    gr = _Graph(model)
    count = 0
    for x, users in list(gr.consumers.items()):
        mms = [
            u
            for u in users
            if u.op_type == "MatMul" and u.input[0] == x and (w := gr.value(u.input[1])) is not None and w.ndim == 2
        ]
        if len(mms) < 3:
            continue
        k_dim = {gr.value(m.input[1]).shape[0] for m in mms}  # type: ignore[union-attr]
        if len(k_dim) != 1:
            continue
        parts = []  # (matmul, add or None, bias)
        for m in mms:
            add = gr.only_consumer(m.output[0])
            found = _weight_bias(gr, add) if add is not None else None
            if found is not None and found[0] is m:
                parts.append((m, add, gr.value(add.input[found[2]])))
            else:
                parts.append((m, None, None))
        weights = [gr.value(m.input[1]) for m, _, _ in parts]
        widths = [int(w.shape[1]) for w in weights]  # type: ignore[union-attr]
        has_bias = any(a is not None for _, a, _ in parts)
        name = gr.fresh(f"qkv_{count}")
        w_all: np.ndarray = np.concatenate(weights, axis=1)  # type: ignore[arg-type]
        new_nodes = [
            helper.make_node("MatMul", [x, gr.set_initializer(f"{name}_w", w_all)], [f"{name}_mm"], name=f"{name}_mm")
        ]
        last = f"{name}_mm"
        if has_bias:
            b_all = np.concatenate(
                [b if b is not None else np.zeros(wd, np.float32) for (_, _, b), wd in zip(parts, widths)]
            ).astype(np.float32)
            new_nodes.append(
                helper.make_node(
                    "Add", [last, gr.set_initializer(f"{name}_b", b_all)], [f"{name}_add"], name=f"{name}_add"
                )
            )
            last = f"{name}_add"
        outs = [(a.output[0] if a is not None else m.output[0]) for m, a, _ in parts]
        split = gr.set_initializer(f"{name}_split", np.array(widths, np.int64))
        if gr.opset >= 13:
            new_nodes.append(helper.make_node("Split", [last, split], outs, axis=-1, name=f"{name}_split"))
        else:
            new_nodes.append(helper.make_node("Split", [last], outs, axis=-1, split=widths, name=f"{name}_split"))
        gr.replace([n for m, a, _ in parts for n in (m, a) if n is not None], new_nodes)
        count += 1
    _prune(model)
    return count


# ------------------------------------------------------------------------------------------ driver

REWRITES: dict[str, Callable[[Any], int]] = {
    "fold_constants": fold_constants,
    "fold_layer_scale": fold_layer_scale,
    "fold_query_scale": fold_query_scale,
    "channel_layernorm": channel_layernorm,
    "merge_qkv": merge_qkv,
}
DEFAULT = ("fold_constants", "fold_layer_scale", "fold_query_scale", "channel_layernorm")


def clean_up(model: Any, names: Iterable[str] = DEFAULT) -> dict[str, int]:
    """Apply the named rewrites in order; returns how many places each changed (zeros kept: 'gave nothing' is a result)."""
    done = {}
    for name in names:
        done[name] = REWRITES[name](model)
    return done


def rewrite_graph(
    graph: Any, names: Iterable[str], target: Any, feeds: Iterable[Any], tolerance: float
) -> tuple[Any, dict[str, int]]:
    """``graph`` (an ExportedGraph) with the named rewrites, written to ``target``; checked on ``feeds``.

    The rewritten file must match the export within ``tolerance`` (scaled like the export check:
    max |a - b| / max(1, max |a|)); otherwise the export itself is returned with an empty record, so a
    rewrite can never change what a model computes.
    """
    import dataclasses

    import onnx

    names = tuple(names)
    if not names:
        return graph, {}
    model = onnx.load(str(graph.path))
    done = clean_up(model, names)
    if not any(done.values()):
        return graph, done
    target.parent.mkdir(parents=True, exist_ok=True)
    from ..convert.export import EXTERNAL_DATA_BYTES

    large = _initializer_bytes(model) > EXTERNAL_DATA_BYTES  # as the export: the inline save holds the weights twice
    onnx.save(model, str(target), save_as_external_data=large, location=target.name + ".data" if large else None)
    del model
    if scaled_difference(graph.path, target, list(feeds)) > tolerance:
        return graph, {}
    return dataclasses.replace(graph, path=target), done


def _initializer_bytes(model: Any) -> int:
    """The size of the graph's initializers from their shapes and types.

    Not ``model.ByteSize()``: protobuf's upb backend serialises the whole message to measure it, a
    transient copy of every weight (measured at vision large: the clean-up's high-water mark 2.55 ->
    5.12 GB, between two RSS samples 20 ms apart).
    """
    from onnx import helper

    total = 0
    for t in model.graph.initializer:
        total += int(np.prod(t.dims, dtype=np.int64)) * helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
    return total


def scaled_difference(a: Any, b: Any, feeds: list[Any]) -> float:
    """Worst output difference of two ONNX files on ``feeds`` (the reference runtime), scaled by the output's magnitude."""
    from .. import backends
    from ..convert.validate import scaled_error

    # One session at a time (the outputs are small, each session holds a copy of the weights).
    with backends.reference().onnx_runner(a, threads=1) as ra:
        xs = [ra.infer(feed) for feed in feeds]
    worst = 0.0
    with backends.reference().onnx_runner(b, threads=1) as rb:
        for feed, x in zip(feeds, xs):
            y = rb.infer(feed)
            for name, ref in x.items():
                worst = max(worst, scaled_error(ref, y[name])[1])
    return worst


def describe(done: dict[str, int]) -> str:
    """One line for an artifact's notes: what the clean-up changed."""
    changed = [f"{name} x{count}" for name, count in done.items() if count]
    return "graph clean-up before compiling (exact): " + (", ".join(changed) if changed else "nothing applied")


def for_model(graph: Any, names: Iterable[str], model: Any, profile: Any, target: Any) -> tuple[Any, dict[str, int]]:
    """``rewrite_graph`` checked on the model's own dummy inputs at the profile's opt and min shapes, within the head's tolerance."""
    from ..heads import dummy_inputs

    feeds = [dummy_inputs(model.head, model.config, profile.point(p), seed=3) for p in ("opt", "min")]
    return rewrite_graph(graph, names, target, feeds, model.head.tolerance)
