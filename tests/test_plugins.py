"""A target added as ONE file outside the package works through the real ``d2v-export`` command (issue 13).

The plug-in below runs the fp32 ONNX on ONNX Runtime with a different session setup (basic graph
optimisations, spinning left on, its own file name). It is written into a temporary folder, put on
PYTHONPATH and named in ``D2V_BACKENDS`` — nothing in d2v_export changes — and then serves build, drift,
latency, report, bundle, ``run`` and ``doctor``. A second test installs it the packaged way (an entry
point in the ``d2v_export.backends`` group) and checks that a broken plug-in is reported, not fatal.
"""

from __future__ import annotations

import json
import os
import textwrap
from pathlib import Path

import pytest

from .conftest import cli

PLUGIN = '''
"""A d2v-export target in one file: the fp32 ONNX on ONNX Runtime, basic optimisations, default session."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

import numpy as np

from d2v_export.backends.base import Availability, Backend, BackendBase, BuildRequest, RunnerBase, copy_onnx, files_in
from d2v_export.spec import Artifact, D2VError, ExitCode, ExportedGraph, Precision

MODEL_FILE = "graph.onnx"


class BasicRunner(RunnerBase):
    def __init__(self, path: Path, threads: int, name: str) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        self.name = name
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self.outputs = [o.name for o in self.session.get_outputs()]

    def infer(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = dict(zip(self.outputs, self.session.run(self.outputs, dict(feed))))
        # for the test: every call leaves a line (the shapes it ran), and its float outputs move by a known offset
        if os.environ.get("ORT_BASIC_LOG"):
            with open(os.environ["ORT_BASIC_LOG"], "a") as log:
                log.write(" ".join(f"{k}={'x'.join(map(str, v.shape))}" for k, v in sorted(feed.items())) + "\\n")
        offset = float(os.environ.get("ORT_BASIC_OFFSET", "0"))
        return {k: v + np.asarray(offset, v.dtype) if v.dtype.kind == "f" else v for k, v in out.items()}


class OrtBasic(BackendBase):
    name = "ort-basic"
    install_hint = "pip install onnxruntime"
    packages = ("onnxruntime",)
    precisions = (Precision.FP32,)

    def available(self) -> Availability:
        try:
            import onnxruntime as ort
        except ImportError as exc:
            return Availability(False, f"onnxruntime does not import ({exc}); {self.install_hint}")
        return Availability(True, version=ort.__version__, devices=("CPU",))

    def compile(self, graph: ExportedGraph, folder: Path, request: BuildRequest) -> Artifact:
        if request.precision is not Precision.FP32:
            raise D2VError(f"ort-basic builds fp32 only, not {request.precision.value}", ExitCode.TARGET_UNAVAILABLE)
        folder.mkdir(parents=True, exist_ok=True)
        copy_onnx(graph.path, folder / MODEL_FILE)
        return Artifact(self.name, request.precision, folder, folder / MODEL_FILE, files_in(folder),
                        notes=("plug-in: ONNX Runtime with basic graph optimisations",))

    def runner(self, artifact: Artifact, *, threads: int) -> BasicRunner:
        return BasicRunner(artifact.model_file, threads, f"{self.name}-{artifact.precision.value}")


BACKEND: Backend = OrtBasic()
'''


def plugin_env(folder: Path, **more: str) -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(folder), os.environ.get("PYTHONPATH", "")) if p)
    return {"PYTHONPATH": path, **more}


@pytest.fixture(scope="module")
def plugin_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("plugins")
    (folder / "d2v_ort_basic.py").write_text(PLUGIN)
    return folder


OFFSET = 3e-5  # what the plug-in's runner adds to every float output in the test: within the head's tolerance (1e-4)


def test_a_one_file_target_works_through_the_cli(plugin_dir: Path, tmp_path: Path) -> None:
    log = tmp_path / "ort-basic.log"
    env = plugin_env(plugin_dir, D2V_BACKENDS="d2v_ort_basic", ORT_BASIC_LOG=str(log), ORT_BASIC_OFFSET=str(OFFSET))
    out = tmp_path / "text"
    built = cli(
        "text",
        "--model",
        "preset:tiny",
        "--task",
        "text-classification",
        "--target",
        "ort-basic",
        "--output",
        str(out),
        "--threads",
        "1",
        "--bench-seconds",
        "0.5",
        env=env,
    )
    assert built.returncode == 0, built.stderr[-3000:]

    doc = json.loads((out / "report.json").read_text())
    variants = {v["name"]: v for v in doc["variants"]}
    assert set(variants) == {"ort-basic-fp32"}, variants.keys()
    v = variants["ort-basic-fp32"]
    assert v["target"] == "ort-basic" and v["drift"]["passed"] is True  # drift against PyTorch, judged
    # ... on the plug-in's own runner: it ran at every shape of the check (latency only times one), and the
    # drift is its own (the offset its runner adds), not the export's check on ONNX Runtime
    shapes = set(log.read_text().splitlines())
    # min, opt, odd, largest batch, longest
    assert len(shapes) >= 4 and any("input_ids=8x" in s for s in shapes), shapes
    error, export_error = v["drift"]["metrics"]["max_abs_error"], doc["export"]["check"]["metrics"]["max_abs_error"]
    assert OFFSET * 0.9 <= error <= OFFSET * 1.1 + export_error and export_error < OFFSET * 0.5, (error, export_error)
    assert v["drift"]["samples"] == doc["export"]["check"]["samples"]
    assert (
        v["latency_ms"]["p50"] > 0
        and v["latency_ms"]["n"] >= 10
        and len(v["latency_ms"]["samples"]) == v["latency_ms"]["n"]
    )  # timed beside the reference
    assert "plug-in: ONNX Runtime with basic graph optimisations" in v["notes"]
    assert "ort-basic-fp32" in (out / "report.md").read_text()

    bundle = out / "ort-basic-fp32"
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["target"] == "ort-basic" and manifest["model_file"] == "graph.onnx"
    assert manifest["runtime"]["name"] == "ort-basic" and manifest["runtime"]["version"]
    assert {f["path"] for f in manifest["files"]} >= {"graph.onnx", "config.json"}
    readme = (bundle / "README.md").read_text()
    assert 'ort.InferenceSession("ort-basic-fp32/graph.onnx"' in readme  # the backend's README snippet

    ran = cli("run", str(bundle), "A sentence to classify.", "--json", env=env)
    assert ran.returncode == 0, ran.stderr[-2000:]
    result = json.loads(ran.stdout)[0]
    assert result["runtime"].startswith("ort-basic ") and result["labels"]

    doctor = cli("doctor", "--json", env=env)
    assert doctor.returncode == 0, doctor.stderr[-2000:]
    row = next(t for t in json.loads(doctor.stdout)["targets"] if t["name"] == "ort-basic")
    assert row["available"] is True and row["precisions"] == ["fp32"]

    # what the plug-in does not build is refused with the target's own answer
    half = cli(
        "text", "--model", "preset:tiny", "--target", "ort-basic", "--bf16", "--output", str(tmp_path / "half"), env=env
    )
    assert (
        half.returncode == 6 and "no requested target builds bf16 (ort-basic); add --target openvino" in half.stderr
    ), half.stderr[-2000:]


def test_entry_point_plugins_and_broken_plugins(plugin_dir: Path, tmp_path: Path) -> None:
    site = tmp_path / "site"
    site.mkdir()
    (site / "d2v_ort_basic_ep.py").write_text(PLUGIN.replace('name = "ort-basic"', 'name = "ort-basic-ep"'))
    info = site / "d2v_ort_basic_ep-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: d2v-ort-basic-ep\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(
        textwrap.dedent("""\
        [d2v_export.backends]
        ort-basic-ep = d2v_ort_basic_ep:BACKEND
        """)
    )
    doctor = cli("doctor", "--json", env=plugin_env(site, D2V_BACKENDS="no_such_plugin_module"))
    assert doctor.returncode == 0, doctor.stderr[-2000:]
    rows = {t["name"]: t for t in json.loads(doctor.stdout)["targets"]}
    assert rows["ort-basic-ep"]["available"] is True
    broken = rows["no_such_plugin_module"]
    assert (
        broken["available"] is False
        and "does not load" in broken["reason"]
        and "ModuleNotFoundError" in broken["reason"]
    )
    text = cli("doctor", env=plugin_env(site, D2V_BACKENDS="no_such_plugin_module"))
    assert "[ok ] ort-basic-ep" in text.stdout and "[no ] no_such_plugin_module" in text.stdout
