"""Faults found by trying bad inputs (issue 12): signals, killed runs, two runs into one folder, bad files.

Real processes of the console script, real files, tiny presets.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from d2v_export.spec import ExitCode

from .conftest import cli

TEXT = ("text", "--model", "preset:tiny", "--sequence-length", "8:16:32")


def _start(*args: str) -> subprocess.Popen[str]:
    exe = shutil.which("d2v-export") or str(Path(sys.executable).parent / "d2v-export")
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    # SIGHUP as a terminal delivers it: a test run started under nohup would hand the tool an ignored SIGHUP, which
    # the tool rightly keeps ignored (staging._interruptible)
    return subprocess.Popen(
        [exe, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_DFL),
    )


def _wait_for(proc: subprocess.Popen[str], needle: str) -> list[str]:
    """Read progress lines on stderr until one contains ``needle``."""
    seen = []
    assert proc.stderr is not None
    for line in proc.stderr:
        seen.append(line)
        if needle in line:
            return seen
    raise AssertionError(f"the run ended before '{needle}': {''.join(seen)}")


def _partials(parent: Path) -> list[Path]:
    return sorted(parent.glob(".out.*.partial"))


@pytest.mark.parametrize(
    "sig,wait_for", [(signal.SIGTERM, "measuring latency"), (signal.SIGHUP, "building onnxruntime-fp32")]
)
def test_sigterm_and_sighup_clean_up_like_ctrl_c(sig: signal.Signals, wait_for: str, tmp_path: Path) -> None:
    out = tmp_path / "out"
    int8 = ("--int8", "--calib-samples", "4", "--eval-samples", "4") if sig is signal.SIGTERM else ()
    proc = _start(*TEXT, *int8, "--output", str(out), "--bench-seconds", "300")
    try:
        _wait_for(proc, wait_for)
        (partial,) = _partials(tmp_path)
        if int8:
            assert (partial / "calibration-cache.npz").is_file()  # what used to be left behind
        proc.send_signal(sig)
        _stdout, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 128 + sig, stderr
    errors = [ln for ln in stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "interrupted" in errors[0] and sig.name in errors[0], stderr
    assert list(tmp_path.iterdir()) == [], "the run left files beside the output"


def test_a_killed_runs_staging_folder_is_removed_by_the_next_run(tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = _start(*TEXT, "--output", str(out), "--bench-seconds", "300")
    try:
        _wait_for(proc, "building onnxruntime-fp32")
        proc.send_signal(signal.SIGKILL)  # no handler can run: the staging folder stays
        proc.wait(timeout=60)
    finally:
        proc.kill()
    (stale,) = _partials(tmp_path)
    owner = json.loads((stale / ".d2v-owner.json").read_text())
    assert owner["pid"] == proc.pid
    res = cli(*TEXT, "--output", str(out), "--bench-seconds", "0")
    assert res.returncode == 0, res.stderr
    assert f"removed '{stale}'" in res.stderr and f"pid {proc.pid}" in res.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert not (out / ".d2v-owner.json").exists()


def test_a_staging_folder_without_an_owner_is_named_not_removed(tmp_path: Path) -> None:
    from d2v_export.staging import staging

    foreign = tmp_path / ".out.abc123.partial"
    foreign.mkdir()
    messages: list[str] = []
    with staging(tmp_path / "out", False, messages.append) as root:
        (root / "report.json").write_text("{}")
    assert foreign.is_dir() and any(str(foreign) in m and "interrupted run" in m for m in messages)
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["report.json"]


def test_the_output_folder_is_readable_by_others_as_the_umask_allows(tmp_path: Path) -> None:
    """mkdtemp makes the staging folder 0700: a bundle copied out of it, or served in place, was unreadable to a service user."""
    from d2v_export.staging import staging

    old = os.umask(0o022)
    try:
        with staging(tmp_path / "out", False) as root:
            (root / "report.json").write_text("{}")
    finally:
        os.umask(old)
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o755


def test_a_folder_filled_by_another_run_meanwhile_is_not_replaced(tmp_path: Path) -> None:
    """Two runs into one output without --force: the second to finish refuses and leaves nothing."""
    from d2v_export.staging import staging
    from d2v_export.spec import D2VError

    out = tmp_path / "out"
    with pytest.raises(D2VError, match="another run.*--force") as err:
        with staging(out, False) as root:
            (root / "report.json").write_text("mine")
            out.mkdir()  # the other run finishes first
            (out / "report.json").write_text("theirs")
    assert err.value.code == ExitCode.BAD_INPUT
    assert (out / "report.json").read_text() == "theirs"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    # with --force the last one replaces, as documented
    with staging(out, True) as root:
        (root / "report.json").write_text("mine")
    assert (out / "report.json").read_text() == "mine" and [p.name for p in tmp_path.iterdir()] == ["out"]


def test_two_real_runs_into_one_folder(tmp_path: Path) -> None:
    out = tmp_path / "out"
    procs = [_start(*TEXT, "--output", str(out), "--bench-seconds", "0", "--quiet") for _ in range(2)]
    results = [(p.communicate(timeout=600)[1], p.returncode)[::-1] for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, int(ExitCode.BAD_INPUT)], results
    (refused,) = [err for code, err in results if code == int(ExitCode.BAD_INPUT)]
    # "written by another run" (or "not empty" had the other finished before this one began)
    assert "--force" in refused
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert json.loads((out / "report.json").read_text())["variants"]


def test_invalid_utf8_lines_become_report_warnings(tmp_path: Path) -> None:
    calib, held = tmp_path / "calib.txt", tmp_path / "held.txt"
    calib.write_bytes(b"The cat sat on the mat.\nbad \xff line\nA second good sentence.\n\xc3\x28\nThird one, fine.\n")
    held.write_bytes(b"Held out one.\nHeld out two.\ncaf\xe9 au lait\n")
    out = tmp_path / "out"
    res = cli(
        *TEXT,
        "--int8",
        "--calibration",
        str(calib),
        "--eval",
        str(held),
        "--output",
        str(out),
        "--bench-seconds",
        "0",
        "--quiet",
        "--max-drift",
        "top1_agreement=0,logit_cosine=-1",
    )  # the readers are under test, not the random model's drift
    assert res.returncode == 0, res.stderr
    warnings = json.loads((out / "report.json").read_text())["warnings"]
    assert f"skipped 2 unreadable sample(s) in {calib}: calib.txt lines 2, 4 (not valid UTF-8)" in warnings
    assert f"skipped 1 unreadable sample(s) in {held}: held.txt line 3 (not valid UTF-8)" in warnings
    assert "calib.txt lines 2, 4" in (out / "report.md").read_text()


@pytest.fixture(scope="module")
def text_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from d2v_export.models import load, parse_source
    from d2v_export.spec import Modality

    folder = tmp_path_factory.mktemp("ckpt") / "ckpt"
    model = load(parse_source("preset:tiny", Modality.TEXT, "text-classification"))
    model.module.save_pretrained(folder)
    model.save_pretrained_files(folder)
    return folder


def _damage(src: Path, dst: Path, how: str) -> Path:
    import torch

    shutil.copytree(src, dst)
    st = dst / "model.safetensors"
    data = st.read_bytes()
    if how == "safetensors-truncated":
        st.write_bytes(data[: len(data) // 2])
    elif how == "safetensors-header":
        st.write_bytes(data[:5])
    else:  # pytorch_model.bin, as older checkpoints ship it
        from safetensors.torch import load_file

        st.unlink()
        torch.save(load_file(src / "model.safetensors"), dst / "pytorch_model.bin")
        full = (dst / "pytorch_model.bin").read_bytes()
        (dst / "pytorch_model.bin").write_bytes(
            full[: len(full) // 2] if how == "bin-truncated" else b"\x80\x02not a pickle at all"
        )
    return dst


@pytest.mark.parametrize("how", ["safetensors-truncated", "safetensors-header", "bin-truncated", "bin-garbage-pickle"])
def test_a_damaged_weights_file_is_bad_input(how: str, text_checkpoint: Path, tmp_path: Path) -> None:
    from d2v_export.models import load, parse_source
    from d2v_export.spec import D2VError, Modality

    ckpt = _damage(text_checkpoint, tmp_path / how, how)
    with pytest.raises(D2VError, match="truncated or corrupt") as err:
        load(parse_source(str(ckpt), Modality.TEXT, None))
    assert err.value.code == ExitCode.BAD_INPUT
    assert ("model.safetensors" if how.startswith("safetensors") else "pytorch_model.bin") in str(err.value)
    assert "\n" not in str(err.value)


def test_a_truncated_checkpoint_exits_3_with_one_line(text_checkpoint: Path, tmp_path: Path) -> None:
    ckpt = _damage(text_checkpoint, tmp_path / "ckpt", "safetensors-truncated")
    res = cli("text", "--model", str(ckpt), "--output", str(tmp_path / "out"), "--bench-seconds", "0", "--quiet")
    assert res.returncode == int(ExitCode.BAD_INPUT), res.stderr
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "model.safetensors" in errors[0] and "truncated or corrupt" in errors[0], res.stderr
    assert "internal error" not in res.stderr
    assert not (tmp_path / "out").exists()
