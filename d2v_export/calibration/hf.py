"""Hugging Face layouts: `metadata.csv`/`metadata.jsonl` beside media, and the column rules shared with
`save_to_disk` folders and parquet files (read in dataset.py, which builds on this module and the media readers).

- imagefolder / audiofolder: a `metadata.csv` or `metadata.jsonl` anywhere in the folder, with a
  `file_name` column (relative to the metadata file's folder) and label / transcription columns.
  The image and audio readers look labels up here first (then class folders, then labels.tsv).
- A folder written by `datasets.Dataset.save_to_disk` (or `DatasetDict.save_to_disk`: the split is
  picked, see `SPLITS`) and a `.parquet` file, or a folder of them (`{split}-00000-of-00001.parquet`
  as on the hub). Both need the `datasets` package (`pip install 'd2v-export[datasets]'`), which
  brings pyarrow. Media columns are decoded here (Pillow, soundfile), not by `datasets`, so that the
  same preprocessing applies as for files on disk and no audio codec package is needed.

Columns are found by their usual names (`DEFAULTS`), for media also by their `Image` / `Audio`
feature type; `--columns ROLE=COLUMN,...` overrides any of them (`parse_columns`). ClassLabel values
become the class name when the model's label2id knows every name, else stay the class index.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..spec import D2VError
from .samples import Unreadable, confined, one_line

# role -> usual column names, first match wins. "label" is a class; "transcription" the CTC target.
DEFAULTS: dict[str, tuple[str, ...]] = {
    "image": ("image", "img", "picture", "photo"),
    "audio": ("audio", "speech", "sound"),
    "text": ("text", "sentence", "sentence1", "premise", "content"),
    "text_pair": ("text_pair", "sentence2", "hypothesis"),
    "question": ("question",),
    "context": ("context",),
    "label": ("label", "labels", "class", "fine_label", "target"),
    "transcription": ("transcription", "transcript", "text", "sentence", "normalized_text"),
}
ROLES = tuple(DEFAULTS)
METADATA_FILES = ("metadata.csv", "metadata.jsonl")
# DatasetDict / parquet split picked per use when there are several.
SPLITS = {"calibration": ("train", "calibration"), "evaluation": ("validation", "test", "evaluation", "eval", "valid")}
EXTRA = "pip install 'd2v-export[datasets]'"


def parse_columns(text: str | Sequence[str] | None) -> dict[str, str]:
    """`"image=img,label=fine_label"` (or several such strings) -> {"image": "img", "label": "fine_label"}."""
    if not text:
        return {}
    items = [text] if isinstance(text, str) else list(text)
    out: dict[str, str] = {}
    for item in items:
        for part in item.split(","):
            if not part.strip():
                continue
            role, sep, column = part.partition("=")
            role, column = role.strip(), column.strip()
            if not sep or not column:
                raise D2VError(
                    f"--columns takes ROLE=COLUMN pairs, got '{part.strip()}'; e.g. --columns image=img,label=fine_label"
                )
            if role not in DEFAULTS:
                raise D2VError(f"unknown --columns role '{role}'; choose from: {', '.join(ROLES)}")
            out[role] = column
    return out


def label_role(model: Any) -> str:
    return "transcription" if model.head.metric == "ctc" else "label"


def pick(
    role: str, available: Sequence[str], columns: Mapping[str, str], features: Mapping[str, Any] | None = None
) -> str | None:
    """The column for a role: the override, else a usual name, else (media) the feature type.

    One --columns applies to --calibration and --eval alike, so an override missing from one source
    falls back to the usual names there; it is an error only when nothing fits.
    """
    if columns.get(role) in available:
        return columns[role]
    taken = set(columns.values())
    for name in DEFAULTS[role]:
        if name in available and name not in taken:
            return name
    if features is not None and role in ("image", "audio"):
        kind = role.capitalize()
        for name in available:
            if type(features.get(name)).__name__ == kind and name not in taken:
                return name
    if role in columns:
        raise D2VError(
            f"--columns {role}={columns[role]}: no such column (the data has: {', '.join(available)}); name one of those"
        )
    return None


def normalize_label(value: Any, model: Any, names: Sequence[str] | None = None) -> object:
    """A label as the metrics can use it: a class name the model knows, else a class index; text as is."""
    if value is None or isinstance(value, bool):
        return None
    label2id = {str(k) for k in (getattr(model.config, "label2id", None) or {})}
    if isinstance(value, (int, np.integer)):
        value = int(value)
        if names is not None and 0 <= value < len(names) and names[value] in label2id:
            return names[value]
        return value
    if isinstance(value, str):
        text = value.strip()
        if model.head.metric != "ctc" and text not in label2id and text.lstrip("-").isdigit():
            try:
                return int(text)
            except ValueError:  # digits int() does not take ("²") or more than its 4300: a class name after all
                return text
        return text if model.head.metric != "ctc" else value
    return value if isinstance(value, (float, list)) else str(value)


# --------------------------------------------------------------------------- imagefolder / audiofolder metadata


def metadata(root: Path) -> dict[str, dict[str, Any]]:
    """{file path relative to root: metadata row} from every metadata.csv / metadata.jsonl under root."""
    base = root.parent if root.is_file() else root
    tables = (
        [base / n for n in METADATA_FILES]
        if root.is_file()
        else sorted(p for n in METADATA_FILES for p in root.rglob(n))
    )
    out: dict[str, dict[str, Any]] = {}
    for table in tables:
        if not table.is_file() or any(part.startswith(".") for part in table.relative_to(base).parts):
            continue
        try:
            confined(table, root)
        except Unreadable:
            continue  # a metadata file linked from outside the folder is not read
        for row in _metadata_rows(table):
            name = row.get("file_name")
            if not isinstance(name, str) or not name.strip() or "\x00" in name:
                continue
            path = (table.parent / name.strip()).resolve()
            try:
                out[path.relative_to(base.resolve()).as_posix()] = row
            except ValueError:
                continue  # a file outside the folder
    return out


def _metadata_rows(table: Path) -> list[dict[str, Any]]:
    try:
        text = table.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise D2VError(f"cannot read '{table}' ({one_line(exc)}); save it as UTF-8") from None
    if table.suffix == ".csv":
        try:
            rows: list[dict[str, Any]] = list(csv.DictReader(io.StringIO(text)))
        except csv.Error as exc:  # a NUL byte, a field over csv's size limit
            raise D2VError(
                f"'{table}' is not a readable CSV file ({one_line(exc)}); write it with a CSV writer, one row per file"
            ) from None
    else:
        rows = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except (json.JSONDecodeError, RecursionError) as exc:
                why = exc.msg if isinstance(exc, json.JSONDecodeError) else "nested too deeply"
                raise D2VError(f"'{table}' line {number} is not JSON ({why}); write one JSON object per line") from None
            if isinstance(row, dict):
                rows.append(row)
    if rows and "file_name" not in rows[0]:
        raise D2VError(
            f"'{table}' has no file_name column (it has: {', '.join(map(str, rows[0]))}); name the file column file_name"
        )
    return rows


def metadata_label(row: Mapping[str, Any] | None, model: Any, columns: Mapping[str, str]) -> object:
    """The label (or transcript, for CTC) of a metadata row, None when it has none."""
    if not row:
        return None
    role = label_role(model)
    name = pick(role, [k for k in row if k != "file_name"], columns)
    return normalize_label(row.get(name), model) if name else None
