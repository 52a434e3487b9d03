"""The backend is the only place that knows a target (issue 13, part 1).

- No module outside ``d2v_export/backends/`` holds target knowledge (``test_no_target_names_outside_backends``).
- Every backend conforms to the ``Backend`` protocol, checked by mypy (``test_backends_conform_to_the_protocol``).
- The registry's answers (availability, precisions, packages) come from the backends' declarations.
- A target added as one plug-in file works through the real ``d2v-export`` command: tests/test_plugins.py.
"""

from __future__ import annotations

import ast
import os
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

EXAMPLE_LINE = re.compile(r"^\s*(\$ )?(d2v-export|python3?) ")
COMMAND_DECORATORS = {"command", "group"}
# Products whose names hold a target's name but are not targets: the model server d2v-export deploy writes for.
PRODUCTS = re.compile(r"OpenVINO Model Server")  # @click.command(...), @main.command(...), @click.group(...)


def target_words() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(names, modules): every target's ``--target`` value and display name (``display_name``, where the backend
    declares one), and the module under ``backends/`` that holds each target."""
    names: list[str] = []
    modules: list[str] = []
    for name in backends.names():
        backend = backends.get(name)
        names += [name, getattr(backend, "display_name", "")]
        module = type(backend).__module__.split(".")
        if "backends" in module[:-1]:
            modules.append(module[module.index("backends") + 1])
    return tuple(dict.fromkeys(n for n in names if n)), tuple(dict.fromkeys(modules))


def _name_pattern(names: tuple[str, ...]) -> re.Pattern[str]:
    """A target's name in any case, its words joined by nothing, a space or a hyphen ("Onnx Runtime", "ONNX-Runtime",
    "onnxruntime"); not a module path (``onnxruntime.quantization``), a key or a file name (``openvino_model.xml``)."""
    spelled = ["[\\s-]?".join(map(re.escape, re.split(r"[\s-]+", n))) for n in sorted(names, key=len, reverse=True)]
    return re.compile(r"(?<![\w.])(" + "|".join(spelled) + r")(?!\w|\.\w)", re.IGNORECASE)


def _module_pattern(modules: tuple[str, ...]) -> re.Pattern[str]:
    """A backend module's path in a string: what ``importlib.import_module`` loads it by."""
    return re.compile(r"\bbackends[./](" + "|".join(map(re.escape, modules)) + r")\b", re.IGNORECASE)


def _is_command(node: ast.AST) -> bool:
    """A Click command or group: its docstring is its --help text."""
    for deco in getattr(node, "decorator_list", ()):
        func = deco.func if isinstance(deco, ast.Call) else deco
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
        if name in COMMAND_DECORATORS:
            return True
    return False


def _docstrings(tree: ast.AST) -> set[int]:
    """ids of the documentation strings (module, class, function), but not those of Click commands (help text)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            is_text = (
                isinstance(first, ast.Expr)
                and isinstance(first.value, ast.Constant)
                and isinstance(first.value.value, str)
            )
            if is_text and not _is_command(node):
                found.add(id(first.value))
    return found


def _imported(node: ast.AST) -> list[str]:
    """Dotted module paths an import statement loads (``from .backends import x`` loads ``backends.x``)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if isinstance(node, ast.ImportFrom):
        return [f"{node.module or ''}.{alias.name}" for alias in node.names]
    return []


def _dynamic_import(node: ast.AST) -> str:
    """The literal path of ``importlib.import_module("x", "pkg")``, package prefixed to a relative name; else ""."""
    if not isinstance(node, ast.Call):
        return ""
    func = node.func
    if (func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")) not in (
        "import_module",
        "__import__",
    ):
        return ""
    texts = [a.value for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str)]
    if len(texts) == 2 and texts[0].startswith("."):
        return texts[1] + texts[0]  # import_module(".openvino", "d2v_export.backends")
    return texts[0] if texts else ""


def target_knowledge(path: Path, names: tuple[str, ...], modules: tuple[str, ...]) -> list[str]:
    """Where a module outside backends/ names a target (``names``: --target values and display names, any case)
    or loads a target's module (``modules``: the backend modules' names). What counts, and what does not:

    Forbidden: a target name inside any string constant of the code, in any case and spelled with or without
    spaces ("ONNX Runtime", "onnx runtime", "OpenVINO") — a comparison (``target == "tensorrt"``), a default
    (``("onnxruntime",)``), a registry lookup (``backends.get("openvino")``), a dict key, a variant folder
    (``"onnxruntime-fp32"``), an install hint (``d2v-export[openvino]``), a message or help text naming which
    target builds what (``"add --target openvino"``, a Click ``help=`` string, a sentence ending in "TensorRT.").
    The docstring of a Click command is its ``--help`` text: it counts. Also forbidden: importing a target's
    backend module, statically (``from .backends.openvino import ...``, ``from .backends import openvino``) or
    through dynamic loading (a string ``backends.openvino``, as ``importlib.import_module`` takes it).

    Not target knowledge: other docstrings and comments (documentation); lines that are example command lines
    (starting with ``d2v-export `` or ``python3 ``); a target name followed by ``.`` and a word character or by a
    word character (a Python module path such as ``onnxruntime.quantization``, a key such as
    ``onnxruntime_providers``, a file name such as ``openvino_model.xml``); and imports of the runtime packages
    themselves (``import onnxruntime``): a module that runs a library does not decide anything about a target;
    the name of a product that is not a target (``PRODUCTS``: "OpenVINO Model Server", a server ``deploy`` writes for).
    """
    tree = ast.parse(path.read_text(encoding="utf-8"))
    docs = _docstrings(tree)
    name_re, module_re = _name_pattern(names), _module_pattern(modules)
    where = path.relative_to(PACKAGE).as_posix() if PACKAGE in path.parents else path.name
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs:
            for line in node.value.splitlines():
                line = PRODUCTS.sub("", line)
                if module_re.search(line) or (not EXAMPLE_LINE.match(line) and name_re.search(line)):
                    found.append(f"{where}:{node.lineno}: {line.strip()[:100]!r}")
        for module in [*_imported(node), _dynamic_import(node)]:
            hit = module_re.search(module)
            if hit:
                found.append(f"{where}:{node.lineno}: imports backends.{hit.group(1)}")
    return found


def outside_backends() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if (PACKAGE / "backends") not in p.parents)


def test_no_target_names_outside_backends() -> None:
    names, modules = target_words()
    assert {"onnxruntime", "openvino", "tensorrt", "ONNX Runtime", "OpenVINO", "TensorRT"} <= set(names)
    assert {"onnxruntime", "openvino", "tensorrt"} <= set(modules)
    found = [hit for path in outside_backends() for hit in target_knowledge(path, names, modules)]
    assert not found, (
        "target knowledge outside d2v_export/backends/ (ask the backend or the registry instead):\n" + "\n".join(found)
    )


PLANTED = '''"""Docstring naming tensorrt and ONNX Runtime is fine."""
import importlib
import onnxruntime as ort
from openvino import Core
from .backends.openvino import compile_config
from .backends import tensorrt
from . import backends
OPTION = click.option("--x", help="Runs on Onnx Runtime.")
SENTENCE = "Built for OpenVINO."
SERVER = "Written for OpenVINO Model Server."


@main.command("build")
def build():
    """Build the TensorRT engine."""


def f(t):
    """tensorrt here too, and openvino."""
    # a comment naming tensorrt is fine
    if t == "tensorrt":
        return ("onnxruntime",), "out/onnxruntime-fp32", "pip install d2v-export[openvino]", backends.get("ONNXRUNTIME")
    importlib.import_module("d2v_export.backends.openvino")
    importlib.import_module(".onnxruntime", "d2v_export.backends")
    HELP = """\\nExample:\\n  d2v-export vision --target tensorrt\\n"""
    return "onnxruntime.quantization", "onnxruntime_providers", "openvino_model.xml", "nncf.openvino", HELP
'''


def test_the_grep_finds_what_it_forbids(tmp_path: Path) -> None:
    """The rule is not vacuous: each forbidden form is found, each allowed form is not."""
    bad = tmp_path / "bad.py"
    bad.write_text(PLANTED)
    names = ("onnxruntime", "ONNX Runtime", "openvino", "OpenVINO", "tensorrt", "TensorRT")
    hits = target_knowledge(bad, names, ("onnxruntime", "openvino", "tensorrt"))
    assert sorted(h.split(": ", 1)[1] for h in hits) == sorted(
        [
            "imports backends.openvino",  # from .backends.openvino import ...
            "imports backends.tensorrt",  # from .backends import tensorrt
            "'Runs on Onnx Runtime.'",  # help text, mixed case, display name
            "'Built for OpenVINO.'",  # a sentence's last word
            "'Build the TensorRT engine.'",  # a Click command's docstring is its --help
            "'tensorrt'",
            "'onnxruntime'",
            "'out/onnxruntime-fp32'",
            "'pip install d2v-export[openvino]'",
            "'ONNXRUNTIME'",  # a registry lookup by name, any case
            "'d2v_export.backends.openvino'",  # dynamic loading: the module path ...
            "imports backends.openvino",  # ... and the import_module call
            "imports backends.onnxruntime",  # import_module(".onnxruntime", "d2v_export.backends")
        ]
    ), hits


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
        assert info.value.code == ExitCode.TARGET_UNAVAILABLE and "target 'tensorrt' is not available here" in str(
            info.value
        )
        assert backends.unavailable(trt) and backends.require("tensorrt", defer_build=True) is trt
    with pytest.raises(D2VError, match="unknown target 'nope'"):
        backends.get("nope")


def test_report_and_doctor_record_the_backends_packages() -> None:
    from d2v_export import doctor
    from d2v_export.reports import report

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
    assert (
        info.value.code == ExitCode.TARGET_UNAVAILABLE
        and "--fallback auto is not supported by target 'plain'" in str(info.value)
    )
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
    cmd = [
        sys.executable,
        "-m",
        "mypy",
        "--config-file",
        str(config),
        "--cache-dir",
        str(tmp_path / "cache"),
        "-p",
        "d2v_export.backends",
    ]
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
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        [numpy_helper.from_array(weight, "w")],
    )
    source = tmp_path / "export" / "model.onnx"
    source.parent.mkdir()
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx.save_model(
        model,
        str(source),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="model.onnx.data",
        size_threshold=0,
    )
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
    assert result.exit_code == 3 and result.output.count("\n") == 1 and "holds no TensorRT bundle" in result.output, (
        result.output
    )


# ---------------------------------------------------------------------------- no single-target field in a shared record

SHARED_RECORDS = ("spec.py", "options.py", "backends/base.py")  # the records every target and the pipeline pass around
NOT_TARGETS = {"base", "__init__", "torch_ref", "bundle_run"}  # modules of backends/ that are no target's


def _records(tree: ast.Module) -> dict[str, list[str]]:
    """The dataclasses of a module: class name -> its annotated fields."""
    found = {}
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and any("dataclass" in ast.unparse(d) for d in node.decorator_list):
            found[node.name] = [
                s.target.id for s in node.body if isinstance(s, ast.AnnAssign) and isinstance(s.target, ast.Name)
            ]
    return found


def _reads(tree: ast.Module, records: set[str]) -> list[tuple[str, frozenset[str] | None]]:
    """(attribute read, the records it is read from) for every ``x.attr`` load and ``getattr(x, "attr")``: the records
    named by ``x``'s annotation (a parameter of the enclosing function) or ``self``'s class, an empty set for another
    known type; None where the type is unknown (a chain ``a.b.attr``, an unannotated name)."""
    found: list[tuple[str, frozenset[str] | None]] = []

    def types(annotation: ast.AST | None) -> frozenset[str] | None:
        if annotation is None:
            return None
        named = set(re.findall(r"\w+", ast.unparse(annotation))) - {"None", "Optional"}
        if named & records:
            return frozenset(named & records)
        return None if named <= {"Any", "object"} else frozenset()

    def visit(node: ast.AST, scope: dict[str, frozenset[str] | None], owner: str) -> None:
        if isinstance(node, ast.ClassDef):
            owner, scope = node.name, {}
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            args = node.args
            scope = {**scope, **{a.arg: types(a.annotation) for a in [*args.posonlyargs, *args.args, *args.kwonlyargs]}}
            scope["self"] = frozenset()  # a class's own attributes (a record's methods, a backend's data)
        if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load):
            found.append((node.attr, scope.get(node.value.id) if isinstance(node.value, ast.Name) else None))
        elif isinstance(node, ast.Call) and getattr(node.func, "id", "") == "getattr" and len(node.args) >= 2:
            name = node.args[1]
            if isinstance(name, ast.Constant) and isinstance(name.value, str):
                found.append((name.value, None))
        for child in ast.iter_child_nodes(node):
            visit(child, scope, owner)

    visit(tree, {}, "")
    return found


def _group(path: Path, package: Path) -> str:
    """ "" for a module that is no target's; else the target's module or package under backends/."""
    parts = path.relative_to(package).with_suffix("").parts
    if parts[0] != "backends" or len(parts) < 2 or parts[1] in NOT_TARGETS:
        return ""
    return parts[1]


def one_target_fields(package: Path, records: tuple[str, ...] = SHARED_RECORDS) -> list[str]:
    """Fields of the shared records (dataclasses in ``records``) that only one target reads.

    A field is read where a module loads an attribute of its name (``x.field``, ``getattr(x, "field")``) from that
    record: ``x`` annotated with the record's class (a parameter), or of unknown type (a chain ``a.b.field``, an
    unannotated name); a read from another known type (``options: RunOptions`` for ``BuildRequest``'s field of the same name) or through
    ``self`` (the record's own methods) does not count. A field is shared when a module that is no target's reads it (the
    pipeline, the quantizer, the report, ``backends/base.py``'s default plan ...) or at least two targets do; read by
    nobody (written to report.json as a whole, say) is fine too. Read by exactly one target and by nothing else, it
    is that target's knob in everybody's record: it belongs in the target's own record (a subclass, a
    ``TargetOption``). Types are read from parameter annotations only, so a read of unknown type counts for every
    record with a field of that name: the check can miss a field (it caught ``BuildRequest.defer_build``, read by
    the pipeline only as ``options.defer_build`` of ``RunOptions``), it does not blame one wrongly.
    """
    modules = {p: ast.parse(p.read_text(encoding="utf-8")) for p in sorted(package.rglob("*.py"))}
    declared = {(package / f, cls): fields for f in records for cls, fields in _records(modules[package / f]).items()}
    names = {cls for _, cls in declared}
    reads = {p: _reads(tree, names) for p, tree in modules.items()}
    found = []
    for (path, cls), fields in declared.items():
        for name in fields:
            groups = set()
            for p, rs in reads.items():
                if any(a == name and (t is None or cls in t) for a, t in rs):
                    groups.add(_group(p, package))
            if len(groups) == 1 and "" not in groups:
                found.append(f"{path.relative_to(package).as_posix()}: {cls}.{name} is read by {groups.pop()} only")
    return sorted(found)


# Fields one target reads today that are part of the protocol any target may implement (each with the reason); an entry
# that is no longer found must go (``test_the_excused_fields_are_still_found``).
PROTOCOL_FIELDS = {
    "backends/base.py: PlanContext.defer_build": "--defer-build for every target that can defer (Backend.can_defer, "
    "resolve_device(defer_build=), backends.unavailable(defer_build=)): one target implements it today",
    "backends/base.py: Recovery.score": "accuracy control's validation function (NNCF's validation_fn) for a target whose "
    "quantizer reverts operations itself; one target has such a quantizer today",
    "backends/base.py: Recovery.max_drop": "accuracy control's allowed drop (NNCF's max_drop), with Recovery.score",
}


def test_no_single_target_field_in_a_shared_record() -> None:
    found = [f for f in one_target_fields(PACKAGE) if f.split(" is read by")[0] not in PROTOCOL_FIELDS]
    assert not found, (
        "a shared record carries one target's field (move it into the target's own record):\n" + "\n".join(found)
    )


def test_the_excused_fields_are_still_found() -> None:
    found = {f.split(" is read by")[0] for f in one_target_fields(PACKAGE)}
    assert set(PROTOCOL_FIELDS) <= found, (
        f"PROTOCOL_FIELDS excuses fields the check no longer finds: {set(PROTOCOL_FIELDS) - found}"
    )


def test_the_shared_record_check_finds_a_planted_field(tmp_path: Path) -> None:
    """The rule is not vacuous: a field read by one target only is named; one read by two targets, by the pipeline, or by
    nobody is not; a read inside the record's own class does not count."""
    package = tmp_path / "pkg"
    (package / "backends" / "beta").mkdir(parents=True)
    (package / "spec.py").write_text(
        "from dataclasses import dataclass\n\n\n@dataclass(frozen=True)\nclass Request:\n    common: int = 0\n    both: int = 0\n"
        "    only_alpha: int = 0\n    unread: int = 0\n    checked: int = 0\n\n    def __post_init__(self):\n        assert self.checked >= 0\n"
    )
    (package / "options.py").write_text(
        "from dataclasses import dataclass\n\n\n@dataclass(frozen=True)\nclass Options:\n    only_alpha: int = 0\n\n\n"
        "def run(o: Options, r):\n    return o.only_alpha, r.common  # a read from Options, not Request\n"
    )
    (package / "backends" / "base.py").write_text("def plan(r):\n    return r.common\n")
    (package / "backends" / "alpha.py").write_text(
        "def build(r):\n    return r.both + r.only_alpha + getattr(r, 'checked')\n"
    )
    (package / "backends" / "beta" / "build.py").write_text("def build(r):\n    return r.both, r.common\n")
    assert one_target_fields(package) == [
        "spec.py: Request.checked is read by alpha only",
        "spec.py: Request.only_alpha is read by alpha only",
    ]


# ---------------------------------------------------------------------------- a check is reused only for its own runner

DRIFTING = """
from d2v_export.backends.onnxruntime import OnnxRuntimeBackend, OrtRunner


class Drifting(OrtRunner):
    def infer(self, feed):
        return {k: v + 0.01 for k, v in super().infer(feed).items()}  # a deliberately different setup


class DriftingBackend(OnnxRuntimeBackend):
    name = "drifting"
    display_name = "Drifting"

    def runner(self, artifact, *, threads):
        return Drifting(artifact.model_file, threads, name="drifting")


BACKEND = DriftingBackend()
"""


def test_the_export_check_stands_only_for_its_own_runner_options_and_file(tmp_path: Path) -> None:
    """``check_key``: (runner, options, file). A hard link of the export on the reference's own session shares the
    export check's key; a copy of the file, other session options or another runner class (a subclass) do not."""
    from d2v_export.backends.onnxruntime import OnnxRuntimeBackend
    from d2v_export.spec import Artifact

    export = tmp_path / "export.onnx"
    export.write_bytes(b"not a graph: keys never open the file")
    (tmp_path / "linked").mkdir()
    (tmp_path / "linked" / "model.onnx").hardlink_to(export)
    (tmp_path / "copied").mkdir()
    (tmp_path / "copied" / "model.onnx").write_bytes(export.read_bytes())
    ort = backends.get(backends.REFERENCE)
    checked = backends.reference().onnx_runner_key(export)

    def key(backend: Backend, folder: str) -> object:
        return backend.check_key(
            Artifact(backend.name, Precision.FP32, tmp_path / folder, tmp_path / folder / "model.onnx", ())
        )

    assert key(ort, "linked") == checked
    assert key(ort, "copied") != checked  # the same bytes, another file
    assert backends.reference().onnx_runner_key(export, optimize=False) != checked  # other session options
    assert key(type("Sub", (OnnxRuntimeBackend,), {"name": "sub"})(), "linked") != checked  # another runner class
    # a plug-in: its own check
    assert BackendBase().check_key(Artifact("x", Precision.FP32, tmp_path, export, ())) is None


def test_a_target_running_the_export_file_differently_sees_its_own_drift(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A plug-in that serves the export's own file (a hard link) through a different runner is checked through that
    runner: its fp32 variant reports the drift it adds, while the reference target's reuses the export check."""
    from d2v_export.measure.bench import BenchSettings
    from d2v_export.models import parse_source
    from d2v_export.pipeline import RunOptions, ShapeRequest, run
    from d2v_export.spec import Modality

    (tmp_path / "drifting_plugin.py").write_text(DRIFTING)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv(backends.ENV, "drifting_plugin")
    backends._load.cache_clear()
    try:
        options = RunOptions(
            output=tmp_path / "out", targets=(backends.REFERENCE, "drifting"), bench=BenchSettings(seconds=0), threads=1
        )
        report = run(parse_source("preset:tiny", Modality.VISION, None), ShapeRequest(), options)
    finally:
        monkeypatch.delenv(backends.ENV)
        backends._load.cache_clear()
    drift = {v.artifact.split("/")[-1]: v.drift for v in report.variants}
    assert drift[f"{backends.REFERENCE}-fp32"] == report.export.check  # the same runner, options and file: reused
    out = tmp_path / "out"
    # one file
    assert os.path.samefile(out / "drifting-fp32" / "model.onnx", out / f"{backends.REFERENCE}-fp32" / "model.onnx")
    assert not drift["drifting-fp32"].passed and drift["drifting-fp32"].metrics["max_scaled_error"] > 1e-3
