"""Do ONNX Runtime bundles give the same answers on aarch64 as on x86? A functional check under qemu-user.

    .venv/bin/python scripts/aarch64_parity.py [CACHE] [--cpu cortex-a72 --cpu neoverse-n1 --cpu max]
        [--modality vision --modality text --modality audio] [--quant static --quant dynamic]
        [--reduce-range auto|on|off] [--bundle FOLDER] [--setup-only] [--json FILE]

1. Builds an arm64 Debian 12 root once, cached in CACHE (default ~/.cache/d2v-export-aarch64): `debootstrap
   --foreign` (download and unpack only: nothing runs emulated), the arm64 python3.11 it unpacked, and the
   aarch64 wheels of the versions this environment runs (onnxruntime, numpy, Pillow, soundfile, tokenizers)
   installed by this machine's pip (`--platform manylinux..._aarch64 --target`). Needs root (debootstrap,
   chroot), Debian's `debootstrap` and `qemu-user-static` (apt-get install debootstrap qemu-user-static), and
   the Debian mirror and PyPI. binfmt_misc is not needed: qemu-aarch64-static is copied into the root and
   started by chroot.
2. Makes ONNX Runtime fp32 and INT8 (static QDQ, dynamic MatMulInteger) bundles of the tiny presets of each
   modality with d2v-export on this machine (or takes the bundles given with --bundle).
3. Runs each bundle's own bundle_run.py (scripts/aarch64_probe.py keeps its raw outputs) on the same inputs
   natively and under qemu-aarch64 with each --cpu model (cortex-a72: plain NEON; neoverse-n1: + dot product;
   max: + i8mm, SVE, bf16: the three families of ONNX Runtime's Arm int8 kernels, chosen from the HWCAPs).
4. Prints a table: the largest difference of the raw outputs (logits) between aarch64 and x86, and whether
   the answers (top-1 labels, transcripts) are the same. Tolerance T: fp32 1e-4, int8 2e-2, times max(1, |logit|).
   Exit 0 when every output is within T of x86's and every changed answer is a near tie (x86's own top-1/top-2
   margin, where the argmax changed, is within T; such changes are listed in the table, not hidden), 1 when not,
   2 when the root cannot be built or run. Emulated timings mean nothing: none are taken.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
PROBE = HERE / "aarch64_probe.py"
DEFAULT_CACHE = Path("~/.cache/d2v-export-aarch64").expanduser()
SUITE, MIRROR = "bookworm", "http://deb.debian.org/debian"
QEMU = Path("/usr/bin/qemu-aarch64-static")
PYTHON = "/usr/bin/python3.11"  # in the root
STAGE = "d2v-parity"  # the folder in the root where bundles, inputs and outputs are put for one check
READY = ".d2v-ready.json"  # written last: a root without it is rebuilt
# the wheels the probe needs, at the versions this environment runs (dependencies named: installed --no-deps)
WHEELS = (
    "onnxruntime",
    "numpy",
    "pillow",
    "soundfile",
    "tokenizers",
    "cffi",
    "pycparser",
    "flatbuffers",
    "packaging",
    "protobuf",
    "typing_extensions",
)
PLATFORMS = (
    "manylinux_2_36_aarch64",
    "manylinux_2_28_aarch64",
    "manylinux_2_17_aarch64",
    "manylinux2014_aarch64",
    "any",
)
CPUS = ("cortex-a72", "neoverse-n1", "max")
TOLERANCE = {"fp32": 1e-4, "int8": 2e-2}  # on max|Δ logit| / max(1, max|logit|)
TEXTS = (
    "The only thing better than love is milk.",
    "Surprise due today. Also the rent.",
    "Is it raining? ||| No, the sun is out.",
    " ".join(["a long text"] * 20),
)
IMAGES = ("chelsea.jpg", "rocket.jpg", "coffee.jpg", "astronaut.jpg")
SPEECH = ("flite_awb_13.wav", "espeak_en-us_15.wav", "klettres_en_no.wav")
LONG = ("flite_rms_11.wav", "espeak_en-us_15.wav", "flite_kal16_14.wav")  # joined: 5.4 s, run in windows


class SetupError(Exception):
    """The arm64 root cannot be built or run here: one line naming the fix (exit 2)."""


# ------------------------------------------------------------------------------------ the arm64 root


def _run(cmd: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        raise SetupError(f"{' '.join(cmd[:3])} ... failed (exit {done.returncode}): {' | '.join(tail)}")
    return done


def _pins() -> list[str]:
    return [f"{name}=={importlib.metadata.version(name)}" for name in WHEELS]


def _wheels(cache: Path, target: Path) -> None:
    """Download the aarch64 wheels on this machine and unpack them into the root's dist-packages (no emulated pip)."""
    wheels = cache / "wheels"
    where = ["--only-binary=:all:", "--python-version", "3.11", "--implementation", "cp"]
    where += [arg for abi in ("cp311", "abi3", "none") for arg in ("--abi", abi)]
    where += [arg for platform in PLATFORMS for arg in ("--platform", platform)]
    pip = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]
    _run([*pip, "download", "--no-deps", "-d", str(wheels), *where, *_pins()], timeout=900)
    install = [*pip, "install", "--no-index", "--no-deps", "--find-links", str(wheels), "--target", str(target)]
    _run([*install, *where, *_pins()], timeout=900)


def _unpack_debs(root: Path) -> None:
    """Unpack what `debootstrap --foreign` downloaded: an unconfigured root, enough to run python3.11 in it."""
    archives = root / "var" / "cache" / "apt" / "archives"
    for deb in sorted(archives.glob("*.deb")):
        _run(["dpkg-deb", "-x", str(deb), str(root)], timeout=300)
        deb.unlink()


def build_root(cache: Path) -> Path:
    """The cached arm64 root (built when missing): CACHE/root, with READY recording versions and set-up time."""
    root = cache / "root"
    if (root / READY).is_file():
        return root
    missing = [tool for tool in ("debootstrap", "dpkg-deb", "chroot") if shutil.which(tool) is None]
    if missing or not QEMU.is_file():
        raise SetupError(f"missing {', '.join(missing) or QEMU}: apt-get install debootstrap qemu-user-static")
    if os.geteuid() != 0:
        raise SetupError(
            f"building the arm64 root needs root (debootstrap, chroot); run this script as root once to fill {cache}"
        )
    started, partial = time.monotonic(), cache / "root.partial"
    shutil.rmtree(partial, ignore_errors=True)
    partial.parent.mkdir(parents=True, exist_ok=True)
    boot = [
        "debootstrap",
        "--arch=arm64",
        "--variant=minbase",
        "--foreign",
        "--include=python3",
        SUITE,
        str(partial),
        MIRROR,
    ]
    _run(boot, timeout=1800)
    debootstrap_s = time.monotonic() - started
    _unpack_debs(partial)
    unpacked_s = time.monotonic() - started
    _wheels(cache, partial / "usr" / "local" / "lib" / "python3.11" / "dist-packages")
    shutil.copy2(QEMU, partial / "usr" / "bin" / QEMU.name)
    qemu = _run([str(QEMU), "--version"]).stdout.splitlines()[0]
    seconds = {
        "debootstrap": round(debootstrap_s, 1),
        "unpack": round(unpacked_s - debootstrap_s, 1),
        "wheels": round(time.monotonic() - started - unpacked_s, 1),
        "total": round(time.monotonic() - started, 1),
    }
    about = {"suite": SUITE, "qemu": qemu, "wheels": _pins(), "seconds": seconds, "built": time.strftime("%Y-%m-%d")}
    (partial / READY).write_text(json.dumps(about, indent=1), encoding="utf-8")
    shutil.rmtree(root, ignore_errors=True)
    partial.rename(root)
    return root


def emulated(root: Path, cpu: str, args: list[str]) -> list[str]:
    """The command that runs the root's python3.11 under qemu-aarch64 with a CPU model (chroot; unshare when not root)."""
    chroot = ["chroot", str(root)] if os.geteuid() == 0 else ["unshare", "--map-root-user", "chroot", str(root)]
    return [*chroot, f"/usr/bin/{QEMU.name}", "-cpu", cpu, PYTHON, "-I", *args]


# ------------------------------------------------------------------------------------ bundles and inputs


def build_bundles(work: Path, modalities: list[str], quants: list[str], reduce_range: str) -> dict[str, Path]:
    """{name: bundle} for fp32 + one INT8 per quant mode of each modality's tiny preset (d2v-export on this machine)."""
    cli = Path(sys.executable).parent / "d2v-export"
    shapes = {"vision": [], "text": ["--sequence-length", "8:16:32"], "audio": ["--audio-seconds", "0.5:1:2"]}
    found = {}
    for modality in modalities:
        for quant in quants:
            out = work / f"{modality}-{quant}"
            cmd = [
                str(cli),
                modality,
                "--model",
                "preset:tiny",
                "--target",
                "onnxruntime",
                "--int8",
                "--quant",
                quant,
                "--reduce-range",
                reduce_range,
                "--bench-seconds",
                "0",
                "--threads",
                "1",
                "--batch-size",
                "1:1:2",
                *shapes[modality],
                "--output",
                str(out),
                "--force",
                "--quiet",
            ]
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
            if done.returncode not in (
                0,
                5,
            ):  # 5: INT8 over its drift budget; the bundle is still written, and checked here
                raise SetupError(
                    f"d2v-export {modality} --quant {quant} failed (exit {done.returncode}): {done.stderr.strip()[-300:]}"
                )
            for folder in sorted(p for p in out.iterdir() if (p / "bundle_run.py").is_file()):
                found.setdefault(f"{modality}-{folder.name}", folder)
    return found


def make_inputs(folder: Path) -> dict[str, list[str]]:
    """{modality: inputs} (file names in ``folder``, or texts): bundled evaluation samples, and a 5.4 s recording."""
    from d2v_export.calibration import bundled_path
    from d2v_export.spec import Modality

    import soundfile as sf

    folder.mkdir(parents=True, exist_ok=True)
    images, speech = bundled_path(Modality.VISION, "evaluation"), bundled_path(Modality.AUDIO, "evaluation")
    for name in IMAGES:
        shutil.copy2(images / name, folder / name)
    for name in SPEECH:
        shutil.copy2(speech / name, folder / name)
    waves = [sf.read(str(speech / name), dtype="float32")[0] for name in LONG]
    sf.write(str(folder / "long.wav"), np.concatenate(waves), 16000)
    return {"vision": list(IMAGES), "text": list(TEXTS), "audio": [*SPEECH, "long.wav"]}


# ------------------------------------------------------------------------------------ runs and comparison


@dataclass
class Row:
    """One bundle on one emulated CPU model against the same bundle run natively."""

    bundle: str
    int8_format: str
    cpu: str
    features: str
    inputs: int
    max_diff: float
    max_logit: float
    tolerance: float
    same_answers: int
    differences: list[str] = field(default_factory=list)
    tie_margin: float = 0.0  # the largest x86 top-1/top-2 margin where an answer changed

    @property
    def ok(self) -> bool:
        """Outputs within tolerance, and every changed answer a near tie: x86's own margin within that tolerance."""
        allowed = self.tolerance * max(1.0, self.max_logit)
        return self.max_diff <= allowed and self.tie_margin <= allowed


def int8_format(manifest: dict[str, Any]) -> str:
    """How the bundle's INT8 is stored: what Arm's kernels see ("fp32" for a float bundle)."""
    q = manifest.get("quantization") or {}
    if manifest.get("precision") != "int8" or not q:
        return "fp32"
    kind = "QDQ, static u8" if q.get("mode") == "static" else "MatMulInteger, dynamic u8"
    acts = "s8" if q.get("symmetric_activations") else "u8"
    kind = kind.replace("u8", acts, 1)
    weights = "s8 per-channel" if q.get("per_channel") else "s8 per-tensor"
    return f"{kind} x {weights}, {'7' if q.get('reduce_range') else '8'}-bit weights"


def answers(result: dict[str, Any]) -> Any:
    """What a user reads off a result: the transcript, or the top label."""
    return result["transcript"] if "transcript" in result else result["labels"][0]["id"]


def near_tie(a: np.ndarray, b: np.ndarray) -> float:
    """The largest x86 margin (top-1 minus top-2 logit) where the two argmaxes differ (0 when none do)."""
    flipped = np.argmax(a, axis=-1) != np.argmax(b, axis=-1)
    if not flipped.any():
        return 0.0
    top2 = np.sort(a, axis=-1)[..., -2:]
    return float(np.max((top2[..., 1] - top2[..., 0])[flipped]))


def compare(
    bundle: str,
    fmt: str,
    cpu: str,
    native: tuple[dict[str, Any], dict[str, np.ndarray]],
    arm: tuple[dict[str, Any], dict[str, np.ndarray]],
) -> Row:
    """One row: the largest output difference, the answers that changed and x86's margin where they did."""
    (x86, x86_out), (a64, a64_out) = native, arm
    tolerance = TOLERANCE["fp32" if fmt == "fp32" else "int8"]
    row = Row(bundle, fmt, cpu, "+".join(a64["features"]) or "neon", len(x86["results"]), 0.0, 0.0, tolerance, 0)
    for number, (want, got) in enumerate(zip(x86["results"], a64["results"])):
        keys = sorted(k for k in x86_out if k.startswith(f"input{number}."))
        pairs = [(x86_out[k], a64_out.get(k)) for k in keys]
        if sorted(k for k in a64_out if k.startswith(f"input{number}.")) != keys or any(
            a.shape != b.shape for a, b in pairs
        ):
            row.differences.append(f"{Path(want['input']).name}: outputs of other shapes")
            row.max_diff = float("inf")
            continue
        row.max_diff = max([row.max_diff, *(float(np.max(np.abs(a - b))) for a, b in pairs)])
        row.max_logit = max([row.max_logit, *(float(np.max(np.abs(a))) for a, _ in pairs)])
        if answers(want) == answers(got):
            row.same_answers += 1
            continue
        margin = max(near_tie(a, b) for a, b in pairs) or float("inf")  # a changed answer no output explains: not a tie
        row.tie_margin = max(row.tie_margin, margin)
        row.differences.append(
            f"{Path(want['input']).name[:40]}: x86 {_short(answers(want))}, aarch64 {_short(answers(got))} "
            f"(x86's top-2 margin where they differ: {margin:.2g})"
        )
    return row


def _short(answer: Any) -> str:
    text = repr(answer)
    return text if len(text) < 30 else f"{text[:12]}...{text[-12:]} ({len(answer)} characters)"


def probe(cmd: list[str], out: Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/tmp", "LANG": "C.UTF-8"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    if done.returncode != 0:
        raise SetupError(f"the probe failed (exit {done.returncode}): {done.stderr.strip()[-400:]}")
    with np.load(out) as arrays:
        return json.loads(done.stdout), {k: arrays[k] for k in arrays.files}


def check(root: Path, bundles: dict[str, Path], inputs: dict[str, list[str]], cpus: list[str]) -> list[Row]:
    """Copy the bundles and inputs into the root, run each natively and under each CPU model, compare."""
    stage = root / STAGE
    shutil.rmtree(stage, ignore_errors=True)
    (stage / "out").mkdir(parents=True)
    shutil.copy2(PROBE, stage / PROBE.name)
    shutil.copytree(root.parent / "inputs", stage / "inputs")
    rows = []
    for name, folder in bundles.items():
        manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
        shutil.copytree(folder, stage / "bundles" / name)
        files = stage / "inputs"
        raw = [str(files / i) if (files / i).is_file() else i for i in inputs[manifest["model"]["modality"]]]
        host_cmd = [
            sys.executable,
            "-I",
            str(stage / PROBE.name),
            str(stage / "bundles" / name),
            str(stage / "out" / f"{name}-x86.npz"),
            *raw,
        ]
        native = probe(host_cmd, stage / "out" / f"{name}-x86.npz")
        in_root = [r.replace(str(root), "", 1) if r.startswith(str(root)) else r for r in raw]
        for cpu in cpus:
            out = f"/{STAGE}/out/{name}-{cpu}.npz"
            arm = probe(
                emulated(root, cpu, [f"/{STAGE}/{PROBE.name}", f"/{STAGE}/bundles/{name}", out, *in_root]),
                root / out.lstrip("/"),
            )
            rows.append(compare(name, int8_format(manifest), cpu, native, arm))
            print(
                f"  {name} on {cpu}: max |diff| {rows[-1].max_diff:.3g}, {rows[-1].same_answers}/{rows[-1].inputs} same answers",
                file=sys.stderr,
            )
    shutil.rmtree(stage, ignore_errors=True)
    return rows


def table(rows: list[Row]) -> str:
    lines = [
        "| bundle | INT8 format | aarch64 CPU model (features) | inputs | max abs diff of logits | max abs logit | "
        "same answers | within tolerance |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        why = "; ".join(r.differences or [f"diff over {r.tolerance:g} x max(1, |logit|)"])
        verdict = f"NO: {why}" if not r.ok else f"yes, near tie: {why}" if r.differences else "yes"
        lines.append(
            f"| {r.bundle} | {r.int8_format} | {r.cpu} ({r.features}) | {r.inputs} | {r.max_diff:.2g} | "
            f"{r.max_logit:.3g} | {r.same_answers}/{r.inputs} | {verdict} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "cache",
        nargs="?",
        type=Path,
        default=DEFAULT_CACHE,
        help=f"where the arm64 root is kept (default {DEFAULT_CACHE})",
    )
    parser.add_argument(
        "--cpu", action="append", choices=("cortex-a53", "cortex-a72", "cortex-a76", "neoverse-n1", "a64fx", "max")
    )
    parser.add_argument("--modality", action="append", choices=("vision", "text", "audio"))
    parser.add_argument("--quant", action="append", choices=("static", "dynamic"))
    parser.add_argument("--reduce-range", default="auto", choices=("auto", "on", "off"))
    parser.add_argument(
        "--bundle", action="append", type=Path, help="check these ONNX Runtime bundles instead of building the presets'"
    )
    parser.add_argument("--setup-only", action="store_true", help="build the arm64 root and stop")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    args = parser.parse_args(argv)
    try:
        started = time.monotonic()
        root = build_root(args.cache.expanduser())
        about = json.loads((root / READY).read_text(encoding="utf-8"))
        print(
            f"arm64 root: {root} ({about['qemu']}; built {about['built']} in {about['seconds']['total']} s; "
            f"ready in {time.monotonic() - started:.1f} s now)",
            file=sys.stderr,
        )
        if args.setup_only:
            return 0
        inputs = make_inputs(root.parent / "inputs")
        with tempfile.TemporaryDirectory(prefix="d2v-aarch64-") as work:
            if args.bundle:
                bundles = {p.resolve().name: p.resolve() for p in args.bundle}
            else:
                bundles = build_bundles(
                    Path(work),
                    args.modality or ["vision", "text", "audio"],
                    args.quant or ["static", "dynamic"],
                    args.reduce_range,
                )
            rows = check(root, bundles, inputs, args.cpu or list(CPUS))
    except SetupError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(table(rows))
    print(
        f"\nemulated with {about['qemu']}, functional only; x86: this machine, onnxruntime "
        f"{importlib.metadata.version('onnxruntime')}; {time.strftime('%Y-%m-%d')}"
    )
    if args.json:
        args.json.write_text(json.dumps([asdict(r) | {"ok": r.ok} for r in rows], indent=1), encoding="utf-8")
    return 0 if all(r.ok for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
