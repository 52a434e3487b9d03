"""The linter the project adopted (ruff, configured in pyproject.toml) passes on the whole repository, and it is the
project's configuration that is applied (a planted unused import and a late-bound loop variable are caught)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _ruff(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", *args], capture_output=True, text=True, cwd=cwd, timeout=300)


def test_the_repository_lints_clean() -> None:
    res = _ruff(".")
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]


def test_the_project_configuration_catches_what_it_selects(tmp_path: Path) -> None:
    planted = tmp_path / "planted.py"
    planted.write_text("import os\n\n\ndef f(xs):\n    return [lambda: x for x in xs]\n", encoding="utf-8")
    res = _ruff("--config", str(ROOT / "pyproject.toml"), str(planted), cwd=tmp_path)
    assert res.returncode == 1 and "F401" in res.stdout and "B023" in res.stdout, res.stdout + res.stderr
