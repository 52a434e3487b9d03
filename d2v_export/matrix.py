"""The matrix: modalities x targets x precisions, one combined report, the latency-versus-drift front.

    from d2v_export.matrix import run_matrix
    doc = run_matrix("preset:base", ["vision"], ["onnxruntime", "openvino"], ["fp32", "int8"], Path("out/matrix"))

A *cell* is (modality, target, precision). ``plan`` lists them in a fixed order — modalities as in
``Modality`` (vision, text, audio), targets by name, precisions as in ``Precision`` (fp32, fp16, bf16,
int8) — whatever order the options came in. ``shard=(i, n)`` (1 <= i <= n, written "i/n") keeps the
cells whose 0-based position k in that list has k % n == i - 1: shard 1/3 takes cells 0, 3, 6, ...
Every shard of a CI fan-out computes the same list, so the shards cover it exactly once;
``merge`` joins their matrix.json files.

Cells of one (modality, target) run in one ``pipeline.run`` (fp32 is always built; fp16, bf16 and int8
when such a cell is in the shard, as ``--fp16``/``--bf16``/``--int8`` of a single run); the precision
picks which variants of that run land in the matrix. Each target builds for its own device
(``devices``/``device``, as ``--device`` of a single run; default the target's own). An unknown target,
or a device a target does not take, is a usage error (exit 2) before anything runs. A target whose
backend or device is not available here, or that cannot build a precision
(``Backend.precision_problem``: the backend's own reason), is *skipped* with the reason; an error in
one run marks its cells *failed* and the others go on. A matrix in which no cell ran measured nothing:
``exit_code`` gives 6 (``nothing_measured`` says why and what to do), never 0.

Pareto front, per modality: variant a dominates b when a's p50 <= b's p50 and a's drift score <= b's,
one of them strictly. The drift score (``metrics.drift_score``) is the largest share of any budget
metric the variant uses: value / limit for errors, (1 - value) / (1 - limit) for agreement and cosine
metrics; 0 is identical to the reference, 1 is at the budget. fp32 variants are judged by their
export tolerance (max_scaled_error), INT8 variants by their task budget.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import math
import os
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from . import __version__
from .measure.bench import BenchSettings
from .reports.html_report import SPEEDUP_MEANING
from .measure.metrics import drift_score
from .int8.pick import pareto
from .spec import D2VError, ExitCode, Modality, Precision, jsonable, verdict_code

# 1.1: variants' speedup_vs_common_reference (modalities_detail) and simulated; 1.2: variants' device
SCHEMA_VERSION = "1.2"
HALF = (
    Precision.FP16.value,
    Precision.BF16.value,
)  # the extra float precisions a run builds on request (RunOptions.half)


@dataclass(frozen=True)
class Cell:
    modality: str
    target: str
    precision: str

    @property
    def key(self) -> str:
        return f"{self.modality}/{self.target}/{self.precision}"


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """``"2/4"`` -> (2, 4); None or "" -> None. 1 <= i <= n."""
    if text is None or str(text).strip() == "":
        return None
    left, sep, right = str(text).strip().partition("/")
    try:
        i, n = int(left), int(right)
    except ValueError:
        raise D2VError(f"--shard '{text}': give i/n, e.g. 1/4 (the first of four shards)") from None
    if not sep or not (1 <= i <= n):
        raise D2VError(f"--shard '{text}': need 1 <= i <= n, e.g. 1/4 (the first of four shards)")
    return i, n


def _ordered(values: Iterable[str], canonical: Sequence[str]) -> list[str]:
    seen = list(dict.fromkeys(str(v).strip().lower() for v in values if str(v).strip()))
    rank = {name: i for i, name in enumerate(canonical)}
    return sorted(seen, key=lambda v: (rank.get(v, len(rank)), v))


def plan(
    modalities: Iterable[str],
    targets: Iterable[str],
    precisions: Iterable[str],
    *,
    shard: tuple[int, int] | None = None,
) -> list[Cell]:
    """Every cell in a fixed order; with ``shard=(i, n)`` only cells i-1, i-1+n, ... (0-based)."""
    mods = _ordered(modalities, [m.value for m in Modality])
    for m in mods:
        if m not in {x.value for x in Modality}:
            raise D2VError(f"unknown modality '{m}'; choose from: {', '.join(x.value for x in Modality)}")
    tgts = _ordered(targets, [])
    precs = _ordered(precisions, [p.value for p in Precision])
    for p in precs:
        if p not in {x.value for x in Precision}:
            raise D2VError(f"unknown precision '{p}'; choose from: {', '.join(x.value for x in Precision)}")
    cells = [Cell(m, t, p) for m in mods for t in tgts for p in precs]
    if shard is not None:
        i, n = shard
        if not (1 <= i <= n):
            raise D2VError(f"shard {i}/{n}: need 1 <= i <= n")
        cells = [c for k, c in enumerate(cells) if k % n == i - 1]
    return cells


def check_targets(targets: Iterable[str]) -> list[str]:
    """The matrix's targets in order; D2VError(USAGE) naming the valid ones for a name the registry does not know
    (a plug-in that failed to load is known: its cells are skipped with the reason)."""
    from . import backends

    tgts = _ordered(targets, [])
    known = set(backends.names()) | set(backends.broken())
    for t in tgts:
        if t not in known:
            raise D2VError(f"unknown target '{t}'; choose from: {', '.join(backends.names())}", ExitCode.USAGE)
    return tgts


def _skip_reason(cell: Cell, defer_build: bool = False, device: str | None = None) -> str | None:
    """Why a cell cannot run here, or None. With ``defer_build`` a target that can defer (TensorRT) runs.

    ``device``: the one the target builds for (None: its default); absent here, the cell is skipped."""
    from . import backends

    if cell.target not in backends.names():
        return f"target not usable: {backends.broken().get(cell.target, 'not a target')}"
    backend = backends.get(cell.target)
    reason = backends.unavailable(backend, defer_build=defer_build)
    if reason is not None:
        return f"target not available here: {reason}"
    try:
        device = backend.resolve_device(device or backend.devices.default, defer_build=defer_build)
    except D2VError as exc:
        return f"device not available here: {exc}"
    return backend.precision_problem(Precision(cell.precision), device)


def _cells_of_shard(
    modalities: Iterable[str], targets: Iterable[str], precisions: Iterable[str], shard: tuple[int, int] | None
) -> list[Cell]:
    """The cells of this shard (all without one); a shard that holds none is a usage error."""
    modalities, targets, precisions = list(modalities), list(targets), list(precisions)
    cells = plan(modalities, targets, precisions, shard=shard)
    if not cells and shard is not None:
        total = len(plan(modalities, targets, precisions))
        raise D2VError(
            f"--shard {shard[0]}/{shard[1]} holds no cell: the matrix has {total}; use at most {total} shards",
            ExitCode.USAGE,
        )
    return cells


def _runnable(
    cells: list[Cell],
    defer_build: bool,
    devices: Mapping[str, str],
    device: str | None,
    progress: Callable[[str], None],
) -> tuple[dict[str, dict[str, Any]], dict[tuple[str, str], list[Cell]]]:
    """(the skipped cells' documents, the runnable cells grouped by (modality, target))."""
    skipped: dict[str, dict[str, Any]] = {}
    groups: dict[tuple[str, str], list[Cell]] = {}
    for cell in cells:
        reason = _skip_reason(cell, defer_build, devices.get(cell.target) or device)
        if reason is not None:
            progress(f"{cell.key}: skipped ({reason})")
            skipped[cell.key] = _cell_doc(cell, "skipped", reason)
        else:
            groups.setdefault((cell.modality, cell.target), []).append(cell)
    return skipped, groups


def _check_devices(output: Path, targets: Sequence[str], device: str | None, devices: Mapping[str, str]) -> None:
    """Exit 2 for a device a target does not take, as a single run's options would, before anything runs."""
    from . import backends
    from .options import RunOptions

    known = tuple(t for t in targets if t in backends.names()) or (backends.DEFAULT,)
    RunOptions(output=output, targets=known, device=device, devices=dict(devices))


def _cell_reports(doc: Mapping[str, Any], root: Path) -> dict[str, Path]:
    """ "modality/target" -> the report.json of each cell that ran (the first of a group)."""
    out: dict[str, Path] = {}
    for c in doc.get("cells") or []:
        if c.get("status") == "ran" and c.get("report"):
            out.setdefault(f"{c['modality']}/{c['target']}", (root / c["report"]).parent / "report.json")
    return out


def run_matrix(
    model: str,
    modalities: Iterable[str],
    targets: Iterable[str],
    precisions: Iterable[str],
    output: Path,
    *,
    shard: tuple[int, int] | None = None,
    shapes: Any = None,
    bench: BenchSettings = BenchSettings(),
    quant: Any = None,
    threads: int = 0,
    task: str | None = None,
    force: bool = False,
    defer_build: bool = False,
    profile: Any = None,
    device: str | None = None,
    devices: Mapping[str, str] | None = None,
    progress: Callable[[str], None] = lambda _msg: None,
) -> dict[str, Any]:
    """Run the cells (of one shard), write matrix.json/.md/.html into ``output``, return the document.

    ``shapes``: an options.ShapeRequest (default: the model's defaults). ``quant``: the
    options.QuantOptions for int8 cells (default QuantOptions()). ``task``: None for each
    modality's default head. ``defer_build``: as the single run's --defer-build (TensorRT without
    TensorRT or a GPU: the portable half, latency and drift simulated on ONNX Runtime; such variants
    are marked ``simulated`` and kept off the front). ``profile``: a device profile whose latency budget
    judges every variant, as in a single run (its device, threads and shapes apply; the matrix's own
    targets and precisions stay). ``device``/``devices``: as RunOptions' (every target's device, and per
    target), checked before anything runs. Per-cell reports go to ``output/cells/<modality>-<target>/``.
    ``exit_code(doc)`` gates the result with the single run's rule; nothing ran: 6.
    """
    from .options import ShapeRequest

    output = Path(output)
    targets = check_targets(targets)
    devices = dict(devices or {})
    _check_devices(output, targets, device, devices)
    cells = _cells_of_shard(modalities, targets, precisions, shard)
    _check_output(output, force)
    output.mkdir(parents=True, exist_ok=True)
    shapes = shapes if shapes is not None else ShapeRequest()
    results, groups = _runnable(cells, defer_build, devices, device, progress)

    warnings: list[str] = []
    random_weights = False
    for (modality, target), group in groups.items():
        progress(f"{modality}/{target}: running ({', '.join(c.precision for c in group)})")
        cell_docs, random = _run_group(
            model,
            modality,
            target,
            group,
            output,
            shapes=shapes,
            bench=bench,
            quant=quant,
            threads=threads,
            task=task,
            defer_build=defer_build,
            profile=profile,
            progress=progress,
            device=devices.get(target) or device,
        )
        results.update(cell_docs)
        random_weights = random_weights or random
    doc = _document(
        model=model,
        cells=[results[c.key] for c in cells],
        modalities=_ordered(modalities, [m.value for m in Modality]),
        targets=targets,
        precisions=_ordered(precisions, [p.value for p in Precision]),
        shard=f"{shard[0]}/{shard[1]}" if shard else None,
        random_weights=random_weights,
        warnings=warnings,
    )
    write(doc, output)
    return doc


def _run_group(
    model: str,
    modality: str,
    target: str,
    group: list[Cell],
    output: Path,
    *,
    shapes: Any,
    bench: BenchSettings,
    quant: Any,
    threads: int,
    task: str | None,
    defer_build: bool,
    profile: Any,
    progress: Callable[[str], None],
    device: str | None = None,
) -> tuple[dict[str, dict[str, Any]], bool]:
    """The cells of one (modality, target) from one pipeline.run: their documents, and whether the weights were random."""
    from . import backends
    from .models import parse_source
    from .options import QuantOptions, RunOptions, apply_profile
    from .pipeline import run

    folder = output / "cells" / f"{modality}-{target}"
    want_int8 = any(c.precision == Precision.INT8.value for c in group)
    half = tuple(Precision(c.precision) for c in group if c.precision in HALF)
    try:
        spec = parse_source(model, Modality(modality), task)
        options = RunOptions(
            output=folder,
            targets=(target,),
            force=True,
            threads=threads,
            bench=bench,
            int8=(quant if quant is not None else QuantOptions()) if want_int8 else None,
            half=half,
            defer_build=defer_build,
            device=device,
        )
        if (
            profile is not None
        ):  # the matrix names targets and precisions; the profile its device, threads, shapes and budget
            explicit = {"targets", "int8"} | ({"device"} if device else set())
            options, shapes = apply_profile(options, shapes, profile, explicit=explicit)
            options = dataclasses.replace(options, half=half, int8=options.int8 if want_int8 else None)
        run(spec, shapes, options, progress=_prefixed(progress, f"{modality}/{target}"))
        report = json.loads((folder / "report.json").read_text(encoding="utf-8"))
    except Exception as exc:  # one cell's failure must not stop the others
        reason = _one_line(exc)
        progress(f"{modality}/{target}: failed ({reason})")
        code = int(getattr(exc, "code", ExitCode.INTERNAL)) if isinstance(exc, D2VError) else int(ExitCode.INTERNAL)
        return {cell.key: _cell_doc(cell, "failed", reason, exit_code=code) for cell in group}, False
    random_weights = bool((report.get("model") or {}).get("random_weights"))
    simulated = defer_build and not backends.get(target).available().ok
    return {
        cell.key: _cell_from_report(cell, report, folder, output, simulated=simulated) for cell in group
    }, random_weights


def _check_output(output: Path, force: bool) -> None:
    if (output / "matrix.json").exists() and not force:
        raise D2VError(f"'{output}' already holds a matrix.json; pass --force to replace it or choose another --output")


def _prefixed(progress: Callable[[str], None], prefix: str) -> Callable[[str], None]:
    def emit(msg: str) -> None:
        progress(f"{prefix}: {msg}")

    return emit


def exit_code(doc: Mapping[str, Any]) -> int:
    """The first failed cell's code (3 bad input, 4 export mismatch, 1 internal, ...); else 6 when no cell ran
    (``nothing_measured``); else the single run's rule (``spec.verdict_code``) over every variant: 5 when one
    is over its drift budget, then 8 when one is over the device profile's latency budget; else 0 (at least one
    cell ran, the others ran or were skipped)."""
    for cell in doc.get("cells") or []:
        if cell.get("status") == "failed":
            return int(cell.get("exit_code") or ExitCode.INTERNAL)
    if nothing_measured(doc) is not None:
        return int(ExitCode.TARGET_UNAVAILABLE)
    variants = [v for c in doc.get("cells") or [] for v in c.get("variants") or []]
    return int(
        verdict_code(
            drift_passed=all(v.get("drift_passed") is not False for v in variants),
            latency_passed=all(v.get("latency_budget_passed") is not False for v in variants),
        )
    )


def nothing_measured(doc: Mapping[str, Any]) -> str | None:
    """The error line for a matrix in which no cell ran (every cell skipped, or none at all), else None."""
    cells = doc.get("cells") or []
    if any(c.get("status") == "ran" for c in cells):
        return None
    first = next(
        (
            f"{c['modality']}/{c['target']}/{c['precision']}: {c.get('reason')}"
            for c in cells
            if c.get("status") == "skipped"
        ),
        "",
    )
    return (
        f"the matrix measured nothing: {len(cells)} cell(s), none ran"
        + (f" (e.g. {first})" if first else "")
        + "; choose targets and precisions that run here (d2v-export doctor lists them), install the missing runtime, "
        "or pass --defer-build for a target that defers its build"
    )


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    first = text[0] if text else ""
    return (
        first if getattr(exc, "code", None) is not None and first else f"{exc.__class__.__name__}: {first}".rstrip(": ")
    )


def _cell_doc(cell: Cell, status: str, reason: str = "", **extra: Any) -> dict[str, Any]:
    return {
        "modality": cell.modality,
        "target": cell.target,
        "precision": cell.precision,
        "status": status,
        "reason": reason,
        "report": None,
        "task": None,
        "reference_p50_ms": None,
        "variants": [],
    } | extra


SIMULATED = (
    "deferred build: latency and drift were measured on a stand-in for the target's runtime ({device}), not on "
    "the target; build the artifact on the device and measure it there"
)


def _cell_from_report(
    cell: Cell, report: Mapping[str, Any], folder: Path, output: Path, *, simulated: bool = False
) -> dict[str, Any]:
    ref = (report.get("reference") or {}).get("latency_ms") or {}
    variants = [v for v in report.get("variants") or [] if v.get("precision") == cell.precision]
    html = folder / "report.html"
    link = os.path.relpath(html if html.exists() else folder / "report.md", output)
    if not variants:
        return _cell_doc(cell, "failed", f"the run built no {cell.precision} variant", report=link)
    entries = [_variant_entry(v, ref.get("p50")) | {"simulated": simulated} for v in variants]
    failed = [e["name"] for e in entries if e["drift_passed"] is False]
    stand_in = SIMULATED.format(device=entries[0].get("device") or "another runtime") if simulated else ""
    reason = "; ".join(r for r in (f"drift over budget: {', '.join(failed)}" if failed else "", stand_in) if r)
    return _cell_doc(
        cell,
        "ran",
        reason,
        report=link,
        task=(report.get("model") or {}).get("task"),
        reference_p50_ms=ref.get("p50"),
        variants=entries,
    )


def _variant_entry(v: Mapping[str, Any], ref_p50: float | None) -> dict[str, Any]:
    lat = v.get("latency_ms") or {}
    drift = v.get("drift") or {}
    budget = drift.get("budget") or {}
    key = next(iter(budget), None) or next(iter(drift.get("metrics") or {}), None)
    score = drift_score(drift)
    return {
        "name": v.get("name"),
        "target": v.get("target"),
        "precision": v.get("precision"),
        "device": v.get("device"),
        "quantization": (v.get("quantization") or {}).get("mode") if v.get("quantization") else None,
        "p50_ms": lat.get("p50"),
        "p90_ms": lat.get("p90"),
        "p99_ms": lat.get("p99"),
        "speedup_vs_reference": v.get("speedup_vs_reference"),
        "drift_passed": drift.get("passed"),
        "drift_score": score if score is None or math.isfinite(score) else None,
        "key_metric": key,
        "key_metric_value": (drift.get("metrics") or {}).get(key) if key else None,
        "failed_metrics": list(drift.get("failed") or []),
    } | ({"latency_budget_passed": v["latency_budget"].get("passed")} if v.get("latency_budget") else {})


def summarize(cells: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Per modality: its task, the reference p50 (median over runs), every variant, the front."""
    out: dict[str, Any] = {}
    for cell in cells:
        if cell.get("status") != "ran":
            continue
        info = out.setdefault(cell["modality"], {"task": cell.get("task"), "refs": [], "variants": []})
        if cell.get("reference_p50_ms") is not None:
            info["refs"].append(cell["reference_p50_ms"])
        known = {v["name"] for v in info["variants"]}
        info["variants"] += [
            dict(v, report=cell.get("report")) for v in cell.get("variants") or [] if v["name"] not in known
        ]
    for info in out.values():
        refs = info.pop("refs")
        ref = info["reference_p50_ms"] = statistics.median(refs) if refs else None
        for v in info["variants"]:  # one footing: every variant against the same reference p50
            v["speedup_vs_common_reference"] = round(ref / v["p50_ms"], 3) if ref and v.get("p50_ms") else None
        info["variants"].sort(key=lambda v: (v.get("p50_ms") is None, v.get("p50_ms") or 0.0, v["name"]))
        info["pareto"] = pareto(info["variants"])
    return out


def _document(
    *,
    model: str,
    cells: list[dict[str, Any]],
    modalities: list[str],
    targets: list[str],
    precisions: list[str],
    shard: str | None,
    random_weights: bool,
    warnings: list[str],
) -> dict[str, Any]:
    return {
        "schema_version": SCHEMA_VERSION,
        "kind": "matrix",
        "tool": {"name": "d2v-export", "version": __version__},
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "model": model,
        "random_weights": random_weights,
        "modalities": modalities,
        "targets": targets,
        "precisions": precisions,
        "shard": shard,
        "cells": cells,
        "modalities_detail": summarize(cells),
        "warnings": warnings,
        "passed": any(c["status"] == "ran" for c in cells)
        and all(c["status"] != "failed" for c in cells)
        and all(v.get("drift_passed") is not False for c in cells for v in c.get("variants") or []),
    }


def merge(
    docs: Sequence[Mapping[str, Any]], *, relocate: Callable[[Mapping[str, Any], str], str] | None = None
) -> dict[str, Any]:
    """Join the matrix.json documents of several shards (a cell that ran wins over a skipped/failed copy)."""
    if not docs:
        raise D2VError("nothing to merge: pass the matrix.json of every shard")
    models = {d.get("model") for d in docs}
    warnings = [w for d in docs for w in d.get("warnings") or []]
    if len(models) > 1:
        warnings.append(f"merged shards of different models: {', '.join(sorted(map(str, models)))}")
    rank = {"ran": 0, "failed": 1, "skipped": 2}
    cells: dict[str, dict[str, Any]] = {}
    for d in docs:
        for c in d.get("cells") or []:
            c = dict(c)
            if relocate is not None and c.get("report"):
                c["report"] = relocate(d, c["report"])
            key = f"{c['modality']}/{c['target']}/{c['precision']}"
            if key not in cells or rank.get(c["status"], 9) < rank.get(cells[key]["status"], 9):
                cells[key] = c
    mods = _ordered((m for d in docs for m in d.get("modalities") or []), [m.value for m in Modality])
    tgts = _ordered((t for d in docs for t in d.get("targets") or []), [])
    precs = _ordered((p for d in docs for p in d.get("precisions") or []), [p.value for p in Precision])
    order = [c.key for c in plan(mods, tgts, precs)]
    ordered = [cells[k] for k in order if k in cells] + [c for k, c in cells.items() if k not in order]
    missing = [k for k in order if k not in cells]
    if missing:
        warnings.append(
            f"{len(missing)} cell(s) in no shard: {', '.join(missing[:6])}" + (" …" if len(missing) > 6 else "")
        )
    return _document(
        model=str(next(iter(models))),
        cells=ordered,
        modalities=mods,
        targets=tgts,
        precisions=precs,
        shard=None,
        random_weights=any(d.get("random_weights") for d in docs),
        warnings=warnings,
    )


def merge_files(paths: Sequence[Path], output: Path, *, force: bool = False) -> dict[str, Any]:
    """Read the shards' matrix.json files, merge, write matrix.json/.md/.html into ``output``.

    As ``run_matrix``: an ``output`` that already holds a matrix.json needs ``force``."""
    from .reports.compare import load_report

    output = Path(output)
    _check_output(output, force)
    docs, where = [], {}
    for p in paths:  # every shard is read and merged before anything is written: a bad one leaves no folder behind
        p = Path(p)
        p = p / "matrix.json" if p.is_dir() else p
        d = load_report(p)
        if d.get("kind") != "matrix":
            raise D2VError(f'\'{p}\' is not a matrix.json (no "kind": "matrix"); pass the matrix.json of each shard')
        unknown = sorted(
            set(d.get("modalities") or ()) - {m.value for m in Modality}
            | set(d.get("precisions") or ()) - {x.value for x in Precision}
        )
        if unknown:
            raise D2VError(
                f"'{p}' names an unknown modality or precision ({', '.join(unknown)}); pass the matrix.json a d2v-export shard wrote"
            )
        docs.append(d)
        where[id(d)] = p.parent

    def relocate(d: Mapping[str, Any], link: str) -> str:
        return os.path.relpath(where[id(d)] / link, output)

    doc = merge(docs, relocate=relocate)
    output.mkdir(parents=True, exist_ok=True)
    write(doc, output)
    return doc


def markdown(doc: Mapping[str, Any]) -> str:
    lines = [f"# d2v-export matrix: {doc.get('model')}", ""]
    if doc.get("random_weights"):
        lines += [
            "> **RANDOM WEIGHTS** — presets have the real architecture but untrained weights: latency is meaningful, "
            "accuracy numbers only measure conversion drift.",
            "",
        ]
    if doc.get("shard"):
        lines += [f"Shard {doc['shard']} of the matrix.", ""]
    lines += ["| modality | target | precision | status | reason |", "|---|---|---|---|---|"]
    for c in doc.get("cells") or []:
        lines.append(
            f"| {c['modality']} | {c['target']} | {c['precision']} | {c['status']} | {_md(c.get('reason') or '')} |"
        )
    for modality, info in (doc.get("modalities_detail") or {}).items():
        front = info.get("pareto") or []
        lines += ["", f"## {modality}: {info.get('task')}", ""]
        ref = info.get("reference_p50_ms")
        if ref is not None:
            lines += [f"PyTorch fp32 reference p50 {ref:.3f} ms. {SPEEDUP_MEANING}", ""]
        lines += [
            "| variant | p50 ms | speedup vs common ref | drift score | key metric | drift | front |",
            "|---|---:|---:|---:|---|---|---|",
        ]
        for v in info.get("variants") or []:
            p50 = f"{v['p50_ms']:.3f}" if v.get("p50_ms") is not None else "–"
            sp = f"{v['speedup_vs_common_reference']:.2f}×" if v.get("speedup_vs_common_reference") else "–"
            score = f"{v['drift_score']:.3g}" if v.get("drift_score") is not None else "–"
            key = (
                f"{v['key_metric']} {v['key_metric_value']:.4g}"
                if v.get("key_metric") and v.get("key_metric_value") is not None
                else "–"
            )
            ok = {True: "✅", False: "❌"}.get(v.get("drift_passed"), "–")
            lines.append(
                f"| {v['name']}{' (simulated)' if v.get('simulated') else ''} | {p50} | {sp} | {score} | {key} | {ok} | {'★' if v['name'] in front else ''} |"
            )
        lines += ["", f"Latency-versus-drift front: {', '.join(front) or 'none'}."]
    if doc.get("warnings"):
        lines += ["", "## Warnings", ""] + [f"- {_md(w)}" for w in doc["warnings"]]
    lines.append("")
    return "\n".join(lines)


def _md(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def write(doc: Mapping[str, Any], output: Path) -> tuple[Path, Path, Path]:
    """matrix.json, matrix.md and matrix.html in ``output``."""
    from .reports.html_report import write_matrix_html

    output = Path(output)
    j, m, h = output / "matrix.json", output / "matrix.md", output / "matrix.html"
    j.write_text(json.dumps(jsonable(doc), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    m.write_text(markdown(doc), encoding="utf-8")
    write_matrix_html(doc, h)
    return j, m, h


# ---------------------------------------------------------------------------------- baseline gate


def compare_to_baseline(
    doc: Mapping[str, Any],
    output: Path,
    baseline: Path,
    *,
    latency_tolerance: float = 0.10,
    drift_tolerance: float = 0.005,
) -> dict[str, Any]:
    """Each run of the merged matrix against the same (modality, target) run of a baseline matrix.

    ``baseline``: a previous merged matrix.json (or its folder) whose cell reports are still where its
    links point (keep the shard folders beside it, as the examples/ci workflow's artifact does).
    Writes comparison.json / comparison.md into ``output``; ``passed`` is False on any regression
    (compare.compare: latency beyond the tolerance with a Mann-Whitney test, or drift worsening).
    Runs missing on either side are listed, never a failure.
    """
    from .reports import compare as cmp

    baseline = Path(baseline)
    base_file = baseline / "matrix.json" if baseline.is_dir() else baseline
    base_doc = cmp.load_report(base_file)
    if base_doc.get("kind") != "matrix":
        raise D2VError(
            f'baseline \'{base_file}\' is not a matrix.json (no "kind": "matrix"); pass the merged matrix.json of the last run'
        )

    cur, base = _cell_reports(doc, Path(output)), _cell_reports(base_doc, base_file.parent)
    runs: list[dict[str, Any]] = []
    notes: list[str] = []
    for key, path in cur.items():
        if key not in base:
            notes.append(f"{key}: not in the baseline")
            continue
        if not base[key].is_file():
            notes.append(
                f"{key}: the baseline's report {base[key]} is missing; keep the shard folders beside the baseline matrix.json"
            )
            continue
        result = cmp.compare(
            cmp.load_report(base[key]),
            cmp.load_report(path),
            latency_tolerance=latency_tolerance,
            drift_tolerance=drift_tolerance,
        )
        runs.append(
            {
                "run": key,
                "passed": result.passed,
                "regressions": [v.name for v in result.regressions],
                "markdown": cmp.markdown(result),
            }
        )
    notes += [f"{key}: in the baseline, not run this time" for key in base if key not in cur]
    passed = all(r["passed"] for r in runs)
    summary: dict[str, Any] = {"baseline": str(base_file), "passed": passed, "runs": runs, "notes": notes}
    lines = [
        "# Matrix against the baseline",
        "",
        f"Baseline: `{base_file}`.",
        "",
        "**No regression**"
        if passed
        else "**Regression** in "
        + ", ".join(f"{r['run']} ({', '.join(r['regressions'])})" for r in runs if not r["passed"]),
        "",
    ]
    for r in runs:
        lines += [f"## {r['run']}", "", r["markdown"], ""]
    lines += [f"- {n}" for n in notes]
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    (out / "comparison.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    (out / "comparison.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return summary
