"""The calibration cache is keyed on what makes the feeds, not only on the files (issue 21, part 4).

A cache written before an upgrade, or by other reader code, must not be reused without notice: the key
(`calibration.samples.cache_key`) holds the tool's version and a hash of the readers' source besides the
files' stamps, processor, tokenizer, shapes and seed. Driven through the pipeline's own cache lookup.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

import d2v_export
from d2v_export.calibration import samples
from d2v_export.models import load, parse_source
from d2v_export.pipeline import _cached
from d2v_export.spec import Dim, Modality, ShapeProfile

TEXT = ShapeProfile(dims=(Dim("batch", 1, 1, 8), Dim("sequence", 8, 16, 32)))


@pytest.fixture(scope="module")
def text():
    return load(parse_source("preset:tiny", Modality.TEXT, None))


def test_a_new_version_or_new_reader_code_misses_the_cache(tmp_path, monkeypatch, text):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "home-cache"))
    said: list[str] = []

    def reused() -> bool:
        said.clear()
        got = _cached(text, TEXT, None, "calibration", 4, 0, said.append)
        assert len(got) == 4
        return any(m.startswith("reusing the calibration cache") for m in said)

    assert not reused() and reused()  # written once, then reused while nothing changed
    monkeypatch.setattr(d2v_export, "__version__", d2v_export.__version__ + ".post1")
    assert not reused() and reused()  # an upgrade reads the files again
    readers = tmp_path / "readers"
    shutil.copytree(Path(samples.__file__).parent, readers, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(samples, "READER_SOURCES", (readers, *samples.READER_SOURCES[1:]))
    assert reused()  # the same source, byte for byte: the same key
    (readers / "text.py").write_text(
        (readers / "text.py").read_text(encoding="utf-8") + "\n# a change to a reader\n", encoding="utf-8"
    )
    assert not reused() and reused()
    assert len(list((tmp_path / "home-cache" / "d2v-export").glob("calibration-*.npz"))) == 3


def test_the_reader_digest_covers_every_reader_module():
    package = Path(samples.__file__).parent
    covered = {p.name for p in package.glob("*.py")}
    assert {"images.py", "audio.py", "text.py", "npz.py", "hf.py", "dataset.py", "samples.py"} <= covered
    assert package in samples.READER_SOURCES
