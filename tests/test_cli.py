"""The real `d2v-export` command: end to end on tiny presets, the report schema, and the error cases."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from d2v_export.models import load, parse_source
from d2v_export.spec import ExitCode, Modality

from .conftest import cli

FAST = ("--bench-seconds", "0", "--quiet")


def _checkpoint(folder: Path, modality: Modality, task: str) -> Path:
    """A real Hugging Face checkpoint folder (safetensors + config + processor files)."""
    model = load(parse_source("preset:tiny", modality, task))
    model.module.save_pretrained(folder)
    model.save_pretrained_files(folder)
    return folder


@pytest.mark.parametrize(
    "modality,extra",
    [
        ("vision", ()),
        ("text", ("--sequence-length", "8:16:32", "--batch-size", "1:2:4")),
        ("audio", ("--audio-seconds", "0.5:1:2")),
    ],
)
def test_end_to_end_json_report(modality: str, extra: tuple[str, ...], tmp_path: Path) -> None:
    out = tmp_path / "out"
    res = cli(modality, "--model", "preset:tiny", "--output", str(out), "--json", *FAST, *extra)
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc == json.loads((out / "report.json").read_text())
    assert doc["schema_version"] == "1.1"
    assert doc["model"]["random_weights"] is True and doc["model"]["parameters"] > 0
    assert doc["model"]["modality"] == modality
    assert set(doc["environment"]) >= {"versions", "cpu", "threads"}
    (variant,) = doc["variants"]
    assert variant["target"] == "onnxruntime" and variant["precision"] == "fp32" and variant["quantization"] is None
    assert (out / variant["artifact"] / "model.onnx").is_file()
    assert (out / variant["artifact"] / "config.json").is_file()
    assert variant["drift"]["passed"] is True and variant["drift"]["samples"] >= 3
    lat = variant["latency_ms"]
    assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"] and lat["n"] >= 10 and len(lat["samples"]) == lat["n"]
    assert doc["reference"]["latency_ms"]["n"] == lat["n"]
    assert variant["speedup_vs_reference"] == pytest.approx(
        doc["reference"]["latency_ms"]["p50"] / lat["p50"], rel=1e-2
    )
    md = (out / "report.md").read_text()
    assert "RANDOM WEIGHTS" in md and "onnxruntime-fp32" in md
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "staging folders left behind"


def test_local_checkpoint_with_task(tmp_path: Path) -> None:
    ckpt = _checkpoint(tmp_path / "ckpt", Modality.TEXT, "question-answering")
    out = tmp_path / "out"
    res = cli(
        "text",
        "--model",
        str(ckpt),
        "--task",
        "question-answering",
        "--output",
        str(out),
        "--sequence-length",
        "8:16:32",
        *FAST,
    )
    assert res.returncode == 0, res.stderr
    doc = json.loads((out / "report.json").read_text())
    assert doc["model"]["class"] == "Data2VecTextForQuestionAnswering"
    assert doc["model"]["random_weights"] is False
    assert [v["drift"]["passed"] for v in doc["variants"]] == [True]
    assert "question-answering" in res.stdout


def test_default_task_is_the_checkpoints_own_head(tmp_path: Path) -> None:
    ckpt = _checkpoint(tmp_path / "ckpt", Modality.AUDIO, "audio-frame-classification")
    out = tmp_path / "out"
    res = cli("audio", "--model", str(ckpt), "--output", str(out), "--audio-seconds", "0.5:1:2", *FAST)
    assert res.returncode == 0, res.stderr
    assert json.loads((out / "report.json").read_text())["model"]["task"] == "audio-frame-classification"


def _one_line_error(res, code: ExitCode, *needles: str) -> None:  # type: ignore[no-untyped-def]
    assert res.returncode == int(code), (res.returncode, res.stderr)
    lines = [ln for ln in res.stderr.strip().splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, res.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_missing_path(tmp_path: Path) -> None:
    out = tmp_path / "out"
    res = cli("vision", "--model", str(tmp_path / "nope"), "--output", str(out), *FAST)
    _one_line_error(res, ExitCode.BAD_INPUT, "does not exist", "preset:")
    assert not out.exists()


def test_hub_id_while_offline(tmp_path: Path) -> None:
    out = tmp_path / "out"
    res = cli("audio", "--model", "facebook/data2vec-audio-base-960h", "--output", str(out), *FAST)
    _one_line_error(res, ExitCode.BAD_INPUT, "facebook/data2vec-audio-base-960h", "local", "preset:")
    assert not out.exists()


def test_checkpoint_of_another_modality(tmp_path: Path) -> None:
    ckpt = _checkpoint(tmp_path / "ckpt", Modality.TEXT, "text-classification")
    out = tmp_path / "out"
    res = cli("vision", "--model", str(ckpt), "--output", str(out), *FAST)
    _one_line_error(res, ExitCode.BAD_INPUT, "data2vec-text", "d2v-export text")
    assert not out.exists()


def test_task_the_modality_lacks(tmp_path: Path) -> None:
    res = cli("text", "--model", "preset:tiny", "--task", "semantic-segmentation", "--output", str(tmp_path / "o"))
    assert res.returncode == int(ExitCode.USAGE)
    assert "semantic-segmentation" in res.stderr and "question-answering" in res.stderr
    assert not (tmp_path / "o").exists()


def test_corrupt_config(tmp_path: Path) -> None:
    ckpt = _checkpoint(tmp_path / "ckpt", Modality.VISION, "image-classification")
    (ckpt / "config.json").write_text('{"model_type": "data2vec-vision", "hidden_size": ')
    out = tmp_path / "out"
    res = cli("vision", "--model", str(ckpt), "--output", str(out), *FAST)
    _one_line_error(res, ExitCode.BAD_INPUT, "config.json", "not valid JSON")
    assert not out.exists()


def test_not_a_data2vec_checkpoint(tmp_path: Path) -> None:
    ckpt = tmp_path / "bert"
    ckpt.mkdir()
    (ckpt / "config.json").write_text('{"model_type": "bert"}')
    res = cli("text", "--model", str(ckpt), "--output", str(tmp_path / "out"), *FAST)
    _one_line_error(res, ExitCode.BAD_INPUT, "not a Data2Vec checkpoint", "bert")


def test_non_empty_output_needs_force_and_is_left_untouched(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    res = cli("vision", "--model", "preset:tiny", "--output", str(out), *FAST)
    _one_line_error(res, ExitCode.BAD_INPUT, "--force")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_failed_run_leaves_the_previous_output_intact(tmp_path: Path) -> None:
    """With --force, a run that fails midway (too long a sequence) keeps the old folder as it was."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    res = cli(
        "text", "--model", "preset:tiny", "--output", str(out), "--force", "--sequence-length", "8:16:4096", *FAST
    )
    _one_line_error(res, ExitCode.BAD_INPUT, "--sequence-length", "512")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"], "a staging folder was left behind"


def test_help_shows_examples_and_exit_codes() -> None:
    res = cli("--help")
    assert res.returncode == 0 and "Examples:" in res.stdout and "Exit codes:" in res.stdout
    for sub in ("vision", "text", "audio"):
        res = cli(sub, "--help")
        assert res.returncode == 0 and "Examples:" in res.stdout and f"d2v-export {sub}" in res.stdout


@pytest.mark.parametrize("choice", ["on", "off"])
def test_reduce_range_reaches_the_int8_artifact(choice: str, tmp_path: Path) -> None:
    """Budgets no INT8 graph can miss (agreement >= 0, cosine >= -1), so the verdict is decided: exit 0."""
    out = tmp_path / "out"
    res = cli(
        "text",
        "--model",
        "preset:tiny",
        "--int8",
        "--quant",
        "dynamic",
        "--reduce-range",
        choice,
        "--max-drift",
        "top1_agreement=0,logit_cosine=-1",
        "--output",
        str(out),
        "--json",
        *FAST,
    )
    assert res.returncode == 0, res.stderr
    (int8,) = [v for v in json.loads(res.stdout)["variants"] if v["precision"] == "int8"]
    assert int8["quantization"]["reduce_range"] is (choice == "on")
    assert any(n.startswith("7-bit weights (reduce_range)") for n in int8["notes"]) is (choice == "on")


def test_a_budget_no_int8_graph_can_meet_exits_5(tmp_path: Path) -> None:
    """The other side of the gate, decided too: top-1 agreement above 1 (judged on the measured value, @0) fails."""
    out = tmp_path / "out"
    res = cli(
        "text",
        "--model",
        "preset:tiny",
        "--int8",
        "--quant",
        "dynamic",
        "--max-drift",
        "top1_agreement=1.01@0",
        "--output",
        str(out),
        "--json",
        *FAST,
    )
    assert res.returncode == int(ExitCode.DRIFT_BUDGET), res.stderr
    (int8,) = [v for v in json.loads(res.stdout)["variants"] if v["precision"] == "int8"]
    assert int8["drift"]["passed"] is False and int8["drift"]["failed"] == ["top1_agreement"]
