"""report.json has a versioned, machine-checked schema (issue 21, part 3).

- docs/report.schema.json is a valid JSON Schema whose version is the one the code writes.
- docs/report-schema.md and the schema name the same fields, object by object.
- Every report a test writes is validated (tests/conftest.py); the hook is live and strict: a field that is
  not in the schema, or a missing one, fails.
- A 1.0 baseline still loads and compares with a 1.1 report (`compare.SUPPORTED_MAJOR`).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from d2v_export.reports import compare, report as report_mod
from d2v_export.measure.bench import BenchSettings
from d2v_export.models import parse_source
from d2v_export.pipeline import RunOptions, run
from d2v_export.spec import Modality, Report

from .conftest import SCHEMA_PATH, TINY_SHAPES, _reports_written, check_report, report_errors

DOC = SCHEMA_PATH.parent / "report-schema.md"
BENCH = BenchSettings(warmup=1, min_iterations=3, seconds=0.0, max_warmup=3)
HEADING = re.compile(r"^#{2,3} .*\(`(\w+)`\)\s*$")
ROW = re.compile(r"^\|\s*`([^`]+)`\s*\|")


def schema() -> dict[str, Any]:
    return json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))


def documented_objects(text: str) -> dict[str, list[str]]:
    """{object name: the fields its table lists}, from the sections whose heading ends with (`NAME`)."""
    objects: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        if line.startswith("#"):
            match = HEADING.match(line)
            current = match.group(1) if match else None
            if current is not None:
                assert current not in objects, f"docs/report-schema.md describes `{current}` twice"
                objects[current] = []
        elif current is not None and (row := ROW.match(line)):
            objects[current].append(row.group(1))
    return objects


def schema_objects(doc: dict[str, Any]) -> dict[str, list[str]]:
    found = {"report": list(doc["properties"])}
    found |= {name: list(d["properties"]) for name, d in doc["$defs"].items() if "properties" in d}
    return found


@pytest.fixture(scope="module")
def ran(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Report]:
    """A real run (tiny text classifier, ONNX Runtime fp32): its report.json was checked when written."""
    out = tmp_path_factory.mktemp("schema") / "out"
    spec = parse_source("preset:tiny", Modality.TEXT, "text-classification")
    return out, run(spec, TINY_SHAPES, RunOptions(output=out, bench=BENCH))


@pytest.fixture(scope="module")
def written(ran: tuple[Path, Report]) -> Path:
    return ran[0]


def test_the_schema_is_valid_and_has_the_version_the_code_writes() -> None:
    doc = schema()
    jsonschema.Draft202012Validator.check_schema(doc)
    assert doc["properties"]["schema_version"] == {"const": report_mod.SCHEMA_VERSION}
    assert DOC.read_text(encoding="utf-8").splitlines()[0] == f"# report.json — schema {report_mod.SCHEMA_VERSION}"
    assert f'| `schema_version` | string | `"{report_mod.SCHEMA_VERSION}"` |' in DOC.read_text(encoding="utf-8")
    major = int(report_mod.SCHEMA_VERSION.split(".")[0])
    assert compare.SUPPORTED_MAJOR == major  # compare reads what this version writes


def test_the_page_and_the_schema_name_the_same_fields() -> None:
    documented = documented_objects(DOC.read_text(encoding="utf-8"))
    checked = schema_objects(schema())
    assert set(documented) == set(checked), (
        f"objects only in report-schema.md: {sorted(set(documented) - set(checked))}; "
        f"only in report.schema.json: {sorted(set(checked) - set(documented))}"
    )
    for name, fields in checked.items():
        assert sorted(documented[name]) == sorted(fields), (
            f"`{name}`: only in report-schema.md {sorted(set(documented[name]) - set(fields))}, "
            f"only in report.schema.json {sorted(set(fields) - set(documented[name]))}"
        )
        assert len(set(documented[name])) == len(documented[name]), f"`{name}` lists a field twice"


def test_every_object_of_the_schema_is_closed() -> None:
    """additionalProperties false on every object with named fields: an undocumented field fails validation."""
    doc = schema()
    for name, d in [("report", doc), *doc["$defs"].items()]:
        if "properties" in d:
            assert d.get("additionalProperties") is False, f"`{name}` is open"
            assert set(d["required"]) <= set(d["properties"]), name


def test_a_written_report_is_checked_and_a_stray_field_fails(written: Path) -> None:
    doc = json.loads((written / "report.json").read_text(encoding="utf-8"))
    assert doc["schema_version"] == report_mod.SCHEMA_VERSION and not report_errors(doc)
    stray = copy.deepcopy(doc)
    stray["variants"][0]["device_name"] = "CPU"  # a field written without the schema knowing it
    assert any("device_name" in e and e.startswith("variants.0") for e in report_errors(stray))
    missing = copy.deepcopy(doc)
    del missing["variants"][0]["drift"]["informational"]
    assert any("'informational' is a required property" in e for e in report_errors(missing))
    wrong = dict(doc, schema_version="1.0")
    with pytest.raises(AssertionError, match="schema_version"):
        check_report(wrong)
    assert _reports_written(("vision", "--output", str(written)), None, 0.0) == [written / "report.json"]


def test_the_writer_itself_is_checked_while_the_tests_run(ran: tuple[Path, Report], tmp_path: Path) -> None:
    """The session hook wraps report.write: a report the schema does not describe fails where it is written."""
    _, result = ran
    (tmp_path / "old").mkdir()
    with pytest.raises(AssertionError, match="does not match docs/report.schema.json"):
        report_mod.write(dataclasses.replace(result, schema_version="0.9"), tmp_path / "old")
    report_mod.write(result, tmp_path)  # the same report at its own version passes


def test_a_1_0_baseline_still_compares_with_a_1_1_report(written: Path, tmp_path: Path) -> None:
    current = json.loads((written / "report.json").read_text(encoding="utf-8"))
    old = copy.deepcopy(current)
    old["schema_version"] = "1.0"
    for field in ("pick", "comparison"):
        old.pop(field)
    for drift in [old["export"]["check"], *(v["drift"] for v in old["variants"])]:
        for field in ("informational", "bounds", "confidence", "unresolved"):
            drift.pop(field)
    for v in old["variants"]:
        v.pop("latency_budget")
    (tmp_path / "report.json").write_text(json.dumps(old))
    baseline = compare.load_report(tmp_path / "report.json")
    result = compare.compare(baseline, current)
    assert {v.name for v in result.variants} >= {v["name"] for v in current["variants"]}
    assert all(v.verdict != compare.MISSING for v in result.variants)
