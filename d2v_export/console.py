"""Keep third-party chatter off the user's console: one context manager for every library that prints."""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from typing import Iterable, Iterator


@contextlib.contextmanager
def quiet(
    loggers: Iterable[str] = ("",), level: int = logging.ERROR, *, python_warnings: bool = False
) -> Iterator[None]:
    """Inside: the named loggers ("" is the root) log from ``level`` up, stdout (progress bars) is swallowed,
    and with ``python_warnings`` so are warnings. Everything is restored after, also on an exception."""
    chosen = [logging.getLogger(name or None) for name in loggers]
    levels = [lg.level for lg in chosen]
    for lg in chosen:
        lg.setLevel(level)
    try:
        with contextlib.ExitStack() as stack:
            if python_warnings:
                stack.enter_context(warnings.catch_warnings())
                warnings.simplefilter("ignore")
            stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
            yield
    finally:
        for lg, lv in zip(chosen, levels):
            lg.setLevel(lv)
