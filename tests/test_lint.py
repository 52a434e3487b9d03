"""The linter and formatter the project adopted (ruff check and ruff format, configured in pyproject.toml) pass on the
whole repository, and it is the project's configuration that is applied (a planted unused import and a late-bound
loop variable are caught; a packed line is reformatted)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _ruff(*args: str, cwd: Path = ROOT, command: str = "check") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ruff", command, "--no-cache", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=300,
    )


def test_the_repository_lints_clean() -> None:
    res = _ruff(".")
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]


def test_the_project_configuration_catches_what_it_selects(tmp_path: Path) -> None:
    planted = tmp_path / "planted.py"
    planted.write_text("import os\n\n\ndef f(xs):\n    return [lambda: x for x in xs]\n", encoding="utf-8")
    res = _ruff("--config", str(ROOT / "pyproject.toml"), str(planted), cwd=tmp_path)
    assert res.returncode == 1 and "F401" in res.stdout and "B023" in res.stdout, res.stdout + res.stderr


def test_the_repository_is_formatted() -> None:
    """``ruff format --check``: what the formatter would change is a failure (units are short because they are
    simple, not because lines were packed)."""
    res = _ruff("--check", ".", command="format")
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]


def test_the_formatter_applies_the_project_line_length(tmp_path: Path) -> None:
    packed = tmp_path / "packed.py"
    call = "f(" + ", ".join(f"argument_{i}" for i in range(12)) + ")\n"  # 151 characters on one line
    packed.write_text(call, encoding="utf-8")
    res = _ruff("--config", str(ROOT / "pyproject.toml"), "--check", str(packed), cwd=tmp_path, command="format")
    assert res.returncode == 1 and "reformatted" in res.stdout, res.stdout + res.stderr
    # 109 characters: within 120, over ruff's default 88
    fits = "f(" + ", ".join(f"argument_{i}" for i in range(9)) + ")\n"
    packed.write_text(fits, encoding="utf-8")
    res = _ruff("--config", str(ROOT / "pyproject.toml"), "--check", str(packed), cwd=tmp_path, command="format")
    assert res.returncode == 0 and 88 < len(fits) <= 121, res.stdout + res.stderr
