"""Shared fixtures: tiny presets of the real architectures, exported once per session."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

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
    """Run the installed console script for real."""
    exe = shutil.which("d2v-export") or str(Path(sys.executable).parent / "d2v-export")
    full_env = dict(os.environ, HF_HUB_OFFLINE="1", **(env or {}))
    return subprocess.run([exe, *args], capture_output=True, text=True, env=full_env, cwd=cwd, timeout=600)
