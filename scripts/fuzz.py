"""The long fuzz run: every target of tests/test_fuzz.py with N generated cases each (default 10,000).

    .venv/bin/python scripts/fuzz.py                      # all targets, 10,000 cases each
    .venv/bin/python scripts/fuzz.py --examples 500 --only images text

Prints, per target, the cases run, their outcomes (ok / exit code of the D2VError) and the time, then
the CPU. A case that breaks the invariant stops its target with Hypothesis's minimal example and the
script exits 1. The counts of the last full run are in docs/fuzzing.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGETS = {  # name in COUNTS -> test function in tests/test_fuzz.py
    "images": "test_image_folders",
    "audio": "test_audio_folders",
    "text": "test_text_files",
    "npz": "test_npz_feeds",
    "hf_metadata": "test_hf_metadata",
    "datasets": "test_datasets_and_parquet",
    "run_inputs": "test_run_inputs",
    "bundle_manifest": "test_bundle_manifests",
    "build_recipe": "test_build_recipes",
    "compare_report": "test_compare_reports",
    "matrix_merge": "test_matrix_merge",
}


def cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip() + f", {os.cpu_count()} cores"
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--examples", type=int, default=10_000, help="generated cases per target")
    ap.add_argument("--only", nargs="*", choices=sorted(TARGETS), help="these targets only")
    args = ap.parse_args()
    os.environ["D2V_FUZZ_PROFILE"] = "long"
    os.environ["D2V_FUZZ_EXAMPLES"] = str(args.examples)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.path.insert(0, str(ROOT))
    from tests import test_fuzz as fz

    failed = []
    started = time.perf_counter()
    cpu_started = time.process_time()
    print(f"fuzzing with up to {args.examples} cases per target on {cpu()}", flush=True)
    for name in args.only or TARGETS:
        t0 = time.perf_counter()
        try:
            getattr(fz, TARGETS[name])()
            status = "ok"
        except Exception:  # noqa: BLE001 - a broken invariant: print Hypothesis's report and go on
            traceback.print_exc()
            failed.append(name)
            status = "FAILED"
        outcomes = ", ".join(
            f"{k.split(':', 1)[1]} {v}" for k, v in sorted(fz.OUTCOMES.items()) if k.startswith(name + ":")
        )
        print(
            f"{name:16s} {fz.COUNTS[name]:7d} cases  {time.perf_counter() - t0:8.1f} s  {status}  ({outcomes})",
            flush=True,
        )
    print(
        f"total {sum(fz.COUNTS.values())} cases in {time.perf_counter() - started:.0f} s wall, {time.process_time() - cpu_started:.0f} s CPU; "
        f"failed: {', '.join(failed) or 'none'}"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
