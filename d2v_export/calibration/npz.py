"""Ready-made feeds: `.npz` files whose arrays are named after the ONNX inputs (any modality).

An array with one axis fewer than the input gets a batch axis; one with a batch of N gives N
samples (named `file.npz[i]`). Values are cast to the input's dtype when the kind matches (float to
float32, integer or bool to int64). An optional `label` / `labels` array gives labels. A file
written by `save_cache` is read as the cache it is.
"""

from __future__ import annotations

import zipfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from ..heads import input_specs, with_audio_mask
from ..spec import D2VError, TensorSpec
from .samples import (
    CACHE_KEY,
    Candidate,
    Samples,
    Unreadable,
    collect,
    confined,
    load_cache,
    one_line,
    rel_name,
    visible_files,
)

WHAT = ".npz feeds"


def find(root: Path) -> list[Path]:
    return visible_files(root, lambda p: p.suffix.lower() == ".npz")


def _fix(specs: tuple[TensorSpec, ...]) -> str:
    return "save arrays named " + ", ".join(f"{s.name} {s.shape}" for s in specs) + " with numpy.savez"


def _cast(value: np.ndarray, spec: TensorSpec) -> np.ndarray:
    want = np.dtype(spec.dtype)
    if value.dtype == want:
        return value
    if want.kind == "f" and value.dtype.kind in "fiu":
        return value.astype(want)
    if want.kind == "i" and value.dtype.kind in "iub":
        return value.astype(want)
    raise Unreadable(f"{spec.name} is {value.dtype}, the model takes {spec.dtype}")


def _optional(spec: TensorSpec, files: Any) -> bool:
    """An audio ``attention_mask`` may be left out beside ``input_values``: unpadded clips, a mask of ones."""
    return spec.name == "attention_mask" and "input_values" in files


def _split(data: Any, specs: tuple[TensorSpec, ...]) -> tuple[list[dict[str, np.ndarray]], list[object] | None]:
    """The samples of one plain .npz, each with batch axis 1."""
    missing = [s.name for s in specs if s.name not in data.files and not _optional(s, data.files)]
    if missing:
        raise Unreadable(f"no array named {', '.join(missing)} (found: {', '.join(data.files) or 'none'})")
    arrays: dict[str, np.ndarray] = {}
    sizes = set()
    for spec in specs:
        if spec.name not in data.files:
            continue  # an optional audio mask: all ones, below
        value = np.asarray(data[spec.name])
        rank = len(spec.shape)
        if value.ndim == rank - 1:
            value = value[None]
        elif value.ndim != rank:
            raise Unreadable(f"{spec.name} has {value.ndim} axes, the model takes {rank} {spec.shape}")
        arrays[spec.name] = _cast(value, spec)
        sizes.add(value.shape[0])
    if len(sizes) != 1:
        raise Unreadable(f"the inputs disagree on the batch size ({sorted(sizes)})")
    n = sizes.pop()
    feeds = [with_audio_mask({k: np.ascontiguousarray(v[i : i + 1]) for k, v in arrays.items()}) for i in range(n)]
    labels = None
    for key in ("labels", "label"):
        if key in data.files:
            raw = np.asarray(data[key])
            values = raw.reshape(1, *raw.shape).tolist() if n == 1 and raw.ndim == 0 else raw.tolist()
            labels = list(values) if isinstance(values, list) and len(values) == n else None
            break
    return feeds, labels


def read(root: Path, files: list[Path], model: Any, *, count: int | None, seed: int) -> Samples:
    specs = input_specs(model.head)
    names = {s.name for s in specs}
    candidates: list[Candidate] = []
    skipped: list[tuple[str, str]] = []

    def fixed(feed: dict[str, np.ndarray], label: object) -> Any:
        return lambda: (feed, label)

    for path in files:
        name = rel_name(path, root)
        try:
            with np.load(confined(path, root), allow_pickle=False) as data:
                if CACHE_KEY in data.files:
                    cache = load_cache(path)
                    feeds, labels, sub = list(cache.feeds), list(cache.labels or [None] * len(cache)), list(cache.names)
                    skipped.extend(cache.skipped)
                    bad = [f for f in feeds if set(f) != names]
                    if bad:
                        raise Unreadable(f"a cache for inputs {sorted(bad[0])}, the model takes {sorted(names)}")
                else:
                    feeds, plain = _split(data, specs)
                    labels = plain or [None] * len(feeds)
                    sub = [name] if len(feeds) == 1 else [f"{name}[{i}]" for i in range(len(feeds))]
        except Unreadable as exc:
            skipped.append((name, str(exc)))
            continue
        except (
            OSError,
            ValueError,
            EOFError,
            zipfile.BadZipFile,
            zlib.error,
            NotImplementedError,
        ) as exc:  # truncated or corrupt zip members
            skipped.append((name, f"not a readable .npz ({one_line(exc)})"))
            continue
        except D2VError as exc:
            skipped.append((name, str(exc)))
            continue
        candidates.extend(Candidate(n, fixed(f, lab)) for n, f, lab in zip(sub, feeds, labels))
    return collect(candidates, count=count, seed=seed, source=str(root), what=WHAT, fix=_fix(specs), skipped=skipped)
