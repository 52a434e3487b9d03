"""Cold start: what opening an artifact costs a fresh process, measured in a child process per artifact.

In the run's own process the numbers would be polluted by what is already loaded there (PyTorch, the
other variants' sessions, the runtime's one-time initialisation done by an earlier artifact), so each
artifact is opened by a new interpreter (``python -m d2v_export.measure.cold_start JOB``) that

1. imports the target's runtime (``Backend.available()``): ``import_ms``, and then reads its peak resident
   memory, the *baseline* (the interpreter, numpy, d2v-export's backend registry, the runtime, the feed);
2. opens the artifact's runner (ONNX Runtime session creation, OpenVINO compile_model, TensorRT engine
   deserialization): ``open_ms``;
3. runs one inference on the feed (the latency stage's input, at the profile's opt shape): ``first_inference_ms``;
4. reads its peak resident memory again (``_peak_mb``: VmHWM on Linux): ``peak_rss_mb``, of which
   ``artifact_rss_mb`` = peak - baseline is what opening and running this artifact added.

The child prints one JSON line; a child that fails or times out gives no numbers, and the run says why.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from ..spec import Artifact, ColdStart

TIMEOUT_S = 600.0  # a large model's OpenVINO compile or TensorRT deserialization takes tens of seconds; a hang does not stall a run forever


def measure(
    artifact: Artifact, feed: Path, *, threads: int, timeout: float = TIMEOUT_S
) -> tuple[ColdStart | None, str]:
    """(the cold start of ``artifact`` opened in a child process with ``threads``, "") or (None, why it failed).

    ``feed``: an .npz of the inputs of the first inference."""
    job = {
        "target": artifact.target,
        "precision": artifact.precision.value,
        "path": str(artifact.path),
        "model_file": str(artifact.model_file),
        "feed": str(feed),
        "threads": threads,
    }
    package_root = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH", "")) if p))
    try:
        done = subprocess.run(
            [sys.executable, "-m", "d2v_export.measure.cold_start", json.dumps(job)],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return None, f"the child process did not finish in {timeout:g} s"
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        tail = " ".join((done.stderr or done.stdout).split())[-300:]
        return None, f"the child process exited with {done.returncode}: {tail or 'no output'}"
    values = json.loads(lines[-1])
    return ColdStart(**values), ""


def _peak_mb() -> float:
    """This process's peak resident memory, MiB: VmHWM where /proc has it (Linux), else ``ru_maxrss``.

    Not ``ru_maxrss`` on Linux: the kernel carries the parent's peak across fork and exec into it (a child of a
    run that holds PyTorch would start at the run's 600 MB), while VmHWM belongs to the child's own memory map."""
    try:
        for line in Path("/proc/self/status").read_text(encoding="ascii").splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB elsewhere


def _child(job: dict[str, object]) -> dict[str, float]:
    """Steps 1-4 of the module's docstring, in this (fresh) process."""
    import numpy as np

    from .. import backends
    from ..backends.base import files_in
    from ..spec import Precision

    backend = backends.get(str(job["target"]))
    with np.load(str(job["feed"])) as stored:
        feed = {name: stored[name] for name in stored.files}
    t0 = time.perf_counter()
    backend.available()
    import_ms = (time.perf_counter() - t0) * 1000.0
    baseline = _peak_mb()
    folder = Path(str(job["path"]))
    artifact = Artifact(
        str(job["target"]), Precision(str(job["precision"])), folder, Path(str(job["model_file"])), files_in(folder)
    )
    t0 = time.perf_counter()
    with backend.runner(artifact, threads=int(str(job["threads"]))) as runner:
        t1 = time.perf_counter()
        runner.infer(feed)
        t2 = time.perf_counter()
        peak = _peak_mb()
    return {
        "import_ms": round(import_ms, 3),
        "open_ms": round((t1 - t0) * 1000.0, 3),
        "first_inference_ms": round((t2 - t1) * 1000.0, 3),
        "peak_rss_mb": round(peak, 1),
        "baseline_rss_mb": round(baseline, 1),
        "artifact_rss_mb": round(peak - baseline, 1),
    }


if __name__ == "__main__":
    print(json.dumps(_child(json.loads(sys.argv[1]))))
