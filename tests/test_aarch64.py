"""ONNX Runtime bundles give the same answers on aarch64 (qemu-user) as on x86: scripts/aarch64_parity.py on one bundle.

Runs where the arm64 root that ``scripts/aarch64_parity.py`` builds is present (``D2V_AARCH64_CACHE``, default
~/.cache/d2v-export-aarch64), and skips naming that script otherwise. The comparison itself (what counts as
the same answer, what is over tolerance) is tested everywhere.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest

from .test_bundle import bundles  # noqa: F401 - the session fixture shared with test_bundle

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "aarch64_parity.py"
CACHE = Path(os.environ.get("D2V_AARCH64_CACHE", "~/.cache/d2v-export-aarch64")).expanduser()


def _parity() -> Any:
    spec = importlib.util.spec_from_file_location("aarch64_parity", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["aarch64_parity"] = module  # dataclasses resolve the module by name
    spec.loader.exec_module(module)
    return module


def _can_run_the_root() -> str | None:
    """Why the root cannot be used here, or None."""
    parity = _parity()
    if not (CACHE / "root" / parity.READY).is_file():
        return f"no arm64 root in {CACHE}: run `.venv/bin/python scripts/aarch64_parity.py --setup-only` once, as root (~30 s)"
    if os.geteuid() != 0 and shutil.which("unshare") is None:
        return "running the arm64 root needs root or unshare (chroot)"
    return None


def _result(label: int, name: str = "x") -> dict[str, Any]:
    return {"input": name, "labels": [{"id": label, "label": f"L{label}", "score": 0.9}]}


def test_the_comparison_catches_a_changed_answer_and_a_drift_over_tolerance() -> None:
    parity = _parity()
    logits = {"input0.0": np.array([2.0, -1.0]), "input1.0": np.array([0.5, 0.4])}
    native = ({"features": [], "results": [_result(0, "a"), _result(0, "b")]}, logits)
    same = parity.compare(
        "b", "fp32", "max", native, ({"features": ["asimddp"], "results": [_result(0), _result(0)]}, logits)
    )
    assert same.ok and same.same_answers == 2 and same.max_diff == 0 and same.features == "asimddp"
    flipped = parity.compare(
        "b", "fp32", "max", native, ({"features": [], "results": [_result(0), _result(1)]}, logits)
    )
    # no output explains it
    assert not flipped.ok and flipped.same_answers == 1 and "x86 0, aarch64 1" in flipped.differences[0]
    drifted = {"input0.0": logits["input0.0"] + [0, 3e-4], "input1.0": logits["input1.0"]}
    over = parity.compare("b", "fp32", "max", native, ({"features": [], "results": [_result(0), _result(0)]}, drifted))
    assert not over.ok and over.max_diff == pytest.approx(3e-4) and over.features == "neon"
    assert parity.compare(
        "b", "QDQ", "max", native, ({"features": [], "results": [_result(0), _result(0)]}, drifted)
    ).ok  # int8: 2e-2
    tie = {"input0.0": np.array([2.0, -1.0]), "input1.0": np.array([0.5, 0.49])}
    native_tie = ({"features": [], "results": [_result(0, "a"), _result(0, "b")]}, tie)
    swapped = {"input0.0": tie["input0.0"], "input1.0": np.array([0.49, 0.5])}
    near = parity.compare(
        "b", "QDQ", "max", native_tie, ({"features": [], "results": [_result(0), _result(1)]}, swapped)
    )
    assert (
        near.ok
        and near.same_answers == 1
        and near.tie_margin == pytest.approx(0.01)
        and "margin" in near.differences[0]
    )
    assert not parity.compare(
        "b", "fp32", "max", native_tie, ({"features": [], "results": [_result(0), _result(1)]}, swapped)
    ).ok
    wide = {"input0.0": tie["input0.0"], "input1.0": np.array([0.4, 0.5])}
    was_wide = {"input0.0": tie["input0.0"], "input1.0": np.array([0.5, 0.4])}
    native_wide = ({"features": [], "results": [_result(0, "a"), _result(0, "b")]}, was_wide)
    assert not parity.compare(
        "b", "QDQ", "max", native_wide, ({"features": [], "results": [_result(0), _result(1)]}, wide)
    ).ok
    short = {"input0.0": logits["input0.0"][:1], "input1.0": logits["input1.0"]}
    assert not parity.compare(
        "b", "fp32", "max", native, ({"features": [], "results": [_result(0), _result(0)]}, short)
    ).ok
    static = {"precision": "int8", "quantization": {"mode": "static", "per_channel": True, "reduce_range": False}}
    assert parity.int8_format(static) == "QDQ, static u8 x s8 per-channel, 8-bit weights"
    dynamic = {"precision": "int8", "quantization": {"mode": "dynamic", "per_channel": True, "reduce_range": True}}
    assert parity.int8_format(dynamic) == "MatMulInteger, dynamic u8 x s8 per-channel, 7-bit weights"


def test_a_text_bundle_answers_the_same_on_aarch64(bundles: Callable[..., dict[str, Path]], tmp_path: Path) -> None:  # noqa: F811
    why = _can_run_the_root()
    if why:
        pytest.skip(why)
    built = bundles("text", "text-classification", ("onnxruntime",), int8="static")
    out = tmp_path / "rows.json"
    cmd = [sys.executable, str(SCRIPT), str(CACHE), "--cpu", "neoverse-n1", "--json", str(out)]
    cmd += ["--bundle", str(built["onnxruntime-fp32"]), "--bundle", str(built["onnxruntime-int8-static"])]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr
    rows = {r["bundle"]: r for r in json.loads(out.read_text())}
    assert set(rows) == {"onnxruntime-fp32", "onnxruntime-int8-static"}
    for row in rows.values():
        assert row["ok"] and row["same_answers"] == row["inputs"] == 4 and row["features"] == "asimddp", row
        assert row["max_logit"] > 0  # outputs were compared, not two empty lists
    assert rows["onnxruntime-fp32"]["max_diff"] <= 1e-4
    assert rows["onnxruntime-int8-static"]["int8_format"].startswith("QDQ, static u8 x s8 per-channel")
    assert "| onnxruntime-fp32 | fp32 | neoverse-n1 (asimddp) | 4 |" in done.stdout
