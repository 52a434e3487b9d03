"""Bundles: manifest.json written from real pipeline runs, verify() refusing tampering, escapes and pickles.

The pipeline does not call write_manifest yet (the lead wires it); `build` runs the real pipeline on a
tiny preset and writes the manifest into each variant folder the way the pipeline will.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest

from d2v_export import backends
from d2v_export.deploy import bundle
from d2v_export.measure.bench import BenchSettings
from d2v_export.models import load, parse_source
from d2v_export.pipeline import QuantOptions, RunOptions, run
from d2v_export.spec import Artifact, D2VError, ExitCode, Modality, Precision

from .conftest import TINY_SHAPES

MODEL_FILES = {"onnxruntime": "model.onnx", "openvino": "openvino_model.xml", "tensorrt": "model.onnx"}


def openvino_ok() -> bool:
    return backends.get("openvino").available().ok


def build(
    root: Path,
    modality: str,
    task: str | None,
    targets: tuple[str, ...] = ("onnxruntime",),
    int8: QuantOptions | None = None,
) -> dict[str, Path]:
    """Run the real pipeline, then write every variant's manifest; {variant name: folder}."""
    spec = parse_source("preset:tiny", Modality(modality), task)
    report = run(
        spec,
        TINY_SHAPES,
        RunOptions(output=root, targets=targets, bench=BenchSettings(seconds=0), int8=int8, threads=1),
    )
    model = load(spec)  # the preset again: same seed, same weights, same processor
    doc = json.loads((root / "report.json").read_text(encoding="utf-8"))
    out = {}
    for variant, entry in zip(report.variants, doc["variants"]):
        folder = root / variant.artifact
        artifact = Artifact(
            variant.target,
            variant.precision,
            folder,
            folder / MODEL_FILES[variant.target],
            tuple(sorted(p for p in folder.iterdir() if p.is_file())),
            variant.quantization,
            variant.notes,
        )
        bundle.write_manifest(
            folder,
            artifact=artifact,
            model=model,
            graph=report.export,
            variant_verdict=entry,
            environment=report.environment,
        )
        out[variant.artifact] = folder
    return out


_BUILT: dict[Any, dict[str, Path]] = {}  # module-level: shared by every module that imports these fixtures


@pytest.fixture(scope="session")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., dict[str, Path]]:
    """build() once per (modality, task, targets, int8) for the whole session."""

    def get(
        modality: str, task: str | None = None, targets: tuple[str, ...] = ("onnxruntime",), int8: str | None = None
    ) -> dict[str, Path]:
        key = (modality, task, targets, int8)
        if key not in _BUILT or not all(p.is_dir() for p in _BUILT[key].values()):
            root = tmp_path_factory.mktemp(f"{modality}-{task or 'default'}") / "out"
            _BUILT[key] = build(root, modality, task, targets, QuantOptions(mode=int8) if int8 else None)
        return _BUILT[key]

    return get


@pytest.fixture(scope="session")
def vision_bundles(bundles: Callable[..., dict[str, Path]]) -> dict[str, Path]:
    targets = ("onnxruntime", "openvino") if openvino_ok() else ("onnxruntime",)
    return bundles("vision", "image-classification", targets)


def copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def relist(folder: Path) -> None:
    """Rewrite the manifest's file list to match the folder (what an attacker with write access could do)."""
    doc = json.loads((folder / "manifest.json").read_text())
    doc["files"] = [
        {
            "path": p.relative_to(folder).as_posix(),
            "size": p.stat().st_size,
            "sha256": hashlib.sha256(p.read_bytes()).hexdigest(),
        }
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != "manifest.json"
    ]
    (folder / "manifest.json").write_text(json.dumps(doc))


def refused(folder: Path, *words: str) -> str:
    with pytest.raises(D2VError) as info:
        bundle.verify(folder)
    message = str(info.value)
    assert info.value.code is ExitCode.BAD_INPUT
    assert "\n" not in message
    for word in words:
        assert word in message, message
    return message


# --------------------------------------------------------------------------------------- manifest


def test_manifest_describes_the_vision_bundle(vision_bundles: dict[str, Path]) -> None:
    folder = vision_bundles["onnxruntime-fp32"]
    doc = json.loads((folder / "manifest.json").read_text())
    assert doc["schema_version"] == "1.1"
    assert (doc["device"], doc["deploy_device"], doc["environment"]["device"]) == (
        "CPU",
        "CPU",
        "CPU",
    )  # from its report entry
    on_disk = sorted(
        p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() and p.name != "manifest.json"
    )
    assert [f["path"] for f in doc["files"]] == on_disk
    assert {"model.onnx", "config.json", "preprocessor_config.json", "README.md"} <= set(on_disk)
    for f in doc["files"]:
        data = (folder / f["path"]).read_bytes()
        assert f["size"] == len(data) and f["sha256"] == hashlib.sha256(data).hexdigest()
    assert doc["target"] == "onnxruntime" and doc["precision"] == "fp32" and doc["model_file"] == "model.onnx"
    assert doc["model"] | {"description": None} == doc["model"] | {
        "modality": "vision",
        "task": "image-classification",
        "class": "Data2VecVisionForImageClassification",
        "random_weights": True,
        "description": None,
    }
    (pixels,) = doc["inputs"]
    assert pixels["name"] == "pixel_values" and pixels["dtype"] == "float32"
    assert pixels["dynamic"] == {"batch": {"min": 1, "opt": 1, "max": 4}} and pixels["fixed"] == {
        "height": 32,
        "width": 32,
    }
    assert doc["outputs"][0]["name"] == "logits"
    pre = doc["preprocessing"]
    assert (
        pre["image_mean"] == [0.5, 0.5, 0.5]
        and pre["image_std"] == [0.5, 0.5, 0.5]
        and pre["size"] == {"height": 32, "width": 32}
    )
    assert len(doc["labels"]) == 1000 and doc["labels"]["281"].startswith("tabby")
    assert doc["verdict"]["passed"] is True and doc["verdict"]["drift"]["metrics"]
    assert doc["runtime"]["name"] == "onnxruntime" and doc["runtime"]["version"]
    assert doc["environment"]["versions"]["onnxruntime"] and doc["environment"]["versions"]["torch"]
    readme = (folder / "README.md").read_text()
    assert "d2v-export run onnxruntime-fp32/" in readme and "ort.InferenceSession" in readme


def test_manifest_of_text_int8_and_audio(bundles: Callable[..., dict[str, Path]]) -> None:
    text = bundles("text", "text-classification", int8="dynamic")
    doc = json.loads((text["onnxruntime-int8-dynamic"] / "manifest.json").read_text())
    assert doc["precision"] == "int8" and doc["quantization"]["mode"] == "dynamic"
    tok = doc["preprocessing"]["tokenizer"]
    assert tok["max_length"] == 32 and "tokenizer_config.json" in tok["files"] and tok["files"]
    assert doc["preprocessing"]["pair_separator"] == "|||"
    assert {i["name"] for i in doc["inputs"]} == {"input_ids", "attention_mask"}
    assert doc["inputs"][0]["dynamic"]["sequence"] == {"min": 8, "opt": 16, "max": 32}
    audio = bundles("audio", "automatic-speech-recognition")
    doc = json.loads((audio["onnxruntime-fp32"] / "manifest.json").read_text())
    pre = doc["preprocessing"]
    assert pre["sampling_rate"] == 16000 and pre["do_normalize"] is True
    assert "vocab.json" in pre["tokenizer"]["files"]
    assert doc["inputs"][0]["dynamic"]["samples"] == {"min": 8000, "opt": 16000, "max": 32000}


def test_verify_accepts_an_untouched_bundle(vision_bundles: dict[str, Path]) -> None:
    for name, folder in vision_bundles.items():
        m = bundle.verify(folder)
        assert m.modality is Modality.VISION and m.task == "image-classification"
        assert m.target == name.split("-")[0] and (folder / m.model_file).is_file()
        assert m.labels is not None and m.labels[281].startswith("tabby")
        assert m.dims() == {"batch": (1, 1, 4)} and m.static() == {"image_size": 32}


def test_openvino_weights_are_not_mistaken_for_a_pickle(vision_bundles: dict[str, Path]) -> None:
    if "openvino-fp32" not in vision_bundles:
        pytest.skip(f"openvino is not available here: {backends.get('openvino').available().reason}")
    folder = vision_bundles["openvino-fp32"]
    assert (folder / "openvino_model.bin").is_file()
    assert bundle.pickle_reason(folder / "openvino_model.bin") is None
    m = bundle.verify(folder)
    assert m.model_file == "openvino_model.xml"
    assert "ov.Core().compile_model" in (folder / "README.md").read_text()


# --------------------------------------------------------------------------------------- refusals


def test_a_flipped_byte_is_refused(vision_bundles: dict[str, Path], tmp_path: Path) -> None:
    folder = copy(vision_bundles["onnxruntime-fp32"], tmp_path / "b")
    data = bytearray((folder / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0x01
    (folder / "model.onnx").write_bytes(bytes(data))
    refused(folder, "model.onnx", "sha256")


def test_missing_and_extra_files_are_refused(vision_bundles: dict[str, Path], tmp_path: Path) -> None:
    folder = copy(vision_bundles["onnxruntime-fp32"], tmp_path / "missing")
    (folder / "config.json").unlink()
    refused(folder, "missing", "config.json")
    folder = copy(vision_bundles["onnxruntime-fp32"], tmp_path / "extra")
    (folder / "notes.txt").write_text("hello")
    refused(folder, "not in manifest.json", "notes.txt")
    folder = copy(vision_bundles["onnxruntime-fp32"], tmp_path / "grown")
    with open(folder / "config.json", "a") as fh:
        fh.write(" ")
    refused(folder, "config.json", "bytes")
    folder = copy(vision_bundles["onnxruntime-fp32"], tmp_path / "nomanifest")
    (folder / "manifest.json").unlink()
    refused(folder, "no manifest.json")


@pytest.mark.parametrize("path", ["../x", "a/../../x", "/etc/passwd", "..", "C:/x", "a\\..\\..\\x"])
def test_paths_escaping_the_bundle_are_refused(vision_bundles: dict[str, Path], tmp_path: Path, path: str) -> None:
    folder = copy(vision_bundles["onnxruntime-fp32"], tmp_path / "b")
    (tmp_path / "x").write_text("outside")
    doc = json.loads((folder / "manifest.json").read_text())
    doc["files"].append({"path": path, "size": 7, "sha256": hashlib.sha256(b"outside").hexdigest()})
    (folder / "manifest.json").write_text(json.dumps(doc))
    refused(folder, "refusing")


def test_a_symlink_pointing_outside_is_refused(vision_bundles: dict[str, Path], tmp_path: Path) -> None:
    folder = copy(vision_bundles["onnxruntime-fp32"], tmp_path / "b")
    secret = tmp_path / "secret.txt"
    secret.write_text("outside the bundle")
    os.symlink(secret, folder / "labels.txt")
    relist(folder)  # even when the manifest lists it
    refused(folder, "symbolic link", "outside")


def _torch_checkpoint() -> bytes:
    import torch

    buf = io.BytesIO()
    torch.save({"w": torch.zeros(2)}, buf)
    return buf.getvalue()


@pytest.mark.parametrize(
    "name, content",
    [
        ("pytorch_model.bin", _torch_checkpoint),  # torch's zip format: .../data.pkl inside
        ("weights.bin", lambda: pickle.dumps({"w": [1.0, 2.0]}, protocol=2)),  # plain pickle behind a harmless name
        ("extra.pkl", lambda: b"not even a pickle, but named like one"),
        ("arrays.npy", lambda: _npy(np.array([{"a": 1}], dtype=object))),
        ("arrays.npz", lambda: _npz(np.array([{"a": 1}], dtype=object))),
    ],
)
def test_pickles_are_refused(
    vision_bundles: dict[str, Path], tmp_path: Path, name: str, content: Callable[[], bytes]
) -> None:
    folder = copy(vision_bundles["onnxruntime-fp32"], tmp_path / "b")
    (folder / name).write_bytes(content())
    relist(folder)  # listed with a correct checksum: only the pickle check can catch it
    refused(folder, name, "pickle")


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=True)
    return buf.getvalue()


def _npz(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("a.npy", _npy(array))
    return buf.getvalue()


def test_raw_weights_that_start_like_a_pickle_are_not_one(tmp_path: Path) -> None:
    raw = tmp_path / "weights.bin"
    raw.write_bytes(b"\x80\x02" + bytes([0xFF, 0xFE, 0x00, 0x13]) * 1000)
    assert bundle.pickle_reason(raw) is None
    plain = tmp_path / "plain.npy"
    plain.write_bytes(_npy(np.arange(4, dtype=np.float32)))
    assert bundle.pickle_reason(plain) is None


def test_write_manifest_refuses_a_symlink(vision_bundles: dict[str, Path], tmp_path: Path) -> None:
    folder = copy(vision_bundles["onnxruntime-fp32"], tmp_path / "b")
    os.symlink("/etc/hostname", folder / "link")
    spec = parse_source("preset:tiny", Modality.VISION, "image-classification")
    artifact = Artifact("onnxruntime", Precision.FP32, folder, folder / "model.onnx", ())
    with pytest.raises(D2VError, match="symbolic link"):
        bundle.write_manifest(
            folder, artifact=artifact, model=load(spec), graph=_graph_of(folder), variant_verdict=None, environment={}
        )


def _graph_of(folder: Path) -> Any:
    """An ExportedGraph rebuilt from a bundle's manifest (its ONNX path is the bundle's copy)."""
    from d2v_export.spec import Dim, Drift, ExportedGraph, ShapeProfile, TensorSpec

    doc = json.loads((folder / "manifest.json").read_text())
    dims = tuple(Dim(a, r["min"], r["opt"], r["max"]) for t in doc["inputs"] for a, r in t["dynamic"].items())
    return ExportedGraph(
        path=folder / "model.onnx",
        inputs=tuple(TensorSpec(t["name"], t["dtype"], tuple(t["shape"])) for t in doc["inputs"]),
        outputs=tuple(TensorSpec(t["name"], t["dtype"], tuple(t["shape"])) for t in doc["outputs"]),
        profile=ShapeProfile(dims, doc["static"]),
        opset=18,
        exporter="test",
        check=Drift("pytorch-fp32", 0, {}, {}, True),
    )


def test_the_openvino_readme_snippet_runs_the_way_it_was_measured(
    vision_bundles: dict[str, Path], tmp_path: Path
) -> None:
    """fp32 was measured with INFERENCE_PRECISION_HINT=f32; a snippet without it would run bf16 where the CPU has it."""
    if "openvino-fp32" not in vision_bundles:
        pytest.skip(f"openvino is not available here: {backends.get('openvino').available().reason}")
    folder = copy(vision_bundles["openvino-fp32"], tmp_path / "openvino-fp32")
    readme = (folder / "README.md").read_text()
    assert '"INFERENCE_PRECISION_HINT": "f32"' in readme
    snippet = readme.split("```python\n", 1)[1].split("```", 1)[0]
    shutil.copy(
        Path(__file__).parents[1] / "calibration" / "vision" / "calibration" / "china.jpg", tmp_path / "cat.jpg"
    )
    snippet += 'print("HINT", compiled.get_property("INFERENCE_PRECISION_HINT"), len(outputs))\n'
    res = subprocess.run([sys.executable, "-c", snippet], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    hint = res.stdout.split("HINT", 1)[1]
    assert "float32" in hint or "f32" in hint, res.stdout  # <Type: 'float32'>, not bf16
