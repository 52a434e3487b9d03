"""Hugging Face datasets on disk: `save_to_disk` folders and parquet files, one sample per row.

Column rules, label normalisation and the `--columns` overrides are hf.py's; the media are prepared by
the image, audio and text readers, as for files on disk.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..spec import D2VError, Modality, ShapeProfile
from . import audio, images, text
from .hf import EXTRA, SPLITS, label_role, normalize_label, pick
from .samples import Candidate, Samples, Unreadable, collect, confined, one_line


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
            raise D2VError(
                f"'{path}' cannot be loaded as a saved dataset ({one_line(exc)}); save it again with save_to_disk"
            ) from None
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
        raise D2VError(
            f"'{path}' is not a readable parquet file ({one_line(exc)}); write it with pyarrow or datasets' to_parquet"
        ) from None
    try:
        features = dict(ds.Features.from_arrow_schema(table.schema))
    except Exception:  # noqa: BLE001 - a schema datasets cannot map: plain columns still work
        features = {}
    return table, features, f"{path} [{split}]" if len(groups) > 1 else str(path)


def _row(table: Any, i: int) -> dict[str, Any]:
    import pyarrow as pa

    try:
        return dict(table.slice(i, 1).to_pylist()[0])
    except (UnicodeDecodeError, pa.ArrowException) as exc:  # found by fuzzing: a string cell that is not UTF-8
        raise Unreadable(f"the row cannot be decoded ({one_line(exc)})") from None


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
        if not isinstance(data, (bytes, bytearray)):
            raise Unreadable(f"the {what} is stored as {type(data).__name__}, not bytes")
        return io.BytesIO(bytes(data))
    if where:
        if not isinstance(where, str) or "\x00" in where:
            raise Unreadable(f"the {what} is stored as a path that is not a file name ({where!r})")
        for candidate in (Path(where), base / where):
            try:
                found = candidate.is_file()
            except OSError as exc:  # found by fuzzing: a 5,000-character name (ENAMETOOLONG)
                raise Unreadable(
                    f"the {what} is stored as a path that cannot be a file here ({one_line(exc)})"
                ) from None
            if found:
                try:  # a stored path is read only inside the dataset's folder: a shared dataset must not read /etc
                    return confined(candidate, base)
                except Unreadable:
                    raise Unreadable(
                        f"the {what} is stored as a path outside '{base}' ({where}); embed the files (datasets' embed_external_files) or copy them into the folder"
                    ) from None
        raise Unreadable(f"the {what} is stored as a path that does not exist here ({where})")
    raise Unreadable(f"no {what} in this row")


Feed = Callable[[dict[str, Any]], tuple[dict[str, np.ndarray], object]]
WHAT = {Modality.VISION: "images", Modality.AUDIO: "audio clips", Modality.TEXT: "text samples"}
EXAMPLE_COLUMN = {Modality.VISION: "image=img", Modality.AUDIO: "audio=speech", Modality.TEXT: "text=review"}


def _image_feed(col: str, base: Path, model: Any, profile: ShapeProfile) -> Feed:
    prepare = images.preparer(model, profile)

    def feed(row: dict[str, Any]) -> tuple[dict[str, np.ndarray], object]:
        return prepare(images.open_rgb(_media(row[col], base, "image"))), None

    return feed


def _audio_feed(col: str, base: Path, model: Any, profile: ShapeProfile) -> Feed:
    prepare = audio.preparer(model, profile)

    def feed(row: dict[str, Any]) -> tuple[dict[str, np.ndarray], object]:
        value = row[col]
        if isinstance(value, dict) and value.get("array") is not None:
            try:
                array = np.asarray(value["array"], dtype=np.float64)
            except (TypeError, ValueError) as exc:
                raise Unreadable(f"its audio array is not numbers ({one_line(exc)})") from None
            wave = audio.resample(array, value.get("sampling_rate") or prepare.rate, prepare.rate, prepare.limit)
        else:
            wave = audio.read_mono(_media(value, base, "audio clip"), prepare.rate, prepare.limit)
        return prepare(wave), None

    return feed


def _text_columns(names: list[str], columns: Mapping[str, str]) -> tuple[dict[str, str | None], str | None]:
    """(role -> column, the column that must be there) for text rows."""
    fields = {r: pick(r, names, columns) for r in ("text", "text_pair", "question", "context")}
    found = fields["text"] or (fields["question"] if fields["context"] else None)
    if found is None and "choices" in names:
        found = "choices"
    return fields, found


def _text_feed(fields: Mapping[str, str | None], label_col: str | None, model: Any, profile: ShapeProfile) -> Feed:
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

    return feed


def read(
    path: Path,
    model: Any,
    profile: ShapeProfile,
    *,
    split: str,
    count: int | None,
    seed: int,
    columns: Mapping[str, str],
) -> Samples:
    """Samples from a saved dataset folder or parquet file(s), one per row."""
    table, features, source = _table(path, split)
    try:
        names = [str(n) for n in table.column_names]
    except UnicodeDecodeError:  # found by fuzzing: a column name that is not UTF-8
        raise D2VError(f"'{source}' has a column name that is not UTF-8; write the dataset again") from None
    modality = model.head.modality
    base = path if path.is_dir() else path.parent
    label_col = pick(label_role(model), names, columns, features)
    class_names = getattr(features.get(label_col or ""), "names", None)
    what, fix = WHAT[modality], f"name the column with --columns, e.g. --columns {EXAMPLE_COLUMN[modality]}"
    if modality is Modality.TEXT:
        fields, found = _text_columns(names, columns)
    else:
        found = pick("image" if modality is Modality.VISION else "audio", names, columns, features)
    if found is None:
        raise D2VError(f"no {what.rstrip('s')} column in '{source}' (columns: {', '.join(names)}); {fix}")
    if modality is Modality.TEXT:
        feed = _text_feed(fields, label_col, model, profile)
    elif modality is Modality.VISION:
        feed = _image_feed(found, base, model, profile)
    else:
        feed = _audio_feed(found, base, model, profile)

    def reader(i: int) -> Callable[[], tuple[dict[str, np.ndarray], object]]:
        def run() -> tuple[dict[str, np.ndarray], object]:
            row = _row(table, i)
            values, own = feed(row)
            if own is not None or not label_col:
                return values, own
            return values, normalize_label(row.get(label_col), model, class_names)

        return run

    candidates = [Candidate(f"{path.name}[{i}]", reader(i)) for i in range(table.num_rows)]
    return collect(candidates, count=count, seed=seed, source=source, what=what, fix=fix)
