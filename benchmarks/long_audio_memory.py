"""Peak RSS of `d2v-export run` on recordings of growing length (whole recordings run in windows: d2v_export/deploy/chunking.py).

    .venv/bin/python benchmarks/long_audio_memory.py BUNDLE speech.wav --seconds 30 120 600

The speech file is repeated to each length and written as 16 kHz mono WAV; each length runs `predict.predict`
in a fresh Python process, which prints its peak resident set (ru_maxrss) and the wall time. A 1 s clip gives
the floor (runtime, model and libraries loaded). Numbers in docs/bundles.md "Long recordings", with the CPU class.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = """
import resource, sys, time
from d2v_export.deploy import predict
t = time.perf_counter()
(r,) = predict.predict(sys.argv[1], [sys.argv[2]], threads=int(sys.argv[3]))
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, time.perf_counter() - t, r["frames"])
"""


def main() -> None:
    import numpy as np
    import soundfile as sf

    from d2v_export.calibration.audio import read_mono

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle", type=Path)
    ap.add_argument("speech", type=Path)
    ap.add_argument("--seconds", type=float, nargs="+", default=[30, 120, 600])
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    speech = read_mono(args.speech, 16000)
    print("| seconds | frames | peak RSS (MiB) | wall (s) |\n|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        for seconds in [1.0, *args.seconds]:
            n = int(seconds * 16000)
            wav = Path(tmp) / f"{seconds:g}.wav"
            sf.write(str(wav), np.resize(speech, n), 16000)
            out = subprocess.run(
                [sys.executable, "-c", CHILD, str(args.bundle), str(wav), str(args.threads)],
                capture_output=True,
                text=True,
                check=True,
            )
            rss, wall, frames = out.stdout.split()[-3:]
            print(f"| {seconds:g} | {frames} | {float(rss):.0f} | {float(wall):.1f} |", flush=True)
            wav.unlink()


if __name__ == "__main__":
    main()
