"""Does Intel Neural Compressor's SmoothQuant lower ONNX Runtime static INT8 drift on Data2Vec?

    # INC needs its torch extra and peft; keep it out of the project's venv (see docs/neural-compressor.md)
    python3 -m venv /tmp/incvenv
    /tmp/incvenv/bin/pip install torch==2.13.0 transformers==5.23.0 onnx==1.23.2 onnxruntime==1.32.0 \
        onnxscript==0.7.2 "neural-compressor[pt]==3.10" peft
    PYTHONPATH=. /tmp/incvenv/bin/python benchmarks/inc_smoothquant.py --case text-fortunes --json out.json

For each case the script:

1. loads the checkpoint the way d2v-export does and reads calibration / evaluation samples with
   ``d2v_export.calibration.load_samples`` (the same files for every variant);
2. runs the PyTorch fp32 reference (the *original* model) on the evaluation samples;
3. variant ``static``: export -> ``quantize_onnx`` with the onnxruntime static recipe -> task drift;
4. variant ``sq-<mode>-a<alpha>``: a copy of the model goes through INC's SmoothQuant
   (``TorchSmoothQuant.transform``; mode ``fold`` absorbs the scales into the preceding LayerNorm /
   Linear, mode ``mul`` inserts a per-channel Mul in front of each Linear), is checked to be the same
   fp32 function, then exported and quantized with the *same* recipe and calibration samples, and
   judged against the *original* fp32 reference on the same evaluation samples;
5. optionally (``--latency``) times the INT8 variants interleaved at the profile's opt shape.

INC's documented 3.x entry (``prepare(model, SmoothQuantConfig(...))``) needs Intel Extension for
PyTorch, which does not exist for torch 2.13; the script records that error and then reaches
INC's own IPEX-free transform (``TorchSmoothQuant``) by putting an empty stand-in for the
``intel_extension_for_pytorch`` module in ``sys.modules`` (its module imports IPEX at the top but
the transform itself never calls it). Cases: ``text-fortunes`` and ``vision-digits`` are the
real-weight example checkpoints (examples/train_text.py, examples/train_vision.py); ``text-tiny``
is the random-weight tiny preset with the bundled sets.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import sys
import tempfile
import time
import traceback
import types
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CASES: dict[str, dict[str, Any]] = {
    "text-fortunes": {
        "modality": "text",
        "source": str(ROOT / "examples/out/text-fortunes"),
        "calibration": ROOT / "examples/out/text-fortunes/calibration.txt",
        "evaluation": ROOT / "examples/out/text-fortunes/eval.jsonl",
    },
    "vision-digits": {
        "modality": "vision",
        "source": str(ROOT / "examples/out/vision-digits"),
        "calibration": ROOT / "examples/out/vision-digits/calibration",
        "evaluation": ROOT / "examples/out/vision-digits/eval",
    },
    "text-tiny": {
        "modality": "text",
        "source": "preset:tiny",
        "calibration": None,
        "evaluation": None,
    },
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ----------------------------------------------------------------------------- INC


def inc_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in (
        "neural-compressor",
        "intel-extension-for-pytorch",
        "torch",
        "transformers",
        "onnxruntime",
        "numpy",
        "peft",
    ):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def inc_public_api(wrapper: Any, feeds: list[dict[str, Any]]) -> str:
    """INC 3.x's documented SmoothQuant entry; returns 'ok' or the error's last line."""
    try:
        from neural_compressor.torch.quantization import (
            SmoothQuantConfig,
            convert,
            prepare,
        )

        model = prepare(
            copy.deepcopy(wrapper),
            SmoothQuantConfig(alpha=0.5),
            example_inputs=feeds[0],
        )
        for f in feeds[:4]:
            model(**f)
        convert(model)
        return "ok"
    except BaseException as exc:  # noqa: BLE001 - IPEX's own import error is an AttributeError, INC's an AssertionError
        tb = traceback.format_exception(exc)
        where = next((ln.strip() for ln in reversed(tb) if ln.strip().startswith("File ")), "")
        return f"{exc.__class__.__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''} ({where})"


def inc_transform_class() -> Any:
    """INC's IPEX-free SmoothQuant transform, reached past its module-level `import intel_extension_for_pytorch`."""
    import neural_compressor.torch.utils  # noqa: F401  imports without IPEX (it only probes for it)

    try:
        import intel_extension_for_pytorch  # noqa: F401
    except BaseException:  # noqa: BLE001 - missing, or IPEX 2.8 refusing torch 2.13 (AttributeError: os.exit)
        stub = types.ModuleType("intel_extension_for_pytorch")
        stub.__version__ = "0.0"
        sys.modules["intel_extension_for_pytorch"] = stub
    from neural_compressor.torch.algorithms.smooth_quant.utility import TorchSmoothQuant

    return TorchSmoothQuant


def inc_smooth(model: Any, feeds: list[dict[str, Any]], alpha: float, folding: bool) -> tuple[Any, dict[str, Any]]:
    """A LoadedModel whose module went through INC SmoothQuant; (model, info)."""
    import torch

    from d2v_export.convert.export import make_wrapper

    TorchSmoothQuant = inc_transform_class()
    wrapper = make_wrapper(dataclasses.replace(model, module=copy.deepcopy(model.module)))
    sq = TorchSmoothQuant(wrapper, dataloader=feeds, example_inputs=feeds[0])
    with torch.no_grad():
        out = sq.transform(alpha=alpha, folding=folding, calib_iter=len(feeds))
    absorbed = dict(getattr(sq, "absorb_to_layer", {}) or {})
    wrapped = [n for n, m in out.named_modules() if type(m).__name__ == "SQLinearWrapper"]
    info = {
        "absorbing_layers": len(absorbed),
        "smoothed_linears": sum(len(v) for v in absorbed.values()),
        "inserted_muls": len(wrapped),
        "absorbed_into": sorted(absorbed)[:8],
    }
    return dataclasses.replace(model, module=out.inner.eval()), info


# ----------------------------------------------------------------------------- measuring


def quantize_and_judge(
    model: Any,
    profile: Any,
    calib: Any,
    evaluation: Any,
    ref: list[dict[str, np.ndarray]],
    work: Path,
    name: str,
    threads: int,
) -> dict[str, Any]:
    from d2v_export.backends.onnxruntime import OrtRunner
    from d2v_export.convert.export import export
    from d2v_export.measure.metrics import DEFAULT_BUDGETS
    from d2v_export import backends
    from d2v_export.int8.quantize import make_recipe, quantize_onnx
    from d2v_export.convert.validate import task_drift

    t0 = time.perf_counter()
    graph = export(model, profile, work / name / "model.onnx")
    recipe = make_recipe(backends.get("onnxruntime"), "static", method="minmax", samples=len(calib.feeds))
    q = quantize_onnx(graph, work / name / "model.int8.onnx", recipe, calib.feeds)
    budget = DEFAULT_BUDGETS[model.head.metric]
    with OrtRunner(q.path, threads=threads, name=name) as runner:
        drift = task_drift(
            model,
            ref,
            runner.infer,
            evaluation.feeds,
            budget,
            labels=evaluation.labels,
            source=evaluation.source,
        )
    with OrtRunner(graph.path, threads=threads, name=name + "-fp32") as runner:
        fp32 = task_drift(
            model,
            ref,
            runner.infer,
            evaluation.feeds,
            budget,
            labels=evaluation.labels,
            source=evaluation.source,
        )
    return {
        "int8_path": str(q.path),
        "export_check_max_scaled_error": graph.check.metrics.get("max_scaled_error"),
        "ort_fp32_vs_reference": {k: round(v, 6) for k, v in fp32.metrics.items()},
        "int8_vs_reference": {k: round(v, 6) for k, v in drift.metrics.items()},
        "passed": drift.passed,
        "failed": list(drift.failed),
        "seconds": round(time.perf_counter() - t0, 1),
    }


def latency(paths: dict[str, str], feed: dict[str, np.ndarray], threads: int, rounds: int) -> dict[str, float]:
    import random

    from d2v_export.backends.onnxruntime import OrtRunner

    runners = {n: OrtRunner(Path(p), threads=threads, name=n) for n, p in paths.items()}
    times: dict[str, list[float]] = {n: [] for n in runners}
    for r in runners.values():
        for _ in range(3):
            r.infer(feed)
    order = list(runners)
    rng = random.Random(0)
    for _ in range(rounds):
        rng.shuffle(order)
        for n in order:
            t = time.perf_counter()
            runners[n].infer(feed)
            times[n].append((time.perf_counter() - t) * 1000)
    return {n: round(float(np.median(v)), 2) for n, v in times.items()}


def run_case(
    case: str,
    alphas: list[float],
    modes: list[str],
    calib_samples: int | None,
    threads: int,
    rounds: int,
    work: Path,
) -> dict[str, Any]:
    import torch

    from d2v_export.calibration import load_samples
    from d2v_export.convert.export import make_wrapper, torch_forward
    from d2v_export.heads import dummy_inputs
    from d2v_export.models import load, parse_source
    from d2v_export.pipeline import ShapeRequest, resolve_profile
    from d2v_export.spec import Modality

    torch.set_num_threads(threads)
    spec = CASES[case]
    model = load(parse_source(spec["source"], Modality(spec["modality"]), None))
    profile = resolve_profile(model, ShapeRequest())
    calib = load_samples(
        spec["calibration"],
        model,
        profile,
        split="calibration",
        count=calib_samples,
        seed=0,
    )
    evaluation = load_samples(spec["evaluation"], model, profile, split="evaluation", count=None, seed=0)
    log(
        f"{case}: {model.head.class_name}, {model.parameters / 1e6:.1f} M parameters, random weights: {model.random_weights}; "
        f"{len(calib)} calibration / {len(evaluation)} evaluation samples"
    )
    reference = make_wrapper(model)
    ref = [torch_forward(reference, f, model.head.outputs) for f in evaluation.feeds]
    tfeeds = [{k: torch.from_numpy(v) for k, v in f.items()} for f in calib.feeds]

    result: dict[str, Any] = {
        "case": case,
        "model": model.description,
        "class": model.head.class_name,
        "parameters": model.parameters,
        "random_weights": model.random_weights,
        "calibration": f"{len(calib)} from {calib.source}",
        "evaluation": f"{len(evaluation)} from {evaluation.source}",
        "variants": {},
    }
    log("INC public API (prepare/convert with SmoothQuantConfig)")
    result["inc_public_api"] = inc_public_api(reference, tfeeds)
    log(f"  -> {result['inc_public_api']}")

    log("plain static INT8")
    result["variants"]["static"] = quantize_and_judge(model, profile, calib, evaluation, ref, work, "static", threads)
    log(f"  -> {result['variants']['static']['int8_vs_reference']}")
    for mode in modes:
        for alpha in alphas:
            name = f"sq-{mode}-a{alpha:g}"
            log(f"{name}: INC TorchSmoothQuant.transform(alpha={alpha}, folding={mode == 'fold'})")
            try:
                smoothed, info = inc_smooth(model, tfeeds, alpha, folding=mode == "fold")
            except BaseException as exc:  # noqa: BLE001 - record whatever INC raises
                result["variants"][name] = {"error": f"{exc.__class__.__name__}: {str(exc).strip()[:300]}"}
                log(f"  -> {result['variants'][name]['error']}")
                continue
            if info["smoothed_linears"] == 0 and info["inserted_muls"] == 0:
                result["variants"][name] = {
                    "inc": info,
                    "skipped": "INC found no layer it could smooth",
                }
                log("  -> INC found nothing to smooth")
                continue
            wrap = make_wrapper(smoothed)
            equiv = max(
                float(np.max(np.abs(torch_forward(wrap, f, model.head.outputs)[o] - r[o])))
                for f, r in zip(evaluation.feeds, ref)
                for o in model.head.outputs
            )
            entry = {"inc": info, "fp32_max_abs_diff_vs_original": equiv}
            entry |= quantize_and_judge(smoothed, profile, calib, evaluation, ref, work, name, threads)
            result["variants"][name] = entry
            log(f"  -> fp32 diff {equiv:.2e}; {entry['int8_vs_reference']}")
    if rounds:
        paths = {n: v["int8_path"] for n, v in result["variants"].items() if "int8_path" in v}
        paths["fp32"] = str(work / "static" / "model.onnx")
        feed = dummy_inputs(model.head, model.config, profile.point("opt"), seed=7)
        log(f"latency, {rounds} interleaved rounds at {profile.point('opt')}, {threads} threads")
        result["latency_p50_ms"] = latency(paths, feed, threads, rounds)
        result["load_average_1min"] = round(os.getloadavg()[0], 2)
        log(f"  -> {result['latency_p50_ms']}")
    for v in result["variants"].values():
        v.pop("int8_path", None)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--case",
        action="append",
        choices=sorted(CASES),
        help="repeatable (default: text-fortunes)",
    )
    p.add_argument(
        "--alphas",
        default="0.5",
        help="comma-separated SmoothQuant alphas (default 0.5)",
    )
    p.add_argument(
        "--modes",
        default="mul,fold",
        help="comma-separated: mul (insert Mul), fold (absorb into LayerNorm/Linear)",
    )
    p.add_argument(
        "--calib-samples",
        type=int,
        default=32,
        help="calibration samples (d2v-export's default: 32); 0 = all",
    )
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--latency",
        type=int,
        default=0,
        metavar="ROUNDS",
        help="time the INT8 models interleaved for ROUNDS rounds",
    )
    p.add_argument("--json", type=Path, help="write the results here")
    args = p.parse_args()
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    out: dict[str, Any] = {"versions": inc_versions(), "cases": []}
    log(f"versions: {out['versions']}")
    with tempfile.TemporaryDirectory(prefix="inc-sq-") as tmp:
        for case in args.case or ["text-fortunes"]:
            out["cases"].append(
                run_case(
                    case,
                    [float(a) for a in args.alphas.split(",")],
                    args.modes.split(","),
                    args.calib_samples or None,
                    args.threads,
                    args.latency,
                    Path(tmp) / case,
                )
            )
    text = json.dumps(out, indent=2)
    if args.json:
        args.json.write_text(text + "\n", encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
