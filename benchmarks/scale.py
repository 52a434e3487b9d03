#!/usr/bin/env python
"""What a whole d2v-export run costs: wall time and peak resident memory, per pipeline and per stage.

    python benchmarks/scale.py                                   # vision, text, audio large: --target onnxruntime --target openvino --int8
    python benchmarks/scale.py --preset base --modalities vision --targets openvino          # issue 14's 90 s question
    python benchmarks/scale.py --preset tiny --modalities text --json /tmp/scale.json        # smoke run

Each pipeline is the real command (``d2v-export MODALITY --model preset:PRESET --target ... --int8 --output
TMP --force``) in a child process of this checkout's code, run one at a time. Per pipeline it prints:

- wall time and peak RSS (the child's ``ru_maxrss`` from ``wait4``, what ``/usr/bin/time -v`` calls
  "Maximum resident set size");
- the fp32 weight size (``report.json`` ``model.parameters`` x 4 bytes) and peak RSS / that;
- the CPU class (model name and the relevant /proc/cpuinfo flags) and the load average before and after,
  since absolute times on a shared machine mean little without them;
- per stage, where a stage is the time between two progress lines on stderr: seconds, the largest RSS
  sampled in it (every 50 ms from /proc/PID/status) and how much the kernel's high-water mark (VmHWM)
  rose in it, which names the stage where the peak happens even between two samples.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
GB = 1e9
FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_int8", "amx_bf16", "avx_vnni")


@dataclass
class Stage:
    name: str
    seconds: float = 0.0
    cpu_s: float = 0.0  # user + system CPU seconds of the process in this stage
    rss_max: int = 0  # bytes, largest sample
    hwm_rise: int = 0  # bytes the high-water mark rose in this stage


@dataclass
class Pipeline:
    command: list[str]
    exit_code: int
    wall_s: float
    cpu_s: float  # user + system CPU seconds of the run: the work done, less distorted by other load than wall time
    peak_rss: int  # bytes (ru_maxrss)
    weights_fp32: int  # bytes
    ratio: float | None
    load_before: tuple[float, float, float]
    load_after: tuple[float, float, float]
    stages: list[Stage] = field(default_factory=list)
    tail: str = ""  # stderr's last lines when the run failed


def cpu_class() -> str:
    """'AMD EPYC 9R14 (2 cores): avx2 avx512f avx512_vnni avx512_bf16' from /proc/cpuinfo."""
    name, flags = platform.processor() or "unknown CPU", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                name = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{name} ({cores} cores): " + (" ".join(f for f in FLAGS if f in flags) or "no AVX2")


def _cpu(pid: int) -> float:
    """utime + stime of a live process, in seconds (/proc/PID/stat fields 14 and 15)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return 0.0


def _status(pid: int) -> dict[str, int]:
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, value = line.split(":", 1)
                out[key] = int(value.split()[0]) * 1024
    except (OSError, ValueError):
        pass
    return out


def run_pipeline(modality: str, preset: str, targets: list[str], int8: bool, extra: list[str], log: Any) -> Pipeline:
    with tempfile.TemporaryDirectory(prefix="d2v-scale-") as tmp:
        out = Path(tmp) / "out"
        args = [modality, "--model", f"preset:{preset}", *[a for t in targets for a in ("--target", t)]]
        args += ["--int8"] if int8 else []
        args += ["--output", str(out), "--force", *extra]
        cmd = [sys.executable, "-c", "from d2v_export.cli import main; main()", *args]
        env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        load_before = os.getloadavg()
        started = time.perf_counter()
        proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, env=env, text=True, bufsize=1)
        stages = [Stage("start")]
        stage_start, last_hwm, last_cpu = started, 0, 0.0
        lock = threading.Lock()
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                s = _status(proc.pid)
                with lock:
                    stages[-1].rss_max = max(stages[-1].rss_max, s.get("VmRSS", 0))
                done.wait(0.05)

        def close_stage(now: float) -> None:
            nonlocal last_hwm, last_cpu
            hwm = _status(proc.pid).get("VmHWM", last_hwm)
            cpu = _cpu(proc.pid) or last_cpu
            stages[-1].seconds = now - stage_start
            stages[-1].cpu_s = round(cpu - last_cpu, 2)
            last_cpu = cpu
            stages[-1].hwm_rise = max(0, hwm - last_hwm)
            last_hwm = max(last_hwm, hwm)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        lines: list[str] = []
        assert proc.stderr is not None
        for line in proc.stderr:
            line = line.rstrip("\n")
            lines.append(line)
            if not line.startswith("[d2v-export] "):
                continue
            now = time.perf_counter()
            with lock:
                close_stage(now)
                stages.append(Stage(line[len("[d2v-export] ") :][:90]))
            stage_start = now
            log(f"  {now - started:7.1f} s  {_status(proc.pid).get('VmRSS', 0) / GB:5.2f} GB  {line[13:110]}")
        with lock:
            close_stage(time.perf_counter())  # the last stage ends when stderr closes (the process exits)
        _pid, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - started
        cpu_total = usage.ru_utime + usage.ru_stime
        stages[-1].cpu_s = round(max(0.0, cpu_total - last_cpu), 2)  # the last stage: up to the exit
        done.set()
        sampler.join()
        load_after = os.getloadavg()
        weights = 0
        report = out / "report.json"
        if report.is_file():
            weights = int(json.loads(report.read_text())["model"]["parameters"]) * 4
        peak = int(usage.ru_maxrss) * 1024
        return Pipeline(
            command=["d2v-export", *[a if a != str(out) else "TMP" for a in args]],
            exit_code=proc.returncode,
            wall_s=round(wall, 1),
            cpu_s=round(cpu_total, 1),
            peak_rss=peak,
            weights_fp32=weights,
            ratio=round(peak / weights, 2) if weights else None,
            load_before=load_before,
            load_after=load_after,
            stages=stages,
            tail="\n".join(lines[-5:]) if proc.returncode else "",
        )


def describe(p: Pipeline, top: int) -> str:
    load = lambda la: " / ".join(f"{x:.2f}" for x in la)  # noqa: E731
    rows = [
        f"{' '.join(p.command)}",
        f"  exit {p.exit_code}, wall {p.wall_s:.1f} s (CPU {p.cpu_s:.1f} s), peak RSS {p.peak_rss / GB:.2f} GB, fp32 weights {p.weights_fp32 / GB:.2f} GB, "
        f"ratio {p.ratio if p.ratio is not None else '?'}x",
        f"  load average (1/5/15 min) before {load(p.load_before)}, after {load(p.load_after)}",
        "  stages (wall seconds, CPU seconds, largest RSS sampled, rise of the high-water mark):",
    ]
    for s in p.stages:
        mark = f"  +{s.hwm_rise / GB:.2f} GB HWM" if s.hwm_rise >= 0.05 * GB else ""
        rows.append(f"    {s.seconds:7.1f} s {s.cpu_s:7.1f} cpu  {s.rss_max / GB:5.2f} GB{mark:>17s}  {s.name}")
    slow = sorted(p.stages, key=lambda s: -s.seconds)[:top]
    rows.append("  slowest: " + "; ".join(f"{s.name[:50]} {s.seconds:.1f} s" for s in slow))
    if p.tail:
        rows.append("  stderr tail:\n" + p.tail)
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="large", help="tiny | base | large (default large)")
    ap.add_argument("--modalities", default="vision,text,audio", help="comma-separated (default vision,text,audio)")
    ap.add_argument(
        "--targets",
        default="onnxruntime,openvino",
        help="comma-separated --target values (default onnxruntime,openvino)",
    )
    ap.add_argument("--no-int8", action="store_true", help="float variants only")
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--top", type=int, default=4, help="slowest stages to name")
    ap.add_argument("extra", nargs="*", help="more d2v-export options, after --")
    args = ap.parse_args(argv)
    print(f"CPU: {cpu_class()}", flush=True)
    results = []
    for modality in [m.strip() for m in args.modalities.split(",") if m.strip()]:
        print(f"{modality} preset:{args.preset}", flush=True)
        p = run_pipeline(
            modality, args.preset, args.targets.split(","), not args.no_int8, args.extra, lambda m: print(m, flush=True)
        )
        print(describe(p, args.top), flush=True)
        results.append(p)
    if args.json:
        doc = {"cpu": cpu_class(), "results": [asdict(p) for p in results]}
        args.json.write_text(json.dumps(doc, indent=1) + "\n")
    return 0 if all(p.exit_code == 0 for p in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
