"""report.html: self-contained, its three plots present, text escaped, and it renders in a real browser."""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from d2v_export.reports import compare as cmp
from d2v_export.reports.html_report import render, render_matrix, write_html
from d2v_export.matrix import summarize

from .test_compare import real_doc

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "render_report.sh"


@pytest.fixture(scope="module")
def doc() -> dict[str, Any]:
    """The real tiny vision report plus a second variant made from it whose drift is over budget (a data edit)."""
    d = real_doc()
    extra = copy.deepcopy(d["variants"][0])
    extra["name"], extra["precision"] = "onnxruntime-int8-static", "int8"
    extra["drift"]["metrics"] = {"top1_agreement": 0.9375, "logit_cosine": 0.998}
    extra["drift"]["budget"] = {"top1_agreement": 0.98, "logit_cosine": 0.99, "accuracy_drop": 0.005}
    extra["drift"]["passed"], extra["drift"]["failed"] = False, ["top1_agreement"]
    d["variants"].append(extra)
    d["passed"] = False
    return d


def assert_self_contained(page: str) -> None:
    lowered = page.lower()
    for needle in (
        "<script",
        "<link",
        "<iframe",
        "<img",
        "@import",
        "url(",
        "src=",
        'href="http',
        "href='http",
        "//fonts.",
    ):
        assert needle not in lowered, needle


def test_html_holds_its_plots_and_nothing_external(doc: dict[str, Any]) -> None:
    page = render(doc)
    assert page.startswith("<!DOCTYPE html>")
    kinds = re.findall(r'<svg[^>]*data-plot="([a-z-]+)"', page)
    assert sorted(kinds) == ["drift", "latency", "speedup-drift"], kinds
    assert_self_contained(page)
    assert "http://" not in page and "https://" not in page
    assert "RANDOM WEIGHTS" in page
    # every variant and the reference appear in the latency plot; the budget line in the drift plot
    latency_svg = page[page.index('data-plot="latency"') : page.index("</svg>", page.index('data-plot="latency"'))]
    for name in ("pytorch-fp32", "onnxruntime-fp32", "onnxruntime-int8-static"):
        assert f">{name}<" in latency_svg
    assert latency_svg.count("<circle") >= sum(len(v["latency_ms"]["samples"]) for v in doc["variants"])
    drift_svg = page[page.index('data-plot="drift"') :]
    assert "budget 0.98" in drift_svg and "stroke-dasharray" in drift_svg
    assert "Environment" in page and doc["environment"]["cpu"] in page and "Export check" in page


def test_html_escapes_text(doc: dict[str, Any]) -> None:
    evil = copy.deepcopy(doc)
    evil["model"]["source"] = '<script>alert("x")</script>'
    evil["warnings"] = ["<img src=x onerror=alert(1)>"]
    evil["variants"][0]["name"] = "a<b>&c"
    page = render(evil)
    assert "<script>" not in page and "<img" not in page
    assert "&lt;script&gt;" in page and "a&lt;b&gt;&amp;c" in page


def test_comparison_section_when_a_baseline_was_given(doc: dict[str, Any]) -> None:
    with_cmp = dict(doc, comparison=cmp.to_dict(cmp.compare(doc, doc)))
    page = render(with_cmp)
    assert "Comparison with the baseline" in page and "no regression" in page
    assert_self_contained(page)


def test_matrix_html(doc: dict[str, Any]) -> None:
    from d2v_export.matrix import _variant_entry

    cells = [
        {
            "modality": "vision",
            "target": "onnxruntime",
            "precision": "fp32",
            "status": "ran",
            "reason": "",
            "report": "cells/vision-onnxruntime/report.html",
            "task": "image-classification",
            "reference_p50_ms": doc["reference"]["latency_ms"]["p50"],
            "variants": [_variant_entry(v, doc["reference"]["latency_ms"]["p50"]) for v in doc["variants"]],
        },
        {
            "modality": "vision",
            "target": "tensorrt",
            "precision": "fp32",
            "status": "skipped",
            "reason": "TensorRT is not installed",
            "report": None,
            "task": None,
            "reference_p50_ms": None,
            "variants": [],
        },
    ]
    mdoc = {
        "schema_version": "1.0",
        "kind": "matrix",
        "model": "preset:tiny",
        "random_weights": True,
        "modalities": ["vision"],
        "targets": ["onnxruntime", "tensorrt"],
        "precisions": ["fp32"],
        "cells": cells,
        "modalities_detail": summarize(cells),
        "warnings": [],
    }
    page = render_matrix(mdoc)
    assert 'data-plot="pareto"' in page and "skipped" in page and "TensorRT is not installed" in page
    assert "★" in page
    assert_self_contained(page.replace('href="cells/', "local-link"))  # relative links to the cell reports are fine
    assert "http://" not in page and "https://" not in page


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome-stable", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


@pytest.mark.skipif(
    _chromium() is None, reason="no chromium here: apt-get install -y chromium to render report.html headless"
)
def test_report_renders_in_a_headless_browser(doc: dict[str, Any], tmp_path: Path) -> None:
    from PIL import Image

    html_path = write_html(doc, tmp_path / "report.html")
    png = tmp_path / "report.png"
    proc = subprocess.run(["bash", str(SCRIPT), str(html_path), str(png)], capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    image = Image.open(png).convert("RGB")
    assert image.size == (1280, 2000)
    colors: list[tuple[int, tuple[int, int, int]]] = image.getcolors(maxcolors=1 << 20) or []  # type: ignore[assignment]
    assert len(colors) > 50  # not a blank page
    # the plots drew in their colours: pass green bars and the red budget line / failed bar
    pixels = {rgb for _count, rgb in colors}
    assert any(g > 100 and r < 120 and b < 120 for r, g, b in pixels), "no green (within-budget) marks rendered"
    assert any(r > 180 and g < 90 and b < 90 for r, g, b in pixels), "no red (budget / over-budget) marks rendered"


def test_render_script_without_chromium_says_so(tmp_path: Path) -> None:
    page = tmp_path / "r.html"
    page.write_text("<!DOCTYPE html><p>x</p>")
    proc = subprocess.run(
        [shutil.which("bash") or "/bin/bash", str(SCRIPT), str(page), str(tmp_path / "o.png")],
        capture_output=True,
        text=True,
        env={"PATH": "/nonexistent", "CHROMIUM": ""},
        timeout=60,
    )
    assert proc.returncode == 3 and "apt-get install -y chromium" in proc.stderr


def test_cold_start_and_length_drift_sections(doc: dict[str, Any]) -> None:
    """report.html shows what report.md shows: cold start per artifact and INT8 drift against input length."""
    d = copy.deepcopy(doc)
    for v in d["variants"]:
        v["cold_start"], v["drift_by_length"] = None, []
    assert "Cold start" not in render(d) and "against input length" not in render(d)
    cold = {
        "import_ms": 412.0,
        "open_ms": 37.5,
        "first_inference_ms": 8.25,
        "peak_rss_mb": 161.0,
        "baseline_rss_mb": 120.0,
        "artifact_rss_mb": 41.0,
        "measured_in": "child process",
    }
    d["variants"][1]["cold_start"] = cold
    d["variants"][1]["drift_by_length"] = [
        {"seconds": 1.0, "samples": 4, "metrics": {"logit_cosine": 0.9987, "cer": None}},
        {"seconds": 10.0, "samples": 4, "metrics": {"logit_cosine": 0.9871, "cer": 0.0312}},
    ]
    page = render(d)
    cold_part = page[page.index("<h2>Cold start</h2>") :]
    for shown in ("onnxruntime-int8-static", "412", "37.5", "8.25", "161", "41"):
        assert shown in cold_part.split("</table>")[0], shown
    length_part = page[page.index("<h2>INT8 drift against input length</h2>") :].split("</table>")[0]
    for shown in ("logit_cosine", "cer", "0.9987", "0.9871", "0.0312", "n/a", ">10<"):
        assert shown in length_part, shown
