"""Shared fixtures: tiny presets of the real architectures, exported once per session.

Every report.json a test writes is validated against docs/report.schema.json (`check_report`): those the
library writes in this process (`report.write`, wrapped for the session) and those the installed command
writes (`cli`: the folders named by ``--output``, and ``--json`` on stdout).
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

import d2v_export.reports.report

from d2v_export.heads import HEADS, Head
from d2v_export.models import LoadedModel, load, parse_source
from d2v_export.pipeline import ShapeRequest, resolve_profile
from d2v_export.spec import ShapeProfile

# Small ranges so that every check runs in seconds; still several distinct shapes per axis.
TINY_SHAPES = ShapeRequest(batch=(1, 1, 4), sequence=(8, 16, 32), audio_seconds=(0.5, 1.0, 2.0))


def tiny(head: Head) -> tuple[LoadedModel, ShapeProfile]:
    model = load(parse_source("preset:tiny", head.modality, head.task))
    return model, resolve_profile(model, TINY_SHAPES)


@pytest.fixture(params=HEADS, ids=lambda h: h.key)
def any_head(request: pytest.FixtureRequest) -> Head:
    return request.param


def cli(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run the installed console script for real; every report.json it wrote is checked against the schema."""
    exe = shutil.which("d2v-export") or str(Path(sys.executable).parent / "d2v-export")
    full_env = dict(os.environ, HF_HUB_OFFLINE="1", **(env or {}))
    started = time.time() - 1.0  # mtimes can be coarser than the clock
    done = subprocess.run([exe, *args], capture_output=True, text=True, env=full_env, cwd=cwd, timeout=600)
    for path in _reports_written(args, cwd, started):
        check_report(json.loads(path.read_text(encoding="utf-8")), f"{path} (written by d2v-export {' '.join(args)})")
    if "--json" in args and done.stdout.lstrip().startswith("{"):
        doc = json.loads(done.stdout)
        if "variants" in doc and "kind" not in doc:  # a run's report (matrix --json prints matrix.json)
            check_report(doc, f"the stdout of d2v-export {' '.join(args)}")
    return done


# ------------------------------------------------------------------------ report.json against its schema

SCHEMA_PATH = Path(__file__).resolve().parents[1] / "docs" / "report.schema.json"


@functools.cache
def _validator() -> Any:
    import jsonschema

    schema = json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def report_errors(doc: Any) -> list[str]:
    """Where ``doc`` breaks docs/report.schema.json: one line per error, with the field's path."""
    errors = sorted(_validator().iter_errors(doc), key=lambda e: list(map(str, e.absolute_path)))
    return [f"{'.'.join(map(str, e.absolute_path)) or '(top level)'}: {e.message[:300]}" for e in errors]


def check_report(doc: Any, where: str = "report.json") -> None:
    """Fail when ``doc`` does not match the schema, saying how to add a new field honestly."""
    errors = report_errors(doc)
    assert not errors, (
        f"{where} does not match docs/report.schema.json:\n  "
        + "\n  ".join(errors[:20])
        + "\nA new field goes into docs/report.schema.json and docs/report-schema.md together (see 'Adding a field' there)."
    )


def _reports_written(args: tuple[str, ...], cwd: Path | None, since: float) -> list[Path]:
    """report.json files under the run's --output folder (a matrix: one per cell) modified since ``since``."""
    found = []
    for flag, value in zip(args, args[1:]):
        if flag in ("--output", "-o"):
            out = Path(value) if Path(value).is_absolute() else Path(cwd or Path.cwd()) / value
            found += [
                p
                for p in (
                    [out / "report.json"] if (out / "report.json").is_file() else sorted(out.rglob("report.json"))
                )
                if p.stat().st_mtime >= since
            ]
    return found


@pytest.fixture(scope="session", autouse=True)
def _every_written_report_matches_the_schema() -> Iterator[None]:
    """Wrap the library's report writer for the session: each report.json written in-process is validated."""
    real = d2v_export.reports.report.write

    @functools.wraps(real)
    def write(report: Any, folder: Path) -> Any:
        paths = real(report, folder)
        check_report(json.loads(Path(paths[0]).read_text(encoding="utf-8")), f"{paths[0]}")
        return paths

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(d2v_export.reports.report, "write", write)
        yield
