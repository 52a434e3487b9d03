"""Compare a report with a baseline report: latency (with a statistical test) and drift, per variant.

    from d2v_export.reports import compare as cmp
    c = cmp.compare(cmp.load_report("last/report.json"), cmp.load_report("out/report.json"))
    print(cmp.markdown(c)); sys.exit(cmp.exit_code(c))

Latency. Variants are matched by name (``variants[].name``); the PyTorch reference is matched too and
shown for context (it says whether the machine got slower) but never fails the gate. The ratio is
current p50 / baseline p50 (> 1 is slower). A variant is a *regression* only when all three hold:

  * the ratio exceeds ``1 + latency_tolerance``, and
  * the fastest tenth of the runs is slower by more than the tolerance as well (p10 ratio): a slower
    model shifts every run, while other processes on the machine mostly stretch some of them, and
  * a one-sided Mann-Whitney U test on the raw timings (``latency_ms.samples``) says the current
    timings, divided by ``1 + latency_tolerance``, are still stochastically larger than the baseline
    timings at significance ``alpha``: the slowdown is significantly *beyond the tolerance*, not
    merely significant.

*Improvement* is the mirror image (faster than baseline / (1 + tolerance), significantly). The test
uses ranks, so a few preempted runs (a long tail) do not move it; noise between two identical runs
neither exceeds the tolerance nor passes the test. Without raw timings the p50 ratio alone decides.

``relative_to_reference=True`` divides every timing by its own run's reference (PyTorch) p50 before
comparing: the ratio becomes baseline speedup / current speedup, which cancels a machine that is
uniformly slower or faster (another CI runner type). The default is False (absolute milliseconds):
PyTorch eager is the noisiest runner of a report — Python overhead, and an OpenMP barrier that
collapses when the cores are oversubscribed — so dividing by it usually adds noise on one machine.

Drift. For every metric in the current variant's budget the value is compared with the baseline's;
a change for the worse (direction from ``metrics.METRICS``) larger than ``drift_tolerance``
(absolute, in the metric's units) flags, and so does ``passed`` turning from true to false.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..measure.confidence import describe
from ..measure.metrics import METRICS, drift_score
from ..spec import REFERENCE, D2VError, ExitCode, jsonable

__all__ = [
    "compare",
    "load_report",
    "parse_tolerance",
    "exit_code",
    "to_dict",
    "markdown",
    "write",
    "describe_regressions",
    "drift_score",
]

# reads every report.json 1.x (a 1.0 baseline compares with a 1.1 report); tests/test_report_schema.py
SUPPORTED_MAJOR = 1

REGRESSION, IMPROVEMENT, UNCHANGED, NEW, MISSING = "regression", "improvement", "unchanged", "new", "missing"
NOT_COMPARED = "n/a"
LOW_QUANTILE = 0.10  # a slowdown must move the fast runs too, not only the median


@dataclass(frozen=True)
class LatencyChange:
    baseline_p50: float | None  # ms (absolute p50 even when the verdict is relative to the reference)
    current_p50: float | None
    ratio: float | None  # current / baseline of the compared quantity (> 1: slower)
    p_value: float | None  # one-sided Mann-Whitney U: slower (or faster) beyond the tolerance
    n_baseline: int
    n_current: int
    relative_to_reference: bool
    verdict: str  # regression | improvement | unchanged | n/a
    note: str = ""
    p10_ratio: float | None = None  # the same ratio for the fastest tenth of the runs (must agree with the p50 one)


@dataclass(frozen=True)
class MetricChange:
    metric: str
    baseline: float | None
    current: float | None
    budget: float | None
    higher_is_better: bool
    worse_by: float | None  # > 0: worse than the baseline by this much (metric units)
    flagged: bool
    reason: str = ""


@dataclass(frozen=True)
class VariantComparison:
    name: str
    verdict: str  # regression | improvement | unchanged | new | missing
    gating: bool  # counts for the exit code (False for the PyTorch reference)
    latency: LatencyChange | None
    drift: tuple[MetricChange, ...] = ()
    passed_before: bool | None = None
    passed_now: bool | None = None
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class Comparison:
    baseline: str  # a label: model, created
    current: str
    latency_tolerance: float
    drift_tolerance: float
    alpha: float
    relative_to_reference: bool
    variants: tuple[VariantComparison, ...]
    warnings: tuple[str, ...] = field(default_factory=tuple)

    @property
    def regressions(self) -> tuple[VariantComparison, ...]:
        return tuple(v for v in self.variants if v.gating and v.verdict == REGRESSION)

    @property
    def passed(self) -> bool:
        return not self.regressions


# ---------------------------------------------------------------------------------- input


def parse_tolerance(text: str | float) -> float:
    """``"10%"`` -> 0.1, ``"0.1"`` -> 0.1, ``0.1`` -> 0.1. Raises D2VError for anything else."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value = float(text)
    else:
        s = str(text).strip()
        try:
            value = float(s[:-1].strip()) / 100.0 if s.endswith("%") else float(s)
        except ValueError:
            raise D2VError(f"tolerance '{text}' is not a number; give a fraction (0.1) or a percentage (10%)") from None
    if not math.isfinite(value) or value < 0:
        raise D2VError(f"tolerance '{text}' must be a finite number >= 0; give a fraction (0.1) or a percentage (10%)")
    return value


def load_report(path: str | Path) -> dict[str, Any]:
    """Read a report.json (or matrix.json); one-line D2VError for a missing file, bad JSON or schema."""
    p = Path(path)
    if p.is_dir():
        p = p / "report.json"
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise D2VError(
            f"report '{path}' does not exist; pass the report.json written by d2v-export (or its folder)"
        ) from None
    except OSError as exc:
        raise D2VError(f"cannot read report '{path}': {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise D2VError(f"report '{path}' is not UTF-8 text; pass a report.json written by d2v-export") from None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise D2VError(
            f"report '{path}' is not valid JSON (line {exc.lineno}: {exc.msg}); pass a report.json written by d2v-export"
        ) from None
    except RecursionError:
        raise D2VError(f"report '{path}' is JSON nested too deeply; pass a report.json written by d2v-export") from None
    if not isinstance(doc, dict) or "schema_version" not in doc:
        raise D2VError(f"report '{path}' has no schema_version; pass a report.json written by d2v-export")
    major = str(doc["schema_version"]).split(".", 1)[0]
    if major != str(SUPPORTED_MAJOR):
        raise D2VError(
            f"report '{path}' has schema_version {doc['schema_version']}; this d2v-export reads {SUPPORTED_MAJOR}.x — "
            "compare it with the d2v-export that wrote it"
        )
    problem = _shape_problem(doc, _MATRIX if doc.get("kind") == "matrix" else _REPORT, "")
    if problem:
        raise D2VError(f"report '{path}' has a malformed field ({problem}); pass a report.json written by d2v-export")
    return doc


# The fields compare and matrix-merge read, with their types (found by fuzzing: each once crashed them).
# "number"/"string"/"bool"/"pair" are leaves; [spec] a list of spec; {"*": spec} a mapping of any keys;
# {key: spec} an object whose keys are optional unless they end in "!". None stands for an absent value.
_LATENCY = {"p50": "number", "samples": ["number"]}
_DRIFT = {
    "passed": "bool",
    "budget": {"*": "number"},
    "metrics": {"*": "number"},
    "bounds": {"*": "pair"},
    "confidence": {"*": "number"},
    "failed": ["string"],
}
_REPORT = {
    "model": {},
    "environment": {"versions": {}},
    "reference": {"latency_ms": _LATENCY},
    "variants": [{"name!": "string", "latency_ms": _LATENCY, "drift": _DRIFT}],
}
_MATRIX_VARIANT = {
    "name!": "string",
    "p50_ms": "number",
    "drift_score": "number",
    "key_metric": "string",
    "key_metric_value": "number",
    "drift_passed": "bool",
    "speedup_vs_common_reference": "number",
}
_MATRIX = {
    "model": "string",
    "warnings": ["string"],
    "modalities": ["string"],
    "targets": ["string"],
    "precisions": ["string"],
    "cells": [
        {
            "modality!": "string",
            "target!": "string",
            "precision!": "string",
            "status!": "string",
            "report": "string",
            "reason": "string",
            "task": "string",
            "reference_p50_ms": "number",
            "variants": [_MATRIX_VARIANT],
        }
    ],
}
_LEAVES: dict[str, Any] = {
    "number": lambda x: isinstance(x, (int, float)) and not isinstance(x, bool),
    "string": lambda x: isinstance(x, str),
    "bool": lambda x: isinstance(x, bool),
    "pair": lambda x: isinstance(x, list) and len(x) == 2 and all(_LEAVES["number"](v) for v in x),
}


def _shape_problem(value: Any, spec: Any, where: str) -> str | None:
    """Where ``value`` does not fit ``spec`` ("variants[0].name is not a string"), or None."""
    if value is None:
        return None
    if isinstance(spec, str):
        return None if _LEAVES[spec](value) else f"{where or 'the document'} is not a {spec}"
    if isinstance(spec, list):
        if not isinstance(value, list):
            return f"{where} is not a list"
        if spec[0] != "number" and any(item is None for item in value):
            return f"{where} holds null"
        return next((p for i, item in enumerate(value) if (p := _shape_problem(item, spec[0], f"{where}[{i}]"))), None)
    if not isinstance(value, dict):
        return f"{where or 'the document'} is not an object"
    if "*" in spec:
        return next((p for k, item in value.items() if (p := _shape_problem(item, spec["*"], f"{where}.{k}"))), None)
    for key, sub in spec.items():
        name = key.rstrip("!")
        if key.endswith("!") and value.get(name) is None:
            return f"{where}.{name} is missing"
        problem = _shape_problem(value.get(name), sub, f"{where}.{name}".lstrip("."))
        if problem:
            return problem
    return None


# ---------------------------------------------------------------------------------- compare


def compare(
    baseline: Mapping[str, Any],
    current: Mapping[str, Any],
    *,
    latency_tolerance: float = 0.10,
    drift_tolerance: float = 0.005,
    alpha: float = 0.01,
    relative_to_reference: bool = False,
) -> Comparison:
    """Per variant (matched by name) and the reference: latency verdict with a test, drift changes."""
    warnings = _context_warnings(baseline, current)
    base_ref = _lat(baseline.get("reference"))
    cur_ref = _lat(current.get("reference"))
    if relative_to_reference and not (base_ref and cur_ref and base_ref.get("p50") and cur_ref.get("p50")):
        warnings.append(
            "relative_to_reference: a report has no reference latency; compared absolute milliseconds instead"
        )
        relative_to_reference = False
    scale = (
        (1.0 / float(base_ref["p50"]), 1.0 / float(cur_ref["p50"]))
        if relative_to_reference and base_ref and cur_ref
        else (1.0, 1.0)
    )

    rows: list[VariantComparison] = []
    ref_change = _latency_change(base_ref, cur_ref, latency_tolerance, alpha, (1.0, 1.0), False)
    rows.append(
        VariantComparison(
            name=REFERENCE,
            verdict=ref_change.verdict if ref_change.verdict != NOT_COMPARED else UNCHANGED,
            gating=False,
            latency=ref_change,
            notes=("the reference never fails the gate; a slower reference means a slower machine",),
        )
    )

    base_variants = {v["name"]: v for v in baseline.get("variants") or []}
    cur_variants = {v["name"]: v for v in current.get("variants") or []}
    for name, cur in cur_variants.items():
        base = base_variants.get(name)
        if base is None:
            rows.append(
                VariantComparison(name, NEW, True, None, passed_now=_passed(cur), notes=("not in the baseline",))
            )
            continue
        rows.append(
            _compare_variant(name, base, cur, latency_tolerance, drift_tolerance, alpha, scale, relative_to_reference)
        )
    for name, base in base_variants.items():
        if name not in cur_variants:
            rows.append(
                VariantComparison(
                    name,
                    MISSING,
                    False,
                    None,
                    passed_before=_passed(base),
                    notes=("in the baseline, not built this time",),
                )
            )
    return Comparison(
        baseline=_label(baseline),
        current=_label(current),
        latency_tolerance=latency_tolerance,
        drift_tolerance=drift_tolerance,
        alpha=alpha,
        relative_to_reference=relative_to_reference,
        variants=tuple(rows),
        warnings=tuple(warnings),
    )


def _compare_variant(
    name: str,
    base: Mapping[str, Any],
    cur: Mapping[str, Any],
    latency_tolerance: float,
    drift_tolerance: float,
    alpha: float,
    scale: tuple[float, float],
    relative: bool,
) -> VariantComparison:
    notes: list[str] = []
    lat = _latency_change(_lat(base), _lat(cur), latency_tolerance, alpha, scale, relative)
    drift = _drift_changes(base.get("drift") or {}, cur.get("drift") or {}, drift_tolerance)
    passed_before, passed_now = _passed(base), _passed(cur)
    drift_worse = any(m.flagged for m in drift) or (passed_before is True and passed_now is False)
    if passed_before is True and passed_now is False:
        notes.append(
            "drift budget: passed before, fails now (" + ", ".join((cur.get("drift") or {}).get("failed") or []) + ")"
        )
    if lat.verdict == REGRESSION or drift_worse:
        verdict = REGRESSION
    elif lat.verdict == IMPROVEMENT:
        verdict = IMPROVEMENT
    else:
        verdict = UNCHANGED
    return VariantComparison(name, verdict, True, lat, tuple(drift), passed_before, passed_now, tuple(notes))


def _latency_change(
    base: Mapping[str, Any] | None,
    cur: Mapping[str, Any] | None,
    tolerance: float,
    alpha: float,
    scale: tuple[float, float],
    relative: bool,
) -> LatencyChange:
    b_p50 = _num(base, "p50")
    c_p50 = _num(cur, "p50")
    if b_p50 is None or c_p50 is None or b_p50 <= 0 or c_p50 <= 0:
        return LatencyChange(
            b_p50, c_p50, None, None, _n(base), _n(cur), relative, NOT_COMPARED, "no latency in one of the reports"
        )
    notes = []
    if base and cur and (base.get("shape") != cur.get("shape") or base.get("batch") != cur.get("batch")):
        notes.append(f"measured at different shapes ({base.get('shape')} vs {cur.get('shape')})")
    ratio = (c_p50 * scale[1]) / (b_p50 * scale[0])
    bs = [float(x) * scale[0] for x in (base or {}).get("samples") or [] if x is not None]
    cs = [float(x) * scale[1] for x in (cur or {}).get("samples") or [] if x is not None]
    factor = 1.0 + tolerance
    p_slow = p_fast = low_ratio = None
    if len(bs) >= 3 and len(cs) >= 3:
        p_slow = _mann_whitney_greater([x / factor for x in cs], bs)
        p_fast = _mann_whitney_greater(bs, [x * factor for x in cs])
        low_b, low_c = _quantile(bs, LOW_QUANTILE), _quantile(cs, LOW_QUANTILE)
        low_ratio = low_c / low_b if low_b > 0 else None
    else:
        notes.append("no raw timings: verdict from the p50 ratio alone")
    slow_low = low_ratio is None or low_ratio > factor
    fast_low = low_ratio is None or low_ratio < 1.0 / factor
    if ratio > factor and slow_low and (p_slow is None or p_slow < alpha):
        verdict, p = REGRESSION, p_slow
    elif ratio < 1.0 / factor and fast_low and (p_fast is None or p_fast < alpha):
        verdict, p = IMPROVEMENT, p_fast
    else:
        verdict = UNCHANGED
        if ratio > factor:
            p = p_slow
            if not slow_low:
                notes.append(
                    f"p50 slower by {ratio - 1:.0%} but the fastest runs are not (p10 {(low_ratio or 1.0) - 1:+.0%}): load on the machine, not the model"
                )
            else:
                notes.append(
                    f"slower by {ratio - 1:.0%} but not significantly beyond the tolerance (p={p_slow:.2g} >= {alpha:g})"
                )
        elif ratio < 1.0 / factor:
            p = p_fast
            if not fast_low:
                notes.append(
                    f"p50 faster by {1 - ratio:.0%} but the fastest runs are not (p10 {(low_ratio or 1.0) - 1:+.0%})"
                )
            else:
                notes.append(f"faster by {1 - ratio:.0%} but not significantly (p={p_fast:.2g} >= {alpha:g})")
        else:
            p = p_slow if ratio >= 1.0 else p_fast
    return LatencyChange(b_p50, c_p50, ratio, p, len(bs), len(cs), relative, verdict, "; ".join(notes), low_ratio)


def _quantile(values: Sequence[float], q: float) -> float:
    s = sorted(values)
    pos = (len(s) - 1) * q
    lo = int(math.floor(pos))
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def _mann_whitney_greater(x: Sequence[float], y: Sequence[float]) -> float:
    """p-value of H1: ``x`` is stochastically greater than ``y`` (one-sided Mann-Whitney U)."""
    from scipy.stats import mannwhitneyu

    return float(mannwhitneyu(x, y, alternative="greater", method="asymptotic").pvalue)


def _drift_changes(base: Mapping[str, Any], cur: Mapping[str, Any], tolerance: float) -> list[MetricChange]:
    out = []
    budget = cur.get("budget") or {}
    bm, cm = base.get("metrics") or {}, cur.get("metrics") or {}
    for metric, limit in budget.items():
        higher = METRICS[metric].higher_is_better if metric in METRICS else False
        b, c = bm.get(metric), cm.get(metric)
        if b is None and c is None:
            out.append(MetricChange(metric, None, None, limit, higher, None, False, "not measured"))
            continue
        if c is None:
            out.append(MetricChange(metric, _f(b), None, limit, higher, None, True, "not finite (or missing) now"))
            continue
        if b is None:
            out.append(MetricChange(metric, None, _f(c), limit, higher, None, False, "not in the baseline"))
            continue
        worse_by = (float(b) - float(c)) if higher else (float(c) - float(b))
        flagged = worse_by > tolerance
        reason = f"worse by {worse_by:.4g} (tolerance {tolerance:g})" if flagged else ""
        found = (cur.get("bounds") or {}).get(metric)
        if flagged and found:  # a metric that counts answers: worse only when its favourable bound is worse too
            best = float(found[1] if higher else found[0])
            if ((float(b) - best) if higher else (best - float(b))) <= tolerance:
                flagged = False
                reason = f"worse by {worse_by:.4g}, within its noise ({describe(cur['bounds'], cur.get('confidence') or {}, metric).strip()})"
        out.append(MetricChange(metric, float(b), float(c), limit, higher, worse_by, flagged, reason))
    return out


def _context_warnings(baseline: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    out = []
    bm, cm = baseline.get("model") or {}, current.get("model") or {}
    for key in ("source", "modality", "task"):
        if bm.get(key) != cm.get(key):
            out.append(f"different model {key}: {bm.get(key)} (baseline) vs {cm.get(key)} (current)")
    be, ce = baseline.get("environment") or {}, current.get("environment") or {}
    for key in ("cpu", "threads", "cores_available"):
        if be.get(key) != ce.get(key):
            out.append(
                f"different {key}: {be.get(key)} vs {ce.get(key)}; absolute latency may not compare (try relative_to_reference)"
            )
    bv, cv = be.get("versions") or {}, ce.get("versions") or {}
    changed = [f"{k} {bv.get(k)} -> {cv.get(k)}" for k in sorted(set(bv) | set(cv)) if bv.get(k) != cv.get(k)]
    if changed:
        out.append("versions changed: " + ", ".join(changed))
    return out


def _lat(obj: Mapping[str, Any] | None) -> dict[str, Any] | None:
    if not obj:
        return None
    lat = obj.get("latency_ms")
    return dict(lat) if isinstance(lat, Mapping) else None


def _num(obj: Mapping[str, Any] | None, key: str) -> float | None:
    if not obj or obj.get(key) is None:
        return None
    return float(obj[key])


def _n(obj: Mapping[str, Any] | None) -> int:
    return len((obj or {}).get("samples") or [])


def _f(x: Any) -> float | None:
    return None if x is None else float(x)


def _passed(v: Mapping[str, Any]) -> bool | None:
    d = v.get("drift") or {}
    return d.get("passed")


def _label(doc: Mapping[str, Any]) -> str:
    m = doc.get("model") or {}
    return f"{m.get('source', '?')} {m.get('modality', '')}/{m.get('task', '')}, {doc.get('created', '?')}"


# ---------------------------------------------------------------------------------- output


def exit_code(comparison: Comparison) -> int:
    """0 when nothing regressed, 7 (ExitCode.REGRESSION) otherwise."""
    return int(ExitCode.OK) if comparison.passed else int(ExitCode.REGRESSION)


def to_dict(comparison: Comparison) -> dict[str, Any]:
    doc = asdict(comparison)
    doc["passed"] = comparison.passed
    doc["regressions"] = [v.name for v in comparison.regressions]
    doc["exit_code"] = exit_code(comparison)
    return jsonable(doc)


def _num_text(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4g}"


def describe_regressions(doc: Mapping[str, Any]) -> list[str]:
    """One short phrase per regressed variant of a ``to_dict`` document: its name and by how much."""
    out = []
    for v in doc.get("variants") or []:
        if v.get("name") not in (doc.get("regressions") or []):
            continue
        what = []
        lat = v.get("latency") or {}
        if lat.get("verdict") == REGRESSION and lat.get("ratio") is not None:
            what.append(f"p50 {lat['baseline_p50']:.3g} -> {lat['current_p50']:.3g} ms ({lat['ratio'] - 1:+.0%})")
        for m in v.get("drift") or []:
            if m.get("flagged"):
                what.append(f"{m['metric']} {_num_text(m.get('baseline'))} -> {_num_text(m.get('current'))}")
        out.append(f"{v['name']} ({', '.join(what) or v.get('verdict')})")
    return out


_ICON = {
    REGRESSION: "❌ regression",
    IMPROVEMENT: "✅ improvement",
    UNCHANGED: "unchanged",
    NEW: "🆕 new",
    MISSING: "missing",
}


def markdown(comparison: Comparison) -> str:
    """A Markdown table of the verdicts (fits a CI step summary)."""
    c = comparison
    head = "**No regression**" if c.passed else f"**Regression** in {', '.join(describe_regressions(to_dict(c)))}"
    basis = "relative to each run's PyTorch reference" if c.relative_to_reference else "absolute milliseconds"
    lines = [
        "## Comparison with the baseline",
        "",
        f"{head} — latency tolerance {c.latency_tolerance:.0%} ({basis}, one-sided Mann-Whitney U, α={c.alpha:g}), "
        f"drift tolerance {c.drift_tolerance:g}.",
        "",
        f"Baseline: {c.baseline}  ",
        f"Current: {c.current}",
        "",
        "| variant | verdict | p50 baseline ms | p50 now ms | change | p | drift | notes |",
        "|---|---|---:|---:|---:|---:|---|---|",
    ]
    for v in c.variants:
        lat = v.latency
        b = f"{lat.baseline_p50:.3f}" if lat and lat.baseline_p50 is not None else "–"
        n = f"{lat.current_p50:.3f}" if lat and lat.current_p50 is not None else "–"
        change = f"{lat.ratio - 1:+.1%}" if lat and lat.ratio is not None else "–"
        p = f"{lat.p_value:.2g}" if lat and lat.p_value is not None else "–"
        verdict = _ICON.get(v.verdict, v.verdict) + ("" if v.gating else " (info)")
        drift = "; ".join(_metric_text(m) for m in v.drift) or "–"
        notes = "; ".join([*(n_ for n_ in ([lat.note] if lat and lat.note else [])), *v.notes])
        lines.append(f"| {_md(v.name)} | {verdict} | {b} | {n} | {change} | {p} | {_md(drift)} | {_md(notes)} |")
    if c.warnings:
        lines += ["", *[f"- ⚠️ {_md(w)}" for w in c.warnings]]
    lines.append("")
    return "\n".join(lines)


def _metric_text(m: MetricChange) -> str:
    def fmt(x: float | None) -> str:
        return "n/a" if x is None else f"{x:.4g}"

    text = f"{m.metric} {fmt(m.baseline)} → {fmt(m.current)}"
    return ("**" + text + "**") if m.flagged else text


def _md(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def write(comparison: Comparison, folder: Path) -> tuple[Path, Path]:
    """comparison.json and comparison.md in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    j, m = folder / "comparison.json", folder / "comparison.md"
    j.write_text(json.dumps(to_dict(comparison), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    m.write_text(markdown(comparison), encoding="utf-8")
    return j, m
