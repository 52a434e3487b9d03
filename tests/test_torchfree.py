"""ONNX Runtime and OpenVINO bundles run without torch: ``bundle_run.py`` (d2v_export/backends/bundle_run.py) in a clean venv.

The venv holds only numpy, the two runtimes and the preprocessing libraries (Pillow, soundfile, tokenizers; scipy
added later, for resampling), linked from this environment; torch, transformers and d2v_export do not import there.
Every bundle of each modality must give what ``d2v-export run --json`` gives (``predict``): the same label ids and
names, scores within 1e-4, the same transcripts.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest

from d2v_export.deploy import bundle, predict
from d2v_export.backends.bundle_run import CHUNKING_SCRIPT, SCRIPT
from d2v_export.calibration import bundled_path
from d2v_export.spec import Modality

from .test_bundle import bundles, openvino_ok  # noqa: F401 - the session fixture shared with test_bundle

pytestmark = pytest.mark.skipif(not openvino_ok(), reason="OpenVINO is not installed here")

VISION = bundled_path(Modality.VISION, "evaluation")
AUDIO = bundled_path(Modality.AUDIO, "evaluation")
CASES = {
    "vision": ("image-classification", [str(VISION / "chelsea.jpg"), str(VISION / "rocket.jpg")]),
    "text": (
        "text-classification",
        ["A fine day at the beach.", "Is it raining? ||| No, the sun is out.", " ".join(["a long text"] * 20)],
    ),
    "audio": ("automatic-speech-recognition", [str(AUDIO / "flite_awb_13.wav"), str(AUDIO / "klettres_en_no.wav")]),
}
PACKAGES = (
    "numpy",
    "numpy.libs",
    "onnxruntime",
    "flatbuffers",
    "openvino",
    "openvino_telemetry",
    "packaging",
    "PIL",
    "pillow.libs",
    "soundfile.py",
    "_soundfile.py",
    "_soundfile_data",
    "cffi",
    "pycparser",
    "typing_extensions.py",
    "tokenizers",
)
_cffi = importlib.util.find_spec("_cffi_backend")


def _link(site: Path, names: tuple[str, ...]) -> None:
    here = Path(sysconfig.get_paths()["purelib"])
    for name in names:
        if (here / name).exists():
            (site / name).symlink_to(here / name)


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(python, site-packages) of a venv with only the runtimes and preprocessing libraries."""
    root = tmp_path_factory.mktemp("torchfree") / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True, timeout=300)
    python = root / "bin" / "python"
    site = Path(
        subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
    )
    _link(site, PACKAGES)
    if _cffi is not None and _cffi.origin:
        (site / Path(_cffi.origin).name).symlink_to(_cffi.origin)
    return python, site


def _run(python: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(cwd)}
    return subprocess.run([str(python), "-I", *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=300)


def _same(expected: list[dict[str, Any]], got: list[dict[str, Any]], where: str) -> None:
    assert len(got) == len(expected), where
    for e, g in zip(expected, got):
        assert {k: e[k] for k in ("input", "task", "runtime", "notes")} == {
            k: g[k] for k in ("input", "task", "runtime", "notes")
        }, where
        if "transcript" in e:
            assert (g["transcript"], g["frames"]) == (e["transcript"], e["frames"]), where
            # a random-weight CTC head still spells something: an empty match proves little
            assert e["transcript"], where
            continue
        assert [(x["id"], x["label"]) for x in g["labels"]] == [(x["id"], x["label"]) for x in e["labels"]], where
        assert np.allclose([x["score"] for x in g["labels"]], [x["score"] for x in e["labels"]], rtol=0, atol=1e-4), (
            where
        )


def test_the_clean_venv_has_no_torch(venv: tuple[Path, Path], tmp_path: Path) -> None:
    python, _site = venv
    probe = "import importlib.util as u; print([u.find_spec(m) is None for m in ('torch', 'transformers', 'd2v_export', 'scipy', 'onnx')])"
    assert _run(python, "-c", probe, cwd=tmp_path).stdout.strip() == "[True, True, True, True, True]"
    assert _run(python, "-c", "import torch", cwd=tmp_path).returncode != 0


@pytest.mark.parametrize("modality", list(CASES))
def test_bundles_run_without_torch_as_d2v_export_run_does(
    modality: str, venv: tuple[Path, Path], bundles: Callable[..., dict[str, Path]], tmp_path: Path
) -> None:  # noqa: F811
    task, inputs = CASES[modality]
    built = bundles(modality, task, ("onnxruntime", "openvino"))
    assert {"onnxruntime-fp32", "openvino-fp32"} <= set(built)
    python, _site = venv
    if (
        modality == "audio"
    ):  # longer than the bundle's 2 s: transcribed whole in windows (bundle_chunking.py), as run does
        import soundfile as sf

        waves = [
            sf.read(str(AUDIO / f), dtype="float32")[0]
            for f in ("flite_rms_11.wav", "espeak_en-us_15.wav", "flite_kal16_14.wav")
        ]
        sf.write(str(tmp_path / "long.wav"), np.concatenate(waves), 16000)
        inputs = [*inputs, str(tmp_path / "long.wav")]
        assert all((built[n] / CHUNKING_SCRIPT).is_file() for n in ("onnxruntime-fp32", "openvino-fp32"))
    for name in ("onnxruntime-fp32", "openvino-fp32"):
        folder = built[name]
        assert (
            (folder / SCRIPT).is_file()
            and SCRIPT in (folder / "README.md").read_text()
            and "Run it without torch" in (folder / "README.md").read_text()
        )
        expected = json.loads(predict.to_json(predict.predict(folder, inputs, top_k=5, threads=1)))
        ran = _run(python, str(folder / SCRIPT), *inputs, "--top-k", "5", "--threads", "1", cwd=tmp_path)
        assert ran.returncode == 0, ran.stderr
        _same(expected, json.loads(ran.stdout), f"{modality} {name}")
        bundle.verify(folder)  # the run left nothing in the bundle (no __pycache__): `run` still accepts it
        if modality == "text":
            assert "truncated to 32 tokens" in " ".join(expected[-1]["notes"]), expected[-1]["notes"]
        if modality == "audio":
            assert "windows of 2 s" in " ".join(expected[-1]["notes"]), expected[-1]["notes"]


def test_audio_at_another_rate_needs_scipy_and_then_matches(
    venv: tuple[Path, Path], bundles: Callable[..., dict[str, Path]], tmp_path: Path
) -> None:  # noqa: F811
    import soundfile as sf

    wave, rate = sf.read(str(AUDIO / "flite_kal16_14.wav"), dtype="float32")
    stereo = tmp_path / "stereo8k.wav"
    n = len(wave) // 2
    sf.write(str(stereo), np.stack([wave[: 2 * n : 2], 0.5 * wave[1 : 2 * n : 2]], axis=1), rate // 2)
    folder = bundles("audio", "automatic-speech-recognition", ("onnxruntime", "openvino"))["onnxruntime-fp32"]
    python, site = venv
    refused = _run(python, str(folder / SCRIPT), str(stereo), cwd=tmp_path)
    err = refused.stderr.strip()
    assert refused.returncode == 3 and err.count("\n") == 0 and "pip install scipy" in err and "8000 Hz" in err, err
    bad = _run(python, str(folder / SCRIPT), str(VISION / "chelsea.jpg"), cwd=tmp_path)
    assert bad.returncode == 3 and "not a readable audio file" in bad.stderr and "Traceback" not in bad.stderr, (
        bad.stderr
    )
    _link(site, ("scipy", "scipy.libs"))
    try:
        ran = _run(python, str(folder / SCRIPT), str(stereo), cwd=tmp_path)
        assert ran.returncode == 0, ran.stderr
        _same(
            json.loads(predict.to_json(predict.predict(folder, [str(stereo)], threads=1))),
            json.loads(ran.stdout),
            "8 kHz stereo",
        )
    finally:
        for name in ("scipy", "scipy.libs"):
            if (site / name).is_symlink():
                (site / name).unlink()
