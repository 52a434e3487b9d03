"""The backend is the only place that knows a target (issue 13, part 1).

- No module outside ``d2v_export/backends/`` holds target knowledge (``test_no_target_names_outside_backends``).
- Every backend conforms to the ``Backend`` protocol, checked by mypy (``test_backends_conform_to_the_protocol``).
- The registry's answers (availability, precisions, packages) come from the backends' declarations.
- A target added as one plug-in file works through the real ``d2v-export`` command: tests/test_plugins.py.
"""

from __future__ import annotations

import ast
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

from d2v_export import backends
from d2v_export.backends.base import Backend, BackendBase, Devices, files_in
from d2v_export.spec import D2VError, ExitCode, Precision

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "d2v_export"

# Imports of a target's module from outside backends/ that are allowed, and why. ONNX Runtime is also the
# tool's own fp32 checker (a core dependency): the export check, the clean-up check, the fusion benchmark
# and the profiler run graphs with its runner and session settings whatever the targets are.
ALLOWED_IMPORTS = {
    "validate.py": {"onnxruntime"},  # the export check (validate.check_export)
    "rewrite.py": {"onnxruntime"},
    "optimize.py": {"onnxruntime"},
    "opprofile.py": {"onnxruntime"},
    "cli.py": {"tensorrt"},  # `d2v-export build-engine`, the TensorRT target's own command
}
EXAMPLE_LINE = re.compile(r"^\s*(\$ )?(d2v-export|python3?) ")


def _docstrings(tree: ast.AST) -> set[int]:
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
                found.add(id(first.value))
    return found


def target_knowledge(path: Path, targets: tuple[str, ...]) -> list[str]:
    """Where a module outside backends/ names a target. What counts, and what does not:

    Forbidden: a target name (a ``--target`` value, as the registry lists it) inside any string constant
    of the code — a comparison (``target == "tensorrt"``), a default (``("onnxruntime",)``), a dict key, a
    variant folder (``"onnxruntime-fp32"``), an install hint (``d2v-export[openvino]``), a message naming
    which target builds what (``"add --target openvino"``). Also forbidden: importing a target's backend
    module (``from .backends.openvino import ...``), except the pairs in ALLOWED_IMPORTS.

    Not target knowledge: docstrings and comments (documentation); lines of help text that are example
    command lines (starting with ``d2v-export `` or ``python3 ``); a target name followed by ``.`` or a
    word character (a Python module path such as ``onnxruntime.quantization``, a key such as
    ``onnxruntime_providers``, a file name such as ``openvino_model.xml``); and imports of the runtime
    packages themselves (``import onnxruntime``): a module that runs ONNX Runtime uses a library, it does
    not decide anything about a target.
    """
    tree = ast.parse(path.read_text(encoding="utf-8"))
    docs = _docstrings(tree)
    name_re = re.compile(r"(?<![\w.])(" + "|".join(map(re.escape, targets)) + r")(?![\w.])")
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs:
            for line in node.value.splitlines():
                if not EXAMPLE_LINE.match(line) and name_re.search(line):
                    found.append(f"{path.name}:{node.lineno}: {line.strip()[:100]!r}")
        elif isinstance(node, ast.ImportFrom) and node.module:
            parts = node.module.split(".")
            if "backends" in parts and parts.index("backends") + 1 < len(parts):
                module = parts[parts.index("backends") + 1]
                if module in targets and module not in ALLOWED_IMPORTS.get(path.name, set()):
                    found.append(f"{path.name}:{node.lineno}: imports backends.{module}")
    return found


def outside_backends() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if (PACKAGE / "backends") not in p.parents)


def test_no_target_names_outside_backends() -> None:
    targets = backends.names()
    assert {"onnxruntime", "openvino", "tensorrt"} <= set(targets)
    found = [hit for path in outside_backends() for hit in target_knowledge(path, targets)]
    assert not found, "target knowledge outside d2v_export/backends/ (ask the backend instead):\n" + "\n".join(found)


def test_the_grep_finds_what_it_forbids(tmp_path: Path) -> None:
    """The rule is not vacuous: each forbidden form is found, each allowed form is not."""
    bad = tmp_path / "bad.py"
    bad.write_text(
        '"""Docstring naming tensorrt is fine."""\n'
        'from .backends.openvino import compile_config\n'
        'def f(t):\n'
        '    """tensorrt here too."""\n'
        '    if t == "tensorrt":\n'
        '        return ("onnxruntime",), "out/onnxruntime-fp32", "pip install d2v-export[openvino]"\n'
        '    HELP = """\\nExample:\\n  d2v-export vision --target tensorrt\\n"""\n'
        '    return "onnxruntime.quantization", "onnxruntime_providers", "openvino_model.xml", HELP\n'
    )
    hits = target_knowledge(bad, ("onnxruntime", "openvino", "tensorrt"))
    assert sorted(h.split(": ", 1)[1] for h in hits) == sorted([
        "imports backends.openvino", "'tensorrt'", "'onnxruntime'", "'out/onnxruntime-fp32'", "'pip install d2v-export[openvino]'",
    ]), hits  # fmt: skip


def test_every_backend_declares_what_the_tool_asks() -> None:
    for name in backends.names():
        backend = backends.get(name)
        assert isinstance(backend, Backend) and backend.name == name
        assert Precision.FP32 in backend.precisions  # every comparison starts from the target's fp32
        assert bool(backend.int8_recipes) == (Precision.INT8 in backend.precisions)
        assert set(backend.int8_recipes) <= {"static", "dynamic"}
        assert isinstance(backend.devices, Devices) and backend.devices.accepts(backend.devices.default)
        assert isinstance(backend.can_defer, bool) and set(backend.packages) and backend.install_hint
        avail = backend.available()
        assert avail.ok or avail.reason  # never "no" without why
    assert backends.get("tensorrt").can_defer and not backends.get("onnxruntime").can_defer
    assert Precision.BF16 not in backends.get("tensorrt").precisions  # the backend refuses it (issue 13)
    assert backends.building(Precision.BF16) == ("openvino",)


def test_registry_answers_availability_from_the_backend() -> None:
    trt = backends.get("tensorrt")
    assert backends.require("onnxruntime") is backends.get("onnxruntime")
    if not trt.available().ok:  # no TensorRT here: unavailable, unless the run defers the engine build
        with pytest.raises(D2VError) as info:
            backends.require("tensorrt")
        assert info.value.code == ExitCode.TARGET_UNAVAILABLE and "target 'tensorrt' is not available here" in str(info.value)
        assert backends.unavailable(trt) and backends.require("tensorrt", defer_build=True) is trt
    with pytest.raises(D2VError, match="unknown target 'nope'"):
        backends.get("nope")


def test_report_and_doctor_record_the_backends_packages() -> None:
    from d2v_export import doctor, report

    for pkg in backends.packages():
        assert pkg in doctor.packages()
    versions = report.environment(1)["versions"]
    assert versions.get("onnxruntime") and versions.get("torch")
    assert set(versions) <= {"python", "d2v-export", "torch", "transformers", "onnx", "numpy", *backends.packages()}


def test_a_backend_that_cannot_recover_says_so(tmp_path: Path) -> None:
    class Plain(BackendBase):
        name = "plain"

    with pytest.raises(D2VError) as info:
        Plain().recover(None, tmp_path, None, None)  # type: ignore[arg-type]
    assert info.value.code == ExitCode.TARGET_UNAVAILABLE and "--fallback auto is not supported by target 'plain'" in str(info.value)
    (tmp_path / "b").write_text("x")
    (tmp_path / "a").write_text("x")
    (tmp_path / "sub").mkdir()
    assert files_in(tmp_path) == (tmp_path / "a", tmp_path / "b")


def test_backends_conform_to_the_protocol(tmp_path: Path) -> None:
    """mypy checks every ``BACKEND: Backend = ...`` against the protocol (the TensorRT code's own strict check
    against tensorrt-stubs is in test_tensorrt.py)."""
    if importlib.util.find_spec("mypy") is None:
        pytest.skip("mypy is not installed (pip install 'd2v-export[test]')")
    for path in (PACKAGE / "backends").rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        if re.search(r"^BACKEND\b", text, re.MULTILINE):
            assert re.search(r"^BACKEND: Backend = ", text, re.MULTILINE), f"{path}: type BACKEND as the protocol"
    config = tmp_path / "mypy.ini"
    config.write_text(
        "[mypy]\npython_version = 3.11\nignore_missing_imports = True\nwarn_unused_ignores = False\n"
        "follow_imports = silent\n"  # the backends are checked; what they import is read for types only
        "[mypy-torch.*,transformers.*,onnx.*,onnxruntime.*,onnxscript.*,openvino.*,nncf.*,scipy.*,tensorrt.*,cuda.*]\nfollow_imports = skip\n"
    )
    cmd = [sys.executable, "-m", "mypy", "--config-file", str(config), "--cache-dir", str(tmp_path / "cache"), "-p", "d2v_export.backends"]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600, check=False)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]


@pytest.mark.parametrize("name", ["model.onnx", "plugin_model.onnx"])
def test_copy_onnx_keeps_external_data_loadable_under_any_name(name: str, tmp_path: Path) -> None:
    """A model over export.EXTERNAL_DATA_BYTES keeps its weights in ``model.onnx.data``; copied under another name
    the graph must name the renamed data file (it named the old one, so a plug-in with its own file name could not
    load a model over 1 GB). A small model forced to external data stands in for the large one."""
    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from d2v_export.backends.base import copy_onnx

    weight = np.arange(12, dtype=np.float32).reshape(3, 4)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        [numpy_helper.from_array(weight, "w")],
    )  # fmt: skip
    source = tmp_path / "export" / "model.onnx"
    source.parent.mkdir()
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx.save_model(model, str(source), save_as_external_data=True, all_tensors_to_one_file=True, location="model.onnx.data", size_threshold=0)
    assert (tmp_path / "export" / "model.onnx.data").is_file()
    target = tmp_path / "variant" / name
    target.parent.mkdir()
    copy_onnx(source, target)
    (tmp_path / "export" / "model.onnx.data").unlink()  # the copy must not read the export's data file
    assert sorted(p.name for p in target.parent.iterdir()) == sorted([name, name + ".data"])
    x = np.ones((1, 3), np.float32)
    (y,) = ort.InferenceSession(str(target), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    np.testing.assert_array_equal(y, x @ weight)


def test_a_target_brings_its_own_commands() -> None:
    """`build-engine` is TensorRT's command, registered through the registry (cli.py does not define it) and run
    with the CLI's error handling: a folder without a bundle is a one-line error with exit 3, not a traceback."""
    from click.testing import CliRunner

    from d2v_export.cli import main

    own = {c.name: (name, c) for name in backends.names() for c in backends.get(name).commands()}
    assert own["build-engine"][0] == "tensorrt" and main.commands["build-engine"] is own["build-engine"][1]
    assert "build-engine" not in (Path(__file__).parents[1] / "d2v_export" / "cli.py").read_text(encoding="utf-8")
    result = CliRunner().invoke(main, ["build-engine", str(Path(__file__).parent)])
    assert result.exit_code == 3 and result.output.count("\n") == 1 and "holds no TensorRT bundle" in result.output, result.output
