"""systemd sd_notify over the NOTIFY_SOCKET unix datagram socket (no dependency), plus watchdog pacing."""

from __future__ import annotations

import os
import socket
import time


def notify(message: str) -> bool:
    """Send e.g. 'READY=1' to systemd; False (silently) when not run under systemd with Type=notify."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return False
    if addr.startswith("@"):  # abstract namespace
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(addr)
            sock.sendall(message.encode("utf-8"))
        return True
    except OSError:
        return False


def watchdog_interval_s() -> float | None:
    """Half of WATCHDOG_USEC (as systemd recommends) when the watchdog is meant for this process."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid.isdigit() and int(pid) != os.getpid()):
        return None
    try:
        return int(usec) / 2e6
    except ValueError:
        return None


class Watchdog:
    """Call `kick()` from the live loop; it sends WATCHDOG=1 at most every half watchdog period."""

    def __init__(self) -> None:
        self.interval = watchdog_interval_s()
        self._last = 0.0

    def kick(self) -> None:
        if self.interval is None:
            return
        now = time.monotonic()
        if now - self._last >= self.interval:
            notify("WATCHDOG=1")
            self._last = now
