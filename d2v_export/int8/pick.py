"""``--pick``: the tool chooses the artifact to ship.

The pipeline builds every candidate the targets plan (``Backend.plan`` from their ``pick_levers``: INT8 static and dynamic,
with and without the graph clean-up, 8- and 7-bit ONNX Runtime weights where the CPU allows, NNCF's
presets; plus every float variant), judges each on the evaluation split and times all of them
interleaved in one run. ``choose`` then keeps, among the candidates within their drift budget and
measured on their own runtime, the fastest one at the latency statistic that matters (p50, or the
device profile's percentile), and says why every other candidate lost. Candidates are data: the
report keeps a footprint of all of them (drift, latency, outcome) and the latency-versus-drift front.

The float variants are candidates too: where INT8 is not faster on a CPU (it happens: OpenVINO INT8 on
AVX2 without VNNI), fp32 wins and the report says so.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from ..spec import Precision, Variant


def _stat(variant: Variant, statistic: str) -> float:
    return float(getattr(variant.latency, statistic)) if variant.latency is not None else float("inf")


def _drift_doc(variant: Variant) -> dict[str, Any]:
    d = variant.drift
    return {"metrics": dict(d.metrics), "budget": dict(d.budget), "failed": list(d.failed), "passed": d.passed}


def _outcome(v: Variant, best: Variant, statistic: str, deferred: set[str]) -> str:
    """What became of a candidate: picked, not eligible, over budget, or how much slower than the pick."""
    t, best_t = _stat(v, statistic), _stat(best, statistic)
    if v is best:
        return "picked"
    if v.target in deferred:
        return "not measured on its own runtime here (deferred build): not eligible"
    if not v.drift.passed:
        return f"over the drift budget ({', '.join(v.drift.failed) or 'failed'})"
    if best_t > 0:
        return f"slower: {t:.2f} ms vs {best_t:.2f} ms ({t / best_t:.2f}x the pick's {statistic})"
    return "slower"


def _candidate(
    v: Variant, name: str, outcome: str, statistic: str, described: Mapping[str, str], primary: str | None
) -> dict[str, Any]:
    """report.json's entry of one candidate."""
    from ..measure.metrics import drift_score

    return {
        "name": name,
        "target": v.target,
        "precision": v.precision.value,
        "candidate": described.get(name, v.precision.value),
        "p50_ms": _stat(v, "p50"),
        "p90_ms": _stat(v, "p90"),
        "compared_ms": _stat(v, statistic),
        "drift_passed": v.drift.passed,
        "drift_score": drift_score(_drift_doc(v)),
        "key_metric": primary,
        "key_metric_value": v.drift.metrics.get(primary) if primary else None,
        "outcome": outcome,
    }


def _why(best: Variant, eligible: list[Variant], nxt: Variant | None, name: Mapping[int, str], statistic: str) -> str:
    """The pick's reason: how much faster than the next candidate within budget, and than its target's fp32."""
    best_t = _stat(best, statistic)
    if nxt is not None:
        why = (
            f"fastest of {len(eligible)} candidates within the drift budget at {statistic}: {best_t:.2f} ms, "
            f"{_stat(nxt, statistic) / best_t:.2f}x faster than the next ({name[id(nxt)]}, {_stat(nxt, statistic):.2f} ms)"
        )
    else:
        why = f"the only candidate within the drift budget ({best_t:.2f} ms at {statistic})"
    fp32 = [v for v in eligible if v.precision is Precision.FP32 and v.target == best.target]
    if fp32 and best is not fp32[0] and best_t > 0:
        why += f"; {_stat(fp32[0], statistic) / best_t:.2f}x its target's fp32"
    return why


def choose(
    variants: Sequence[Variant],
    described: Mapping[str, str],
    metric_kind: str,
    profile: Any = None,
    *,
    deferred: Iterable[str] = (),
) -> dict[str, Any]:
    """The pick among ``variants`` (all built and measured by one pipeline run).

    ``described``: variant name -> what the candidate is. ``profile``: a device profile, whose
    ``latency_percentile`` (p50/p90/p99) is the statistic compared. ``deferred``: targets whose artifacts
    did not run on their own runtime here (never picked: their latency is not theirs).
    """
    from ..measure.metrics import PRIMARY

    statistic = str(getattr(profile, "latency_percentile", "") or "p50")
    deferred = set(deferred)
    name = {id(v): v.artifact.split("/")[-1] for v in variants}
    eligible = [v for v in variants if v.drift.passed and v.target not in deferred]
    if not eligible:  # cannot happen while fp32 is built for every target; say so rather than crash
        eligible = [v for v in variants if v.target not in deferred] or list(variants)
    best = min(eligible, key=lambda v: (_stat(v, statistic), v.precision is not Precision.FP32, name[id(v)]))
    runner_up = sorted((v for v in eligible if v is not best), key=lambda v: _stat(v, statistic))
    primary = PRIMARY.get(metric_kind)

    candidates = [
        _candidate(v, name[id(v)], _outcome(v, best, statistic, deferred), statistic, described, primary)
        for v in variants
    ]
    front = pareto(
        [
            {"name": c["name"], "p50_ms": c["compared_ms"], "drift_score": c["drift_score"]}
            for c in candidates
            if c["drift_score"] is not None and c["target"] not in deferred
        ]
    )
    why = _why(best, eligible, runner_up[0] if runner_up else None, name, statistic)
    return {
        "artifact": best.artifact,
        "name": name[id(best)],
        "target": best.target,
        "precision": best.precision.value,
        "candidate": described.get(name[id(best)], best.precision.value),
        "statistic": statistic,
        "why": why,
        "candidates": sorted(candidates, key=lambda c: (c["outcome"] != "picked", c["p50_ms"])),
        "front": front,
    }


def kept(variants: Sequence[Variant], picked: Mapping[str, Any]) -> list[str]:
    """The variants a --pick run ships: the pick and each target's fp32 (the baseline every report compares with)."""
    return [v.artifact for v in variants if v.artifact == picked["artifact"] or v.precision is Precision.FP32]


def pareto(variants: Sequence[Mapping[str, Any]]) -> list[str]:
    """Names on the front (lower p50 and lower drift score both better), fastest first; simulated variants stay off it."""
    pts = [
        v
        for v in variants
        if v.get("p50_ms") is not None and v.get("drift_score") is not None and not v.get("simulated")
    ]
    front = []
    for a in pts:
        dominated = any(
            b is not a
            and b["p50_ms"] <= a["p50_ms"]
            and b["drift_score"] <= a["drift_score"]
            and (b["p50_ms"] < a["p50_ms"] or b["drift_score"] < a["drift_score"])
            for b in pts
        )
        if not dominated:
            front.append(a)
    front.sort(key=lambda v: (v["p50_ms"], v["drift_score"], v["name"]))
    return [v["name"] for v in front]
