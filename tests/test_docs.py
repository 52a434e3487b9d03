"""The docs' facts about the code are checked, so that they cannot go stale silently (issue 21, part 5).

Everything here is derived from the code: the modules of ``d2v_export``, the Click commands' options,
``spec.ExitCode``, the files of the repository. A new module, option or exit code needs its line in the
docs; a renamed or removed one must leave them.
"""

from __future__ import annotations

import ast
import importlib
import pkgutil
import re
from pathlib import Path

import click
import pytest

import d2v_export
from d2v_export.cli import main
from d2v_export.spec import ExitCode

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "d2v_export"
README = ROOT / "README.md"
DESIGN = ROOT / "docs" / "DESIGN.md"
# the documents whose facts these tests read (docs/tensorrt.md too: paths and options are facts wherever they stand)
DOCS = sorted([README, *(ROOT / "docs").glob("*.md")])
# options of other programs that the docs show beside d2v-export's (pip, pytest, the benchmark scripts, trtexec, ...)
OTHER_COMMANDS = re.compile(
    r"^\s*(\$ )?(\S*/)?(pip|python3?|pytest|bash|benchmark_app|trtexec|optimum-cli|\.venv\S*/(python|pytest|pip))\b"
)


def section(text: str, heading: str) -> str:
    """The body of the ``## heading`` section (up to the next heading of the same level)."""
    start = text.index(f"\n## {heading}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end > 0 else None]


# Folders DESIGN.md's rooms table names as a whole (they have their own docs); every other folder is a stage
# whose modules are each named (``convert/export.py``).
WHOLE_FOLDERS = {"backends", "calibration", "assets"}


def modules_of_the_package() -> set[str]:
    """As DESIGN.md names them: top-level modules (``spec.py``), every folder (``calibration/``), and each module of
    a stage folder (``int8/quantize.py``)."""
    files = {p.name for p in PACKAGE.glob("*.py") if p.name != "__init__.py"}
    folders = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file() or p.name == "assets"}
    staged = {
        f"{folder}/{p.name}"
        for folder in folders - WHOLE_FOLDERS
        for p in (PACKAGE / folder).glob("*.py")
        if p.name != "__init__.py"
    }
    return files | {f + "/" for f in folders} | staged


def rooms_table() -> set[str]:
    named: set[str] = set()
    for line in section(DESIGN.read_text(encoding="utf-8"), "Rooms").splitlines():
        if line.startswith("| `"):
            named |= set(re.findall(r"`([^`]+)`", line.split("|")[1]))
    return named


def test_the_rooms_table_names_every_module_and_only_modules() -> None:
    named, real = rooms_table(), modules_of_the_package()
    assert not real - named, f"modules missing from DESIGN.md's rooms table: {sorted(real - named)}"
    assert not named - real, f"DESIGN.md's rooms table names modules that do not exist: {sorted(named - real)}"


def test_every_stage_design_names_is_a_function_of_the_pipeline() -> None:
    """ "The stages of a run": each `_name` there is a function in pipeline.py, and `run` calls each of them."""
    from d2v_export import pipeline

    text = section(DESIGN.read_text(encoding="utf-8"), "The stages of a run")
    stages = set(re.findall(r"`(_?[a-z][a-z_]+)`", text)) & {n for n in dir(pipeline) if callable(getattr(pipeline, n))}
    named_as_stages = set(re.findall(r"^\d+\. `(\w+)`", text, re.M))
    assert named_as_stages and named_as_stages <= stages, named_as_stages - stages
    tree = ast.parse((PACKAGE / "pipeline.py").read_text(encoding="utf-8"))
    run = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "run")
    called = {c.func.id for c in ast.walk(run) if isinstance(c, ast.Call) and isinstance(c.func, ast.Name)}
    assert named_as_stages <= called, (
        f"DESIGN.md lists stages that pipeline.run does not call: {sorted(named_as_stages - called)}"
    )


def test_no_document_has_a_heading_twice() -> None:
    for doc in DOCS:
        headings = [
            line.strip() for line in doc.read_text(encoding="utf-8").splitlines() if re.match(r"^#{1,3} ", line)
        ]
        twice = sorted({h for h in headings if headings.count(h) > 1})
        assert not twice, f"{doc.relative_to(ROOT)} has these headings twice: {twice}"


def test_the_reference_runtime_design_names_is_the_registrys() -> None:
    """DESIGN.md's "Adding a target" names what the reference runtime offers the checks: the registry's own names."""
    from d2v_export import backends

    text = section(DESIGN.read_text(encoding="utf-8"), "Adding a target")
    paragraph = text[
        text.index("No module outside `backends/` imports a target's module") : text.index("What a backend declares")
    ]
    named = set(re.findall(r"`(?:backends\.)?(\w+)(?:\(|`)", paragraph)) - {"backends"}
    runtime = backends.ReferenceRuntime
    offered = set(backends.__all__) | set(runtime.__annotations__) | {m for m in dir(runtime) if not m.startswith("_")}
    assert {"reference", "REFERENCE", "ReferenceRuntime", "onnx_runner", "session_options", "open_session"} <= named
    assert named <= offered, named - offered
    assert isinstance(backends.reference(), backends.ReferenceRuntime)


# ------------------------------------------------------------------------------------ the CLI


def click_options() -> set[str]:
    """Every long option of every d2v-export command (and the group's own)."""
    found: set[str] = set()
    commands: list[click.Command] = [main, *main.commands.values()]  # type: ignore[attr-defined]
    for command in commands:
        for param in command.params:
            found |= {o for o in (*param.opts, *param.secondary_opts) if o.startswith("--")}
    return found | {"--help", "--version"}


def options_named(doc: Path) -> dict[str, int]:
    """``--option`` -> a line number: from prose, d2v-export command lines and code spans that are an option or a
    d2v-export command (not other programs' lines such as ``gpg --detach-sign`` or ``pip install --no-deps``)."""
    found: dict[str, int] = {}
    fence = False
    for number, line in enumerate(doc.read_text(encoding="utf-8").splitlines(), 1):
        fence ^= line.strip().startswith("```")
        if OTHER_COMMANDS.match(line) or (fence and not line.strip().startswith("d2v-export")):
            continue
        parts = line.split("`")
        spans = [p for i, p in enumerate(parts) if i % 2 == 0 or p.startswith(("--", "d2v-export"))]
        for option in re.findall(r"(?<![\w-])--[a-z][a-z0-9]*(?:-[a-z0-9]+)*", " ".join(spans)):
            found.setdefault(option, number)
    return found


@pytest.mark.parametrize(
    "doc",
    [
        README,
        ROOT / "docs" / "reports.md",
        ROOT / "docs" / "bundles.md",
        ROOT / "docs" / "calibration.md",
        ROOT / "docs" / "quantization.md",
        ROOT / "docs" / "deployment.md",
    ],
    ids=lambda p: p.name,
)
def test_every_option_the_docs_name_is_an_option_of_the_command(doc: Path) -> None:
    real = click_options()
    unknown = {o: n for o, n in options_named(doc).items() if o not in real}
    assert not unknown, f"{doc.name} names options that no d2v-export command has: " + ", ".join(
        f"{o} (line {n})" for o, n in unknown.items()
    )


def test_the_readme_lists_every_exit_code_and_only_those() -> None:
    text = README.read_text(encoding="utf-8")
    table = text[text.index("| code | meaning |") :].split("\n\n", 1)[0]
    listed = {int(m) for m in re.findall(r"^\| (\d+) \|", table, re.M)}
    assert listed == {int(c) for c in ExitCode}, (
        f"README's exit codes {sorted(listed)} vs spec.ExitCode {sorted(int(c) for c in ExitCode)}"
    )
    assert "128 + N" in table  # signals: spec.signal_exit_code's rule
    help_text = main.get_help(click.Context(main))
    for code in ExitCode:
        assert re.search(rf"\b{int(code)}\b", help_text), f"d2v-export --help does not list exit code {int(code)}"


# ------------------------------------------------------------------------------------ paths

# A repository path, in a code span: starts with a folder of the repository; or a Markdown link to a local file.
TOP = ("d2v_export/", "docs/", "tests/", "scripts/", "examples/", "benchmarks/", "calibration/", "targets/", ".ci/")
PATH = re.compile(r"^((?:" + "|".join(map(re.escape, TOP)) + r")[\w.*/-]*)$")
LINK = re.compile(r"\]\(([^)#:\s]+)(?:#[^)]*)?\)")


def paths_named(doc: Path) -> dict[str, int]:
    found: dict[str, int] = {}
    for number, line in enumerate(doc.read_text(encoding="utf-8").splitlines(), 1):
        for span in line.split("`")[1::2]:
            for word in span.split():
                if PATH.match(word.rstrip(".,;:)")):
                    found.setdefault(word.rstrip(".,;:)"), number)
        for link in LINK.findall(line):
            target = (doc.parent / link).resolve()
            found.setdefault(str(target.relative_to(ROOT)) if target.is_relative_to(ROOT) else str(target), number)
    return found


def _wheel_paths() -> set[str]:
    """Paths that exist in the wheel only (pyproject's force-include destinations, e.g. d2v_export/targets_data)."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    return set(project["tool"]["hatch"]["build"]["targets"]["wheel"].get("force-include", {}).values())


def _exists(path: str) -> bool:
    if "*" in path:
        return any(ROOT.glob(path))
    if (ROOT / path).exists() or (ROOT / "d2v_export" / path).exists() or path.rstrip("/") in _wheel_paths():
        return True
    # an output folder the repository ignores (.gitignore's `examples/out/`): made by running something
    ignored = [
        p.strip().lstrip("/")
        for p in (ROOT / ".gitignore").read_text(encoding="utf-8").splitlines()
        if p.strip().endswith("/")
    ]
    return any(path.startswith(folder) for folder in ignored if "*" not in folder)


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_repository_path_the_docs_name_exists(doc: Path) -> None:
    missing = {p: n for p, n in paths_named(doc).items() if not _exists(p)}
    assert not missing, f"{doc.name} names files that do not exist: " + ", ".join(
        f"{p} (line {n})" for p, n in missing.items()
    )


def test_the_path_check_finds_what_it_should(tmp_path: Path) -> None:
    """The path rule is not vacuous: a made-up path and a broken link are found, an output file is not."""
    doc = ROOT / "docs" / "DESIGN.md"
    fake = tmp_path / "x.md"
    fake.write_text("see `d2v_export/nope.py` and [x](nope.md), and `out/vision/report.json`\n")
    got = paths_named(fake)
    assert "d2v_export/nope.py" in got and str(tmp_path / "nope.md") in got and "out/vision/report.json" not in got
    assert not any(_exists(p) for p in got)
    assert paths_named(doc)  # DESIGN.md names real paths, and they are found


# ------------------------------------------------------------------------------------ names


def names_in_code_spans(doc: Path) -> list[tuple[int, str, str]]:
    """(line, owner, attribute) for each ``module.name`` or ``Class.name`` in a code span."""
    found = []
    for number, line in enumerate(doc.read_text(encoding="utf-8").splitlines(), 1):
        for span in line.split("`")[1::2]:
            for owner, attr in re.findall(
                r"(?:d2v_export\.)?\b((?:[a-z_]+\.)*[A-Za-z_][A-Za-z0-9_]*)\.([A-Za-z_]\w*)", span
            ):
                found.append((number, owner, attr))
    return found


def report_fields() -> dict[str, set[str]]:
    """report.json's top-level objects and their fields, from docs/report.schema.json."""
    import json

    schema = json.loads((ROOT / "docs" / "report.schema.json").read_text(encoding="utf-8"))
    out = {}
    for name, prop in schema["properties"].items():
        refs = [prop.get("$ref", "")] + [alt.get("$ref", "") for alt in prop.get("anyOf", [])]
        for ref in filter(None, refs):
            out[name] = set(schema["$defs"][ref.rsplit("/", 1)[1]].get("properties", {}))
    return out


def test_every_module_and_class_member_the_docs_name_exists() -> None:
    """`pipeline._plan`, `metrics.METRICS`, `Backend.int8_recipes`, ...: what the docs name in d2v_export is there."""
    import dataclasses
    import inspect

    modules = {n.split(".", 1)[1]: importlib.import_module(n) for n in module_names()}
    # a stage's module is named by its own name too (`validate.task_drift` is `convert.validate.task_drift`)
    staged = {n: m for n, m in modules.items() if n.count(".") == 1 and n.split(".")[0] not in WHOLE_FOLDERS}
    modules |= {n.split(".")[1]: m for n, m in staged.items()}
    classes: dict[str, list[type]] = {}
    for module in modules.values():
        for key, value in vars(module).items():
            if inspect.isclass(value) and value.__module__.startswith("d2v_export"):
                classes.setdefault(key, []).append(value)

    def has(owner: object, attr: str) -> bool:
        fields = {f.name for f in dataclasses.fields(owner)} if dataclasses.is_dataclass(owner) else set()
        return hasattr(owner, attr) or attr in fields or attr in getattr(owner, "__annotations__", {})

    missing, checked = [], 0
    for doc in DOCS:
        for number, owner, attr in names_in_code_spans(doc):
            if attr in ("py", "md", "html", "json", "yml", "sh", "txt", "npz", "onnx", "xml"):
                continue  # a file name
            if attr in report_fields().get(owner, ()):
                continue  # a report.json field (`bench.interleaved`): tests/test_report_schema.py checks those
            if owner in modules:
                checked += 1
                if not (has(modules[owner], attr) or f"{owner}.{attr}" in modules):
                    missing.append(f"{doc.name}:{number}: {owner}.{attr}")
            elif owner in classes:
                checked += 1
                if not any(has(c, attr) for c in classes[owner]):
                    missing.append(f"{doc.name}:{number}: {owner}.{attr}")
    assert checked > 50 and not missing, "the docs name what d2v_export does not have:\n" + "\n".join(missing)


# ------------------------------------------------------------------------------------ import *


def module_names() -> list[str]:
    return [info.name for info in pkgutil.walk_packages(d2v_export.__path__, "d2v_export.")]


def modules_with_all() -> list[str]:
    return [name for name in module_names() if hasattr(importlib.import_module(name), "__all__")]


@pytest.mark.parametrize("name", modules_with_all())
def test_import_star_works(name: str) -> None:
    namespace: dict[str, object] = {}
    exec(f"from {name} import *", namespace)  # noqa: S102 - what a user types
    module = importlib.import_module(name)
    assert set(module.__all__) <= set(namespace), f"{name}.__all__ names what it does not define"
