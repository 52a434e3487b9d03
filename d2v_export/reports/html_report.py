"""report.html and matrix.html: one self-contained file each, plots drawn here as inline SVG.

No JavaScript, no fonts, stylesheets or images from anywhere: the file opens the same offline, in a
CI artifact viewer or attached to an e-mail. Every piece of text from the report is escaped.

    from d2v_export.reports.html_report import write_html
    write_html(doc, folder / "report.html")      # doc: the report.json document (report.to_dict)
"""

from __future__ import annotations

import html
import math
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from ..measure.metrics import METRICS, drift_score, within
from ..spec import REFERENCE

# What a matrix's speedup column means (matrix.md and matrix.html)
SPEEDUP_MEANING = (
    "Speedup = this reference p50 (the median over the modality's runs) / the variant's p50: one footing for every "
    "variant, so a faster variant always shows the larger speedup; each run's own ratio is speedup_vs_reference in its report."
)

PASS, FAIL, REF, MUTED, AXIS, GRID = "#1a7f37", "#cf222e", "#57606a", "#8c959f", "#424a53", "#d8dee4"
PALETTE = ("#0969da", "#bf8700", "#8250df", "#1a7f37", "#cf222e", "#1b7c83", "#953800", "#6639ba")
MAX_POINTS = 400  # dots drawn per row of the latency plot (evenly subsampled beyond that)

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Helvetica,Arial,sans-serif;margin:24px auto;max-width:1100px;
color:#1f2328;padding:0 16px;line-height:1.45}
h1{font-size:1.6em;margin-bottom:4px}h2{font-size:1.25em;margin-top:32px;border-bottom:1px solid #d8dee4;padding-bottom:4px}
table{border-collapse:collapse;margin:8px 0;font-size:.92em}th,td{border:1px solid #d8dee4;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#f6f8fa}td.num{text-align:right;font-variant-numeric:tabular-nums}
.banner{background:#fff8c5;border:2px solid #bf8700;padding:10px 14px;font-weight:600;margin:12px 0}
.pass{color:#1a7f37;font-weight:600}.fail{color:#cf222e;font-weight:600}.muted{color:#57606a}
.verdict{display:inline-block;padding:3px 10px;border-radius:12px;color:#fff;font-weight:600}
.verdict.pass{background:#1a7f37;color:#fff}.verdict.fail{background:#cf222e;color:#fff}
figure{margin:12px 0 24px}figcaption{color:#57606a;font-size:.9em;margin-top:4px}
svg{background:#fff;border:1px solid #d8dee4;max-width:100%;height:auto}
svg text{font-family:system-ui,-apple-system,"Segoe UI",Helvetica,Arial,sans-serif}
code{background:#f6f8fa;padding:1px 4px;border-radius:4px}
ul.warnings li{margin:4px 0}
"""


def esc(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


# ---------------------------------------------------------------------------------- scales


class Scale:
    """Maps data to pixels; linear or log10."""

    def __init__(self, lo: float, hi: float, p0: float, p1: float, log: bool = False) -> None:
        if log:
            lo, hi = max(lo, 1e-12), max(hi, 1e-12)
        if hi <= lo:
            hi = lo * 10 if log else lo + 1.0
        self.lo, self.hi, self.p0, self.p1, self.log = lo, hi, p0, p1, log

    def _t(self, v: float) -> float:
        return math.log10(max(v, 1e-12)) if self.log else v

    def __call__(self, v: float) -> float:
        a, b = self._t(self.lo), self._t(self.hi)
        v = min(max(v, self.lo), self.hi)
        return self.p0 + (self._t(v) - a) / (b - a) * (self.p1 - self.p0)

    def ticks(self, count: int = 6) -> list[float]:
        if self.log:
            out = []
            k0, k1 = math.floor(math.log10(self.lo)), math.ceil(math.log10(self.hi))
            steps = (1, 2, 5) if k1 - k0 <= 4 else (1,)
            for k in range(k0, k1 + 1):
                for m in steps:
                    v = m * 10.0**k
                    if self.lo * (1 - 1e-9) <= v <= self.hi * (1 + 1e-9):
                        out.append(v)
            return out or [self.lo, self.hi]
        span = self.hi - self.lo
        raw = span / max(1, count)
        mag = 10 ** math.floor(math.log10(raw)) if raw > 0 else 1.0
        step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
        first = math.ceil(self.lo / step - 1e-9) * step
        out, v = [], first
        while v <= self.hi + step * 1e-9:
            out.append(round(v, 12))
            v += step
        return out


def fmt_num(v: float | None, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    if v == 0:
        return "0"
    a = abs(v)
    if a >= 1000:
        return f"{v:,.0f}"
    if a >= 0.01:
        return f"{v:.{digits}g}"
    return f"{v:.2g}"


def _log_worthwhile(values: Iterable[float], ratio: float = 20.0) -> bool:
    pos = [v for v in values if v > 0]
    return bool(pos) and max(pos) / min(pos) > ratio


def _text(
    x: float,
    y: float,
    s: str,
    *,
    size: int = 12,
    anchor: str = "start",
    fill: str = AXIS,
    weight: str = "normal",
    extra: str = "",
) -> str:
    return (
        f'<text x="{x:.1f}" y="{y:.1f}" font-size="{size}" text-anchor="{anchor}" fill="{fill}" '
        f'font-weight="{weight}"{extra}>{esc(s)}</text>'
    )


def _svg(width: int, height: int, body: Sequence[str], *, kind: str, label: str) -> str:
    return (
        f'<svg role="img" aria-label="{esc(label)}" data-plot="{esc(kind)}" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}">' + "".join(body) + "</svg>"
    )


def _x_axis(scale: Scale, y: float, y_top: float, label: str, unit: str = "") -> list[str]:
    out = [f'<line x1="{scale.p0:.1f}" y1="{y:.1f}" x2="{scale.p1:.1f}" y2="{y:.1f}" stroke="{AXIS}"/>']
    for t in scale.ticks():
        x = scale(t)
        out.append(f'<line x1="{x:.1f}" y1="{y_top:.1f}" x2="{x:.1f}" y2="{y:.1f}" stroke="{GRID}" stroke-width="1"/>')
        out.append(f'<line x1="{x:.1f}" y1="{y:.1f}" x2="{x:.1f}" y2="{y + 4:.1f}" stroke="{AXIS}"/>')
        out.append(_text(x, y + 17, fmt_num(t) + unit, size=11, anchor="middle"))
    out.append(_text((scale.p0 + scale.p1) / 2, y + 36, label, size=12, anchor="middle", weight="600"))
    return out


def _y_axis(scale: Scale, x: float, x_right: float, label: str) -> list[str]:
    out = [f'<line x1="{x:.1f}" y1="{scale.p0:.1f}" x2="{x:.1f}" y2="{scale.p1:.1f}" stroke="{AXIS}"/>']
    for t in scale.ticks():
        y = scale(t)
        out.append(f'<line x1="{x:.1f}" y1="{y:.1f}" x2="{x_right:.1f}" y2="{y:.1f}" stroke="{GRID}"/>')
        out.append(_text(x - 6, y + 4, fmt_num(t), size=11, anchor="end"))
    cy = (scale.p0 + scale.p1) / 2
    out.append(
        _text(
            x - 48,
            cy,
            label,
            size=12,
            anchor="middle",
            weight="600",
            extra=f' transform="rotate(-90 {x - 48:.1f} {cy:.1f})"',
        )
    )
    return out


def _percentile(sorted_values: Sequence[float], q: float) -> float:
    if not sorted_values:
        return math.nan
    pos = (len(sorted_values) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


# ---------------------------------------------------------------------------------- plots


def latency_plot(given: Sequence[tuple[str, Mapping[str, Any] | None]]) -> str:
    """Box (quartiles, whiskers 5th-95th percentile, median) and every timed run as a dot, per row."""
    rows: list[tuple[str, Mapping[str, Any]]] = [(name, lat) for name, lat in given if lat]
    left, right, top, row_h = 210, 130, 20, 46
    width = 980
    height = top + row_h * max(1, len(rows)) + 50
    values = [float(s) for _, lat in rows for s in (lat.get("samples") or [lat.get("p50")]) if s is not None and s > 0]
    if not values:
        return _svg(width, 60, [_text(20, 35, "no latency measured")], kind="latency", label="latency distribution")
    log = _log_worthwhile(values)
    lo, hi = min(values), max(values)
    scale = (
        Scale(lo / 1.3, hi * 1.3, left, width - right, log=True) if log else Scale(0.0, hi * 1.08, left, width - right)
    )
    body = _x_axis(
        scale, top + row_h * len(rows) + 4, top - 6, "latency per call (ms)" + (", log scale" if log else "")
    )
    for i, (name, lat) in enumerate(rows):
        cy = top + row_h * i + row_h / 2
        color = REF if i == 0 and name.startswith("pytorch") else PALETTE[i % len(PALETTE)]
        samples = sorted(float(s) for s in (lat.get("samples") or []) if s is not None)
        if i % 2:
            body.append(
                f'<rect x="{left}" y="{cy - row_h / 2:.1f}" width="{width - right - left}" height="{row_h}" fill="#f6f8fa"/>'
            )
        body.append(_text(left - 10, cy + 4, name, anchor="end", size=12, weight="600"))
        raw = [float(s) for s in (lat.get("samples") or []) if s is not None]
        step = max(1, math.ceil(len(raw) / MAX_POINTS))
        for j, s in enumerate(raw[::step]):
            jitter = ((j * 0.6180339887) % 1.0 - 0.5) * row_h * 0.55
            body.append(
                f'<circle cx="{scale(s):.1f}" cy="{cy + jitter:.1f}" r="2" fill="{color}" fill-opacity="0.35"/>'
            )
        if samples:
            q1, q3 = _percentile(samples, 25), _percentile(samples, 75)
            w5, w95 = _percentile(samples, 5), _percentile(samples, 95)
            bh = row_h * 0.62
            body.append(
                f'<line x1="{scale(w5):.1f}" y1="{cy:.1f}" x2="{scale(q1):.1f}" y2="{cy:.1f}" stroke="{color}" stroke-width="1.5"/>'
            )
            body.append(
                f'<line x1="{scale(q3):.1f}" y1="{cy:.1f}" x2="{scale(w95):.1f}" y2="{cy:.1f}" stroke="{color}" stroke-width="1.5"/>'
            )
            for w in (w5, w95):
                body.append(
                    f'<line x1="{scale(w):.1f}" y1="{cy - bh / 4:.1f}" x2="{scale(w):.1f}" y2="{cy + bh / 4:.1f}" stroke="{color}" stroke-width="1.5"/>'
                )
            body.append(
                f'<rect x="{scale(q1):.1f}" y="{cy - bh / 2:.1f}" width="{max(1.0, scale(q3) - scale(q1)):.1f}" height="{bh:.1f}" '
                f'fill="{color}" fill-opacity="0.15" stroke="{color}" stroke-width="1.5"/>'
            )
        p50 = lat.get("p50")
        if p50:
            x = scale(float(p50))
            body.append(
                f'<line x1="{x:.1f}" y1="{cy - row_h * 0.36:.1f}" x2="{x:.1f}" y2="{cy + row_h * 0.36:.1f}" stroke="{color}" stroke-width="3"/>'
            )
            body.append(_text(width - right + 8, cy - 2, f"p50 {fmt_num(float(p50))} ms", size=11, weight="600"))
            body.append(
                _text(
                    width - right + 8,
                    cy + 12,
                    f"p99 {fmt_num(lat.get('p99'))} · n={lat.get('n', len(raw))}",
                    size=10,
                    fill=MUTED,
                )
            )
    return _svg(width, height, body, kind="latency", label="latency distribution per variant")


def _metric_ok(value: float | None, limit: float | None, higher: bool) -> bool:
    if value is None:
        return False
    if limit is None:
        return True
    return within(value, limit, higher)  # the same inclusive rule as metrics.judge


def _budget_metrics(variants: Sequence[Mapping[str, Any]]) -> list[str]:
    """The budget metrics of all variants, in first-seen order."""
    metrics: list[str] = []
    for v in variants:
        for m in (v.get("drift") or {}).get("budget") or {}:
            if m not in metrics:
                metrics.append(m)
    return metrics


def _variants_by_metric(variants: Sequence[Mapping[str, Any]], field: str) -> dict[str, set[str]]:
    """metric -> names of the variants whose drift lists it under ``field`` ("failed" or "bounds")."""
    found: dict[str, set[str]] = {}
    for v in variants:
        for m in (v.get("drift") or {}).get(field) or []:
            found.setdefault(m, set()).add(str(v.get("name")))
    return found


def _drift_scale(values: list[float], limits: list[float], higher: bool, p0: float, p1: float) -> tuple[Scale, str]:
    """The x scale of one metric's panel and its axis note."""
    everything = values + limits
    if higher:
        floor = min(everything) if everything else 0.0
        pad = max((1.0 - floor) * 0.35, 0.002)
        lo = max(0.0, floor - pad) if floor < 1.0 else 0.9
        return Scale(lo, 1.0, p0, p1), (f"axis from {fmt_num(lo, 4)} to 1" if lo > 0 else "")
    pos = [v for v in everything if v > 0]
    if pos and limits and min(pos) < max(limits) / 100:
        return Scale(min(pos) / 3, max(pos) * 3, p0, p1, log=True), "log scale"
    return Scale(0.0, (max(everything) if everything else 1.0) * 1.15 or 1.0, p0, p1), ""


def _drift_bar(scale: Scale, y: float, name: str, value: Any, ok: bool, failed: bool) -> list[str]:
    """One variant's bar (or the reason it has none) in a metric's panel."""
    x0, edge = scale.p0, DRIFT_WIDTH - DRIFT_RIGHT - 60
    cy = y + DRIFT_BAR / 2
    body = [_text(DRIFT_LEFT - 10, cy + 4, name, anchor="end", size=12)]
    if value is None:
        note = "not finite: over budget" if failed else "not measured (ignored by the budget)"
        return body + [_text(x0 + 6, cy + 4, note, size=11, fill=FAIL if failed else MUTED)]
    x = scale(float(value))
    width = max(1.5, x - x0)
    color = PASS if ok else FAIL
    body.append(
        f'<rect x="{x0:.1f}" y="{y:.1f}" width="{width:.1f}" height="{DRIFT_BAR}" fill="{color}" fill-opacity="0.75"/>'
    )
    label = fmt_num(float(value), 4) + (" ✓" if ok else " ✗")
    inside = x >= edge
    body.append(
        _text(
            x - 6 if inside else x + 6,
            cy + 4,
            label,
            size=11,
            anchor="end" if inside else "start",
            fill="#ffffff" if inside else "#1f2328",
            weight="600",
        )
    )
    return body


def _drift_panel(
    metric: str, variants: Sequence[Mapping[str, Any]], y: float, failed: set[str], judged: set[str]
) -> tuple[list[str], float]:
    """One budget metric's panel: a bar per variant and the budget as a dashed line; returns (svg, next y)."""
    rows = []
    for v in variants:
        drift = v.get("drift") or {}
        if metric in (drift.get("budget") or {}):
            rows.append((v["name"], drift.get("metrics", {}).get(metric), drift["budget"][metric]))
    higher = METRICS[metric].higher_is_better if metric in METRICS else False
    limits = [float(r[2]) for r in rows if r[2] is not None]
    values = [float(r[1]) for r in rows if r[1] is not None]
    direction = "higher is better, budget is a lower bound" if higher else "lower is better, budget is an upper bound"
    body = [_text(12, y + 16, metric, size=13, weight="700")]
    body.append(_text(12 + 8 * len(metric) + 14, y + 16, f"({direction})", size=11, fill=MUTED))
    y += 44
    plot_top = y
    scale, axis_note = _drift_scale(values, limits, higher, DRIFT_LEFT, DRIFT_WIDTH - DRIFT_RIGHT)
    for name, value, limit in rows:
        measured = None if value is None else float(value)
        ok = name in judged or _metric_ok(measured, None if limit is None else float(limit), higher)
        ok = ok and name not in failed
        body += _drift_bar(scale, y, name, value, ok, name in failed)
        y += DRIFT_BAR + 6
    body += _x_axis(scale, y + 2, plot_top - 4, axis_note, "")
    for limit in sorted(set(limits)):
        bx = scale(limit)
        body.append(
            f'<line x1="{bx:.1f}" y1="{plot_top - 6:.1f}" x2="{bx:.1f}" y2="{y + 2:.1f}" '
            f'stroke="{FAIL}" stroke-width="2" stroke-dasharray="6 4"/>'
        )
        body.append(
            _text(bx, plot_top - 9, f"budget {fmt_num(limit, 4)}", size=11, anchor="middle", fill=FAIL, weight="600")
        )
    return body, y + 52


DRIFT_WIDTH, DRIFT_LEFT, DRIFT_RIGHT, DRIFT_BAR = 980, 210, 150, 20


def drift_plot(variants: Sequence[Mapping[str, Any]]) -> str:
    """One panel per budget metric: a bar per variant, the budget as a dashed line."""
    metrics = _budget_metrics(variants)
    if not metrics:
        empty = [_text(20, 35, "no drift budget in this report")]
        return _svg(DRIFT_WIDTH, 60, empty, kind="drift", label="drift against budget")
    failed = _variants_by_metric(variants, "failed")
    judged = _variants_by_metric(variants, "bounds")  # judged on confidence bounds: the verdict, not the bar, decides
    body: list[str] = []
    y = 10.0
    for metric in metrics:
        panel, y = _drift_panel(metric, variants, y, failed.get(metric, set()), judged.get(metric, set()))
        body += panel
    return _svg(DRIFT_WIDTH, int(y), body, kind="drift", label="drift per metric against its budget")


def scatter_plot(
    points: Sequence[Mapping[str, Any]],
    *,
    y_label: str,
    y_higher_better: bool,
    reference_y: float | None = None,
    front: Sequence[str] = (),
    kind: str = "speedup-drift",
) -> str:
    """Drift score (budget used) on x, ``y`` on y; points {name, x, y, ok}. ``front``: names to join."""
    width, height = 980, 460
    left, right, top, bottom = 90, 220, 24, 64
    usable = [p for p in points if p.get("y") is not None and p.get("y", 0) > 0 and p.get("x") is not None]
    if not usable:
        return _svg(
            width,
            60,
            [_text(20, 35, "nothing to plot: no variant has both latency and drift")],
            kind=kind,
            label=y_label,
        )
    xs = [float(p["x"]) for p in usable if math.isfinite(float(p["x"]))]
    floor = min([x for x in xs if x > 0] + [1e-3]) / 3
    x_hi = max(xs + [1.0]) * 3
    xscale = Scale(floor, x_hi, left, width - right, log=True)
    ys = [float(p["y"]) for p in usable] + ([reference_y] if reference_y else [])
    ylog = _log_worthwhile(ys, 5.0)
    ylo, yhi = min(ys), max(ys)
    yscale = (
        Scale(ylo / 1.5, yhi * 1.5, height - bottom, top, log=True)
        if ylog
        else Scale(0.0, yhi * 1.15, height - bottom, top)
    )
    body = _x_axis(
        xscale, height - bottom, top, "drift: share of the budget used (worst metric; 1 = at budget; log scale)"
    )
    body += _y_axis(yscale, left, width - right, y_label)
    bx = xscale(1.0)
    body.append(
        f'<line x1="{bx:.1f}" y1="{top}" x2="{bx:.1f}" y2="{height - bottom}" stroke="{FAIL}" stroke-width="2" stroke-dasharray="6 4"/>'
    )
    body.append(_text(bx + 4, top + 12, "budget", size=11, fill=FAIL, weight="600"))
    if reference_y:
        ry = yscale(reference_y)
        body.append(
            f'<line x1="{left}" y1="{ry:.1f}" x2="{width - right}" y2="{ry:.1f}" stroke="{REF}" stroke-width="1.5" stroke-dasharray="3 3"/>'
        )
        body.append(_text(width - right + 6, ry + 4, "PyTorch fp32 reference", size=11, fill=REF))
    better = "better: left and up" if y_higher_better else "better: left and down"
    body.append(_text(width - right + 6, height - bottom + 36, better, size=11, fill=MUTED))
    on_front = [p for p in usable if p["name"] in set(front)]
    if len(on_front) > 1:
        on_front.sort(key=lambda p: float(p["x"]))
        path = " ".join(f"{xscale(max(float(p['x']), floor)):.1f},{yscale(float(p['y'])):.1f}" for p in on_front)
        body.append(f'<polyline points="{path}" fill="none" stroke="#0969da" stroke-width="2" stroke-opacity="0.6"/>')
    placed: list[tuple[float, float]] = []
    for p in usable:
        xv = float(p["x"])
        x = xscale(max(xv, floor)) if math.isfinite(xv) else xscale.p1
        y = yscale(float(p["y"]))
        color = PASS if p.get("ok") else FAIL
        star = p["name"] in set(front)
        r = 7 if star else 5.5
        body.append(
            f'<circle cx="{x:.1f}" cy="{y:.1f}" r="{r}" fill="{color}" fill-opacity="0.85" stroke="{"#0969da" if star else "#ffffff"}" stroke-width="{2.5 if star else 1}">'
            f"<title>{esc(p['name'])}: x={esc(fmt_num(xv, 3))}, y={esc(fmt_num(float(p['y']), 3))}</title></circle>"
        )
        ly = y - 9
        while any(abs(ly - py) < 13 and abs(x - px) < 150 for px, py in placed):
            ly += 14
        placed.append((x, ly))
        body.append(_text(x + 9, ly, p["name"] + (" ★" if star else ""), size=11, weight="600" if star else "normal"))
    return _svg(width, height, body, kind=kind, label=y_label + " versus drift")


# ---------------------------------------------------------------------------------- report.html


def _table(header: Sequence[str], rows: Iterable[Sequence[Any]], numeric: Sequence[int] = ()) -> str:
    out = ["<table><thead><tr>" + "".join(f"<th>{esc(h)}</th>" for h in header) + "</tr></thead><tbody>"]
    for row in rows:
        cells = []
        for i, c in enumerate(row):
            cls = ' class="num"' if i in numeric else ""
            cells.append(f"<td{cls}>{c if isinstance(c, _Raw) else esc(c)}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</tbody></table>")
    return "".join(out)


class _Raw(str):
    """Already-escaped HTML for a table cell."""


def _ok(passed: bool | None, yes: str = "within budget", no: str = "over budget") -> _Raw:
    if passed is None:
        return _Raw('<span class="muted">–</span>')
    return _Raw(f'<span class="pass">✓ {esc(yes)}</span>' if passed else f'<span class="fail">✗ {esc(no)}</span>')


def _page(title: str, body: Sequence[str]) -> str:
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{esc(title)}</title><style>{CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n"
    )


def _metrics_text(drift: Mapping[str, Any]) -> str:
    metrics, budget = drift.get("metrics") or {}, drift.get("budget") or {}
    parts = []
    for name in budget or list(metrics)[:3]:
        limit = budget.get(name)
        higher = METRICS[name].higher_is_better if name in METRICS else False
        bound = "" if limit is None else f" ({'≥' if higher else '≤'} {fmt_num(limit, 4)})"
        parts.append(f"{name} {fmt_num(metrics.get(name), 4)}{bound}")
    return "; ".join(parts)


def render(doc: Mapping[str, Any]) -> str:
    """report.json document -> one self-contained HTML page."""
    model = doc.get("model") or {}
    title = f"d2v-export report: {model.get('modality', '?')} / {model.get('task', '?')}"
    body = [f"<h1>{esc(title)}</h1>"]
    body.append(
        f'<p><span class="verdict {"pass" if doc.get("passed") else "fail"}">{"PASSED" if doc.get("passed") else "FAILED"}</span> '
        f"model <code>{esc(model.get('source'))}</code> ({esc(model.get('class'))}, {(model.get('parameters') or 0):,} parameters) · "
        f"created {esc(doc.get('created'))} · d2v-export {esc((doc.get('tool') or {}).get('version'))} · schema {esc(doc.get('schema_version'))}</p>"
    )
    if model.get("random_weights"):
        body.append(
            '<div class="banner" role="alert">RANDOM WEIGHTS — this preset has the real architecture but untrained weights: '
            "latency is meaningful, accuracy numbers only measure conversion drift.</div>"
        )
    body += _summary_section(doc)
    body += _plot_sections(doc)
    pick = doc.get("pick")
    if isinstance(pick, Mapping):
        body.append(render_pick_section(pick, (doc.get("reference") or {}).get("latency_ms")))
    comparison = doc.get("comparison")
    if isinstance(comparison, Mapping):
        body.append(render_comparison_section(comparison))
    body += _export_section(doc)
    body += _variant_details(doc)
    body += _cold_start_section(doc.get("variants") or [])
    body += _length_section(doc.get("variants") or [])
    if doc.get("warnings"):
        body.append(
            '<h2>Warnings</h2><ul class="warnings">' + "".join(f"<li>{esc(w)}</li>" for w in doc["warnings"]) + "</ul>"
        )
    body += _environment_section(doc)
    return _page(title, body)


def _summary_section(doc: Mapping[str, Any]) -> list[str]:
    """The summary table (reference and every variant) and how latency was taken."""
    env = doc.get("environment") or {}
    ref = (doc.get("reference") or {}).get("latency_ms")
    variants = list(doc.get("variants") or [])
    out: list[str] = []
    rows: list[list[Any]] = []
    if ref:
        rows.append(
            [
                _Raw(f"<b>{REFERENCE}</b> (reference)"),
                "fp32",
                "–",
                fmt_num(ref.get("p50")),
                fmt_num(ref.get("p90")),
                fmt_num(ref.get("p99")),
                fmt_num(ref.get("throughput_per_s")),
                "1.00×",
                "–",
                _Raw('<span class="muted">reference</span>'),
            ]
        )
    for v in variants:
        lat = v.get("latency_ms") or {}
        q = v.get("quantization") or {}
        sp = v.get("speedup_vs_reference")
        rows.append(
            [
                _Raw(f"<b>{esc(v.get('name'))}</b>"),
                v.get("precision"),
                (q.get("mode") or "–") if q else "–",
                fmt_num(lat.get("p50")),
                fmt_num(lat.get("p90")),
                fmt_num(lat.get("p99")),
                fmt_num(lat.get("throughput_per_s")),
                f"{sp:.2f}×" if sp else "–",
                _metrics_text(v.get("drift") or {}),
                _ok((v.get("drift") or {}).get("passed")),
            ]
        )
    out.append("<h2>Summary</h2>")
    out.append(
        _table(
            [
                "variant",
                "precision",
                "quant",
                "p50 ms",
                "p90 ms",
                "p99 ms",
                "items/s",
                "speedup vs PyTorch",
                "drift",
                "",
            ],
            rows,
            numeric=(3, 4, 5, 6, 7),
        )
    )
    shape = (ref or {}).get("shape") or {}
    bench = doc.get("bench") or {}
    bench_text = ""
    if bench:
        unsettled = [k for k, ok in (bench.get("settled") or {}).items() if not ok]
        bench_text = (
            f" Warm-up {bench.get('warmup_rounds')} rounds"
            + (f" (still drifting: {', '.join(unsettled)})" if unsettled else " (all settled)")
            + "."
        )
    out.append(
        f'<p class="muted">Latency at batch {esc((ref or {}).get("batch", "?"))}, shape {esc(shape)}: {esc((ref or {}).get("n", 0))} timed runs per variant, '
        + (
            "each variant in a pair with the reference (speedup against its own pair's reference), "
            if isinstance(bench.get("interleaved"), str)
            else "interleaved round-robin with the reference, "
        )
        + f"{esc(env.get('threads'))} threads on {esc(env.get('cpu'))} "
        f"({esc(env.get('cores_available'))} cores available).{esc(bench_text)}</p>"
    )
    return out


def _plot_sections(doc: Mapping[str, Any]) -> list[str]:
    """Latency distribution, drift against budget, speedup versus drift."""
    ref = (doc.get("reference") or {}).get("latency_ms")
    variants = list(doc.get("variants") or [])
    out: list[str] = []
    lat_rows = [(REFERENCE, ref)] + [(v.get("name", "?"), v.get("latency_ms")) for v in variants]
    out.append(
        "<h2>Latency distribution</h2><figure>"
        + latency_plot(lat_rows)
        + "<figcaption>Every timed run is a dot; the box spans the quartiles, whiskers the 5th–95th percentile, the thick bar is the median (p50).</figcaption></figure>"
    )
    out.append(
        "<h2>Drift against budget</h2><figure>"
        + drift_plot(variants)
        + "<figcaption>Each variant against the PyTorch fp32 reference; green within budget, red over it. The dashed line is the budget.</figcaption></figure>"
    )
    points = [
        {
            "name": v.get("name", "?"),
            "x": drift_score(v.get("drift")),
            "y": v.get("speedup_vs_reference"),
            "ok": (v.get("drift") or {}).get("passed"),
        }
        for v in variants
    ]
    out.append(
        "<h2>Speedup versus drift</h2><figure>"
        + scatter_plot(points, y_label="speedup vs PyTorch fp32 (×)", y_higher_better=True, reference_y=1.0)
        + "<figcaption>x: the largest share of any drift budget a variant uses (value / limit for errors, (1 − value) / (1 − limit) for agreements); "
        "right of the dashed line is over budget. y: reference p50 / variant p50.</figcaption></figure>"
    )
    return out


def _export_section(doc: Mapping[str, Any]) -> list[str]:
    """The export and its check against PyTorch: axes, inputs and outputs."""
    out: list[str] = []
    ex = doc.get("export") or {}
    check = ex.get("check") or {}
    out.append("<h2>Export check</h2>")
    out.append(
        f"<p>{esc(ex.get('exporter'))}, opset {esc(ex.get('opset'))}, {esc(ex.get('seconds'))} s. {_ok(check.get('passed'), 'matches PyTorch', 'mismatch')} "
        f"— {esc(_metrics_text(check))}. {esc(check.get('detail'))}</p>"
    )
    axes = [[a, r.get("min"), r.get("opt"), r.get("max")] for a, r in (ex.get("shapes") or {}).items()]
    axes += [[f"{n} (static)", s, s, s] for n, s in (ex.get("static") or {}).items()]
    out.append(_table(["axis", "min", "opt", "max"], axes, numeric=(1, 2, 3)))
    io_rows = [["input", t.get("name"), t.get("dtype"), t.get("shape")] for t in ex.get("inputs") or []]
    io_rows += [["output", t.get("name"), t.get("dtype"), t.get("shape")] for t in ex.get("outputs") or []]
    out.append(_table(["", "name", "dtype", "shape"], io_rows))
    return out


def _variant_details(doc: Mapping[str, Any]) -> list[str]:
    """Per variant: drift detail, what failed, the quantization recipe and notes."""
    variants = list(doc.get("variants") or [])
    out: list[str] = []
    details = []
    for v in variants:
        d = v.get("drift") or {}
        q = v.get("quantization")
        items = [f"<li>drift: {esc(d.get('detail'))}</li>"] if d.get("detail") else []
        if d.get("failed"):
            items.append(f'<li class="fail">over budget: {esc(", ".join(d["failed"]))}</li>')
        if q:
            items.append(
                "<li>quantization: "
                + esc(", ".join(f"{k}={val}" for k, val in q.items() if val not in (None, [], ())))
                + "</li>"
            )
        items += [f"<li>{esc(n)}</li>" for n in v.get("notes") or []]
        if items:
            details.append(f"<h3>{esc(v.get('name'))}</h3><ul>{''.join(items)}</ul>")
    if details:
        out.append("<h2>Variants</h2>" + "".join(details))
    return out


def _environment_section(doc: Mapping[str, Any]) -> list[str]:
    """Where the numbers came from."""
    env = doc.get("environment") or {}
    out: list[str] = []
    env_rows: list[list[Any]] = [
        ["cpu", env.get("cpu")],
        ["cpu flags", ", ".join(env.get("cpu_flags") or [])],
        ["cores available", env.get("cores_available")],
        ["threads", env.get("threads")],
        ["device", env.get("device")],
        ["platform", env.get("platform")],
    ]
    env_rows += [[k, v] for k, v in (env.get("versions") or {}).items()]
    out.append("<h2>Environment</h2>" + _table(["", ""], env_rows))
    return out


def _cold_start_section(variants: Sequence[Mapping[str, Any]]) -> list[str]:
    """Each artifact opened in a child process of its own (report.json ``cold_start``)."""
    measured = [v for v in variants if v.get("cold_start")]
    if not measured:
        return []
    header = ["variant", "import ms", "open ms", "first inference ms", "peak RSS MB", "artifact's share MB"]
    rows = []
    for v in measured:
        c = v["cold_start"]
        keys = ("import_ms", "open_ms", "first_inference_ms", "peak_rss_mb", "artifact_rss_mb")
        rows.append([v["name"], *(fmt_num(c[k]) for k in keys)])
    what = (
        "Each artifact opened in a fresh child process: importing the runtime, opening the artifact, the first "
        "inference at the latency shape; the peak resident memory of that process and the artifact's share of it."
    )
    return ["<h2>Cold start</h2>", f"<p>{esc(what)}</p>", _table(header, rows, numeric=(1, 2, 3, 4, 5))]


def _length_section(variants: Sequence[Mapping[str, Any]]) -> list[str]:
    """INT8 audio drift against input length (report.json ``drift_by_length``): information, not a gate."""
    found = [(v["name"], d) for v in variants for d in v.get("drift_by_length") or ()]
    if not found:
        return []
    names = list(dict.fromkeys(k for _, d in found for k in d["metrics"]))
    rows = [[name, f"{d['seconds']:g}"] + [fmt_num(d["metrics"].get(k), 4) for k in names] for name, d in found]
    what = "One input per length against PyTorch: information, not a gate."
    numeric = tuple(range(1, len(names) + 2))
    return [
        "<h2>INT8 drift against input length</h2>",
        f"<p>{esc(what)}</p>",
        _table(["variant", "seconds", *names], rows, numeric),
    ]


def render_pick_section(pick: Mapping[str, Any], reference: Mapping[str, Any] | None) -> str:
    """--pick: the chosen candidate, why, every candidate's outcome and the latency-versus-drift front."""
    front = list(pick.get("front") or [])
    cands = list(pick.get("candidates") or [])
    parts = [
        "<h2>The pick</h2>",
        f"<p><b>{esc(pick.get('name'))}</b> ({esc(pick.get('candidate'))}): {esc(pick.get('why'))}.</p>",
        _table(
            [
                "candidate",
                "recipe",
                "p50 ms",
                f"{esc(pick.get('statistic', 'p50'))} ms",
                "drift score",
                "key metric",
                "outcome",
            ],
            [
                [
                    _Raw(f"<b>{esc(c['name'])}</b>" + (" ★" if c["name"] in front else "")),
                    c.get("candidate"),
                    fmt_num(c.get("p50_ms")),
                    fmt_num(c.get("compared_ms")),
                    fmt_num(c.get("drift_score"), 3),
                    f"{c.get('key_metric')} {fmt_num(c.get('key_metric_value'), 4)}" if c.get("key_metric") else "–",
                    c.get("outcome"),
                ]
                for c in cands
            ],
            numeric=(2, 3, 4),
        ),
    ]
    points = [
        {"name": c["name"], "x": c.get("drift_score"), "y": c.get("compared_ms"), "ok": c.get("drift_passed")}
        for c in cands
    ]
    ref = (reference or {}).get(str(pick.get("statistic", "p50")))
    parts.append(
        "<figure>"
        + scatter_plot(
            points,
            y_label=f"{pick.get('statistic', 'p50')} latency (ms)",
            y_higher_better=False,
            reference_y=ref,
            front=front,
            kind="pareto",
        )
        + "<figcaption>Every candidate --pick built. Blue ring and line: the latency-versus-drift front (★); right of the dashed line is over budget.</figcaption></figure>"
    )
    return "".join(parts)


def render_comparison_section(c: Mapping[str, Any]) -> str:
    """The ``compare.to_dict`` document as an HTML section (used by report.html with --baseline)."""
    head = (
        '<span class="pass">no regression</span>'
        if c.get("passed")
        else f'<span class="fail">regression: {esc(", ".join(c.get("regressions") or []))}</span>'
    )
    rows = []
    for v in c.get("variants") or []:
        lat = v.get("latency") or {}
        ratio = lat.get("ratio")
        drift = "; ".join(
            f"{m['metric']} {fmt_num(m.get('baseline'), 4)} → {fmt_num(m.get('current'), 4)}"
            + (" ✗" if m.get("flagged") else "")
            for m in v.get("drift") or []
        )
        verdict = v.get("verdict", "?")
        cls = "fail" if verdict == "regression" and v.get("gating") else ("pass" if verdict == "improvement" else "")
        rows.append(
            [
                v.get("name"),
                _Raw(f'<span class="{cls}">{esc(verdict)}{"" if v.get("gating") else " (info)"}</span>'),
                fmt_num(lat.get("baseline_p50")),
                fmt_num(lat.get("current_p50")),
                f"{ratio - 1:+.1%}" if ratio else "–",
                fmt_num(lat.get("p_value"), 2),
                drift or "–",
                "; ".join([x for x in [lat.get("note")] if x] + list(v.get("notes") or [])),
            ]
        )
    basis = "relative to each run's reference" if c.get("relative_to_reference") else "absolute"
    return (
        f"<h2>Comparison with the baseline</h2><p>{head} — latency tolerance {float(c.get('latency_tolerance') or 0):.0%} ({esc(basis)}, "
        f"one-sided Mann-Whitney U, α={esc(c.get('alpha'))}), drift tolerance {esc(c.get('drift_tolerance'))}. Baseline: {esc(c.get('baseline'))}.</p>"
        + _table(
            ["variant", "verdict", "p50 baseline ms", "p50 now ms", "change", "p", "drift", "notes"],
            rows,
            numeric=(2, 3, 4, 5),
        )
        + (
            '<ul class="warnings">' + "".join(f"<li>{esc(w)}</li>" for w in c.get("warnings") or []) + "</ul>"
            if c.get("warnings")
            else ""
        )
    )


# ---------------------------------------------------------------------------------- matrix.html


def _matrix_header(doc: Mapping[str, Any], title: str) -> list[str]:
    """The title, what the matrix covered, and the random-weights banner."""
    covered = (
        f"created {esc(doc.get('created'))} · modalities {esc(', '.join(doc.get('modalities') or []))} · "
        f"targets {esc(', '.join(doc.get('targets') or []))} · precisions {esc(', '.join(doc.get('precisions') or []))}"
    )
    if doc.get("shard"):
        covered += f" · shard {esc(doc['shard'])}"
    body = [f"<h1>{esc(title)}</h1>", f'<p class="muted">{covered}</p>']
    if doc.get("random_weights"):
        body.append(
            '<div class="banner" role="alert">RANDOM WEIGHTS — presets have the real architecture but untrained weights: '
            "latency is meaningful, accuracy numbers only measure conversion drift.</div>"
        )
    return body


def _cells_section(cells: Sequence[Mapping[str, Any]]) -> list[str]:
    """Every cell with its status, reason and report link."""
    rows = []
    for c in cells:
        status = str(c.get("status"))
        cls = {"ran": "pass", "failed": "fail"}.get(status, "muted")
        ran = c.get("report") and status == "ran"
        link = _Raw(f'<a href="{esc(c["report"])}">{esc(c["report"])}</a>') if ran else "–"
        badge = _Raw(f'<span class="{cls}">{esc(status)}</span>')
        rows.append([c.get("modality"), c.get("target"), c.get("precision"), badge, c.get("reason") or "", link])
    counts = {s: sum(1 for c in cells if c.get("status") == s) for s in ("ran", "skipped", "failed")}
    summary = f"{counts['ran']} ran, {counts['skipped']} skipped, {counts['failed']} failed."
    header = ["modality", "target", "precision", "status", "reason", "report"]
    return [f"<h2>Cells</h2><p>{summary}</p>", _table(header, rows)]


def _matrix_variant_row(v: Mapping[str, Any], front: Sequence[str]) -> list[Any]:
    name = (
        f"<b>{esc(v['name'])}</b>"
        + (" (simulated)" if v.get("simulated") else "")
        + (" ★" if v["name"] in front else "")
    )
    speedup = v.get("speedup_vs_common_reference")
    key = v.get("key_metric")
    return [
        _Raw(name),
        v.get("target"),
        v.get("precision"),
        fmt_num(v.get("p50_ms")),
        f"{speedup:.2f}×" if speedup else "–",
        fmt_num(v.get("drift_score"), 3),
        f"{key} {fmt_num(v.get('key_metric_value'), 4)}" if key else "–",
        _ok(v.get("drift_passed")),
    ]


def _modality_section(modality: str, info: Mapping[str, Any]) -> list[str]:
    """One modality's variants: a table and the latency-versus-drift scatter with its Pareto front."""
    variants = info.get("variants") or []
    front = info.get("pareto") or []
    body = [f"<h2>{esc(modality)}: {esc(info.get('task', ''))}</h2>"]
    ref = info.get("reference_p50_ms")
    if ref is not None:
        body.append(f"<p>PyTorch fp32 reference p50 {fmt_num(ref)} ms. {esc(SPEEDUP_MEANING)}</p>")
    header = ["variant", "target", "precision", "p50 ms", "speedup vs common ref", "drift score", "key metric", "drift"]
    body.append(_table(header, [_matrix_variant_row(v, front) for v in variants], numeric=(3, 4, 5)))
    body.append(f"<p>Latency-versus-drift front (★): {esc(', '.join(front) or 'none')}.</p>")
    points = [
        {"name": v["name"], "x": v.get("drift_score"), "y": v.get("p50_ms"), "ok": v.get("drift_passed")}
        for v in variants
    ]
    plot = scatter_plot(
        points, y_label="p50 latency (ms)", y_higher_better=False, reference_y=ref, front=front, kind="pareto"
    )
    caption = "Blue ring and line: the Pareto front (no other variant is both faster and closer to the reference)."
    body.append(f"<figure>{plot}<figcaption>{caption}</figcaption></figure>")
    return body


def render_matrix(doc: Mapping[str, Any]) -> str:
    """matrix.json document -> one self-contained HTML page."""
    title = f"d2v-export matrix: {doc.get('model', '?')}"
    body = _matrix_header(doc, title)
    body += _cells_section(list(doc.get("cells") or []))
    for modality, info in (doc.get("modalities_detail") or {}).items():
        body += _modality_section(modality, info)
    if doc.get("warnings"):
        items = "".join(f"<li>{esc(w)}</li>" for w in doc["warnings"])
        body.append(f'<h2>Warnings</h2><ul class="warnings">{items}</ul>')
    return _page(title, body)


def write_html(doc: Mapping[str, Any], path: Path) -> Path:
    """Render a report.json document to ``path`` (report.html)."""
    path = Path(path)
    path.write_text(render(doc), encoding="utf-8")
    return path


def write_matrix_html(doc: Mapping[str, Any], path: Path) -> Path:
    path = Path(path)
    path.write_text(render_matrix(doc), encoding="utf-8")
    return path
