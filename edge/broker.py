"""Embedded broker: spawn `mosquitto` on 127.0.0.1 when configured (or when none listens, in `auto` mode)."""

from __future__ import annotations

import ipaddress
import logging
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

log = logging.getLogger(__name__)


# mosquitto keeps at most 1000 messages per subscriber by default and silently drops the rest: a device
# replaying a long outage's spool (up to spool.max_rows alerts) faster than a dashboard takes them would lose
# alerts there. Sized to hold a full default spool; a site broker gets the same from configs/mosquitto/.
BROKER_MAX_QUEUED_MESSAGES = 20_000


class BrokerError(RuntimeError):
    pass


class BrokerSettingError(BrokerError):
    """The settings ask for an embedded broker that cannot be: a restart would not help (edge exit status 78)."""


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name other than localhost may resolve to anything: treat it as exposed


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


class EmbeddedBroker:
    """A mosquitto child process listening on 127.0.0.1:port only, anonymous access (loopback only)."""

    def __init__(self, port: int, binary: str | None = None, *, workdir: Path | None = None,
                 persistence: bool = False) -> None:
        """workdir: a fixed folder for the config, the log and (with persistence) the session store, kept
        across stop()/start(); by default a fresh temporary folder per start(), removed by stop()."""
        self.port = port
        self.binary = binary or shutil.which("mosquitto") or (
            "/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None)
        self.workdir = workdir
        self.persistence = persistence
        self._proc: subprocess.Popen | None = None
        self._dir: tempfile.TemporaryDirectory | None = None

    def _config(self, workdir: Path, logfile: Path) -> str:
        lines = [f"listener {self.port} 127.0.0.1", "allow_anonymous true",
                 f"max_queued_messages {BROKER_MAX_QUEUED_MESSAGES}"]
        if os.geteuid() == 0:
            # Started as root, mosquitto would switch to the `mosquitto` user, which cannot write our folders: no log,
            # and a session store silently not saved, so persistent sessions die with a restart. This broker is
            # loopback-only and belongs to the edge process, so it stays root like it. (Other users never switch.)
            lines.append("user root")
        if self.persistence:
            lines += ["persistence true", f"persistence_location {workdir}/", "autosave_interval 1"]
        else:
            lines.append("persistence false")
        lines.append(f"log_dest file {logfile}")
        return "\n".join(lines) + "\n"

    def start(self, timeout: float = 10.0) -> EmbeddedBroker:
        if not self.binary:
            raise BrokerSettingError("embedded broker requested but the `mosquitto` binary is not installed "
                              "(apt-get install mosquitto) - or set mqtt.embedded_broker: never")
        if port_open("127.0.0.1", self.port, 0.2):  # else that program's answer would pass for our broker's
            raise BrokerError(f"127.0.0.1:{self.port} is taken by another program, so an embedded mosquitto cannot "
                              f"listen there (mqtt.embedded_broker: auto uses a broker already listening; or choose "
                              f"another mqtt.port)")
        if self.workdir is None:
            self._dir = tempfile.TemporaryDirectory(prefix="drywallqa-mosquitto-")
            workdir = Path(self._dir.name)
        else:
            workdir = self.workdir
            workdir.mkdir(parents=True, exist_ok=True)
        conf = workdir / "mosquitto.conf"
        logfile = workdir / "mosquitto.log"
        conf.write_text(self._config(workdir, logfile))
        self._proc = subprocess.Popen([self.binary, "-c", str(conf)], stdout=subprocess.DEVNULL,
                                      stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                err = logfile.read_text(errors="replace")[-500:] if logfile.exists() else ""
                raise BrokerError(f"embedded mosquitto exited with code {self._proc.returncode}: {err.strip()}")
            if port_open("127.0.0.1", self.port, 0.2):
                log.info("embedded mosquitto listening on 127.0.0.1:%d (pid %d)", self.port, self._proc.pid)
                return self
            time.sleep(0.05)
        self.stop()
        raise BrokerError(f"embedded mosquitto did not listen on 127.0.0.1:{self.port} within {timeout:.0f} s")

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._proc = None
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None


def maybe_start_embedded(mode: str, host: str, port: int) -> EmbeddedBroker | None:
    """always: start one (host must be loopback); auto: only if host is loopback and nothing listens."""
    if mode == "never":
        return None
    if not is_loopback(host):
        if mode == "always":
            raise BrokerSettingError(f"mqtt.embedded_broker=always needs mqtt.host on loopback, got {host!r}")
        return None
    if mode == "auto" and port_open(host, port):
        return None
    if mode == "auto" and not EmbeddedBroker(port).binary:
        log.warning("no broker on %s:%d and no mosquitto binary; alerts are spooled until a broker appears",
                    host, port)
        return None
    return EmbeddedBroker(port).start()
