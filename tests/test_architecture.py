"""The shape of the house, checked on the source (``ast``), so it stays the shape docs/DESIGN.md draws.

- No import circles among the modules of ``d2v_export`` (module-level and function-level imports,
  relative ones resolved): shared helpers live below the rooms that share them.
- No function longer than ``MAX_LINES`` (methods included): units a reader takes in at once. A class is a
  container of such units; it is held to ``MAX_CLASS_LINES`` (a backend with a dozen short methods is fine).
- No module imports another room's private names (``from .calibration.text import _record``): what two rooms
  share is public, named for what it does.
- Prediction is driven by the heads table: every head names a result ``d2v-export run`` knows.
"""

from __future__ import annotations

import ast
from pathlib import Path

from d2v_export.heads import HEADS
from d2v_export.deploy.predict import RESULTS

PACKAGE = Path(__file__).resolve().parents[1] / "d2v_export"
MAX_LINES = 80
MAX_CLASS_LINES = 200


def _modules() -> dict[str, tuple[Path, bool]]:
    """Dotted module name -> (file, is a package __init__)."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        if is_package:
            parts = parts[:-1]
        out[".".join(parts)] = (path, is_package)
    return out


def import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports anywhere in its body (``module_deps``)."""
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, (path, is_package) in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        graph[name] = module_deps(tree, name, is_package, set(modules)) - {name}
    return graph


def module_deps(tree: ast.AST, name: str, is_package: bool, modules: set[str]) -> set[str]:
    """The package modules ``tree`` (module ``name``) imports: statements at any depth, and dynamic loading.

    ``from . import x`` depends on the submodule x; ``from .pkg import name`` on pkg. A submodule's
    implicit import of its own parent package is not an edge (every package would be a circle).
    ``importlib.import_module("d2v_export.x")`` with a literal (``".x"`` with a literal package, or with
    ``__package__``/``__name__``) is an edge like ``import d2v_export.x``.
    """
    here = name.split(".") if is_package else name.split(".")[:-1]
    deps: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            deps |= {a.name for a in node.names if a.name in modules}
        elif isinstance(node, ast.ImportFrom):
            source = _resolve("." * node.level + (node.module or ""), here) if node.level else (node.module or "")
            for alias in node.names:
                if f"{source}.{alias.name}" in modules:
                    deps.add(f"{source}.{alias.name}")
                elif source in modules:
                    deps.add(source)
        else:
            loaded = _dynamic_import(node, name, here)
            if loaded in modules:
                deps.add(loaded)
    return deps


def _resolve(relative: str, here: list[str]) -> str:
    """``..x.y`` seen from the package ``here`` (a list of its parts) as an absolute dotted name."""
    level = len(relative) - len(relative.lstrip("."))
    base = here[: len(here) - (level - 1)]
    rest = relative[level:]
    return ".".join(base + ([rest] if rest else []))


def _dynamic_import(node: ast.AST, name: str, here: list[str]) -> str:
    """The module ``importlib.import_module(...)`` loads when its name is a literal; else ""."""
    if not isinstance(node, ast.Call) or not node.args:
        return ""
    func = node.func
    if (func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")) != "import_module":
        return ""
    first = node.args[0]
    if not (isinstance(first, ast.Constant) and isinstance(first.value, str)):
        return ""
    if not first.value.startswith("."):
        return first.value
    package = node.args[1] if len(node.args) > 1 else None
    if isinstance(package, ast.Constant) and isinstance(package.value, str):
        return _resolve(first.value, package.value.split("."))
    if isinstance(package, ast.Name) and package.id in ("__package__", "__name__"):
        return _resolve(first.value, here if package.id == "__package__" else name.split("."))
    return ""


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state:
            found = visit(start)
            if found:
                return found
    return None


def test_the_cycle_finder_finds_a_circle_and_accepts_a_tree() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_the_import_graph_sees_function_level_and_relative_imports() -> None:
    graph = import_graph()
    assert "d2v_export.pipeline" in graph["d2v_export.cli"]  # imported inside a function, relatively
    assert "d2v_export.backends.torch_ref" in graph["d2v_export.convert.validate"]  # from ..backends.torch_ref import
    assert "d2v_export.measure.metrics" in graph["d2v_export.int8.pick"]  # from another stage's folder
    assert "d2v_export.spec" in graph["d2v_export.calibration.hf"]  # from ..spec import ...


def test_the_import_graph_counts_dynamic_imports_with_a_literal() -> None:
    code = ast.parse(
        "import importlib\n"
        "def f(m):\n"
        "    importlib.import_module('d2v_export.spec')\n"
        "    importlib.import_module('.backends.onnxruntime', __package__)\n"
        "    importlib.import_module('.hf', 'd2v_export.calibration')\n"
        "    importlib.import_module(f'd2v_export.{m}')\n"  # not a literal: what it loads is not known here
    )
    modules = set(_modules())
    assert module_deps(code, "d2v_export.pipeline", False, modules) == {
        "d2v_export.spec",
        "d2v_export.backends.onnxruntime",
        "d2v_export.calibration.hf",
    }


def test_no_import_circles() -> None:
    cycle = find_cycle(import_graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle or [])


def private_imports() -> list[str]:
    """ "importer: module._name" for every private name a module imports from another folder, or from another room of
    the top level. What two rooms share is public, named for what it does; a subpackage (``backends/tensorrt/``)
    may share its privates among its own modules."""
    modules = _modules()
    found = []
    for name, (path, is_package) in modules.items():
        here = name.split(".") if is_package else name.split(".")[:-1]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if not isinstance(node, ast.ImportFrom) or not (node.level or (node.module or "").startswith(PACKAGE.name)):
                continue
            source = _resolve("." * node.level + (node.module or ""), here) if node.level else (node.module or "")
            folder = source if source in modules and modules[source][1] else source.rpartition(".")[0]
            same_folder = folder == ".".join(here) and folder != PACKAGE.name
            for alias in node.names:
                if alias.name.startswith("_") and not alias.name.startswith("__") and not same_folder:
                    found.append(f"{name}: {source}.{alias.name}")
    return found


def test_no_module_imports_another_rooms_private_names() -> None:
    found = private_imports()
    assert not found, "private names imported across rooms (make them public, named for what they do): " + ", ".join(
        found
    )


def long_units() -> list[tuple[str, int]]:
    """("file.py:name", lines) for every function over MAX_LINES and every class over MAX_CLASS_LINES (any depth)."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                lines = (node.end_lineno or node.lineno) - node.lineno + 1
                if lines > (MAX_CLASS_LINES if isinstance(node, ast.ClassDef) else MAX_LINES):
                    found.append((f"{path.relative_to(PACKAGE).as_posix()}:{node.name}", lines))
    return found


def test_no_function_is_over_80_lines_and_no_class_over_200() -> None:
    too_long = [f"{name} ({lines} lines)" for name, lines in long_units()]
    assert not too_long, f"over {MAX_LINES} lines (a function) or {MAX_CLASS_LINES} (a class): " + ", ".join(too_long)


def test_every_head_names_a_prediction_result() -> None:
    """`d2v-export run` reads a head's outputs the way its ``result`` in the heads table says (predict.RESULTS)."""
    missing = [h.key for h in HEADS if h.result not in RESULTS]
    assert not missing, f"heads without a predict.RESULTS entry: {missing}"
    assert {h.result for h in HEADS} == set(RESULTS), "a predict.RESULTS entry no head uses"
