"""The default paths end to end, through the real `d2v-export` console script (issue 12).

Every test runs the installed command in a subprocess on tiny presets or on small checkpoint folders
built here with a real pathology (outlier channels, an ill-conditioned head, a much bigger model):
no mocks of ONNX Runtime, OpenVINO or the file system. Each expensive run is used by one test only,
so that `pytest -n 2` never runs it twice.
"""

from __future__ import annotations

import json
import statistics
import subprocess
from pathlib import Path
from typing import Any, Callable

import pytest

from d2v_export.models import load, parse_source
from d2v_export.spec import ExitCode, Modality

from .conftest import cli

FAST = ("--bench-seconds", "0", "--quiet")
TEXT_SHAPES = ("--sequence-length", "8:16:32")
AUDIO_SHAPES = ("--audio-seconds", "0.5:1:2")
REPO = Path(__file__).resolve().parents[1]


def ok(res: subprocess.CompletedProcess[str], code: int = 0) -> subprocess.CompletedProcess[str]:
    assert res.returncode == int(code), f"exit {res.returncode}, wanted {int(code)}\n{res.stderr[-3000:]}"
    return res


def report(folder: Path) -> dict[str, Any]:
    return json.loads((folder / "report.json").read_text(encoding="utf-8"))


def variant(doc: dict[str, Any], name: str) -> dict[str, Any]:
    (v,) = [v for v in doc["variants"] if v["name"] == name]
    return v


def error_line(res: subprocess.CompletedProcess[str]) -> str:
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, res.stderr[-3000:]
    return lines[0]


def checkpoint(
    folder: Path,
    modality: Modality,
    task: str | None = None,
    *,
    edit: Callable[[Any], None] | None = None,
    **config: Any,
) -> Path:
    """A Hugging Face checkpoint folder from the tiny preset's architecture, ``config`` changed, ``edit``ed."""
    import torch

    model = load(parse_source("preset:tiny", modality, task))
    module = model.module
    if config:
        cfg = module.config
        for k, v in config.items():
            setattr(cfg, k, v)
        if "num_labels" in config:
            cfg.id2label = {i: f"LABEL_{i}" for i in range(config["num_labels"])}
            cfg.label2id = {v: k for k, v in cfg.id2label.items()}
        torch.manual_seed(0)
        module = type(module)(cfg).eval()
    if edit is not None:
        with torch.no_grad():
            edit(module)
    module.save_pretrained(folder)
    model.save_pretrained_files(folder)
    return folder


def plant_outliers(module: Any, factor: float = 1000.0) -> None:
    """Outlier channels, as trained transformers have them: the same function in float, ruinous for per-tensor INT8.

    The last layer's output LayerNorm scales two channels by ``factor`` and the classifier, its only
    consumer, divides its weights for them by ``factor``; the classifier's input range then swamps
    every other channel once its activations share one INT8 scale.
    """
    norm = module.base_model.encoder.layer[-1].output.LayerNorm
    dense = module.classifier.dense
    for k in (0, 1):
        norm.weight[k] *= factor
        norm.bias[k] *= factor
        dense.weight[:, k] /= factor


def ill_conditioned_head(module: Any) -> None:
    """A classifier whose logits come out of catastrophic cancellation: +1e6 and -1e6 weights on two equal halves.

    In exact arithmetic the added weights cancel; in float the residue depends on the order of the
    sums, which PyTorch's and ONNX Runtime's GEMM kernels do differently. The export genuinely differs.
    """
    import torch

    c = module.classifier
    half = c.dense.weight.shape[0] // 2
    c.dense.weight[half:] = c.dense.weight[:half]
    c.dense.bias[half:] = c.dense.bias[:half]
    r = torch.randn(c.out_proj.weight.shape[0], half, generator=torch.Generator().manual_seed(0)) * 1e6
    c.out_proj.weight[:, :half] += r
    c.out_proj.weight[:, half:] -= r


# ----------------------------------------------------------------------- 1. the README's INT8 defaults


@pytest.mark.parametrize("modality,extra", [("vision", ()), ("text", TEXT_SHAPES), ("audio", AUDIO_SHAPES)])
def test_int8_with_defaults(modality: str, extra: tuple[str, ...], tmp_path: Path) -> None:
    """`d2v-export MODALITY --int8`: static, the bundled calibration and evaluation splits, exit 0 on a preset."""
    out = tmp_path / "out"
    res = ok(cli(modality, "--model", "preset:tiny", "--int8", "--output", str(out), *FAST, *extra))
    doc = report(out)
    assert doc["passed"] is True and doc["model"]["random_weights"] is True
    int8 = variant(doc, "onnxruntime-int8-static")
    q = int8["quantization"]
    assert q["mode"] == "static" and q["method"] == "minmax" and q["samples"] > 0
    drift = int8["drift"]
    assert drift["passed"] is True and drift["samples"] > 0
    assert f"calibration/{modality}/evaluation" in drift["detail"]  # the bundled evaluation split
    assert (out / "calibration-cache.npz").is_file()  # the bundled calibration split, cached
    assert (out / "onnxruntime-int8-static" / "model.onnx").is_file() and (
        out / "onnxruntime-int8-static" / "manifest.json"
    ).is_file()
    # latency statistics as report.json states them: p50 is the median of the raw timings
    for lat in (int8["latency_ms"], doc["reference"]["latency_ms"]):
        assert lat["p50"] == pytest.approx(statistics.median(lat["samples"]), rel=1e-3, abs=1e-3)
        assert lat["mean"] == pytest.approx(statistics.fmean(lat["samples"]), rel=1e-3, abs=1e-3)
    if modality == "audio":
        # random weights: CER/WER between two noise transcripts gate nothing; the logits' agreement gates
        assert set(drift["informational"]) == {"cer", "wer", "cer_increase", "wer_increase"} & set(drift["metrics"]) | {
            "cer",
            "wer",
        }
        assert all("random weights" in why for why in drift["informational"].values())
        assert "cer" not in drift["budget"] and "wer" not in drift["budget"]
        assert drift["budget"]["logit_cosine"] == 0.99 and drift["metrics"]["logit_cosine"] >= 0.99
        md = (out / "report.md").read_text(encoding="utf-8")
        assert (
            "cer" in md
            and "(information, not gating)" in md
            and "`wer` is information, not a gate: random weights" in md
        )
    else:
        assert drift["budget"]["top1_agreement"] == 0.98 and "accuracy_drop" not in drift["budget"]
        assert drift["metrics"]["top1_agreement"] >= 0.98
    assert "RANDOM WEIGHTS" in res.stdout


def test_an_explicit_budget_on_an_informational_metric_gates(tmp_path: Path) -> None:
    """--max-drift wins over the random-weight rule: CER named explicitly gates again (exit 5)."""
    out = tmp_path / "out"
    res = ok(
        cli(
            "audio",
            "--model",
            "preset:tiny",
            "--int8",
            "--max-drift",
            "cer=0",
            "--output",
            str(out),
            *FAST,
            *AUDIO_SHAPES,
        ),
        ExitCode.DRIFT_BUDGET,
    )
    line = error_line(res)
    assert "onnxruntime-int8-static" in line and "cer" in line and "--fallback auto" in line
    drift = variant(report(out), "onnxruntime-int8-static")["drift"]
    assert drift["budget"]["cer"] == 0 and "cer" in drift["failed"] and "cer" not in drift["informational"]


# ----------------------------------------------------------------------- 2. --fallback auto


def test_planted_outliers_break_int8_and_fallback_recovers_on_every_target(tmp_path: Path) -> None:
    """Plain static INT8 of a model with outlier channels: exit 5. --fallback auto on ONNX Runtime, OpenVINO
    (NNCF accuracy control) and the TensorRT Q/DQ graph: within budget, exit 0, what stayed float listed."""
    ckpt = checkpoint(tmp_path / "ckpt", Modality.TEXT, "text-classification", edit=plant_outliers)
    plain = tmp_path / "plain"
    res = ok(
        cli("text", "--model", str(ckpt), "--int8", "--output", str(plain), *FAST, *TEXT_SHAPES), ExitCode.DRIFT_BUDGET
    )
    assert "onnxruntime-int8-static" in error_line(res) and "try --fallback auto" in error_line(res)
    drift = variant(report(plain), "onnxruntime-int8-static")["drift"]
    assert not drift["passed"] and drift["metrics"]["logit_cosine"] < 0.9

    out = tmp_path / "fallback"
    ok(
        cli(
            "text",
            "--model",
            str(ckpt),
            "--int8",
            "--fallback",
            "auto",
            "--target",
            "onnxruntime",
            "--target",
            "openvino",
            "--target",
            "tensorrt",
            "--defer-build",
            "--output",
            str(out),
            *FAST,
            *TEXT_SHAPES,
        )
    )
    doc = report(out)
    assert doc["passed"] is True
    for name in ("onnxruntime-int8-static", "openvino-int8-static", "tensorrt-int8-static"):
        v = variant(doc, name)
        assert v["drift"]["passed"] and v["drift"]["metrics"]["logit_cosine"] >= 0.99, (name, v["drift"])
    ort, trt = variant(doc, "onnxruntime-int8-static"), variant(doc, "tensorrt-int8-static")
    assert ort["quantization"]["excluded_nodes"]  # nodes returned to float, recorded in the recipe
    assert any(n.startswith("fallback:") and "in float" in n for n in ort["notes"]), ort["notes"]
    # TensorRT's recipe leaves small GEMMs (the classifier) float by itself (ModelOpt's rule): the fallback runs only if needed
    if any(n.startswith("fallback:") for n in trt["notes"]):
        assert trt["quantization"]["excluded_nodes"], trt["notes"]
    # OpenVINO: NNCF's transformer recipe (SmoothQuant) may already absorb the outliers; either way within budget
    assert (
        json.loads((out / "tensorrt-int8-static" / "build_recipe.json").read_text())["quantization"]["excluded_nodes"]
        == trt["quantization"]["excluded_nodes"]
    )


def test_a_fallback_over_budget_and_worse_than_plain_int8_is_not_shipped(tmp_path: Path) -> None:
    """The guard: labels that plain INT8 gets right where the float model does not, and a budget no candidate
    can meet (logit_cosine > 1). Every fallback step ends over budget and moves towards the float model, so it
    loses accuracy against these labels: the plain artifact is kept and the note says why."""
    ckpt = checkpoint(tmp_path / "ckpt", Modality.TEXT, "text-classification", edit=plant_outliers, num_labels=8)
    texts = (REPO / "calibration" / "text" / "evaluation.txt").read_text(encoding="utf-8").splitlines()[:24]
    (tmp_path / "eval.txt").write_text("\n".join(texts) + "\n", encoding="utf-8")
    first = tmp_path / "first"
    ok(
        cli(
            "text",
            "--model",
            str(ckpt),
            "--int8",
            "--eval",
            str(tmp_path / "eval.txt"),
            "--eval-samples",
            "24",
            "--output",
            str(first),
            *FAST,
            *TEXT_SHAPES,
        ),
        ExitCode.DRIFT_BUDGET,
    )

    def top1(bundle: str) -> list[str]:
        res = ok(cli("run", str(first / bundle), *texts, "--top-k", "1", "--json"))
        return [r["labels"][0]["label"] for r in json.loads(res.stdout)]

    plain, fp32 = top1("onnxruntime-int8-static"), top1("onnxruntime-fp32")
    assert plain != fp32, "the planted outliers should flip some of plain INT8's answers"
    rows = [{"text": t, "label": p} for t, p in zip(texts, plain)]
    (tmp_path / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")

    out = tmp_path / "out"
    res = ok(
        cli(
            "text",
            "--model",
            str(ckpt),
            "--int8",
            "--fallback",
            "auto",
            "--max-drift",
            "logit_cosine=1.01",
            "--eval",
            str(tmp_path / "eval.jsonl"),
            "--eval-samples",
            "24",
            "--output",
            str(out),
            *FAST,
            *TEXT_SHAPES,
        ),
        ExitCode.DRIFT_BUDGET,
    )
    v = variant(report(out), "onnxruntime-int8-static")
    assert v["drift"]["metrics"]["candidate_accuracy"] == 1.0  # the plain artifact's own answers: it was kept
    assert v["quantization"]["excluded_nodes"] == []
    assert any(
        "did not reach the budget and scored worse" in n and "plain INT8 artifact is kept" in n for n in v["notes"]
    ), v["notes"]
    assert "onnxruntime-int8-static" in error_line(res)


# ----------------------------------------------------------------------- 3. --baseline and compare


def test_baseline_and_compare_clean_and_regressed(tmp_path: Path) -> None:
    """A clean pair exits 0; a genuinely slower model (16x the compute) against a tiny one's baseline exits 7 and says
    which variant regressed and by how much, from --baseline and from `d2v-export compare`."""
    base = tmp_path / "base"
    ok(cli("vision", "--model", "preset:tiny", "--output", str(base), "--bench-seconds", "1", "--quiet"))
    res = ok(cli("compare", str(base / "report.json"), str(base)))
    assert "No regression" in res.stdout

    same = tmp_path / "same"  # the same model again: no regression (tolerance for a machine shared with other jobs)
    ok(
        cli(
            "vision",
            "--model",
            "preset:tiny",
            "--output",
            str(same),
            "--bench-seconds",
            "1",
            "--quiet",
            "--baseline",
            str(base),
            "--latency-tolerance",
            "100%",
        )
    )
    assert report(same)["comparison"]["passed"] is True and (same / "comparison.md").is_file()

    big = checkpoint(
        tmp_path / "big",
        Modality.VISION,
        "image-classification",
        hidden_size=128,
        intermediate_size=512,
        num_hidden_layers=8,
    )
    cur = tmp_path / "cur"
    res = ok(
        cli(
            "vision",
            "--model",
            str(big),
            "--output",
            str(cur),
            "--bench-seconds",
            "1",
            "--quiet",
            "--baseline",
            str(base / "report.json"),
        ),
        ExitCode.REGRESSION,
    )
    line = error_line(res)
    assert "regression against" in line and "onnxruntime-fp32 (p50 " in line and "%)" in line, line
    comp = report(cur)["comparison"]
    assert comp["regressions"] == ["onnxruntime-fp32"]
    (lat,) = [v["latency"] for v in comp["variants"] if v["name"] == "onnxruntime-fp32"]
    assert lat["ratio"] > 2.0 and f"{lat['ratio'] - 1:+.0%}" in line

    res = ok(cli("compare", str(base), str(cur), "--output", str(tmp_path / "cmp")), ExitCode.REGRESSION)
    assert "**Regression** in onnxruntime-fp32 (p50 " in res.stdout
    assert json.loads((tmp_path / "cmp" / "comparison.json").read_text())["exit_code"] == int(ExitCode.REGRESSION)


# ----------------------------------------------------------------------- 4. --target-profile


def test_target_profile_merges_with_explicit_options_and_gates_latency(tmp_path: Path) -> None:
    """A profile file: its target, threads, shapes and INT8 apply where the command line is silent, explicit options win,
    and a variant over its latency budget exits 8 with the variant and the numbers named."""
    profile = tmp_path / "strict.toml"
    profile.write_text(
        'name = "strict"\nbackend = "openvino"\nprecision = "int8"\nquantize = "dynamic"\ndevice = "CPU"\nthreads = 1\n'
        'latency_percentile = "p50"\n[shapes]\nbatch = [1, 2, 4]\nsequence = [8, 16, 32]\n'
        "[latency_budget_ms]\ntext = 0.001\n",
        encoding="utf-8",
    )
    out = tmp_path / "out"
    res = ok(
        cli(
            "text",
            "--model",
            "preset:tiny",
            "--target-profile",
            str(profile),
            "--batch-size",
            "1:1:2",
            "--quant",
            "static",
            "--output",
            str(out),
            *FAST,
        ),
        ExitCode.LATENCY_BUDGET,
    )
    line = error_line(res)
    assert (
        "over the latency budget of profile" in line
        and "openvino-int8-static p50" in line
        and "0.001 ms budget" in line
    )
    doc = report(out)
    assert doc["environment"]["threads"] == 1  # the profile's
    assert doc["export"]["shapes"]["batch"] == {"min": 1, "opt": 1, "max": 2}  # explicit --batch-size wins
    assert doc["export"]["shapes"]["sequence"] == {"min": 8, "opt": 16, "max": 32}  # the profile's
    assert [v["name"] for v in doc["variants"]] == [
        "openvino-fp32",
        "openvino-int8-static",
    ]  # profile target + int8, explicit --quant static
    assert all(
        v["latency_budget"]["passed"] is False and v["latency_budget"]["budget_ms"] == 0.001 for v in doc["variants"]
    )

    # a bundled profile with an explicit --target and a budget this tiny model meets: exit 0
    out2 = tmp_path / "out2"
    ok(
        cli(
            "vision",
            "--model",
            "preset:tiny",
            "--target-profile",
            "generic-avx2",
            "--target",
            "onnxruntime",
            "--threads",
            "1",
            "--output",
            str(out2),
            *FAST,
        )
    )
    doc = report(out2)
    assert doc["environment"]["threads"] == 1  # explicit, not the profile's 4
    assert [v["name"] for v in doc["variants"]] == [
        "onnxruntime-fp32",
        "onnxruntime-int8-dynamic",
    ]  # the profile's dynamic INT8
    assert all(
        v["latency_budget"]["passed"] is True and v["latency_budget"]["profile"] == "generic-avx2"
        for v in doc["variants"]
    )


# ----------------------------------------------------------------------- 5. every exit code


def test_exit_2_bad_option(tmp_path: Path) -> None:
    res = cli("vision", "--model", "preset:tiny", "--batch-size", "4:2:1", "--output", str(tmp_path / "o"))
    assert res.returncode == int(ExitCode.USAGE) and "MIN <= OPT <= MAX" in res.stderr
    res = cli("text", "--max-drift", "top1_agreement=0.9", "--model", "preset:tiny", "--output", str(tmp_path / "o"))
    assert res.returncode == int(ExitCode.BAD_INPUT) and "add --int8" in error_line(res)


def test_exit_3_bad_input(tmp_path: Path) -> None:
    res = ok(
        cli("vision", "--model", "preset:tiny", "--image-size", "64", "--output", str(tmp_path / "o"), *FAST),
        ExitCode.BAD_INPUT,
    )
    assert "--image-size 32" in error_line(res)  # the checkpoint's size, named as the fix
    assert not (tmp_path / "o").exists()


def test_exit_4_export_does_not_match(tmp_path: Path) -> None:
    ckpt = checkpoint(tmp_path / "ckpt", Modality.TEXT, "text-classification", edit=ill_conditioned_head)
    res = ok(
        cli("text", "--model", str(ckpt), "--output", str(tmp_path / "o"), *FAST, *TEXT_SHAPES),
        ExitCode.EXPORT_MISMATCH,
    )
    line = error_line(res)
    assert "ONNX Runtime does not match PyTorch" in line and "output 'logits'" in line and "tolerance 0.0001" in line
    assert not (tmp_path / "o").exists()


def test_exit_6_target_unavailable(tmp_path: Path) -> None:
    from d2v_export import backends

    if backends.get("tensorrt").available().ok:
        pytest.skip("TensorRT works on this machine")
    res = ok(
        cli("vision", "--model", "preset:tiny", "--target", "tensorrt", "--output", str(tmp_path / "o"), *FAST),
        ExitCode.TARGET_UNAVAILABLE,
    )
    line = error_line(res)
    assert "target 'tensorrt' is not available here" in line and "--defer-build" in line, line  # the fix, named
    assert not (tmp_path / "o").exists()


# Exit 5: test_planted_outliers_..., test_an_explicit_budget_...; 7: test_baseline_...; 8: test_target_profile_...


def test_help_lists_every_exit_code() -> None:
    res = ok(cli("--help"))
    for code in ExitCode:
        assert f"  {int(code)}  " in res.stdout, code
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    for code in ExitCode:
        assert f"| {int(code)} |" in readme, code


# ----------------------------------------------------------------------- 6. commands and options


def test_run_doctor_and_fp16_through_the_pipeline(tmp_path: Path) -> None:
    """vision on OpenVINO with --fp16 (and --bf16 where the CPU has it), --image-size, then `run` on the bundle and `doctor`."""
    doctor = json.loads(ok(cli("doctor", "--json")).stdout)
    assert {t["name"]: t["available"] for t in doctor["targets"]}["onnxruntime"] is True
    out = tmp_path / "out"
    args = (
        "vision",
        "--model",
        "preset:tiny",
        "--image-size",
        "32",
        "--target",
        "openvino",
        "--fp16",
        "--output",
        str(out),
        *FAST,
    )
    res = cli(*args, "--bf16")
    bf16 = res.returncode == 0
    if not bf16:  # a CPU without bf16: exit 6, named, and nothing written; then fp16 alone
        assert res.returncode == int(ExitCode.TARGET_UNAVAILABLE) and "bf16" in error_line(res), res.stderr[-2000:]
        ok(cli(*args))
    doc = report(out)
    assert doc["export"]["static"]["image_size"] == 32
    names = [v["name"] for v in doc["variants"]]
    assert names[:2] == ["openvino-fp32", "openvino-fp16"] and ("openvino-bf16" in names) is bf16
    for v in doc["variants"]:
        assert v["drift"]["passed"], v
    text = ok(cli("doctor")).stdout
    assert "onnxruntime" in text and "openvino" in text

    photo = REPO / "calibration" / "vision" / "calibration" / "coins.jpg"
    res = ok(cli("run", str(out / "openvino-fp16"), str(photo), "--top-k", "3", "--json"))
    (result,) = json.loads(res.stdout)
    assert len(result["labels"]) == 3 and result["runtime"]
    (bundle_json := out / "openvino-fp16" / "manifest.json").write_text(
        bundle_json.read_text().replace('"sha256": "', '"sha256": "0')
    )
    res = cli("run", str(out / "openvino-fp16"), str(photo))
    assert res.returncode == int(ExitCode.BAD_INPUT), res.stderr


def test_num_choices_reaches_the_graph(tmp_path: Path) -> None:
    out = tmp_path / "out"
    ok(
        cli(
            "text",
            "--model",
            "preset:tiny",
            "--task",
            "multiple-choice",
            "--num-choices",
            "2:3:5",
            "--batch-size",
            "1:1:2",
            "--output",
            str(out),
            *FAST,
            *TEXT_SHAPES,
        )
    )
    doc = report(out)
    assert doc["export"]["shapes"]["choices"] == {"min": 2, "opt": 3, "max": 5}
    assert doc["reference"]["latency_ms"]["shape"]["choices"] == 3  # latency at OPT
    assert "choices=5" in doc["export"]["check"]["detail"]  # checked at the largest count, not only the traced one


def test_matrix_shards_and_merge(tmp_path: Path) -> None:
    # no drift gate (a budget no build can miss): the shards and their merge are under test, not a random model's drift
    args = (
        "matrix",
        "--model",
        "preset:tiny",
        "--modality",
        "text",
        "--target",
        "onnxruntime",
        "--precision",
        "fp32",
        "--precision",
        "int8",
        "--bench-seconds",
        "0",
        "--quiet",
        "--max-drift",
        "top1_agreement=0,logit_cosine=-1",
    )
    for i in (1, 2):
        res = ok(cli(*args, "--shard", f"{i}/2", "--output", str(tmp_path / f"m{i}")))
        assert "onnxruntime" in res.stdout
    ok(cli("matrix-merge", str(tmp_path / "m1"), str(tmp_path / "m2"), "--output", str(tmp_path / "all")))
    doc = json.loads((tmp_path / "all" / "matrix.json").read_text())
    cells = doc["cells"] if isinstance(doc["cells"], list) else list(doc["cells"].values())
    assert [(c["precision"], c["status"] != "failed") for c in cells] == [("fp32", True), ("int8", True)], cells
    assert (tmp_path / "all" / "matrix.md").is_file()
