"""Hugging Face layouts: `metadata.csv`/`metadata.jsonl` beside media, `save_to_disk` folders, parquet files.

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
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..spec import D2VError, Modality, ShapeProfile
from .samples import Candidate, Samples, Unreadable, collect, one_line

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
                raise D2VError(f"--columns takes ROLE=COLUMN pairs, got '{part.strip()}'; e.g. --columns image=img,label=fine_label")
            if role not in DEFAULTS:
                raise D2VError(f"unknown --columns role '{role}'; choose from: {', '.join(ROLES)}")
            out[role] = column
    return out


def label_role(model: Any) -> str:
    return "transcription" if model.head.metric == "ctc" else "label"


def pick(role: str, available: Sequence[str], columns: Mapping[str, str], features: Mapping[str, Any] | None = None) -> str | None:
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
            return int(text)
        return text if model.head.metric != "ctc" else value
    return value if isinstance(value, (float, list)) else str(value)


# --------------------------------------------------------------------------- imagefolder / audiofolder metadata


def metadata(root: Path) -> dict[str, dict[str, Any]]:
    """{file path relative to root: metadata row} from every metadata.csv / metadata.jsonl under root."""
    base = root.parent if root.is_file() else root
    tables = [base / n for n in METADATA_FILES] if root.is_file() else sorted(p for n in METADATA_FILES for p in root.rglob(n))
    out: dict[str, dict[str, Any]] = {}
    for table in tables:
        if not table.is_file() or any(part.startswith(".") for part in table.relative_to(base).parts):
            continue
        for row in _metadata_rows(table):
            name = row.get("file_name")
            if not isinstance(name, str) or not name.strip():
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
        rows: list[dict[str, Any]] = list(csv.DictReader(io.StringIO(text)))
    else:
        rows = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise D2VError(f"'{table}' line {number} is not JSON ({exc.msg}); write one JSON object per line") from None
            if isinstance(row, dict):
                rows.append(row)
    if rows and "file_name" not in rows[0]:
        raise D2VError(f"'{table}' has no file_name column (it has: {', '.join(map(str, rows[0]))}); name the file column file_name")
    return rows


def metadata_label(row: Mapping[str, Any] | None, model: Any, columns: Mapping[str, str]) -> object:
    """The label (or transcript, for CTC) of a metadata row, None when it has none."""
    if not row:
        return None
    role = label_role(model)
    name = pick(role, [k for k in row if k != "file_name"], columns)
    return normalize_label(row.get(name), model) if name else None


# --------------------------------------------------------------------------- save_to_disk and parquet


def is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file())


def parquet_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path] if path.suffix.lower() == ".parquet" else []
    if not path.is_dir():
        return []
    return sorted(
        (p for p in path.rglob("*.parquet") if not any(s.startswith(".") for s in p.relative_to(path).parts)),
        key=lambda p: p.relative_to(path).as_posix(),
    )


def _datasets() -> Any:
    try:
        import datasets
    except ImportError:
        raise D2VError(f"reading a saved dataset or a parquet file needs the datasets package; {EXTRA}") from None
    return datasets


def _choose(splits: Sequence[str], use: str, where: Path) -> str:
    if len(splits) == 1:
        return splits[0]
    for name in SPLITS.get(use, ()):
        if name in splits:
            return name
    raise D2VError(
        f"'{where}' holds the splits {', '.join(splits)} and none is a usual {use} split; pass one split's folder or file"
    )


def _table(path: Path, use: str) -> tuple[Any, dict[str, Any], str]:
    """(pyarrow table, features by column, a name for the report) of a saved dataset or parquet file(s)."""
    ds = _datasets()
    if is_saved_dataset(path):
        try:
            loaded = ds.load_from_disk(str(path))
        except Exception as exc:  # noqa: BLE001 - datasets raises many types for a damaged folder
            raise D2VError(f"'{path}' cannot be loaded as a saved dataset ({one_line(exc)}); save it again with save_to_disk") from None
        source = str(path)
        if isinstance(loaded, ds.DatasetDict):
            split = _choose(list(loaded), use, path)
            loaded, source = loaded[split], f"{path} [{split}]"
        return loaded.with_format("arrow")[:], dict(loaded.features), source
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = parquet_files(path)
    groups: dict[str, list[Path]] = {}
    for f in files:  # hub layout: {split}-00000-of-00003.parquet
        groups.setdefault(f.stem.split("-")[0] if path.is_dir() else f.stem, []).append(f)
    split = _choose(sorted(groups), use, path) if len(groups) > 1 else next(iter(groups))
    try:
        table = pa.concat_tables([pq.read_table(f) for f in groups[split]], promote_options="default")
    except Exception as exc:  # noqa: BLE001 - pyarrow raises ArrowInvalid, OSError, ...
        raise D2VError(f"'{path}' is not a readable parquet file ({one_line(exc)}); write it with pyarrow or datasets' to_parquet") from None
    try:
        features = dict(ds.Features.from_arrow_schema(table.schema))
    except Exception:  # noqa: BLE001 - a schema datasets cannot map: plain columns still work
        features = {}
    return table, features, f"{path} [{split}]" if len(groups) > 1 else str(path)


def _media(value: Any, base: Path, what: str) -> Any:
    """A file object or path for a stored image / audio value ({bytes, path}, bytes, or a path string)."""
    data, where = None, None
    if isinstance(value, dict):
        data, where = value.get("bytes"), value.get("path")
    elif isinstance(value, (bytes, bytearray)):
        data = value
    elif isinstance(value, str):
        where = value
    if data:
        return io.BytesIO(bytes(data))
    if where:
        p = Path(where)
        for candidate in (p, base / p):
            if candidate.is_file():
                return candidate
        raise Unreadable(f"the {what} is stored as a path that does not exist here ({where})")
    raise Unreadable(f"no {what} in this row")


def read(path: Path, model: Any, profile: ShapeProfile, *, split: str, count: int | None, seed: int, columns: Mapping[str, str]) -> Samples:
    """Samples from a saved dataset folder or parquet file(s), one per row."""
    from . import audio, images, text

    table, features, source = _table(path, split)
    names = list(table.column_names)
    modality = model.head.modality
    base = path if path.is_dir() else path.parent
    role = label_role(model)
    label_col = pick(role, names, columns, features)
    class_names = getattr(features.get(label_col or ""), "names", None)
    what = {Modality.VISION: "images", Modality.AUDIO: "audio clips", Modality.TEXT: "text samples"}[modality]
    fix = "name the column with --columns, e.g. --columns " + {
        Modality.VISION: "image=img", Modality.AUDIO: "audio=speech", Modality.TEXT: "text=review"}[modality]
    row_of: Callable[[int], dict[str, Any]] = lambda i: table.slice(i, 1).to_pylist()[0]  # noqa: E731

    found: str | None
    if modality is Modality.VISION:
        found = pick("image", names, columns, features)
        prepare = images.preparer(model, profile)

        def feed(row: dict[str, Any]) -> tuple[dict[str, np.ndarray], object]:
            return prepare(images.open_rgb(_media(row[col], base, "image"))), None
    elif modality is Modality.AUDIO:
        found = pick("audio", names, columns, features)
        prepare_audio = audio.preparer(model, profile)

        def feed(row: dict[str, Any]) -> tuple[dict[str, np.ndarray], object]:
            value = row[col]
            if isinstance(value, dict) and value.get("array") is not None:
                wave = audio.resample(np.asarray(value["array"], dtype=np.float64), int(value.get("sampling_rate") or prepare_audio.rate), prepare_audio.rate)
            else:
                wave = audio.read_mono(_media(value, base, "audio clip"), prepare_audio.rate)
            return prepare_audio(wave), None
    else:
        fields = {r: pick(r, names, columns) for r in ("text", "text_pair", "question", "context")}
        found = fields["text"] or (fields["question"] if fields["context"] else None)
        if found is None and "choices" in names:
            found = "choices"
        encode = text.encoder(model, profile)

        def feed(row: dict[str, Any]) -> tuple[dict[str, np.ndarray], object]:
            record = {k: v for k, v in row.items() if k in ("prompt", "choices")}
            for r, c in fields.items():
                if c is not None:
                    record[r] = row[c]
            if model.head.multiple_choice and label_col is not None and isinstance(row.get(label_col), int):
                record["label"] = row[label_col]
            values, label = encode(record)
            return values, (label if model.head.multiple_choice else None)

    if found is None:
        raise D2VError(f"no {what.rstrip('s')} column in '{source}' (columns: {', '.join(names)}); {fix}")

    def reader(i: int) -> Callable[[], tuple[dict[str, np.ndarray], object]]:
        def run() -> tuple[dict[str, np.ndarray], object]:
            row = row_of(i)
            values, own = feed(row)
            label = own if own is not None else normalize_label(row.get(label_col), model, class_names) if label_col else None
            return values, label

        return run

    col: str = found
    stem = path.name
    candidates = [Candidate(f"{stem}[{i}]", reader(i)) for i in range(table.num_rows)]
    return collect(candidates, count=count, seed=seed, source=source, what=what, fix=fix)
