"""Calibration and evaluation inputs: files on disk -> model-ready feeds, one `{input: array}` each.

    samples = load_samples(path_or_None, model, profile, split="calibration", count=64, seed=0)
    for feed in samples: session.run(None, feed)

`path=None` reads the small real sets bundled with d2v-export (the top-level `calibration/` folder,
shipped in the wheel as `d2v_export/calibration_data`; see calibration/PROVENANCE.md). Otherwise
`path` is an image folder, an audio folder (both optionally with Hugging Face `metadata.csv` /
`metadata.jsonl` labels), a .txt/.jsonl file or folder (per the model's modality), .npz feeds for
any modality, or a Hugging Face dataset: a `save_to_disk` folder or .parquet file(s) with an image /
audio / text column (`columns` names them where the usual names do not fit; see hf.py). Inputs are prepared with the checkpoint's own processor or tokenizer,
bucketed to the shape profile so that few distinct shapes occur, and picked with a seeded generator.
Unreadable files are reported in `Samples.skipped`; nothing readable at all is a `D2VError`.

`save_cache` / `load_cache` store a `Samples` as one .npz (no pickle) beside an artifact.
"""

from __future__ import annotations

from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any

from ..spec import D2VError, Modality, ShapeProfile
from . import audio, dataset, hf, images, npz, text
from .hf import parse_columns
from .samples import Samples, load_cache, save_cache

__all__ = ["SPLITS", "Samples", "bundled_path", "load_cache", "load_samples", "parse_columns", "save_cache"]

SPLITS = ("calibration", "evaluation")
_READERS = {Modality.VISION: images, Modality.AUDIO: audio, Modality.TEXT: text}
_TEXT_FILES = {"question-answering": "qa_{split}.jsonl", "multiple-choice": "choices_{split}.jsonl"}


def _bundled_roots() -> list[Path]:
    roots = []
    ref = resources.files("d2v_export") / "calibration_data"  # where the wheel puts calibration/
    if isinstance(ref, Path):
        roots.append(ref)
    roots.append(Path(__file__).resolve().parents[2] / "calibration")  # a source checkout
    return roots


def bundled_path(modality: Modality, split: str, task: str | None = None) -> Path:
    """The bundled sample set for a modality and split ("calibration" or "evaluation").

    Vision and audio give a folder. Text gives a file: `qa_<split>.jsonl` for question-answering,
    `choices_<split>.jsonl` for multiple-choice, `<split>.txt` for every other task.
    """
    if split not in SPLITS:
        raise D2VError(f"unknown split '{split}'; choose one of: {', '.join(SPLITS)}")
    modality = Modality(modality)
    if modality is Modality.TEXT:
        rel = Path("text") / _TEXT_FILES.get(task or "", "{split}.txt").format(split=split)
    else:
        rel = Path(modality.value) / split
    for root in _bundled_roots():
        if (root / rel).exists():
            return root / rel
    raise D2VError(
        f"the bundled {modality.value} {split} samples ({rel.as_posix()}) are missing from this installation; "
        "reinstall d2v-export or pass your own calibration data"
    )


def load_samples(
    path: Path | None,
    model: Any,
    profile: ShapeProfile,
    *,
    split: str = "calibration",
    count: int | None = None,
    seed: int = 0,
    columns: Mapping[str, str] | None = None,
) -> Samples:
    """Read model-ready samples from `path` (None: the bundled set for the model's modality and split).

    `model` is a `models.LoadedModel`; its head picks the reader and its processor / tokenizer
    prepares the inputs. With `count` below the number available, `count` samples are picked with
    numpy's default_rng(seed) and returned in sorted order. `columns` ({role: column}, see
    `hf.parse_columns`) overrides the usual column names of metadata files and datasets.
    """
    modality = model.head.modality
    if path is None:
        path = bundled_path(modality, split, model.head.task)
    path = Path(path).expanduser()
    if not path.exists():
        raise D2VError(
            f"calibration data '{path}' does not exist; pass an existing file or folder, or leave it out to use the bundled samples"
        )
    columns = dict(columns or {})
    reader = _READERS[modality]
    if path.is_file() and path.suffix.lower() == ".npz":
        return npz.read(path, [path], model, count=count, seed=seed)
    if dataset.is_saved_dataset(path) or (path.is_file() and dataset.parquet_files(path)):
        return dataset.read(path, model, profile, split=split, count=count, seed=seed, columns=columns)
    files = reader.find(path)
    if files:
        return reader.read(path, files, model, profile, count=count, seed=seed, columns=columns)
    feeds = npz.find(path)
    if feeds:
        return npz.read(path, feeds, model, count=count, seed=seed)
    if dataset.parquet_files(path):
        return dataset.read(path, model, profile, split=split, count=count, seed=seed, columns=columns)
    raise D2VError(f"no {reader.WHAT} in '{path}'; {reader.FIX}, a saved dataset or a .parquet file")
