"""`Samples`, the seeded selection every reader shares, and the .npz calibration cache.

A reader turns a path into a list of `Candidate`s (cheap: a name and a function that reads it) and
hands them to `collect`, which reads them in a seeded order until it has `count` good ones, reports
the unreadable ones in `Samples.skipped`, and returns the chosen ones in their sorted order.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import zipfile
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..heads import with_audio_mask
from ..spec import D2VError

Feed = dict[str, np.ndarray]

CACHE_KEY = "__d2v_cache__"  # the JSON metadata array that marks an .npz as a calibration cache
CACHE_VERSION = 1
# What turns a user's files into feeds besides the files themselves, so part of every cache key (`cache_key`):
# the source of the readers (every module of this package, and the input table they fill) and the libraries
# they decode and preprocess with.
READER_SOURCES: tuple[Path, ...] = (Path(__file__).parent, Path(__file__).parent.parent / "heads.py")
READER_LIBRARIES = ("transformers", "numpy", "pillow", "soundfile", "scipy", "datasets", "pyarrow")


@dataclass(frozen=True, eq=False)  # eq=False: numpy arrays have no single truth value
class Samples:
    """Model-ready inputs read from a file or folder, one feed per sample, each with batch axis 1."""

    feeds: tuple[Feed, ...]  # {onnx_input_name: array with leading batch axis 1}
    names: tuple[str, ...]  # file name relative to the source, or "file.txt:17"
    labels: tuple[object, ...] | None  # None when no sample has a label; else one entry (maybe None) each
    skipped: tuple[tuple[str, str], ...]  # (name, reason) of unreadable entries
    source: str  # what was read, for the report

    def __len__(self) -> int:
        return len(self.feeds)

    def __iter__(self) -> Iterator[Feed]:
        return iter(self.feeds)

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(self.feeds[0]) if self.feeds else ()

    @property
    def shapes(self) -> tuple[dict[str, tuple[int, ...]], ...]:
        """The distinct input shapes, in order of first appearance (few, thanks to bucketing)."""
        seen: list[dict[str, tuple[int, ...]]] = []
        for feed in self.feeds:
            shape = {k: tuple(int(n) for n in v.shape) for k, v in feed.items()}
            if shape not in seen:
                seen.append(shape)
        return tuple(seen)


class Unreadable(Exception):
    """One entry cannot be used; its message (one line) lands in `Samples.skipped`."""


@dataclass(frozen=True)
class Candidate:
    name: str
    read: Callable[[], tuple[Feed, object]]  # -> (feed, label or None); raises Unreadable


def one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def check_count(count: int | None) -> None:
    if count is not None and (not isinstance(count, (int, np.integer)) or count < 1):
        raise D2VError(f"calibration sample count must be a positive integer, got {count!r}; pass 1 or more")


def collect(
    candidates: Sequence[Candidate],
    *,
    count: int | None,
    seed: int,
    source: str,
    what: str,
    fix: str,
    skipped: Sequence[tuple[str, str]] = (),
) -> Samples:
    """Read `count` candidates (all when None) picked with default_rng(seed), in their sorted order.

    With `count` below the number of candidates, a seeded permutation is walked until `count` of them
    read well, so an unreadable one is replaced by the next in that order rather than lost.
    """
    check_count(count)
    n = len(candidates)
    if count is None or count >= n:
        order: Sequence[int] = range(n)
    else:
        order = [int(i) for i in np.random.default_rng(seed).permutation(n)]
    bad = list(skipped)
    good: list[tuple[int, Feed, object]] = []
    for i in order:
        if count is not None and len(good) >= count:
            break
        try:
            feed, label = candidates[i].read()
            why = non_finite(feed)
            if why:
                raise Unreadable(why)
        except Unreadable as exc:
            bad.append((candidates[i].name, " ".join(str(exc).split())))
            continue
        good.append((i, feed, label))
    if not good:
        raise D2VError(f"no readable {what} in '{source}'{_detail(bad)}; {fix}")
    good.sort(key=lambda t: t[0])
    labels = tuple(label for _, _, label in good)
    return Samples(
        feeds=tuple(feed for _, feed, _ in good),
        names=tuple(candidates[i].name for i, _, _ in good),
        labels=labels if any(label is not None for label in labels) else None,
        skipped=tuple(bad),
        source=source,
    )


def describe_skipped(skipped: Sequence[tuple[str, str]], limit: int = 8) -> str:
    """One line for a report warning: the entries grouped by file and reason, lines numbered.

    ``[("a.txt:3", "not valid UTF-8"), ("a.txt:9", "not valid UTF-8"), ("b.npz", "...")]`` ->
    ``"a.txt lines 3, 9 (not valid UTF-8); b.npz (...)"``.
    """
    groups: dict[tuple[str, str], list[str]] = {}
    for name, why in skipped:
        file, sep, line = name.rpartition(":")
        if sep and line.isdigit():
            groups.setdefault((file, why), []).append(line)
        else:
            groups.setdefault((name, why), [])
    parts = []
    for (file, why), lines in groups.items():
        where = file
        if lines:
            shown = ", ".join(lines[:20]) + (f" and {len(lines) - 20} more" if len(lines) > 20 else "")
            where = f"{file} line{'s' if len(lines) > 1 else ''} {shown}"
        parts.append(f"{where} ({why})")
    more = f"; and {len(parts) - limit} more" if len(parts) > limit else ""
    return "; ".join(parts[:limit]) + more


def non_finite(feed: Feed) -> str | None:
    """Why a feed cannot calibrate or evaluate anything (NaN or inf in a float input), or None."""
    bad = [name for name, value in feed.items() if value.dtype.kind == "f" and not np.isfinite(value).all()]
    return f"holds non-finite values (NaN or inf) in {', '.join(bad)}" if bad else None


def _detail(bad: Sequence[tuple[str, str]]) -> str:
    if not bad:
        return ""
    names = ", ".join(f"{n}: {why}" for n, why in bad[:3])
    return f" ({len(bad)} unreadable: {names}" + (", …)" if len(bad) > 3 else ")")


def visible_files(root: Path, accept: Callable[[Path], bool]) -> list[Path]:
    """Files under root (or root itself), sorted by relative path, hidden ones left out."""
    if root.is_file():
        return [root]
    found = []
    for path in root.rglob("*"):
        rel = path.relative_to(root)
        if any(part.startswith(".") for part in rel.parts) or not path.is_file():
            continue
        if accept(path):
            found.append(path)
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def confined(path: Path, root: Path) -> Path:
    """``path`` when it stays inside ``root`` once symbolic links are followed; Unreadable otherwise.

    A link in a calibration folder that points outside it is refused, so that reading a folder
    (someone else's download, say) never reads a file the user did not pass."""
    base = root if root.is_dir() else root.parent
    try:
        real, top = path.resolve(), base.resolve()
    except (OSError, RuntimeError, ValueError) as exc:
        raise Unreadable(f"its path cannot be resolved ({one_line(exc)})") from None
    if path == root or real == top or top in real.parents:
        return path
    raise Unreadable(
        f"a symbolic link to a file outside '{base}' ({real}); copy the file into the folder or pass the folder it is in"
    )


def rel_name(path: Path, root: Path) -> str:
    return path.name if root.is_file() else path.relative_to(root).as_posix()


# --------------------------------------------------------------------------- cache


def cache_key(parts: Any) -> str:
    """The name of a cache of the feeds that ``parts`` (file stamps, processor, shapes, seed, ...) describe.

    Keyed also on what makes the feeds: the tool's version, a hash of the readers' source
    (`READER_SOURCES`) and the versions of `READER_LIBRARIES`, so a cache from before an upgrade, or
    from other reader code, is never reused.
    """
    from .. import __version__

    made_by = [__version__, reader_digest(), _library_versions()]
    text = json.dumps([parts, made_by], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def reader_digest(sources: Sequence[Path] | None = None) -> str:
    """sha256 of the readers' source files (each .py under each folder of ``sources``, by relative name)."""
    digest = hashlib.sha256()
    for source in READER_SOURCES if sources is None else sources:
        files = sorted(source.glob("*.py")) if source.is_dir() else [source]
        for f in files:
            digest.update(f.name.encode() + b"\0" + f.read_bytes() + b"\0")
    return digest.hexdigest()


def _library_versions() -> dict[str, str]:
    from importlib import metadata

    found = {}
    for name in READER_LIBRARIES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found


def save_cache(samples: Samples, path: Path) -> Path:
    """Write samples to one .npz (no pickle): arrays as `s000000.<input>`, the rest as JSON.

    The write is atomic (temporary file, then rename), so a crashed run leaves no half cache.
    """
    path = Path(path)
    meta = {
        "version": CACHE_VERSION,
        "source": samples.source,
        "names": list(samples.names),
        "labels": None if samples.labels is None else list(samples.labels),
        "skipped": [list(s) for s in samples.skipped],
        "inputs": [list(feed) for feed in samples.feeds],
    }
    arrays: dict[str, np.ndarray] = {CACHE_KEY: np.array(json.dumps(meta, default=_jsonable))}
    for i, feed in enumerate(samples.feeds):
        for name, value in feed.items():
            arrays[f"s{i:06d}.{name}"] = np.ascontiguousarray(value)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".cache-", suffix=".npz", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            np.savez_compressed(fh, **arrays)  # type: ignore[arg-type]
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def is_cache(path: Path) -> bool:
    """Whether ``path`` is an .npz written by `save_cache` (plain .npz feeds are not)."""
    try:
        with np.load(path, allow_pickle=False) as data:
            return CACHE_KEY in data.files
    except (OSError, ValueError, EOFError):
        return False


def load_cache(path: Path) -> Samples:
    """Read a file written by `save_cache`."""
    path = Path(path)
    if not path.is_file():
        raise D2VError(f"calibration cache '{path}' does not exist; run once without it to create it")
    try:
        with np.load(path, allow_pickle=False) as data:
            if CACHE_KEY not in data.files:
                raise D2VError(
                    f"'{path}' is an .npz but not a d2v-export calibration cache; delete it or pass it as plain feeds"
                )
            meta = json.loads(str(data[CACHE_KEY][()]))
            if meta.get("version") != CACHE_VERSION:
                raise D2VError(
                    f"calibration cache '{path}' has version {meta.get('version')}, this tool reads {CACHE_VERSION}; delete it to rebuild"
                )
            # an audio cache from before the audio graphs took a mask: unpadded clips, a mask of ones
            feeds = tuple(
                with_audio_mask({name: data[f"s{i:06d}.{name}"] for name in names})
                for i, names in enumerate(meta["inputs"])
            )
        labels, names, skipped = _cache_fields(meta, len(feeds))
    except (
        OSError,
        ValueError,
        KeyError,
        TypeError,
        AttributeError,
        RecursionError,
        zipfile.BadZipFile,
        zlib.error,
    ) as exc:
        raise D2VError(f"calibration cache '{path}' cannot be read ({one_line(exc)}); delete it to rebuild") from None
    keep = []
    for i, feed in enumerate(feeds):
        why = non_finite(feed)
        if why:
            skipped.append((names[i], why))
        else:
            keep.append(i)
    if not keep:
        raise D2VError(f"calibration cache '{path}' has no usable sample{_detail(skipped)}; rebuild it from clean data")
    return Samples(
        feeds=tuple(feeds[i] for i in keep),
        names=tuple(names[i] for i in keep),
        labels=None if labels is None else tuple(labels[i] for i in keep),
        skipped=tuple(skipped),
        source=str(meta.get("source", path)),
    )


def _cache_fields(meta: Any, n: int) -> tuple[list[Any] | None, tuple[str, ...], list[tuple[str, str]]]:
    """(labels, names, skipped) of a cache's metadata; ValueError when they do not fit its `n` samples."""
    labels, names = meta["labels"], tuple(str(x) for x in meta["names"])
    skipped = [(str(a), str(b)) for a, b in meta["skipped"]]
    if len(names) != n or (labels is not None and (not isinstance(labels, list) or len(labels) != n)):
        raise ValueError(f"{n} samples but {len(names)} names")
    return labels, names, skipped


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return str(value)
