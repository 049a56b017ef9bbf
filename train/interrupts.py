"""SIGTERM as Ctrl-C: the one way the training side turns a polite stop into KeyboardInterrupt (no torch here)."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Inside, SIGTERM (kill, a `timeout`, systemd, docker stop, a CI job cancelled) raises KeyboardInterrupt as
    Ctrl-C does, so the work ends through its cleanup and its "interrupted" exit instead of dying on the spot; the
    previous handler is restored on leaving. Off the main thread, where Python cannot set a handler, nothing
    changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)
