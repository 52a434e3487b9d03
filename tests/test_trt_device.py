"""The TensorRT bundle on the device: fp16 remainder of the INT8 graph, the self-contained device module
(clean venv with only numpy and tensorrt-stubs, Python 3.10), recipe paths confined to the bundle, the
manifest checked before building, atomic writes.

Nothing here needs TensorRT or a GPU; the tests that would build an engine are in test_tensorrt.py (-m gpu).
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from d2v_export import bundle as bundle_mod
from d2v_export.backends.tensorrt import device as trt_device
from d2v_export.backends.tensorrt import DEVICE_SCRIPT, FP32_OPS, RECIPE_FILE, SCRIPT_FILE, build_engine, fp16_remainder
from d2v_export.spec import D2VError, ExitCode

from .conftest import cli

ROOT = Path(__file__).resolve().parents[1]
GPU = trt_device.probe()
no_gpu = pytest.mark.skipif(GPU.ok, reason="TensorRT and a GPU are here: the engine would be built")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The deferred INT8 bundle exactly as a user makes it: the CLI on the tiny vision preset."""
    out = tmp_path_factory.mktemp("trt-cli") / "vision"
    result = cli("vision", "--model", "preset:tiny", "--target", "tensorrt", "--int8", "--defer-build", "--output", str(out), "--threads", "1")
    assert result.returncode == 0, result.stderr[-3000:]
    return out


@pytest.fixture()
def int8_bundle(run_dir: Path, tmp_path: Path) -> Path:
    """A private copy of the INT8 bundle (tests tamper with it)."""
    src = next(p for p in run_dir.iterdir() if p.name.startswith("tensorrt-int8"))
    dst = tmp_path / src.name
    shutil.copytree(src, dst)
    return dst


def _onnx(path: Path) -> Any:
    import onnx

    return onnx.load(str(path))


# ------------------------------------------------------------------------------------ the INT8 graph


def test_int8_bundle_has_an_fp16_remainder_with_fp32_io_and_builds_strongly_typed(run_dir: Path) -> None:
    from onnx import TensorProto

    folder = next(p for p in run_dir.iterdir() if p.name.startswith("tensorrt-int8"))
    model = _onnx(folder / "model.onnx")
    g = model.graph
    assert {o.version for o in model.opset_import if o.domain in ("", "ai.onnx")} == {19}  # fp16 Q/DQ scales need 19
    assert all(v.type.tensor_type.elem_type == TensorProto.FLOAT for v in g.input if v.name == "pixel_values")
    assert all(v.type.tensor_type.elem_type == TensorProto.FLOAT for v in g.output)
    inits = {i.name: i for i in g.initializer}
    producers = {o: n for n in g.node for o in n.output}
    qdq = [n for n in g.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert qdq and all(inits[n.input[1]].data_type == TensorProto.FLOAT16 for n in qdq)  # scales typed like the remainder
    weights_dq = [n for n in qdq if n.op_type == "DequantizeLinear" and n.input[0] in inits]
    assert weights_dq and all(inits[n.input[0]].data_type == TensorProto.INT8 for n in weights_dq)
    # the float remainder is fp16: the only fp32 constants are the gamma/beta copies of the fp32 ops
    fp32_inits = [i.name for i in g.initializer if i.data_type == TensorProto.FLOAT]
    assert all(name.endswith("_fp32") for name in fp32_inits), fp32_inits
    # boundaries: the image is cast to fp16 once; every output is cast back to fp32
    casts_in = [n for n in g.node if n.op_type == "Cast" and n.input[0] == "pixel_values"]
    assert len(casts_in) == 1 and casts_in[0].attribute[0].i == TensorProto.FLOAT16
    for out in g.output:
        maker = producers[out.name]
        assert maker.op_type in ("Cast", "Identity"), (out.name, maker.op_type)
    # LayerNorm and Softmax run in fp32 between casts
    for node in (n for n in g.node if n.op_type in FP32_OPS):
        data = producers[node.input[0]]
        assert data.op_type == "Cast" and data.attribute[0].i == TensorProto.FLOAT, node.name
    # ONNX Runtime loads it and it is a graph TensorRT accepts
    from d2v_export.backends.tensorrt import qdq_problems

    assert not qdq_problems(folder / "model.onnx")

    script = (folder / SCRIPT_FILE).read_text()
    assert "--stronglyTyped" in script and "--fp16" not in script and "--int8" not in script
    recipe = json.loads((folder / RECIPE_FILE).read_text())
    assert recipe["strongly_typed"] is True and recipe["builder_flags"] == [] and recipe["tensorrt"]["min_version"] == "10.0"
    assert recipe["float_remainder"] and "fp16" in recipe["float_remainder"]
    assert (folder / DEVICE_SCRIPT).read_bytes() == Path(trt_device.__file__).read_bytes()
    # ModelOpt's GEMV rule, adopted: the classifier on the pooled vector (batch 1) has no Q/DQ and is listed
    dq_out = {n.output[0] for n in qdq if n.op_type == "DequantizeLinear"}
    classifier = [n for n in g.node if n.op_type == "Gemm"]
    assert classifier and all(not any(i in dq_out for i in n.input) for n in classifier)
    assert {n.name for n in classifier} <= set(recipe["quantization"]["excluded_nodes"])


def test_simulated_drift_of_the_fp16_remainder_is_in_the_report(run_dir: Path) -> None:
    report = json.loads((run_dir / "report.json").read_text())
    variant = next(v for v in report["variants"] if v["target"] == "tensorrt" and v["precision"] == "int8")
    assert variant["drift"]["metrics"]["top1_agreement"] >= 0.0
    notes = " ".join(variant.get("notes", []))
    assert "fp16 remainder" in notes and "graph optimisations off" in notes and "not engine accuracy" in notes
    assert "fp16 remainder" in (run_dir / "report.md").read_text()


def test_fp16_remainder_is_idempotent_and_keeps_outputs_close(run_dir: Path, tmp_path: Path) -> None:
    """On the fp32 export: the rewrite alone moves the logits by fp16 rounding only."""
    import onnxruntime as ort

    folder = next(p for p in run_dir.iterdir() if p.name.startswith("tensorrt-fp32") or p.name.startswith("onnxruntime-fp32"))
    src = folder / "model.onnx"
    half = tmp_path / "half.onnx"
    shutil.copy(src, half)
    first = fp16_remainder(half)
    assert first["initializers"] > 0 and first["fp32_nodes"] > 0
    assert fp16_remainder(half) == {"initializers": 0, "casts": 0, "fp32_nodes": 0}
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    feed = {"pixel_values": np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)}
    a = ort.InferenceSession(str(src), opts, providers=["CPUExecutionProvider"])
    shape = [d if isinstance(d, int) else 1 for d in a.get_inputs()[0].shape]
    feed = {"pixel_values": np.random.default_rng(0).standard_normal(shape).astype(np.float32)}
    b = ort.InferenceSession(str(half), opts, providers=["CPUExecutionProvider"])
    ra, rb = a.run(None, feed)[0], b.run(None, feed)[0]
    assert rb.dtype == np.float32 and np.max(np.abs(ra - rb)) <= 2e-2 * max(1.0, float(np.max(np.abs(ra))))


# ------------------------------------------------------------------------------------ device module, clean venv


def _clean_venv(root: Path) -> Path:
    """A venv with only numpy and tensorrt-stubs (symlinked from this environment): no torch, no transformers."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True, timeout=300)
    python = root / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())  # fmt: skip
    here = Path(sysconfig.get_paths()["purelib"])
    numpy_dir = Path(np.__file__).parent
    names = [numpy_dir.name, *(p.name for p in numpy_dir.parent.glob("numpy.libs"))]
    spec = importlib.util.find_spec("tensorrt")
    if spec is not None and spec.submodule_search_locations:
        stubs = Path(next(iter(spec.submodule_search_locations)))
        names += [stubs.name, *(p.name for p in stubs.parent.glob("tensorrt_bindings"))]
        here = stubs.parent
    for name in names:
        src = numpy_dir.parent / name if (numpy_dir.parent / name).exists() else here / name
        (site / name).symlink_to(src, target_is_directory=True)
    return python


def _run(python: Path, *args: str, cwd: Path, **extra_env: str) -> subprocess.CompletedProcess[str]:
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(cwd), **extra_env}
    return subprocess.run([str(python), "-I", *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=300)


@no_gpu
def test_device_half_runs_in_a_clean_venv_with_only_numpy_and_stubs(int8_bundle: Path, tmp_path: Path) -> None:
    python = _clean_venv(tmp_path / "venv")
    probe = _run(python, "-c", "import importlib.util as u; print([u.find_spec(m) is None for m in ('torch', 'transformers', 'onnx', 'd2v_export')])", cwd=tmp_path)
    assert probe.stdout.strip() == "[True, True, True, True]", probe.stdout + probe.stderr
    script = int8_bundle / DEVICE_SCRIPT

    built = _run(python, str(script), "build", cwd=tmp_path)  # verifies the manifest, reads the recipe, then the gate
    assert built.returncode == int(ExitCode.TARGET_UNAVAILABLE), built.stderr
    err = built.stderr.strip()
    assert err.count("\n") == 0 and err.startswith("error: ") and "Traceback" not in err
    assert "TensorRT is not installed" in err and "d2v-export[tensorrt]" in err and "build_engine.sh" in err, err

    np.savez(tmp_path / "inputs.npz", pixel_values=np.zeros((1, 3, 32, 32), np.float32))
    ran = _run(python, str(script), "run", str(tmp_path / "inputs.npz"), cwd=tmp_path)
    assert ran.returncode == int(ExitCode.TARGET_UNAVAILABLE) and "TensorRT" in ran.stderr and "Traceback" not in ran.stderr, ran.stderr

    # the manifest check really runs on the device side: a changed graph is refused before anything else
    with open(int8_bundle / "model.onnx", "ab") as fh:
        fh.write(b"\0")
    tampered = _run(python, str(script), "build", cwd=tmp_path)
    assert tampered.returncode == int(ExitCode.BAD_INPUT) and "sha256" in tampered.stderr, tampered.stderr


@no_gpu
def test_device_half_gates_on_the_tensorrt_version_and_names_cuda_python(int8_bundle: Path, tmp_path: Path) -> None:
    """A stand-in `tensorrt` module (JetPack 6.0's 8.6, then JetPack 6.1's 10.3) in the clean venv: 8.x refused in one
    line, 10.3 passes the gate and stops only for want of CUDA, naming what to install."""
    python = _clean_venv(tmp_path / "venv")
    fake = tmp_path / "fake"
    (fake / "tensorrt").mkdir(parents=True)
    script = int8_bundle / DEVICE_SCRIPT
    runner = textwrap.dedent(f"""
        import runpy, sys
        sys.path.insert(0, {str(fake)!r})
        sys.argv = [{str(script)!r}, "build"]
        runpy.run_path({str(script)!r}, run_name="__main__")
    """)
    cases = (("8.6.2", "TensorRT 8.6.2 is older than 10.0, which this bundle needs; JetPack 6.0 ships TensorRT 8.6: upgrade to JetPack 6.1 or 6.2"),
             ("10.3.0", "cuda-python is not installed"))  # fmt: skip
    for version, expect in cases:
        (fake / "tensorrt" / "__init__.py").write_text(f"__version__ = {version!r}\nclass Builder: ...\n")
        res = _run(python, "-c", runner, cwd=tmp_path, D2V_CUDART="/nonexistent/libcudart.so")
        assert res.returncode == int(ExitCode.TARGET_UNAVAILABLE), res.stderr
        assert expect in res.stderr and "Traceback" not in res.stderr and res.stderr.strip().count("\n") == 0, res.stderr
    assert "pip install 'd2v-export[tensorrt]'" in res.stderr or "JetPack" in res.stderr, res.stderr


FAKES = Path(__file__).resolve().parent / "fake_trt"


@no_gpu
def test_device_half_builds_and_runs_end_to_end_on_stand_ins(int8_bundle: Path, tmp_path: Path) -> None:
    """The whole device path in the clean venv, with stand-ins for TensorRT and cuda-python (tests/fake_trt):
    manifest check, confined recipe paths, build (strongly typed, TF32 cleared), atomic plan / cache /
    engine manifest, manifest relisted, benchmark in rounds between one event pair, pinned host buffers,
    run on an .npz, device selection. The toy engine sums the image over its last axis."""
    python = _clean_venv(tmp_path / "venv")
    script = int8_bundle / DEVICE_SCRIPT

    def device(*args: str) -> subprocess.CompletedProcess[str]:
        code = textwrap.dedent(f"""
            import json, runpy, sys
            sys.path.insert(0, {str(FAKES)!r})
            sys.argv = [{str(script)!r}, *{list(args)!r}]
            try:
                runpy.run_path({str(script)!r}, run_name="__main__")
                status = 0
            except SystemExit as exc:
                status = exc.code
            from cuda.bindings import runtime
            print(json.dumps([c[0] for c in runtime.CALLS]), file=sys.stderr)
            sys.exit(status)
        """)
        return _run(python, "-c", code, cwd=tmp_path)

    built = device("build", "--iterations", "40")
    assert built.returncode == 0, built.stderr
    calls = json.loads(built.stderr.strip().splitlines()[-1])
    assert calls.count("cudaEventRecord") == 2 * 4  # 40 runs: 4 rounds of 10, one event pair per round
    assert "cudaMallocHost" in calls and "pageable copy" not in calls
    plan = (int8_bundle / "model.plan").read_bytes()
    doc = json.loads(plan[len(b"FAKEPLAN"):])
    assert doc["strongly_typed"] is True and doc["cleared"] == [7]  # BuilderFlag.TF32 of the stand-in
    engine = json.loads((int8_bundle / "engine_manifest.json").read_text())
    assert engine["benchmark"]["runs"] == 40 and engine["benchmark"]["n"] == 4 and engine["device_index"] == 0
    assert engine["onnx_sha256"] == trt_device.sha256_file(int8_bundle / "model.onnx")
    assert (int8_bundle / "timing.cache").is_file()
    assert not [p.name for p in int8_bundle.iterdir() if p.name.startswith(".")]  # no temporary files left
    bundle_mod.verify(int8_bundle)  # the files build wrote were added to manifest.json

    image = np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)
    np.savez(tmp_path / "inputs.npz", pixel_values=image)
    ran = device("run", str(tmp_path / "inputs.npz"), "--output", str(tmp_path / "out.npz"))
    assert ran.returncode == 0, ran.stderr
    with np.load(tmp_path / "out.npz") as out:
        np.testing.assert_allclose(out["logits"], image.sum(axis=-1), rtol=1e-6)

    other = device("run", str(tmp_path / "inputs.npz"), "--device", "cuda:1")
    assert other.returncode == int(ExitCode.TARGET_UNAVAILABLE) and "cuda:1 does not exist" in other.stderr, other.stderr


def test_device_module_is_python_3_10(tmp_path: Path) -> None:
    """JetPack 6 ships Python 3.10: the device module parses as 3.10 and type-checks against 3.10's stdlib."""
    source = Path(trt_device.__file__).read_text()
    ast.parse(source, feature_version=(3, 10))
    if importlib.util.find_spec("mypy") is None:
        pytest.skip("mypy is not installed (pip install 'd2v-export[test]')")
    from .test_tensorrt import patched_stubs

    stubs = patched_stubs(tmp_path / "stubs")
    copy = tmp_path / "standalone" / DEVICE_SCRIPT  # as shipped: outside the package
    copy.parent.mkdir()
    copy.write_text(source)
    env = dict(os.environ, MYPYPATH=str(stubs)) if stubs else dict(os.environ)
    config = tmp_path / "mypy.ini"
    config.write_text(
        "[mypy]\nignore_missing_imports = True\nwarn_unused_ignores = False\ndisallow_untyped_defs = True\ncheck_untyped_defs = True\n"
        "[mypy-tensorrt.*,tensorrt_bindings.*]\nignore_errors = True\n[mypy-d2v_export.spec]\nignore_errors = True\n"
    )
    cmd = [sys.executable, "-m", "mypy", "--config-file", str(config), "--python-version", "3.10",
           "--cache-dir", str(tmp_path / "cache"), "--no-incremental"]  # fmt: skip
    for target in (str(ROOT / "d2v_export" / "backends" / "tensorrt" / "device.py"), str(copy)):
        res = subprocess.run([*cmd, target], capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-1000:]


# ------------------------------------------------------------------------------------ issue 12 part 3


BAD_PATHS = ["/etc/passwd", "../model.onnx", "a/../../x", "..", "C:/x", "a\\b", "", "a//b"]


@pytest.mark.parametrize("raw", BAD_PATHS)
def test_recipe_paths_use_the_manifest_rule(raw: str, tmp_path: Path) -> None:
    with pytest.raises(D2VError):
        trt_device.confined(tmp_path, raw, "onnx")
    with pytest.raises(D2VError):
        bundle_mod._safe_rel(tmp_path, raw)


@pytest.mark.parametrize("field", ["onnx", "engine", "timing_cache"])
@pytest.mark.parametrize("raw", ["/tmp/escape.plan", "../escape.plan"])
def test_build_engine_refuses_recipe_paths_outside_the_bundle(field: str, raw: str, int8_bundle: Path) -> None:
    recipe_path = int8_bundle / RECIPE_FILE
    recipe = json.loads(recipe_path.read_text())
    recipe[field] = raw
    recipe_path.write_text(json.dumps(recipe))
    with pytest.raises(D2VError, match="was changed"):  # verified first: the edited recipe no longer matches
        build_engine(int8_bundle)
    with pytest.raises(D2VError, match="outside the bundle|escapes the bundle|absolute") as err:
        build_engine(int8_bundle, verify=False)
    assert err.value.code == ExitCode.BAD_INPUT and field in str(err.value)
    assert not (int8_bundle.parent / "escape.plan").exists()


def test_build_engine_refuses_a_bundle_without_manifest_unless_told(int8_bundle: Path) -> None:
    (int8_bundle / "manifest.json").unlink()
    with pytest.raises(D2VError, match="--no-verify") as err:
        build_engine(int8_bundle)
    assert err.value.code == ExitCode.BAD_INPUT
    if not GPU.ok:
        with pytest.raises(D2VError) as unavailable:  # past the check: it fails only for want of TensorRT
            build_engine(int8_bundle, verify=False)
        assert unavailable.value.code == ExitCode.TARGET_UNAVAILABLE and "TensorRT" in str(unavailable.value)
        res = cli("build-engine", str(int8_bundle), "--no-verify")
        assert res.returncode == int(ExitCode.TARGET_UNAVAILABLE), res.stderr


@no_gpu
def test_build_engine_verifies_the_manifest_then_needs_the_device(int8_bundle: Path) -> None:
    res = cli("build-engine", str(int8_bundle))
    assert res.returncode == int(ExitCode.TARGET_UNAVAILABLE) and "TensorRT" in res.stderr, res.stderr
    (int8_bundle / "extra.bin").write_bytes(b"x")
    res = cli("build-engine", str(int8_bundle))
    assert res.returncode == int(ExitCode.BAD_INPUT) and "not in manifest.json" in res.stderr, res.stderr


def test_engine_files_are_written_atomically(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "model.plan"
    trt_device.atomic_write(target, b"old engine")

    def broken_replace(src: str, dst: str) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(trt_device.os, "replace", broken_replace)
    with pytest.raises(OSError):
        trt_device.atomic_write(target, b"new engine, half written")
    assert target.read_bytes() == b"old engine" and [p.name for p in tmp_path.iterdir()] == ["model.plan"]
    monkeypatch.undo()
    # every writer of build-engine goes through atomic_write: plan, timing cache, engine manifest, manifest.json
    source = Path(trt_device.__file__).read_text()
    tree = ast.parse(source)
    writes = [n for n in ast.walk(tree) if isinstance(n, ast.Attribute) and n.attr in ("write_bytes", "write_text")]
    assert not writes, "trt_device writes a file without atomic_write"
    calls = {ast.unparse(n) for n in ast.walk(tree) if isinstance(n, ast.Call) and ast.unparse(n.func).startswith("atomic_write")}
    assert any("plan_path" in c for c in calls) and any("cache_path" in c for c in calls)
    onnx_file = tmp_path / "model.onnx"
    onnx_file.write_bytes(b"graph")
    trt_device.write_engine_manifest(tmp_path, {"tensorrt": "10.12"}, onnx_file)
    assert json.loads((tmp_path / "engine_manifest.json").read_text())["onnx_sha256"] == trt_device.sha256_file(onnx_file)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_device_index_parses_cuda_n() -> None:
    assert trt_device.device_index("cuda:1") == 1 and trt_device.device_index(None) == 0 and trt_device.device_index("CPU") == 0
    with pytest.raises(D2VError, match="cuda:N"):
        trt_device.device_index("npu:0")


@no_gpu
def test_run_without_an_engine_uses_the_bundles_onnx_on_onnx_runtime(run_dir: Path) -> None:
    """`d2v-export run` on a deferred bundle: the TensorRT backend's open_bundle hands it to ONNX Runtime, and says so."""
    image = ROOT / "calibration" / "vision" / "evaluation" / "chelsea.jpg"
    for bundle in sorted(p for p in run_dir.iterdir() if p.name.startswith("tensorrt-")):
        res = cli("run", str(bundle), str(image), "--json")
        assert res.returncode == 0, res.stderr[-2000:]
        result = json.loads(res.stdout)[0]
        assert result["runtime"].startswith("onnxruntime ") and "model.onnx" in result["runtime"], result["runtime"]
        assert any(n.startswith("the bundle has no TensorRT engine: ran its ONNX file 'model.onnx' with ONNX Runtime") for n in result["notes"])
        assert result["labels"]
