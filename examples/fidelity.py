"""Write docs/FIDELITY.md: INT8 accuracy against labels, drift and latency of the example models.

    python examples/train_text.py && python examples/train_vision.py && python examples/train_audio.py
    python examples/fidelity.py [--models examples/out] [--work out/fidelity] [--output docs/FIDELITY.md]

For each reference model (examples/out/{text-fortunes,vision-digits,audio-letters}) and each
target (default: every one `d2v-export --help` lists; a target not available here is reported as
such), it runs the d2v-export CLI three times: INT8 static, INT8 dynamic, and INT8 static with
`--fallback auto`, each calibrated on the model's calibration split and judged on its whole
held-out split (labels included). The fp32 artifact of each target comes with every run; the
first run's is reported. Everything in the document is read from the runs' report.json files.

Exit status: 0 when the document was written (whatever the verdicts), 1 when no model was found.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

TARGETS_TEXT = {"accuracy_drop": 0.005, "wer_increase": 0.003, "cer_increase": 0.003}  # issue 8: 0.5 / 0.3 points
RUNS = (("static", "off"), ("dynamic", "off"), ("static", "auto"))
# ONNX Runtime also with 8-bit weights: on a CPU without VNNI the default (--reduce-range auto) is 7-bit
# weights, and the 8-bit rows show what the u8 x s8 saturation costs (on a VNNI CPU both are 8-bit).
FULL_RANGE = {"onnxruntime": (("static", "off"), ("dynamic", "off"))}
EXIT_DRIFT, EXIT_UNAVAILABLE = 5, 6


@dataclass(frozen=True)
class Ref:
    name: str
    modality: str
    script: str
    calibration: str  # relative to the checkpoint folder
    evaluation: str

    def count(self, folder: Path, rel: str) -> int:
        path = folder / rel
        if path.is_file():
            return sum(1 for line in path.read_text(encoding="utf-8").splitlines() if line.strip())
        return sum(1 for p in path.rglob("*") if p.suffix.lower() in {".png", ".jpg", ".wav", ".flac"})


REFS = (
    Ref("text-fortunes", "text", "train_text.py", "calibration.txt", "eval.jsonl"),
    Ref("vision-digits", "vision", "train_vision.py", "calibration", "eval"),
    Ref("audio-letters", "audio", "train_audio.py", "calibration", "eval"),
)


def cli() -> str:
    exe = shutil.which("d2v-export") or str(Path(sys.executable).parent / "d2v-export")
    return exe


def targets_available() -> list[str]:
    from d2v_export import backends

    return list(backends.names())


# TensorRT cannot run here: its bundle is built with --defer-build and its INT8 accuracy is the explicit
# Q/DQ graph simulated on ONNX Runtime (what the engine build consumes); it has no dynamic INT8.
DEFER = {"tensorrt"}
NO_DYNAMIC = {"tensorrt": "TensorRT has no dynamic INT8 (explicit Q/DQ only)"}


def run_one(
    ref: Ref,
    folder: Path,
    target: str,
    quant: str,
    fallback: str,
    work: Path,
    args: argparse.Namespace,
    full_range: bool = False,
) -> dict[str, Any]:
    out = (
        work
        / ref.name
        / f"{target}-int8-{quant}{'-fallback' if fallback == 'auto' else ''}{'-8bit' if full_range else ''}"
    )
    if quant == "dynamic" and target in NO_DYNAMIC:
        return {
            "target": target,
            "quant": quant,
            "fallback": fallback,
            "rc": None,
            "seconds": 0.0,
            "command": "",
            "error": NO_DYNAMIC[target],
        }
    cmd = (
        [
            cli(),
            ref.modality,
            "--model",
            str(folder),
            "--target",
            target,
            "--int8",
            "--quant",
            quant,
            "--fallback",
            fallback,
            "--calibration",
            str(folder / ref.calibration),
            "--calib-samples",
            str(ref.count(folder, ref.calibration)),
            "--eval",
            str(folder / ref.evaluation),
            "--eval-samples",
            str(ref.count(folder, ref.evaluation)),
            "--output",
            str(out),
            "--force",
            "--quiet",
            "--bench-seconds",
            str(args.bench_seconds),
            "--threads",
            str(args.threads),
        ]
        + (["--defer-build"] if target in DEFER else [])
        + (["--reduce-range", "off"] if full_range else [])
    )
    # no one machine's paths in the doc
    shown = " ".join(cmd[1:]).replace(str(work), "WORK").replace(str(ROOT) + "/", "")
    report = out / "report.json"
    if args.reuse and report.is_file() and report.stat().st_mtime > (folder / "model.safetensors").stat().st_mtime:
        print(f"[fidelity] {ref.name} {target} {quant} fallback={fallback}: reusing {report}", file=sys.stderr)
        return {
            "target": target,
            "quant": quant,
            "fallback": fallback,
            "rc": 0,
            "seconds": 0.0,
            "command": shown,
            "report": json.loads(report.read_text(encoding="utf-8")),
            "reused": True,
        }
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    result: dict[str, Any] = {
        "target": target,
        "quant": quant,
        "fallback": fallback,
        "rc": proc.returncode,
        "seconds": round(time.perf_counter() - started, 1),
        "command": shown,
    }
    if proc.returncode in (0, EXIT_DRIFT) and report.is_file():
        result["report"] = json.loads(report.read_text(encoding="utf-8"))
    else:
        result["error"] = (proc.stderr.strip().splitlines() or ["(no message)"])[-1]
    print(
        f"[fidelity] {ref.name} {target} {quant} fallback={fallback}: rc {proc.returncode} in {result['seconds']} s",
        file=sys.stderr,
    )
    return result


# --------------------------------------------------------------------------- formatting


def pct(v: Any) -> str:
    return "–" if v is None else f"{100 * float(v):.1f} %"


def pts(v: Any) -> str:
    return "–" if v is None else f"{100 * float(v) + 0.0:+.2f}"  # + 0.0: no "-0.00"


def num(v: Any, fmt: str = ".4f") -> str:
    return "–" if v is None else format(float(v), fmt)


def variant_rows(result: dict[str, Any], seen_fp32: set[str]) -> list[str]:
    rep = result["report"]
    rows = []
    for v in rep.get("variants", []):
        q = v.get("quantization") or {}
        if v.get("precision") != "int8":
            if v["name"] in seen_fp32:
                continue
            seen_fp32.add(v["name"])
            recipe = "fp32"
        else:
            recipe = f"int8 {q.get('mode', result['quant'])}" + (" + fallback" if result["fallback"] == "auto" else "")
            if v["name"].startswith("onnxruntime"):
                recipe += ", 7-bit weights" if q.get("reduce_range") else ", 8-bit weights"
            excluded = len(q.get("excluded_nodes") or [])
            if excluded:
                recipe += f" ({excluded} node{'s' if excluded > 1 else ''} kept float)"
        m = (v.get("drift") or {}).get("metrics", {})
        lat = v.get("latency_ms") or {}
        judged = {k: m.get(k) for k in TARGETS_TEXT if m.get(k) is not None}
        meets = all(float(val) <= TARGETS_TEXT[k] + 1e-12 for k, val in judged.items()) if judged else None
        rows.append(
            f"| {v['name']} | {recipe} | {pct(m.get('candidate_accuracy'))} | {pts(-m['accuracy_drop'] if m.get('accuracy_drop') is not None else None)} "
            f"| {num(m.get('top1_agreement'), '.3f')} | {num(m.get('logit_cosine'), '.5f')} | {num(lat.get('p50'), '.2f')} "
            f"| {num(v.get('speedup_vs_reference'), '.2f')}× | {'yes' if (v.get('drift') or {}).get('passed') else 'no'} "
            f"| {'–' if meets is None else ('yes' if meets else 'NO')} |"
        )
    return rows


def summary(per_model: list[tuple[Ref, list[dict[str, Any]]]]) -> list[str]:
    """Per model and target: the fastest INT8 artifact that meets the issue's target (speed within its own run)."""
    lines = [
        "## Summary",
        "",
        "Per model and target, the INT8 artifact that meets the issue target and runs fastest relative to its own "
        'fp32 artifact (both timed in the same run); "none" when no recipe meets it. Details per model below.',
        "",
        "| model | target | meets the target | recipe | Δ acc (points) | INT8 × fp32 (same run) |",
        "|---|---|---|---|---|---|",
    ]
    for ref, results in per_model:
        for target in dict.fromkeys(r["target"] for r in results):
            best: tuple[float, str, float] | None = None
            worst_drop: float | None = None
            for r in results:
                if r["target"] != target or "report" not in r:
                    continue
                variants = r["report"].get("variants", [])
                fp32 = next((v for v in variants if v.get("precision") == "fp32"), None)
                for v in variants:
                    if v.get("precision") != "int8":
                        continue
                    m = (v.get("drift") or {}).get("metrics", {})
                    judged = {k: m[k] for k in TARGETS_TEXT if m.get(k) is not None}
                    if not judged:
                        continue
                    drop = float(m.get("accuracy_drop", 0.0))
                    worst_drop = drop if worst_drop is None else min(worst_drop, drop)
                    if not all(float(val) <= TARGETS_TEXT[k] + 1e-12 for k, val in judged.items()):
                        continue
                    gain = (
                        fp32["latency_ms"]["p50"] / v["latency_ms"]["p50"]
                        if fp32 and fp32.get("latency_ms") and v.get("latency_ms")
                        else 0.0
                    )
                    q = v.get("quantization") or {}
                    recipe = f"{q.get('mode', r['quant'])}" + (" + fallback" if r["fallback"] == "auto" else "")
                    if target == "onnxruntime":
                        recipe += ", 7-bit" if q.get("reduce_range") else ", 8-bit"
                    # TensorRT's latency here is ORT's, not the engine's: pick it by accuracy alone
                    better = drop < best[2] if best is not None and target in DEFER else best is None or gain > best[0]
                    if better:
                        best = (gain, recipe, drop)
            if best is None:
                lines.append(
                    f"| {ref.name} | {target} | **none** | – | {pts(-worst_drop) if worst_drop is not None else '–'} (best) | – |"
                )
            else:
                speed = "n/a (Q/DQ simulated on ORT, not engine latency)" if target in DEFER else f"{best[0]:.2f}×"
                lines.append(f"| {ref.name} | {target} | yes | {best[1]} | {pts(-best[2])} | {speed} |")
    return lines + [""]


def section(ref: Ref, folder: Path, results: list[dict[str, Any]]) -> list[str]:
    meta_path = folder / "training.json"
    meta = json.loads(meta_path.read_text(encoding="utf-8")) if meta_path.is_file() else {}
    lines = [f"## {ref.name} ({ref.modality}, {meta.get('task', '?')})", ""]
    if meta:
        lines += [
            (
                f"Trained by `examples/{ref.script}` (seed {meta.get('seed')}): held-out accuracy in training "
                f"{pct(meta.get('heldout_accuracy'))}; splits {meta.get('splits')}; data: {meta.get('data', '?')}."
            ),
            "",
        ]
    ok = [r for r in results if "report" in r]
    if ok:
        rep = ok[0]["report"]
        ref_lat = (rep.get("reference") or {}).get("latency_ms") or {}
        int8_drift: dict[str, Any] = next(
            (v.get("drift", {}) for v in rep.get("variants", []) if v.get("precision") == "int8"), {}
        )
        lines += [
            (
                f"PyTorch fp32 reference: accuracy {pct(int8_drift.get('metrics', {}).get('reference_accuracy'))} on "
                f"{int8_drift.get('samples', '?')} held-out samples, p50 {num(ref_lat.get('p50'), '.2f')} ms. "
                "fp32 rows are judged by the export check (max scaled error), INT8 rows by the task budget."
            ),
            "",
            "| artifact | recipe | accuracy | Δ acc (points) | top-1 agreement | logit cosine | p50 ms | vs PyTorch | d2v budget | issue target |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        seen: set[str] = set()
        for r in ok:
            lines += variant_rows(r, seen)
        lines.append("")
    for r in results:
        if "report" not in r:
            why = (
                "not built"
                if r["rc"] is None
                else "target not available here"
                if r["rc"] == EXIT_UNAVAILABLE
                else f"failed (exit {r['rc']})"
            )
            lines.append(
                f"- {r['target']} int8 {r['quant']}{' + fallback' if r['fallback'] == 'auto' else ''}: {why}: {r.get('error', '')}"
            )
    lines += ["", "Commands (after `d2v-export`; paths relative to the repository, WORK = `--work`):", ""]
    lines += [f"    {r['command']}" for r in results if r["command"]] + [""]
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", type=Path, default=HERE / "out", help="folder holding the trained checkpoints")
    p.add_argument("--work", type=Path, default=ROOT / "out" / "fidelity", help="where the d2v-export runs write")
    p.add_argument("--output", type=Path, default=ROOT / "docs" / "FIDELITY.md")
    p.add_argument("--targets", nargs="*", default=None, help="default: every target d2v-export knows")
    p.add_argument("--only", nargs="*", default=None, help="model names to run (default: all found)")
    p.add_argument("--bench-seconds", type=float, default=4.0)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument(
        "--reuse", action="store_true", help="re-render from the report.json of earlier runs newer than the checkpoint"
    )
    p.add_argument(
        "--note", default="", help="a sentence added to the document's header (e.g. how loaded the machine was)"
    )
    args = p.parse_args(argv)

    targets = args.targets or targets_available()
    refs = [r for r in REFS if args.only is None or r.name in args.only]
    found = [(r, args.models / r.name) for r in refs if (args.models / r.name / "config.json").is_file()]
    if not found:
        print(f"no trained models under {args.models}; run examples/train_*.py first", file=sys.stderr)
        return 1
    body: list[str] = []
    every: list[dict[str, Any]] = []
    per_model: list[tuple[Ref, list[dict[str, Any]]]] = []
    first_env: dict[str, Any] = {}
    load_start = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    for ref, folder in found:
        results = [run_one(ref, folder, t, q, f, args.work, args) for t in targets for q, f in RUNS]
        results += [
            run_one(ref, folder, t, q, f, args.work, args, full_range=True)
            for t in targets
            for q, f in FULL_RANGE.get(t, ())
        ]
        first_env = first_env or next((r["report"].get("environment", {}) for r in results if "report" in r), {})
        body += section(ref, folder, results)
        every += results
        per_model.append((ref, results))
    all_reused = bool(every) and all(r.get("reused") or r["rc"] is None for r in every)
    missing = [r for r in refs if (r, args.models / r.name) not in found]
    env = first_env
    head = [
        "# Fidelity of INT8 artifacts on real data",
        "",
        (
            f"Generated by `examples/fidelity.py` on {time.strftime('%Y-%m-%d', time.gmtime())} "
            f"({env.get('cpu') or platform.processor() or platform.machine()} with {', '.join(env.get('cpu_flags') or []) or 'no listed SIMD flags'}, "
            f"{env.get('threads', '?')} threads; versions {json.dumps(env.get('versions', {}))}). "
            "The CPU's instruction set decides INT8 speed (VNNI or not) and, for ONNX Runtime's u8×s8 kernels on CPUs "
            "without VNNI, can decide accuracy too (docs/quantization.md). "
            + (
                f"Load average (1/5/15 min) at start {load_start}, at end {' / '.join(f'{x:.2f}' for x in os.getloadavg())}."
                if not all_reused
                else "Rendered with --reuse from the report.json of earlier runs (their load is not recorded in the reports)."
            )
            + (f" {args.note}" if args.note else "")
        ),
        "",
        (
            "Models: small Data2Vec classifiers with real trained weights (`examples/README.md`). Each INT8 "
            "artifact is calibrated on the model's calibration split and judged against the PyTorch fp32 "
            "reference and the labels on the whole held-out split. Issue targets: accuracy drop ≤ 0.5 points "
            "(vision, text), WER/CER rise ≤ 0.3 points (audio CTC). Δ acc is candidate − reference. Latency: "
            "p50 at batch 1, interleaved with the reference in the same run; on a shared machine treat it as indicative. "
            "TensorRT rows (no TensorRT or GPU here): the deferred bundle's explicit Q/DQ graph, which the engine build "
            "consumes, run on ONNX Runtime on this CPU; its accuracy is the Q/DQ simulation and its latency is not "
            "engine latency (`d2v-export build-engine` measures both on the device). Which layers the default recipe "
            "keeps float per target and modality, and why, measured without fallback: docs/quantization.md, "
            '"Default recipe per modality".'
        ),
        "",
    ]
    if missing:
        head += ["Not built here: " + ", ".join(f"{r.name} (run `examples/{r.script}`)" for r in missing) + ".", ""]
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text("\n".join(head + summary(per_model) + body).rstrip() + "\n", encoding="utf-8")
    print(f"[fidelity] wrote {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
