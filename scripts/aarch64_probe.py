"""Run one bundle's own ``bundle_run.py`` on inputs and keep its raw outputs (scripts/aarch64_parity.py's probe).

    python3 aarch64_probe.py BUNDLE OUT.npz INPUT...

Runs natively and under qemu-aarch64 in the arm64 root, so it needs what ``bundle_run.py`` needs and nothing
more: the standard library, numpy, the runtime and the modality's preprocessing library (no torch, no
d2v_export). Prints one JSON object: the machine, the Arm features the kernel reports (the HWCAP bits ONNX
Runtime's kernels are chosen by), the runtime, and ``bundle_run.py``'s results; OUT.npz holds, per input,
every output array the bundle returned (``input3.0``, ``input3.1``, ...: several for a recording run in windows).
"""

from __future__ import annotations

import ctypes
import json
import platform
import sys
from pathlib import Path
from typing import Any

import numpy as np

AT_HWCAP, AT_HWCAP2 = 16, 26
ARM_FEATURES = {  # name: (auxv key, bit), as linux/arch/arm64/include/uapi/asm/hwcap.h numbers them
    "asimddp": (AT_HWCAP, 1 << 20),
    "sve": (AT_HWCAP, 1 << 22),
    "svei8mm": (AT_HWCAP2, 1 << 9),
    "i8mm": (AT_HWCAP2, 1 << 13),
    "bf16": (AT_HWCAP2, 1 << 14),
}


def arm_features() -> list[str]:
    """The Arm features this process sees (empty off Arm)."""
    if platform.machine() != "aarch64":
        return []
    getauxval = ctypes.CDLL(None).getauxval
    getauxval.restype = ctypes.c_ulong
    getauxval.argtypes = [ctypes.c_ulong]
    return [name for name, (key, bit) in ARM_FEATURES.items() if getauxval(key) & bit]


def probe(folder: Path, inputs: list[str]) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    sys.dont_write_bytecode = True  # nothing written into the bundle
    sys.path.insert(0, str(folder))
    import bundle_run

    runner = bundle_run.BundleRunner(folder, threads=1, top_k=3)
    captured: list[np.ndarray] = []
    infer = runner.infer

    def recording(feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        outputs = infer(feed)
        captured.extend(np.asarray(outputs[name], dtype=np.float64) for name in sorted(outputs))
        return outputs

    runner.infer = recording
    results, arrays = [], {}
    for number, raw in enumerate(inputs):
        captured.clear()
        results.append(runner(raw))
        arrays |= {f"input{number}.{k}": a for k, a in enumerate(captured)}
    about = {"machine": platform.machine(), "features": arm_features(), "runtime": runner.runtime, "results": results}
    return about, arrays


def main(argv: list[str]) -> int:
    if len(argv) < 3:
        print(__doc__, file=sys.stderr)
        return 2
    about, arrays = probe(Path(argv[0]), argv[2:])
    np.savez(argv[1], **arrays)
    print(json.dumps(about))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
