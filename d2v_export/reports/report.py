"""report.json (versioned schema, see docs/report-schema.md) and report.md."""

from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import Any, Mapping

from ..measure.confidence import describe
from ..cpu import REPORTED_FLAGS, cores_available, cpu_flags, cpu_name
from ..spec import REFERENCE, Drift, LatencyStats, Report, Variant, jsonable

__all__ = [
    "SCHEMA_VERSION",
    "environment",
    "jsonable",
    "latency_dict",
    "drift_dict",
    "variant_name",
    "to_dict",
    "write",
    "markdown",
]

SCHEMA_VERSION = "1.1"  # docs/report-schema.md: the fields each version added; docs/report.schema.json checks them
# metrics against the user's labels, listed under each variant in report.md when the evaluation set has labels
LABELLED = (
    "reference_accuracy",
    "candidate_accuracy",
    "reference_cer",
    "candidate_cer",
    "reference_wer",
    "candidate_wer",
)


def environment(threads: int) -> dict[str, Any]:
    """Versions, CPU and threads: where the numbers came from."""
    from importlib import metadata

    from .. import backends
    from ..backends.torch_ref import DEVICE

    versions = {"python": platform.python_version()}
    for pkg in dict.fromkeys(("d2v-export", "torch", "transformers", "onnx", *backends.packages(), "numpy")):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            continue
    return {
        "versions": versions,
        "cpu": cpu_name(),
        "cpu_flags": [f for f in REPORTED_FLAGS if f in cpu_flags()],
        "cores_available": cores_available(),
        "threads": threads,
        "platform": platform.platform(),
        "device": DEVICE,  # the PyTorch reference's; every variant's own is its "device"
    }


def latency_dict(lat: LatencyStats | None) -> dict[str, Any] | None:
    if lat is None:
        return None
    return {
        "p50": lat.p50,
        "p90": lat.p90,
        "p99": lat.p99,
        "mean": lat.mean,
        "stdev": lat.stdev,
        "n": lat.n,
        "batch": lat.batch,
        "shape": dict(lat.shape),
        "throughput_per_s": lat.throughput,
        "samples": list(lat.samples_ms),
    }


def drift_dict(drift: Drift) -> dict[str, Any]:
    return jsonable(drift)


def variant_name(v: Variant) -> str:
    return Path(v.artifact).name


def to_dict(report: Report, root: Path) -> dict[str, Any]:
    """The JSON document. Paths are relative to ``root``, the folder the report is written to."""
    graph = report.export
    return {
        "schema_version": report.schema_version,
        "tool": {"name": "d2v-export", "version": report.tool_version},
        "created": report.created,
        "passed": report.passed,
        "model": {
            "source": report.model.source,
            "modality": report.model.modality.value,
            "task": report.model.task,
            "class": report.model.class_name,
            "random_weights": report.model.random_weights,
            "parameters": report.model.parameters,
            "preset": report.model.preset,
        },
        "environment": jsonable(report.environment),
        "export": {
            "exporter": graph.exporter,
            "opset": graph.opset,
            "seconds": round(graph.seconds, 3),
            "inputs": jsonable(graph.inputs),
            "outputs": jsonable(graph.outputs),
            "shapes": {d.name: {"min": d.min, "opt": d.opt, "max": d.max} for d in graph.profile.dims},
            "static": dict(graph.profile.static),
            "check": drift_dict(graph.check),
        },
        "reference": {"name": REFERENCE, "latency_ms": latency_dict(report.reference_latency)},
        "variants": [
            {
                "name": variant_name(v),
                "target": v.target,
                "precision": v.precision.value,
                "quantization": jsonable(v.quantization),
                "artifact": v.artifact,
                "device": v.device,
                "deploy_device": v.deploy_device,
                "drift": drift_dict(v.drift),
                "latency_ms": latency_dict(v.latency),
                "speedup_vs_reference": v.speedup_vs_reference,
                "notes": list(v.notes),
                "latency_budget": jsonable(v.latency_budget),
                "cold_start": jsonable(v.cold_start),
                "drift_by_length": jsonable(v.drift_by_length),
            }
            for v in report.variants
        ],
        "warnings": list(report.warnings),
        "bench": jsonable(report.bench),
        "comparison": jsonable(report.comparison) if report.comparison is not None else None,
        "pick": jsonable(report.pick) if report.pick is not None else None,
    }


def write(report: Report, folder: Path) -> tuple[Path, Path, Path]:
    """report.json for machines, report.md for a CI step summary, report.html (self-contained) for people."""
    from .html_report import write_html

    doc = to_dict(report, folder)
    json_path, md_path, html_path = folder / "report.json", folder / "report.md", folder / "report.html"
    json_path.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    md_path.write_text(markdown(doc), encoding="utf-8")
    write_html(doc, html_path)
    return json_path, md_path, html_path


def _ms(lat: Mapping[str, Any] | None, key: str) -> str:
    return f"{lat[key]:.2f}" if lat else "–"


def noise(drift: Mapping[str, Any], name: str) -> str:
    """ " [0.962, 0.994] at 95 %, unresolved": a metric's confidence bounds and what they decided; "" without bounds."""
    text = describe(drift.get("bounds") or {}, drift.get("confidence") or {}, name)
    if not text:
        return ""
    if name in (drift.get("failed") or ()):
        return text + ", over budget with that confidence"
    return text + (", too few items to show it is within budget" if name in (drift.get("unresolved") or ()) else "")


def _metric_summary(drift: Mapping[str, Any]) -> str:
    metrics = drift.get("metrics") or {}
    budget = drift.get("budget") or {}
    shown = list(budget) or list(metrics)[:2]
    parts = []
    for name in shown:
        value = metrics.get(name)
        limit = budget.get(name)
        text = "n/a" if value is None else f"{value:.3g}" + noise(drift, name)
        parts.append(f"{name} {text}" + (f" (limit {limit:g})" if limit is not None else ""))
    for name in drift.get("informational") or {}:
        value = metrics.get(name)
        parts.append(f"{name} {'n/a' if value is None else f'{value:.3g}'} (information, not gating)")
    return "; ".join(parts)


def markdown(doc: Mapping[str, Any]) -> str:
    """A short Markdown report that fits a CI step summary."""
    lines = _md_head(doc) + _md_latency_table(doc) + _md_export(doc)
    for v in doc["variants"]:
        lines += _md_variant_notes(v)
    lines += _cold_start_lines(doc["variants"]) + _length_lines(doc["variants"])
    lines += _md_pick(doc.get("pick"))
    comparison = doc.get("comparison")
    if comparison:
        verdict = (
            "no regression"
            if comparison.get("passed")
            else "REGRESSION in " + ", ".join(comparison.get("regressions", []))
        )
        lines += ["", "## Against the baseline", "", f"{verdict} — the table is in comparison.md."]
    if doc["warnings"]:
        lines += ["", "## Warnings", ""] + [f"- {w}" for w in doc["warnings"]]
    versions = ", ".join(f"{k} {v}" for k, v in doc["environment"]["versions"].items())
    lines += ["", f"<sub>{versions}. Created {doc['created']}. Schema {doc['schema_version']}.</sub>", ""]
    return "\n".join(lines)


def _md_head(doc: Mapping[str, Any]) -> list[str]:
    model = doc["model"]
    lines = [f"# d2v-export report: {model['modality']} / {model['task']}", ""]
    if model["random_weights"]:
        lines += [
            "> **RANDOM WEIGHTS** — this preset has the real architecture but untrained weights: "
            "latency is meaningful, accuracy numbers only measure conversion drift.",
            "",
        ]
    verdict = "PASSED" if doc["passed"] else "FAILED"
    source = f"model `{model['source']}` ({model['class']}, {model['parameters']:,} parameters)"
    return lines + [f"**Verdict: {verdict}** — {source}", ""]


def _md_latency_table(doc: Mapping[str, Any]) -> list[str]:
    """The reference and every variant: percentiles, speedup, drift; then how latency was measured."""
    ref, env = doc["reference"]["latency_ms"], doc["environment"]
    lines = [
        "| variant | precision | p50 ms | p90 ms | p99 ms | speedup vs PyTorch | drift | |",
        "|---|---|---:|---:|---:|---:|---|---|",
        f"| pytorch (reference) | fp32 | {_ms(ref, 'p50')} | {_ms(ref, 'p90')} | {_ms(ref, 'p99')} | 1.00× | – | |",
    ]
    for v in doc["variants"]:
        lat = v["latency_ms"]
        speed = f"{v['speedup_vs_reference']:.2f}×" if v["speedup_vs_reference"] else "–"
        ok = "✅" if v["drift"]["passed"] else "❌"
        percentiles = f"{_ms(lat, 'p50')} | {_ms(lat, 'p90')} | {_ms(lat, 'p99')}"
        lines.append(
            f"| {v['name']} | {v['precision']} | {percentiles} | {speed} | {_metric_summary(v['drift'])} | {ok} |"
        )
    shape = (ref or {}).get("shape") or {}
    n = (ref or {}).get("n", 0)
    if isinstance((doc.get("bench") or {}).get("interleaved"), str):
        how = (
            "each variant timed in a pair with the reference after warm-up "
            f"(speedup against its own pair's reference; {n} reference runs in all), "
        )
    else:
        how = f"{n} interleaved timed runs per variant after warm-up, "
    where = f"{env['threads']} threads on {env['cpu']} ({env['cores_available']} cores available)."
    return lines + ["", f"Latency: batch {ref['batch'] if ref else '?'}, shape {shape}, " + how + where]


def _md_export(doc: Mapping[str, Any]) -> list[str]:
    export = doc["export"]
    lines = [
        "",
        "## Export check",
        "",
        f"{export['exporter']}, opset {export['opset']}, {export['seconds']:.1f} s. {export['check']['detail']}.",
        "",
        "| axis | min | opt | max |",
        "|---|---:|---:|---:|",
    ]
    for axis, r in export["shapes"].items():
        lines.append(f"| {axis} | {r['min']} | {r['opt']} | {r['max']} |")
    for name, size in export["static"].items():
        lines.append(f"| {name} (static) | {size} | {size} | {size} |")
    return lines


def _md_variant_notes(v: Mapping[str, Any]) -> list[str]:
    """A variant's drift detail, label metrics, informational metrics, notes and latency budget."""
    lines = []
    drift = v["drift"]
    if drift["detail"]:
        lines += ["", f"- **{v['name']}**: {drift['detail']}"]
        labelled = [k for k in LABELLED if k in drift["metrics"]]
        if labelled:
            lines.append("  - against the labels: " + ", ".join(f"{k} {drift['metrics'][k]:.3g}" for k in labelled))
        for name, why in (drift.get("informational") or {}).items():
            lines.append(f"  - `{name}` is information, not a gate: {why}")
    for note in v["notes"]:
        lines.append(f"  - {note}")
    budget = v.get("latency_budget")
    if budget and budget.get("passed") is not None:
        within = "within" if budget["passed"] else "OVER"
        lines.append(f"  - latency budget ({budget['profile']}): {within} — {budget['detail']}")
    return lines


def _md_pick(pick: Mapping[str, Any] | None) -> list[str]:
    if not pick:
        return []
    lines = [
        "",
        "## The pick",
        "",
        f"**{pick['name']}** ({pick['candidate']}): {pick['why']}.",
        "",
        f"| candidate | recipe | p50 ms | {pick['statistic']} ms | drift score | outcome |",
        "|---|---|---:|---:|---:|---|",
    ]
    for c in pick["candidates"]:
        score = "–" if c.get("drift_score") is None else f"{c['drift_score']:.3g}"
        star = " ★" if c["name"] in (pick.get("front") or ()) else ""
        timing = f"{c['p50_ms']:.3f} | {c['compared_ms']:.3f}"
        lines.append(f"| {c['name']}{star} | {c['candidate']} | {timing} | {score} | {c['outcome']} |")
    star_meaning = (
        "★: on the latency-versus-drift front (no other candidate is both faster and closer to the reference)."
    )
    return lines + ["", star_meaning]


def _cold_start_lines(variants: list[Mapping[str, Any]]) -> list[str]:
    """report.md's "Cold start" table: each artifact opened in a child process of its own."""
    measured = [v for v in variants if v.get("cold_start")]
    if not measured:
        return []
    lines = [
        "",
        "## Cold start",
        "",
        "Each artifact opened in a fresh child process: importing the runtime, opening the artifact (session creation, "
        "compile_model), the first inference at the latency shape; peak resident memory of that process, and what the "
        "artifact added to it after the runtime was imported.",
        "",
        "| variant | import ms | open ms | first inference ms | peak RSS MB | artifact's share MB |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for v in measured:
        c = v["cold_start"]
        lines.append(
            f"| {v['name']} | {c['import_ms']:.0f} | {c['open_ms']:.0f} | {c['first_inference_ms']:.1f} | {c['peak_rss_mb']:.0f} | {c['artifact_rss_mb']:.0f} |"
        )
    return lines


def _length_lines(variants: list[Mapping[str, Any]]) -> list[str]:
    """report.md's "INT8 drift against input length" table (audio INT8 variants)."""
    rows = [(v["name"], d) for v in variants for d in v.get("drift_by_length") or ()]
    if not rows:
        return []
    names = list(dict.fromkeys(k for _, d in rows for k in d["metrics"]))
    lines = [
        "",
        "## INT8 drift against input length",
        "",
        "One input per length (the evaluation samples joined end to end and repeated), against PyTorch: information, not a gate.",
        "",
        "| variant | seconds | " + " | ".join(names) + " |",
        "|---|---:|" + "---:|" * len(names),
    ]
    for name, d in rows:
        values = [d["metrics"].get(k) for k in names]
        lines.append(
            f"| {name} | {d['seconds']:g} | " + " | ".join("–" if x is None else f"{x:.4f}" for x in values) + " |"
        )
    return lines
