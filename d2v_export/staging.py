"""The atomic output folder of a run: a hidden staging folder beside ``--output``, renamed into place at the end.

    with staging(Path("out"), force=False, progress=print) as root:
        ...  # write everything under root; any exception, Ctrl-C, SIGTERM or SIGHUP removes it

SIGTERM and SIGHUP become ``Interrupted`` (a KeyboardInterrupt) while inside, so the same cleanup runs as for
Ctrl-C; the previous handlers come back after. The folder records its owner (host, pid), and a later run into
the same output removes one whose owner is dead (SIGKILL, power loss). docs/DESIGN.md, "Atomic output".
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import signal
import tempfile
import threading
from pathlib import Path
from typing import Any, Callable, Iterator

from .spec import D2VError

__all__ = ["Interrupted", "staging"]

Progress = Callable[[str], None]


class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGHUP during a run: it unwinds like Ctrl-C, so the staging folder is removed."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


_OWNER = ".d2v-owner.json"  # in a staging folder: which process writes it, so a later run can tell a stale one


@contextlib.contextmanager
def _interruptible() -> Iterator[None]:
    """SIGTERM and SIGHUP raise ``Interrupted`` (once) while inside; the previous handlers come back after.

    A signal the process ignores (SIGHUP under nohup) stays ignored. Outside the main thread Python
    cannot install handlers, and nothing changes.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    fired: list[int] = []

    def handler(signum: int, _frame: Any) -> None:
        if fired:  # already unwinding: let the cleanup finish
            return
        fired.append(signum)
        raise Interrupted(signum)

    previous: dict[int, Any] = {}
    for name in ("SIGTERM", "SIGHUP"):
        sig = getattr(signal, name, None)
        if sig is not None and signal.getsignal(sig) is not signal.SIG_IGN:
            previous[sig] = signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: another user's live process
        return True
    return True


def _clear_stale(output: Path, progress: Progress) -> None:
    """Remove staging folders of ``output`` whose run is dead (killed with SIGKILL, power loss); name the unknown ones."""
    import glob
    import json
    import socket

    for folder in sorted(output.parent.glob(f".{glob.escape(output.name)}.*.partial")):
        if not folder.is_dir():
            continue
        try:
            owner = json.loads((folder / _OWNER).read_text(encoding="utf-8"))
            host, pid = str(owner["host"]), int(owner["pid"])
        except (OSError, ValueError, KeyError, TypeError):
            progress(
                f"WARNING: '{folder}' looks like the staging folder of an interrupted run; delete it if no run is writing to '{output}'"
            )
            continue
        if host == socket.gethostname() and not _alive(pid):
            shutil.rmtree(folder, ignore_errors=True)
            progress(f"removed '{folder}', left by a run that was killed (pid {pid})")


@contextlib.contextmanager
def staging(output: Path, force: bool, progress: Progress = lambda _msg: None) -> Iterator[Path]:
    """A temporary folder beside ``output`` that replaces it only when everything succeeded.

    Any exception, Ctrl-C, SIGTERM or SIGHUP removes it; one left by a killed run (its owner process
    dead) is removed by the next run into the same output. Without ``force``, a folder that another
    run filled meanwhile is never replaced: the rename into place is atomic and fails on it.
    """
    import json
    import socket

    if output.exists() and not output.is_dir():
        raise D2VError(f"--output '{output}' is a file; choose a folder")
    if output.is_dir() and any(output.iterdir()) and not force:
        raise D2VError(f"output folder '{output}' is not empty; pass --force to replace it or choose another --output")
    output.parent.mkdir(parents=True, exist_ok=True)
    _clear_stale(output, progress)
    with _interruptible():
        tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.", suffix=".partial", dir=output.parent))
        try:
            tmp.chmod(0o777 & ~_umask())  # mkdtemp makes it 0700: a service user could not read the bundles in it
            (tmp / _OWNER).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}), encoding="utf-8")
            yield tmp
            (tmp / _OWNER).unlink()
            old = None
            if force and output.exists():
                old = output.parent / f".{output.name}.old-{os.getpid()}"
                output.rename(old)
            try:
                os.rename(tmp, output)  # atomic; replaces an empty folder, fails on a non-empty one
            except OSError as exc:
                if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
                    raise
                raise D2VError(
                    f"output folder '{output}' was written by another run while this one worked; this run's results were discarded: "
                    "pass --force to replace it or choose another --output"
                ) from None
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
