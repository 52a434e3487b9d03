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

from d2v_export.deploy import bundle as bundle_mod
from d2v_export.backends.tensorrt import device as trt_device
from d2v_export.backends.tensorrt import DEVICE_SCRIPT, RECIPE_FILE, SCRIPT_FILE, build_engine, fp16_remainder
from d2v_export.spec import D2VError, ExitCode

from .conftest import cli

ROOT = Path(__file__).resolve().parents[1]
GPU = trt_device.probe()
no_gpu = pytest.mark.skipif(GPU.ok, reason="TensorRT and a GPU are here: the engine would be built")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The deferred fp16 and INT8 bundles exactly as a user makes them: the CLI on the tiny vision preset."""
    out = tmp_path_factory.mktemp("trt-cli") / "vision"
    result = cli(
        "vision",
        "--model",
        "preset:tiny",
        "--target",
        "tensorrt",
        "--fp16",
        "--int8",
        "--defer-build",
        "--output",
        str(out),
        "--threads",
        "1",
    )
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
    # scales typed like the remainder
    assert qdq and all(inits[n.input[1]].data_type == TensorProto.FLOAT16 for n in qdq)
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
    # LayerNorm runs in fp32 between casts (Softmax reads and writes fp16: tests/test_trt_graph.py)
    from d2v_export.backends.tensorrt.graph import INT8_FP32_OPS

    for node in (n for n in g.node if n.op_type in INT8_FP32_OPS):
        data = producers[node.input[0]]
        assert data.op_type == "Cast" and data.attribute[0].i == TensorProto.FLOAT, node.name
    # ONNX Runtime loads it and it is a graph TensorRT accepts
    from d2v_export.backends.tensorrt import qdq_problems

    assert not qdq_problems(folder / "model.onnx")

    script = (folder / SCRIPT_FILE).read_text()
    assert "--stronglyTyped" in script and "--fp16" not in script and "--int8" not in script
    recipe = json.loads((folder / RECIPE_FILE).read_text())
    assert (
        recipe["strongly_typed"] is True
        and recipe["builder_flags"] == []
        and recipe["tensorrt"]["min_version"] == "10.0"
    )
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
    metrics, budget = variant["drift"]["metrics"], variant["drift"]["budget"]
    assert variant["drift"]["passed"] is True and set(budget) == {"top1_agreement", "logit_cosine"}
    assert all(metrics[name] >= limit for name, limit in budget.items()), (metrics, budget)
    # the fp16 bundle's graph was checked against PyTorch on ONNX Runtime with the half-precision tolerance
    half = next(v for v in report["variants"] if v["target"] == "tensorrt" and v["precision"] == "fp16")
    assert half["drift"]["passed"] is True and 0 < half["drift"]["metrics"]["max_scaled_error"], half["drift"]
    notes = " ".join(variant.get("notes", []))
    assert "fp16 remainder" in notes and "graph optimisations off" in notes and "not engine accuracy" in notes
    assert "fp16 remainder" in (run_dir / "report.md").read_text()


def test_fp16_remainder_is_idempotent_and_keeps_outputs_close(run_dir: Path, tmp_path: Path) -> None:
    """On the fp32 export: the rewrite alone moves the logits by fp16 rounding only."""
    import onnxruntime as ort

    folder = next(
        p for p in run_dir.iterdir() if p.name.startswith("tensorrt-fp32") or p.name.startswith("onnxruntime-fp32")
    )
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
    site = Path(
        subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
    )
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
    probe = _run(
        python,
        "-c",
        "import importlib.util as u; print([u.find_spec(m) is None for m in ('torch', 'transformers', 'onnx', 'd2v_export')])",
        cwd=tmp_path,
    )
    assert probe.stdout.strip() == "[True, True, True, True]", probe.stdout + probe.stderr
    script = int8_bundle / DEVICE_SCRIPT

    built = _run(python, str(script), "build", cwd=tmp_path)  # verifies the manifest, reads the recipe, then the gate
    assert built.returncode == int(ExitCode.TARGET_UNAVAILABLE), built.stderr
    err = built.stderr.strip()
    assert err.count("\n") == 0 and err.startswith("error: ") and "Traceback" not in err
    assert "TensorRT is not installed" in err and "d2v-export[tensorrt]" in err and "build_engine.sh" in err, err

    np.savez(tmp_path / "inputs.npz", pixel_values=np.zeros((1, 3, 32, 32), np.float32))
    ran = _run(python, str(script), "run", str(tmp_path / "inputs.npz"), cwd=tmp_path)
    assert (
        ran.returncode == int(ExitCode.TARGET_UNAVAILABLE)
        and "TensorRT" in ran.stderr
        and "Traceback" not in ran.stderr
    ), ran.stderr

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
    cases = (
        (
            "8.6.2",
            "TensorRT 8.6.2 is older than 10.0, which this bundle needs; JetPack 6.0 ships TensorRT 8.6: upgrade to JetPack 6.1 or 6.2",
        ),
        ("10.3.0", "cuda-python is not installed"),
    )
    for version, expect in cases:
        (fake / "tensorrt" / "__init__.py").write_text(f"__version__ = {version!r}\nclass Builder: ...\n")
        res = _run(python, "-c", runner, cwd=tmp_path, D2V_CUDART="/nonexistent/libcudart.so")
        assert res.returncode == int(ExitCode.TARGET_UNAVAILABLE), res.stderr
        assert expect in res.stderr and "Traceback" not in res.stderr and res.stderr.strip().count("\n") == 0, (
            res.stderr
        )
    assert "pip install 'd2v-export[tensorrt]'" in res.stderr or "JetPack" in res.stderr, res.stderr


FAKES = Path(__file__).resolve().parent / "fake_trt"


def _device_runner(script: Path, fakes: Path, *args: str) -> str:
    """Python code running ``trt_device.py ARGS`` with the stand-ins of ``fakes`` first on the path, then printing
    the stand-in cuda-python's calls (or the live events of the libcudart stand-in) as the last stderr line."""
    return textwrap.dedent(f"""
        import ctypes, json, os, runpy, sys
        sys.path.insert(0, {str(fakes)!r})
        sys.argv = [{str(script)!r}, *{list(args)!r}]
        try:
            runpy.run_path({str(script)!r}, run_name="__main__")
            status = 0
        except SystemExit as exc:
            status = exc.code
        try:
            from cuda.bindings import runtime
            print(json.dumps([c[0] for c in runtime.CALLS]), file=sys.stderr)
        except ImportError:
            print(json.dumps(ctypes.CDLL(os.environ["D2V_CUDART"]).fake_live_events()), file=sys.stderr)
        sys.exit(status)
    """)


@no_gpu
@pytest.mark.parametrize("version", ["10.3.0", "11.4.0"])
def test_device_half_builds_and_runs_end_to_end_on_stand_ins(version: str, int8_bundle: Path, tmp_path: Path) -> None:
    """The whole device path in the clean venv, with stand-ins for TensorRT (JetPack 6.1's 10.3 with weak typing
    still there; 11.4 without it) and cuda-python (tests/fake_trt): manifest check, confined recipe paths, build
    (strongly typed, no precision flag, TF32 cleared), atomic plan / cache / engine manifest, manifest relisted,
    benchmark in rounds between one event pair (destroyed after), pinned host buffers, run on an .npz, device
    selection, CUDA out of memory as exit 6. The toy engine sums the image over its last axis."""
    python = _clean_venv(tmp_path / "venv")
    script = int8_bundle / DEVICE_SCRIPT

    def device(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
        return _run(python, "-c", _device_runner(script, FAKES, *args), cwd=tmp_path, FAKE_TRT_VERSION=version, **env)

    built = device("build", "--iterations", "40")
    assert built.returncode == 0, built.stderr
    assert f"TensorRT {version}: not verified on this version" in built.stderr
    calls = json.loads(built.stderr.strip().splitlines()[-1])
    assert calls.count("cudaEventRecord") == 2 * 4  # 40 runs: 4 rounds of 10, one event pair per round
    assert calls.count("cudaEventDestroy") == 2  # the timing call's own pair, destroyed after it
    assert "cudaMallocHost" in calls and "pageable copy" not in calls
    plan = (int8_bundle / "model.plan").read_bytes()
    doc = json.loads(plan[len(b"FAKEPLAN") :])
    assert doc["strongly_typed"] is True and doc["flags"] == [] and doc["cleared"] == [7] and doc["version"] == version
    engine = json.loads((int8_bundle / "engine_manifest.json").read_text())
    assert engine["benchmark"]["runs"] == 40 and engine["benchmark"]["n"] == 4 and engine["device_index"] == 0
    assert engine["tensorrt"] == version and engine["verified_on_this_version"] is False
    assert engine["onnx_sha256"] == trt_device.sha256_file(int8_bundle / "model.onnx")
    assert (int8_bundle / "timing.cache").is_file()
    assert not [p.name for p in int8_bundle.iterdir() if p.name.startswith(".")]  # no temporary files left
    bundle_mod.verify(int8_bundle)  # the files build wrote were added to manifest.json

    _runs_the_stand_in_engine(device, tmp_path, seed=0)

    other = device("run", str(tmp_path / "inputs.npz"), "--device", "cuda:1")
    assert other.returncode == int(ExitCode.TARGET_UNAVAILABLE) and "cuda:1 does not exist" in other.stderr, (
        other.stderr
    )
    oom = device("run", str(tmp_path / "inputs.npz"), FAKE_CUDA_OOM="1")  # a CUDA error: the tool's exit code, one line
    error = [line for line in oom.stderr.splitlines() if line.startswith("error: ")]
    assert oom.returncode == int(ExitCode.TARGET_UNAVAILABLE) and "Traceback" not in oom.stderr, oom.stderr
    assert len(error) == 1 and "out of GPU memory" in error[0], oom.stderr

    # a timing cache TensorRT refuses: recorded, replaced, and its error never explains a later failure
    (int8_bundle / "timing.cache").write_bytes(b"bad")
    again = device("build", "--iterations", "10", "--no-verify")
    assert again.returncode == 0, again.stderr
    assert "another device" in json.loads((int8_bundle / "engine_manifest.json").read_text())["timing_cache_refused"]
    (int8_bundle / "timing.cache").write_bytes(b"bad")
    failed = device("build", "--no-verify", FAKE_TRT_FAIL_BUILD="1")
    error = [line for line in failed.stderr.splitlines() if line.startswith("error: ")]
    assert failed.returncode == int(ExitCode.BAD_INPUT) and len(error) == 1 and "another device" not in error[0], (
        failed.stderr
    )


@no_gpu
def test_device_half_reaches_cuda_through_libcudart_without_cuda_python(int8_bundle: Path, tmp_path: Path) -> None:
    """JetPack: no cuda-python; the CUDA runtime library TensorRT links is reached through ctypes (a C stand-in of
    libcudart, tests/fake_trt/libcudart.c, built here). Build, benchmark and run, with every event destroyed."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        pytest.skip("no C compiler to build the libcudart stand-in")
    lib = tmp_path / "libcudart.so"
    subprocess.run([compiler, "-shared", "-fPIC", "-o", str(lib), str(FAKES / "libcudart.c")], check=True, timeout=120)
    only_trt = tmp_path / "fakes"
    shutil.copytree(FAKES / "tensorrt", only_trt / "tensorrt")  # TensorRT's stand-in alone: no cuda-python
    python = _clean_venv(tmp_path / "venv")
    script = int8_bundle / DEVICE_SCRIPT

    def device(*args: str) -> subprocess.CompletedProcess[str]:
        return _run(python, "-c", _device_runner(script, only_trt, *args), cwd=tmp_path, D2V_CUDART=str(lib))

    built = device("build", "--iterations", "20")
    assert built.returncode == 0, built.stderr
    assert json.loads(built.stderr.strip().splitlines()[-1]) == 0  # no CUDA event left alive
    engine = json.loads((int8_bundle / "engine_manifest.json").read_text())
    assert (
        engine["cuda_via"] == "libcudart" and engine["compute_capability"] == "8.7" and engine["cuda_runtime"] == "12.6"
    )
    _runs_the_stand_in_engine(device, tmp_path, seed=1)


FAKE_TRTEXEC = FAKES / "bin" / "trtexec"


def _build_engine_sh(bundle: Path, version: str, tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    environ = dict(os.environ, TRTEXEC=str(FAKE_TRTEXEC), FAKE_TRT_VERSION=version, PYTHON=sys.executable, **env)
    return subprocess.run(
        ["bash", str(bundle / SCRIPT_FILE)], env=environ, capture_output=True, text=True, timeout=120, cwd=tmp_path
    )


@no_gpu
@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_build_engine_sh_leaves_a_bundle_that_verifies_and_runs(precision: str, run_dir: Path, tmp_path: Path) -> None:
    """The documented `bash build_engine.sh` under TensorRT 11's trtexec (stand-in: rejects --fp16/--int8/--best):
    it builds, records the plan, timing cache and layer info in manifest.json, and then `d2v-export run` and
    `trt_device.py run` accept the bundle (they used to exit 3: "holds 2 file(s) not in manifest.json")."""
    src = next(p for p in run_dir.iterdir() if p.name.startswith(f"tensorrt-{precision}"))
    bundle = tmp_path / src.name
    shutil.copytree(src, bundle)
    no_numpy = tmp_path / "no-numpy" / "numpy"  # `record` needs only the standard library
    no_numpy.mkdir(parents=True)
    (no_numpy / "__init__.py").write_text("raise ImportError('numpy hidden by the test')\n")
    done = _build_engine_sh(bundle, "11.4.0", tmp_path, PYTHONPATH=str(no_numpy.parent))
    assert done.returncode == 0, done.stdout + done.stderr
    listed = {e["path"] for e in json.loads((bundle / "manifest.json").read_text())["files"]}
    assert {"model.plan", "timing.cache", "layers.json", "engine_manifest.json"} <= listed
    bundle_mod.verify(bundle)
    trt_device.verify_files(bundle)
    image = ROOT / "calibration" / "vision" / "evaluation" / "chelsea.jpg"
    res = cli("run", str(bundle), str(image), "--json")
    assert res.returncode == 0, res.stderr[-2000:]
    assert any("TensorRT cannot run its engine here" in n for n in json.loads(res.stdout)[0]["notes"])
    python = _clean_venv(tmp_path / "venv")
    np.savez(tmp_path / "inputs.npz", pixel_values=np.ones((1, 3, 32, 32), np.float32))
    ran = _run(
        python, "-c", _device_runner(bundle / DEVICE_SCRIPT, FAKES, "run", str(tmp_path / "inputs.npz")), cwd=tmp_path
    )
    assert ran.returncode == 0, ran.stderr
    assert oct((bundle / "engine_manifest.json").stat().st_mode & 0o777) == oct(0o666 & ~_umask())


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@no_gpu
def test_build_engine_sh_refuses_tensorrt_8_in_one_line(int8_bundle: Path, tmp_path: Path) -> None:
    """JetPack 6.0's trtexec (TensorRT 8.6): refused before building, exit 6, one line, as trt_device.py does."""
    before = sorted(p.name for p in int8_bundle.iterdir())
    done = _build_engine_sh(int8_bundle, "8.6.2", tmp_path)
    assert done.returncode == int(ExitCode.TARGET_UNAVAILABLE), done.stdout + done.stderr
    assert (
        done.stderr.strip().count("\n") == 0
        and "TensorRT 8.6 is older than 10.0" in done.stderr
        and "JetPack 6.1" in done.stderr
    )
    assert sorted(p.name for p in int8_bundle.iterdir()) == before  # nothing written


def test_bundle_files_are_readable_by_others_as_the_umask_allows(tmp_path: Path) -> None:
    """atomic_write used mkstemp's 0600: a service user could not read a copied bundle. Now 0666 & ~umask."""
    old = os.umask(0o022)
    try:
        trt_device.atomic_write(tmp_path / "a", b"x")
        os.umask(0o027)
        trt_device.atomic_write(tmp_path / "b", b"x")
    finally:
        os.umask(old)
    assert (tmp_path / "a").stat().st_mode & 0o777 == 0o644 and (tmp_path / "b").stat().st_mode & 0o777 == 0o640


@pytest.mark.parametrize(
    ("l4t", "driver", "expect"),
    [
        ((36, 4), None, "JetPack's TensorRT 10.3"),
        ((36, 3), None, "upgrade to JetPack 6.1 or 6.2"),
        ((35, 5), None, "upgrade to JetPack 6.1 or 6.2"),
        (None, 470, "too old for CUDA 12"),
        (None, 550, "'d2v-export[tensorrt]'"),
        (None, 580, "[tensorrt-cu13] for TensorRT 11"),
    ],
)
def test_install_hint_names_what_this_machine_needs(
    l4t: tuple[int, int] | None, driver: int | None, expect: str
) -> None:
    hint = trt_device.install_hint(l4t, driver, detect=False)
    assert expect in hint and "\n" not in hint
    if l4t is None and driver and driver < 580:
        assert "tensorrt-cu13] (TensorRT 11, CUDA 13) needs an R580+ driver" in hint or "too old" in hint


def test_l4t_and_driver_are_read_from_their_files() -> None:
    assert trt_device.l4t_release("# R36 (release), REVISION: 4.3, GCID: 38968081, BOARD: generic, EABI: aarch64") == (
        36,
        4,
    )
    assert trt_device.l4t_release("") is None
    assert (
        trt_device.driver_major(
            "NVRM version: NVIDIA UNIX x86_64 Kernel Module  550.54.14  Thu Feb 22 01:44:30 UTC 2024"
        )
        == 550
    )
    assert (
        trt_device.driver_major("NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  580.65.06  Release Build")
        == 580
    )


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
    cmd = [
        sys.executable,
        "-m",
        "mypy",
        "--config-file",
        str(config),
        "--python-version",
        "3.10",
        "--cache-dir",
        str(tmp_path / "cache"),
        "--no-incremental",
    ]
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
    calls = {
        ast.unparse(n)
        for n in ast.walk(tree)
        if isinstance(n, ast.Call) and ast.unparse(n.func).startswith("atomic_write")
    }
    assert any("plan_path" in c for c in calls) and any("cache_path" in c for c in calls)
    onnx_file = tmp_path / "model.onnx"
    onnx_file.write_bytes(b"graph")
    trt_device.write_engine_manifest(tmp_path, {"tensorrt": "10.12"}, onnx_file)
    assert json.loads((tmp_path / "engine_manifest.json").read_text())["onnx_sha256"] == trt_device.sha256_file(
        onnx_file
    )
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_device_index_parses_cuda_n() -> None:
    assert (
        trt_device.device_index("cuda:1") == 1
        and trt_device.device_index(None) == 0
        and trt_device.device_index("CPU") == 0
    )
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
        assert any(
            n.startswith("the bundle has no TensorRT engine: ran its ONNX file 'model.onnx' with ONNX Runtime")
            for n in result["notes"]
        )
        assert result["labels"]


def _runs_the_stand_in_engine(device: Any, tmp_path: Path, seed: int) -> None:
    """``trt_device.py run`` on an image: the stand-in engine's logits are the image summed over its last axis."""
    image = np.random.default_rng(seed).standard_normal((1, 3, 32, 32)).astype(np.float32)
    np.savez(tmp_path / "inputs.npz", pixel_values=image)
    ran = device("run", str(tmp_path / "inputs.npz"), "--output", str(tmp_path / "out.npz"))
    assert ran.returncode == 0, ran.stderr
    with np.load(tmp_path / "out.npz") as out:
        np.testing.assert_allclose(out["logits"], image.sum(axis=-1), rtol=1e-6)
