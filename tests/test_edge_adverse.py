"""Adverse conditions a device meets over weeks, with real processes and files: the alert spool's disk fills up
or turns read-only mid-run, the broker refuses the credentials."""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from _edge_helpers import clean_env, edge_cmd, fill, small_disk, write_config
from _mqtt_fixtures import Collector, mosquitto_fixture, wait_until

pytestmark = pytest.mark.slow
mosquitto = pytest.fixture(mosquitto_fixture, name="mosquitto")

LITE = Path(__file__).resolve().parents[1] / "models" / "exported" / "lite_effnet_lite0.onnx"


@pytest.fixture
def lite_model() -> Path:
    if not LITE.is_file():
        pytest.skip(f"{LITE} is not exported")
    return LITE


def _unique_frames(collector: Collector) -> list[int]:
    seen: dict[str, int] = {}
    for a in collector.payloads("alerts"):
        seen.setdefault(a["event_id"], a["frame_id"])
    return list(seen.values())


def test_spool_disk_full_mid_run_loses_no_alert_and_says_so(tmp_path, mosquitto, lite_model):
    from drywallqa.edge.runner import EdgeRunner
    from drywallqa.edge.settings import load_settings

    with small_disk(tmp_path / "disk") as disk:
        cfg = write_config(tmp_path / "edge.yaml", uri="demo", model=lite_model, port=mosquitto.port,
                           spool=disk / "spool.sqlite", source={"fps": 20.0, "demo_size": [96, 128]})
        collector = Collector(mosquitto.port, "drywallqa/dev1/alerts")
        runner = EdgeRunner(load_settings(cfg)).setup()
        try:
            assert collector.connected.wait(10) and runner.link.connected.wait(10)
            runner.run_frames(max_frames=2)
            wait_until(lambda: len(_unique_frames(collector)) >= 2, 10, "the first alerts")
            filler = fill(disk)
            runner.run_frames(max_frames=6)
            assert runner.stats.errors == 0 and runner.stats.processed == 8, runner.last_error
            assert "alert spool cannot be written" in runner.status("online").last_error
            wait_until(lambda: len(_unique_frames(collector)) >= 8, 15, "the alerts fired while the disk was full")
            filler.unlink()
            runner.run_frames(max_frames=2)
            assert runner.link.spool_error == "" and runner.status("online").last_error == ""
            wait_until(lambda: len(_unique_frames(collector)) >= 10, 15, "the alerts after space was freed")
            assert runner.link.flush(10) and runner.link.pending() == 0
        finally:
            runner.shutdown()
            collector.close()
    frames = _unique_frames(collector)
    assert sorted(frames) == frames[:] and len(frames) == 10, frames  # every alert once (after dedup), in order


def test_a_full_disk_at_start_runs_the_device_and_the_spool_opens_once_space_is_back(tmp_path, mosquitto, lite_model,
                                                                                      monkeypatch):
    """The disk holding the spool is full when the runtime starts (a tablet whose synced photos filled it). Before,
    that was a config error: exit 78, which the unit does not restart, so the device stayed down after the space was
    freed. Now it runs, publishes alerts from memory and says why in its status; once there is space, the spool
    opens, the alert it held from before is delivered, and new alerts are durable again."""
    import sqlite3

    import drywallqa.edge.spool as spool_module
    from drywallqa.edge.runner import EdgeRunner
    from drywallqa.edge.settings import load_settings
    from drywallqa.edge.spool import Spool

    monkeypatch.setattr(spool_module, "SPOOL_REOPEN_S", 0.2)
    collector = Collector(mosquitto.port, "drywallqa/dev1/alerts")
    with small_disk(tmp_path / "disk") as disk:
        before = Spool(disk / "spool.sqlite")
        before.put("from-before", "drywallqa/dev1/alerts", json.dumps({"event_id": "from-before", "frame_id": -1}).encode())
        before.close()
        filler = fill(disk)
        cfg = write_config(tmp_path / "edge.yaml", uri="demo", model=lite_model, port=mosquitto.port,
                           spool=disk / "spool.sqlite", source={"fps": 20.0, "demo_size": [96, 128]})
        runner = EdgeRunner(load_settings(cfg)).setup()
        try:
            assert collector.connected.wait(10) and runner.link.connected.wait(10)
            status = runner.status("online").last_error
            assert "cannot be opened" in status and "kept in memory only" in status, status
            runner.run_frames(max_frames=3)
            assert runner.stats.errors == 0 and runner.stats.processed == 3
            wait_until(lambda: len(_unique_frames(collector)) >= 3, 15, "the alerts published from memory")
            filler.unlink()
            wait_until(lambda: runner.spool.open_error == "", 10, "the spool opened once space is back")
            assert runner.status("online").last_error == ""  # at once, not only after the next alert
            wait_until(lambda: "from-before" in [a["event_id"] for a in collector.payloads("alerts")], 10,
                       "the alert the spool held from before the disk filled")
            runner.run_frames(max_frames=2)
            assert runner.status("online").last_error == ""
            wait_until(lambda: len(_unique_frames(collector)) >= 6, 15, "the alerts after the spool opened")  # 3 + 1 + 2
            assert runner.link.flush(10) and runner.link.pending() == 0
        finally:
            runner.shutdown()
            collector.close()
        db = sqlite3.connect(disk / "spool.sqlite")  # the new alerts went through the file: durable again
        assert db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0] == 0
        assert db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'outbox'").fetchone()[0] >= 3
        db.close()


def test_a_spool_path_in_a_missing_folder_on_a_full_disk_is_created_once_space_is_back(tmp_path, monkeypatch):
    import drywallqa.edge.spool as spool_module
    from drywallqa.edge.runner import open_spool
    from drywallqa.edge.settings import SpoolSettings

    monkeypatch.setattr(spool_module, "SPOOL_REOPEN_S", 0.0)
    with small_disk(tmp_path / "disk") as disk:
        filler = fill(disk)
        spool = open_spool(SpoolSettings(path=str(disk / "state" / "spool.sqlite")))
        try:
            assert "cannot be opened" in spool.open_error and spool.pending() == []
            with pytest.raises(Exception, match="cannot be opened"):
                spool.put("a", "t", b"x")
            filler.unlink()
            assert spool.put("a", "t", b"x") == 0 and spool.open_error == "" and spool.count() == 1
        finally:
            spool.close()
        assert (disk / "state" / "spool.sqlite").is_file()


def test_a_read_only_disk_at_start_is_a_device_state_and_a_wrong_spool_path_a_config_error(tmp_path, monkeypatch):
    """A data partition the kernel remounted read-only (a failing SD card) is not the operator's config: the
    runtime starts and tries again. A spool.path that is a folder is: exit 78 with spool.path named, as before."""
    import drywallqa.edge.spool as spool_module
    from drywallqa.edge.runner import open_spool
    from drywallqa.edge.settings import ConfigError, SpoolSettings
    from drywallqa.edge.spool import Spool

    monkeypatch.setattr(spool_module, "SPOOL_REOPEN_S", 0.0)
    with small_disk(tmp_path / "disk") as disk:
        Spool(disk / "spool.sqlite").close()
        assert subprocess.run(["mount", "-o", "remount,ro", str(disk)]).returncode == 0
        try:
            spool = open_spool(SpoolSettings(path=str(disk / "spool.sqlite")))
            assert "cannot be opened" in spool.open_error, spool.open_error
        finally:
            assert subprocess.run(["mount", "-o", "remount,rw", str(disk)]).returncode == 0
        try:
            spool.put("a", "t", b"x")
            assert spool.open_error == "" and spool.count() == 1
        finally:
            spool.close()
    (tmp_path / "a-folder").mkdir()
    with pytest.raises(ConfigError, match="spool.path"):
        open_spool(SpoolSettings(path=str(tmp_path / "a-folder")))


@pytest.mark.parametrize("state", ["full", "read-only"])
def test_a_spool_unopened_at_start_still_refuses_a_second_runtime(tmp_path, monkeypatch, state):
    """While the spool's disk is full or read-only the runtime runs with its spool unopened, and a manual `edge run`
    (or the service, started beside one) must still be refused: two runtimes with one mqtt.device_id knock each
    other off the broker. Before: the lock, which its lock file from earlier runs still gives on such a disk, was let
    go at start, and once space was back the second runtime took the spool and the first one never opened it."""
    import drywallqa.edge.spool as spool_module
    from drywallqa.edge.runner import open_spool
    from drywallqa.edge.settings import SpoolSettings
    from drywallqa.edge.spool import Spool, SpoolInUse

    monkeypatch.setattr(spool_module, "SPOOL_REOPEN_S", 0.0)
    with small_disk(tmp_path / "disk") as disk:
        path = disk / "spool.sqlite"
        before = Spool(path)
        before.put("from-before", "t", b"x")
        before.close()
        filler = fill(disk) if state == "full" else None
        if state == "read-only":
            assert subprocess.run(["mount", "-o", "remount,ro", str(disk)]).returncode == 0
        spool = open_spool(SpoolSettings(path=str(path)))
        try:
            assert "cannot be opened" in spool.open_error, spool.open_error
            with pytest.raises(SpoolInUse):  # a second runtime on this spool
                Spool(path)
            with pytest.raises(SpoolInUse):
                open_spool(SpoolSettings(path=str(path)))
            if filler is not None:
                filler.unlink()
            else:
                assert subprocess.run(["mount", "-o", "remount,rw", str(disk)]).returncode == 0
            assert [it.event_id for it in spool.pending()] == ["from-before"] and spool.open_error == ""
            with pytest.raises(SpoolInUse):
                Spool(path)
        finally:
            spool.close()
        Spool(path).close()  # closed: free again


def test_damaged_spool_at_start_is_moved_aside_and_the_device_runs(tmp_path, mosquitto, lite_model):
    """A power cut on a worn SD card can leave the spool's pages corrupt: refusing to start (exit 2, restarted by
    systemd, refused again) would silence the device for good. The file is kept aside for recovery instead."""
    from drywallqa.edge.spool import Spool

    spool_path = tmp_path / "spool.sqlite"
    spool = Spool(spool_path)
    for i in range(50):
        spool.put(f"old{i}", "drywallqa/dev1/alerts", os.urandom(3000))
    spool.close()
    data = bytearray(spool_path.read_bytes())
    for offset in range(2 * 4096, len(data), 3 * 4096):  # the header stays valid: an SQLite file, damaged
        data[offset:offset + 200] = os.urandom(200)
    spool_path.write_bytes(bytes(data))
    cfg = write_config(tmp_path / "edge.yaml", uri="demo", model=lite_model, port=mosquitto.port, spool=spool_path,
                       source={"fps": 10.0, "demo_size": [64, 80]})
    collector = Collector(mosquitto.port, "drywallqa/dev1/#")
    try:
        assert collector.connected.wait(10)
        proc = subprocess.run(edge_cmd(cfg, "--max-frames", "3"), env=clean_env(), capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "is damaged" in proc.stderr and "moved aside to" in proc.stderr
        wait_until(lambda: len(_unique_frames(collector)) >= 3, 15, "the alerts of the run")
        assert any("alert spool was damaged" in s["last_error"] for s in collector.payloads("status"))
    finally:
        collector.close()
    kept = list(tmp_path.glob("spool.sqlite.corrupt-*"))
    assert [p.name for p in kept if not p.name.endswith(("-wal", "-shm"))] and \
        next(p for p in kept if not p.name.endswith(("-wal", "-shm"))).read_bytes() == bytes(data)
    assert Spool(spool_path).count() == 0  # the fresh spool, all delivered


def test_broker_refusing_the_credentials_is_reported_once_a_minute_not_per_retry(tmp_path, lite_model):
    from _mqtt_fixtures import MOSQUITTO, free_port

    if MOSQUITTO is None:
        pytest.skip("mosquitto is not installed")
    port = free_port()
    subprocess.run(["mosquitto_passwd", "-b", "-c", str(tmp_path / "passwd"), "edge", "right"], check=True)
    conf = tmp_path / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous false\npassword_file {tmp_path / 'passwd'}\n"
                    + ("user root\n" if os.geteuid() == 0 else ""))
    broker = subprocess.Popen([MOSQUITTO, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        cfg = write_config(tmp_path / "edge.yaml", uri="demo", model=lite_model, port=port,
                           spool=tmp_path / "spool.sqlite", source={"fps": 10.0, "demo_size": [64, 80]},
                           mqtt={"username": "edge", "password": "wrong", "reconnect_max_s": 1})
        proc = subprocess.run(edge_cmd(cfg, "--duration", "6"), env=clean_env(), capture_output=True, text=True,
                              timeout=120)
    finally:
        broker.terminate()
        broker.wait(10)
    assert proc.returncode == 0, proc.stderr[-3000:]
    refused = [line for line in proc.stderr.splitlines() if "refused the connection" in line]
    assert len(refused) == 1, refused  # paho retried every second or two; one line, with what to check
    assert "Not authorized" in refused[0] and "mqtt.password" in refused[0]
    assert "still undelivered; they stay in the spool" in proc.stderr  # the alerts wait on disk


def test_a_spool_that_fails_on_every_try_is_logged_once_a_minute_not_per_retry(tmp_path, mosquitto, caplog):
    """A spool whose database fails mid-run (here its connection is gone) makes every delivery attempt fail; the
    log gets the first traceback, not one every half second for as long as it lasts."""
    import logging
    import time

    from drywallqa.edge.mqtt_link import EdgeLink
    from drywallqa.edge.payloads import StatusPayload
    from drywallqa.edge.settings import MqttSettings
    from drywallqa.edge.spool import Spool

    spool = Spool(tmp_path / "spool.sqlite", max_rows=100, max_bytes=2**20)
    settings = MqttSettings(host="127.0.0.1", port=mosquitto.port, device_id="dev-spool")
    link = EdgeLink(settings, spool, status=lambda state: StatusPayload(device_id="dev-spool", state=state,
                                                                        timestamp=time.time()),
                    on_command=lambda cmd: None)
    caplog.set_level(logging.WARNING, logger="drywallqa.edge.mqtt_link")
    link.start()
    try:
        assert link.connected.wait(10)
        with spool._lock:  # not while the delivery thread is inside a query
            spool._db.close()  # every read of the spool now raises, as a damaged file does
        link._wake.set()
        wait_until(lambda: link._delivery_trouble.count >= 4, timeout=15, what="four failed delivery attempts")
        errors = [r for r in caplog.records if "alert delivery" in r.getMessage()]
        assert len(errors) == 1 and errors[0].exc_info is not None, [r.getMessage() for r in errors]
    finally:
        link._stop.set()
        link._wake.set()
        link._thread.join(5)
        link._client.loop_stop()


HOLD_SPOOL = """
import sys, time
from drywallqa.edge.spool import Spool
spool = Spool(sys.argv[1])
print("holding", flush=True)
time.sleep(120)
"""


def _hold_spool(path: Path) -> subprocess.Popen:
    """Another process with the spool open, as a service left running is."""
    import sys

    holder = subprocess.Popen([sys.executable, "-c", HOLD_SPOOL, str(path)], stdout=subprocess.PIPE, text=True,
                              env=clean_env())
    assert holder.stdout is not None and holder.stdout.readline().strip() == "holding"
    return holder


def test_a_second_runtime_on_one_spool_is_refused_naming_the_first(tmp_path, lite_model):
    """A manual `edge run` while the service runs (a common way to debug on a device) would share the spool and
    the MQTT client id: each would publish the other's alerts and knock it off the broker, every second. The
    second one stops at start with the first one's pid, and exits 1 (the service retries: the other may stop)."""
    spool_path = tmp_path / "spool.sqlite"
    holder = _hold_spool(spool_path)
    try:
        cfg = write_config(tmp_path / "edge.yaml", uri="demo", model=lite_model, port=1, spool=spool_path,
                           source={"fps": 10.0, "demo_size": [64, 80]})
        proc = subprocess.run(edge_cmd(cfg, "--max-frames", "3"), env=clean_env(), capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode == 1, proc.stderr[-3000:]
        assert f"in use by another DrywallQA edge runtime (pid {holder.pid})" in proc.stderr
        assert "spool.path and mqtt.device_id" in proc.stderr
    finally:
        holder.kill()
        holder.wait(10)


def test_the_spool_lock_goes_with_a_killed_holder(tmp_path):
    """kill -9 (or a power cut) leaves the lock file behind, but not the lock: the next start opens the spool."""
    from drywallqa.edge.spool import Spool, SpoolInUse

    spool_path = tmp_path / "spool.sqlite"
    holder = _hold_spool(spool_path)
    with pytest.raises(SpoolInUse, match=f"pid {holder.pid}"):
        Spool(spool_path)
    holder.kill()
    holder.wait(10)
    spool = Spool(spool_path)
    try:
        spool.put("e1", "t", b"x")
        assert spool.count() == 1
        assert (tmp_path / "spool.sqlite.lock").read_text().strip() == str(os.getpid())
        with pytest.raises(SpoolInUse):  # one process, two openings: refused too
            Spool(spool_path)
    finally:
        spool.close()
    Spool(spool_path).close()  # closed: free again


def _damage(spool_path: Path) -> bytes:
    """A spool with rows, its pages then overwritten (the header stays valid: an SQLite file, damaged)."""
    from drywallqa.edge.spool import Spool

    spool = Spool(spool_path)
    for i in range(50):
        spool.put(f"old{i}", "drywallqa/dev1/alerts", os.urandom(3000))
    spool.close()
    data = bytearray(spool_path.read_bytes())
    for offset in range(2 * 4096, len(data), 3 * 4096):
        data[offset:offset + 200] = os.urandom(200)
    spool_path.write_bytes(bytes(data))
    return bytes(data)


def test_a_damaged_spool_is_moved_aside_under_the_lock(tmp_path):
    """The spool lock is held from the first read of a damaged spool until the fresh one is open. Before: it was
    freed while the files were moved aside, so a second runtime starting then opened a spool there, and the
    first one (which had found the damage) then failed with 'in use'; or it moved the second one's fresh spool
    aside as damaged."""
    import logging

    from drywallqa.edge.runner import open_spool
    from drywallqa.edge.settings import SpoolSettings
    from drywallqa.edge.spool import Spool, SpoolInUse

    spool_path = tmp_path / "spool.sqlite"
    _damage(spool_path)
    seen: list[str] = []

    class SecondRuntime(logging.Handler):
        """Starts another spool user right while the first one moves the damaged spool aside."""

        def emit(self, record: logging.LogRecord) -> None:
            if "is damaged" not in record.getMessage():
                return
            try:
                Spool(spool_path).close()
                seen.append("opened")
            except SpoolInUse:
                seen.append("refused")

    handler = SecondRuntime()
    runner_log = logging.getLogger("drywallqa.edge.runner")
    runner_log.addHandler(handler)
    try:
        spool = open_spool(SpoolSettings(path=str(spool_path)))
    finally:
        runner_log.removeHandler(handler)
    try:
        assert seen == ["refused"], seen
        assert spool.moved_aside is not None and spool.moved_aside.exists() and spool.count() == 0
    finally:
        spool.close()
    Spool(spool_path).close()  # closed: the lock is free again


# -- a manual run holding the spool, and the service ------------------------------------------------------------


class NotifySocket:
    """A real sd_notify socket, as systemd gives a Type=notify service: records what the process tells it."""

    def __init__(self, folder: Path) -> None:
        import socket

        self.path = folder / "notify"
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(str(self.path))
        self._sock.settimeout(0.05)
        self.received: list[str] = []

    def poll(self) -> list[str]:
        """Every message so far."""
        while True:
            try:
                self.received.append(self._sock.recv(4096).decode())
            except TimeoutError:
                return self.received

    def close(self) -> None:
        self._sock.close()


@contextlib.contextmanager
def service_run(cfg: Path, *extra: str):
    """`edge run --config CFG --wait-for-spool` as the unit runs it, with a NOTIFY_SOCKET (a short path: a socket's
    path is at most 107 bytes); yields the process and the socket."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="dq-notify-") as folder:
        notify = NotifySocket(Path(folder))
        proc = subprocess.Popen(edge_cmd(cfg, "--wait-for-spool", *extra), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=clean_env(NOTIFY_SOCKET=str(notify.path)))
        try:
            yield proc, notify
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.communicate(timeout=30)
            notify.close()


def test_the_service_waits_for_a_manual_run_to_end_then_starts_by_itself(tmp_path, lite_model):
    """A person's `edge run` on the device holds the spool for minutes. Before: the service exited 1 at each start,
    systemd restarted it every 5 s until StartLimitBurst and then left it failed until the next boot. Now it waits
    (one log line, STATUS= naming the holder, its start time extended, nothing loaded) and starts once that run
    ends."""
    import time

    spool_path = tmp_path / "spool.sqlite"
    holder = _hold_spool(spool_path)
    cfg = write_config(tmp_path / "edge.yaml", uri="demo", model=lite_model, port=1, spool=spool_path,
                       source={"fps": 10.0, "demo_size": [64, 80]})
    with service_run(cfg, "--max-frames", "3") as (proc, notify):
        try:
            status = f"STATUS=waiting for pid {holder.pid} to release the alert spool {spool_path}"
            wait_until(lambda: status in notify.poll() or proc.poll() is not None, 60, "the waiting status")
            time.sleep(3.5)  # several looks at the lock
            assert proc.poll() is None, proc.communicate()[1][-3000:]  # waiting, not failed
            messages = notify.poll()
            assert "READY=1" not in messages and messages.count(status) == 1
            assert messages.count("EXTEND_TIMEOUT_USEC=120000000") >= 3  # systemd's start timeout moves on
        finally:
            holder.kill()
            holder.wait(10)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err[-3000:]
        assert "READY=1" in notify.poll()
    assert err.count("waiting for it to end before starting") == 1, err[-3000:]
    assert f"is held by pid {holder.pid}, most likely another DrywallQA edge runtime" in err and "is free after" in err


def test_a_service_waiting_for_the_spool_stops_at_once(tmp_path, lite_model):
    """`systemctl stop` while the service waits: it ends at once and cleanly, not at TimeoutStopSec by SIGKILL."""
    import signal
    import time

    spool_path = tmp_path / "spool.sqlite"
    holder = _hold_spool(spool_path)
    cfg = write_config(tmp_path / "edge.yaml", uri="demo", model=lite_model, port=1, spool=spool_path)
    try:
        with service_run(cfg) as (proc, notify):
            wait_until(lambda: any(m.startswith("STATUS=waiting") for m in notify.poll()) or proc.poll() is not None,
                       60, "the waiting status")
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            proc.send_signal(signal.SIGTERM)
            t0 = time.monotonic()
            assert proc.wait(10) == 0 and time.monotonic() - t0 < 3
            assert "READY=1" not in notify.poll()
    finally:
        holder.kill()
        holder.wait(10)


# -- deliveries the full disk cannot record ---------------------------------------------------------------------


def _spool_alerts(spool, count: int) -> list[str]:
    ids = [f"ack-{i}" for i in range(count)]
    for event_id in ids:
        spool.put(event_id, "drywallqa/dev-ack/alerts", json.dumps({"event_id": event_id}).encode())
    return ids


def _start_link(spool, port: int):
    import time

    from drywallqa.edge.mqtt_link import EdgeLink
    from drywallqa.edge.payloads import StatusPayload
    from drywallqa.edge.settings import MqttSettings

    def status(state: str) -> StatusPayload:
        return StatusPayload(device_id="dev-ack", state=state, timestamp=time.time())

    link = EdgeLink(MqttSettings(host="127.0.0.1", port=port, device_id="dev-ack"), spool, status=status,
                    on_command=lambda cmd: None).start()
    assert link.connected.wait(10)
    return link, lambda: link.stop(status("offline"))


def test_a_delivery_the_full_disk_cannot_record_is_not_sent_again(tmp_path, mosquitto, caplog):
    """The broker acknowledged the alerts, but deleting their rows fails (SQLITE_FULL). Before: the acknowledgement
    was dropped with the exception, the rows stayed 'undelivered' (status, flush waited its whole timeout at every
    stop) and were sent again at every start. Now the deliveries are kept in memory and written once space is back:
    each alert arrives once, and the error is logged once, with its end."""
    import logging

    from drywallqa.edge.spool import Spool

    caplog.set_level(logging.WARNING, logger="drywallqa.edge.spool")
    collector = Collector(mosquitto.port, "drywallqa/dev-ack/alerts")
    assert collector.connected.wait(10)
    with small_disk(tmp_path / "disk") as disk:
        spool = Spool(disk / "spool.sqlite")
        ids = _spool_alerts(spool, 5)
        filler = fill(disk)
        link, stop = _start_link(spool, mosquitto.port)
        try:
            wait_until(lambda: len(collector.payloads("alerts")) >= 5, 15, "the spooled alerts")
            assert link.flush(5) and link.pending() == 0 and link.delivered == 5
            assert "cannot record deliveries (database or disk is full)" in spool.ack_error
            filler.unlink()
            wait_until(lambda: spool.ack_error == "", 10, "the deliveries written once space is back")
        finally:
            stop()
            spool.close()
        again = Spool(disk / "spool.sqlite")  # the next start
        assert again.count() == 0 and again.pending() == []
        again.close()
    collector.close()
    assert [a["event_id"] for a in collector.payloads("alerts")] == ids
    spool_log = [(r.levelname, r.getMessage()) for r in caplog.records if r.name == "drywallqa.edge.spool"]
    assert [level for level, _ in spool_log] == ["ERROR", "WARNING"], spool_log
    assert "cannot record deliveries" in spool_log[0][1] and "5 recorded late" in spool_log[1][1]


def test_deliveries_still_unrecorded_at_stop_are_sent_once_more_with_their_event_id(tmp_path, mosquitto, caplog):
    """The disk is still full when the runtime stops: the deliveries cannot be kept, and the stop says so. The next
    start sends those alerts once more, byte for byte (same event_id: consumers deduplicate), records them, and
    the start after it sends nothing."""
    import logging

    from drywallqa.edge.spool import Spool

    caplog.set_level(logging.WARNING, logger="drywallqa.edge.spool")
    collector = Collector(mosquitto.port, "drywallqa/dev-ack/alerts")
    assert collector.connected.wait(10)
    with small_disk(tmp_path / "disk") as disk:
        path = disk / "spool.sqlite"
        spool = Spool(path)
        ids = _spool_alerts(spool, 3)
        filler = fill(disk)
        link, stop = _start_link(spool, mosquitto.port)
        try:
            wait_until(lambda: len(collector.payloads("alerts")) >= 3, 15, "the spooled alerts")
            assert link.flush(5) and link.pending() == 0
        finally:
            stop()
            spool.close()
        assert "3 delivered alert(s) could not be recorded as delivered (database or disk is full); they will be " \
               "sent again at the next start" in caplog.text
        filler.unlink()
        for start in (2, 3):
            spool = Spool(path)
            link, stop = _start_link(spool, mosquitto.port)
            try:
                assert link.flush(10) and spool.count() == 0, f"start {start}"
            finally:
                stop()
                spool.close()
    wait_until(lambda: len(collector.payloads("alerts")) >= 6, 5, "the alerts sent once more")
    collector.close()
    assert [a["event_id"] for a in collector.payloads("alerts")] == ids + ids  # and not a third time
    assert [m for _, m, _ in collector.messages[:3]] == [m for _, m, _ in collector.messages[3:]]


def test_delivered_rows_the_full_disk_kept_are_never_counted_as_dropped(tmp_path):
    """Delivered rows whose deletion failed neither count as undelivered nor push the spool over its bounds: once
    space is back, the next alert deletes them first instead of dropping the oldest as if undelivered."""
    from drywallqa.edge.spool import Spool

    with small_disk(tmp_path / "disk") as disk:
        spool = Spool(disk / "spool.sqlite", max_rows=3)
        for i in range(3):
            spool.put(f"e{i}", "t", b"x" * 100)
        delivered = spool.pending()
        filler = fill(disk)
        for item in delivered:
            spool.ack(item.seq)  # before: raised SQLITE_FULL and left the row undelivered
        assert spool.count() == 0 and spool.pending() == [] and spool.ack_error
        filler.unlink()
        spool.put("e3", "t", b"y")
        assert spool.dropped() == 0 and [it.event_id for it in spool.pending()] == ["e3"] and not spool.ack_error
        spool.close()


def test_a_watched_photo_whose_alert_could_not_be_spooled_is_not_recorded_done(tmp_path, lite_model):
    """With the spool's disk full, an alert is published from memory only (lost if the process dies before the
    broker has it): its photo must then not be recorded as processed, so a restart processes it again
    (at-least-once); the photos before and after, whose alerts are spooled, are recorded."""
    import cv2

    from drywallqa.edge.runner import EdgeRunner
    from drywallqa.edge.settings import load_settings
    from drywallqa.edge.sources import DemoSource, watch_record_path

    folder = tmp_path / "sync"
    folder.mkdir()
    demo = DemoSource((96, 128))
    demo.open()
    for i in range(3):
        path = folder / f"p{i}.png"
        cv2.imwrite(str(path), cv2.cvtColor(demo.read(), cv2.COLOR_RGB2BGR))
        os.utime(path, (os.path.getmtime(path) - 60 + i,) * 2)
    with small_disk(tmp_path / "disk") as disk:
        cfg = write_config(tmp_path / "edge.yaml", uri=str(folder), model=lite_model, port=1,
                           spool=disk / "spool.sqlite", source={"watch": True})
        record = watch_record_path(disk / "spool.sqlite", str(folder))
        runner = EdgeRunner(load_settings(cfg)).setup()
        try:
            runner.run_frames(max_frames=1)
            filler = fill(disk)
            runner.run_frames(max_frames=1)
            assert "alert spool cannot be written" in runner.status("online").last_error
            filler.unlink()
            runner.run_frames(max_frames=1)
            assert runner.stats.processed == 3 and runner.stats.alerts == 3, runner.last_error
            done = [json.loads(line)[0] for line in record.read_text().splitlines()[1:]
                    if len(json.loads(line)) == 3]
            assert sorted(done) == [str(folder / "p0.png"), str(folder / "p2.png")], done
        finally:
            runner.shutdown()


# -- the spool's disk at start and mid-run: late opening, config mistakes, stale lock pids, held alerts ------------


def _disk_state(disk: Path, state: str) -> Callable[[], None]:
    """Make `disk` full or read-only; returns what frees it again."""
    if state == "full":
        return fill(disk).unlink
    assert subprocess.run(["mount", "-o", "remount,ro", str(disk)]).returncode == 0
    return lambda: subprocess.run(["mount", "-o", "remount,rw", str(disk)], check=True)


@pytest.mark.parametrize("state", ["full", "read-only"])
def test_a_spool_unopened_at_start_that_turns_out_damaged_is_moved_aside_when_it_opens(tmp_path, monkeypatch, caplog,
                                                                                       state):
    """The disk was full or read-only at start, so the spool's damage could not be seen then. Before: once it could
    be read, the damaged file was tried again every 10 s for good, the spool never opened and no alert was durable
    again. Now it is moved aside as at start (same name, same log line, same status) and a fresh spool opened."""
    import logging

    import drywallqa.edge.spool as spool_module
    from drywallqa.edge.runner import EdgeRunner, open_spool
    from drywallqa.edge.settings import SpoolSettings, load_settings

    monkeypatch.setattr(spool_module, "SPOOL_REOPEN_S", 0.0)
    caplog.set_level(logging.ERROR, logger="drywallqa.edge.spool")
    with small_disk(tmp_path / "disk") as disk:
        path = disk / "spool.sqlite"
        damaged = _damage(path)
        free = _disk_state(disk, state)
        try:
            spool = open_spool(SpoolSettings(path=str(path)))
        finally:
            free()
        try:
            assert "cannot be opened" in spool.open_error and spool.moved_aside is None, spool.open_error
            assert spool.pending() == [] and spool.open_error == "", spool.open_error  # opened, afresh
            aside = spool.moved_aside
            assert aside is not None and aside.name.startswith("spool.sqlite.corrupt-") and aside.read_bytes() == damaged
            assert spool.put("after", "t", b"x") == 0 and [it.event_id for it in spool.pending()] == ["after"]
            runner = EdgeRunner(load_settings())
            runner.spool = spool
            assert runner.status("online").last_error == f"alert spool was damaged: moved aside to {aside}, started afresh"
        finally:
            spool.close()
    assert "is damaged" in caplog.text and f"moved aside to {aside}" in caplog.text


@pytest.mark.parametrize("state", ["full", "read-only"])
def test_a_spool_path_that_cannot_be_a_spool_is_a_config_error_on_a_full_or_read_only_disk_too(tmp_path, state):
    """A folder, a path under a file, a file that is not a database: wrong settings, exit 78 with spool.path named.
    Before: on a full or read-only disk they were taken for the disk's state, and the runtime ran without a spool,
    trying the impossible path again every 10 s for good."""
    from drywallqa.edge.runner import open_spool
    from drywallqa.edge.settings import ConfigError, SpoolSettings

    with small_disk(tmp_path / "disk") as disk:
        (disk / "a-folder").mkdir()
        (disk / "afile").write_text("x")
        (disk / "notes.sqlite").write_text("these are my notes, not a database\n" * 20)
        mistakes = {disk / "a-folder": "it is a folder", disk / "afile" / "spool.sqlite": f"{disk / 'afile'} is a file",
                    disk / "notes.sqlite": "it is not an SQLite database"}
        free = _disk_state(disk, state)
        try:
            for path, why in mistakes.items():
                with pytest.raises(ConfigError, match=re.escape(f"spool.path: cannot open the alert spool {path}: {why}")):
                    open_spool(SpoolSettings(path=str(path)))
        finally:
            free()
        assert (disk / "notes.sqlite").read_text().startswith("these are my notes")


HOLD_LOCK = """
import sys, time
from collections.abc import Callable
from pathlib import Path
from drywallqa.edge.spool import lock_spool
lock_spool(Path(sys.argv[1]))
print("holding", flush=True)
time.sleep(120)
"""


def test_a_refusal_names_no_pid_that_is_not_alive(tmp_path):
    """On a read-only disk the holder of the spool's lock cannot write its pid: the lock file still names an earlier
    holder, gone since. Before: a second runtime was refused naming that dead pid (someone would look for it, or kill
    whatever has that pid now). Now the refusal says the spool is held by another process."""
    import sys

    from drywallqa.edge.spool import SpoolInUse, lock_spool

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True).stdout.strip()
    with small_disk(tmp_path / "disk") as disk:
        path = disk / "spool.sqlite"
        (disk / "spool.sqlite.lock").write_text(f"{gone}\n")  # written by an earlier runtime, ended since
        free = _disk_state(disk, "read-only")
        try:
            holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(path)], stdout=subprocess.PIPE, text=True,
                                      env=clean_env())
            try:
                assert holder.stdout is not None and holder.stdout.readline().strip() == "holding"
                with pytest.raises(SpoolInUse) as info:
                    lock_spool(path)
            finally:
                holder.kill()
                holder.wait(10)
        finally:
            free()
    message = str(info.value)
    assert f"pid {gone}" not in message and info.value.holder == "unknown", message
    assert f"is held by another process (its pid is not known: `fuser -v {path}.lock` names it)" in message


def _alert(event_id: str, snapshot_bytes: int = 30_000):
    """An alert with a snapshot of about `snapshot_bytes` (incompressible, as a JPEG is)."""
    import base64
    import time

    from drywallqa.edge.payloads import AlertPayload

    return AlertPayload(event_id=event_id, device_id="dev-ack", timestamp=time.time(), frame_id=0, class_name="crack",
                        prompt="segment crack", rule="area_fraction>=0.0", area_fraction=0.1,
                        snapshot_jpeg_b64=base64.b64encode(os.urandom(snapshot_bytes * 3 // 4)).decode())


def test_a_spool_whose_disk_filled_mid_run_is_writable_again_without_waiting_for_an_alert(tmp_path, mosquitto,
                                                                                            monkeypatch):
    """The disk filled, an alert was published from memory and delivered. Before: status.last_error said the spool
    'cannot be written' after space was freed, until the next alert (days, on a quiet wall). Now the spool is tried
    again every few seconds with a write as large as the failed alert: the error stays while there is no room, and
    clears once there is, with no new alert."""
    import drywallqa.edge.mqtt_link as link_module
    from drywallqa.edge.spool import Spool

    monkeypatch.setattr(link_module, "SPOOL_RETRY_S", 0.1)
    with small_disk(tmp_path / "disk") as disk:
        spool = Spool(disk / "spool.sqlite")
        link, stop = _start_link(spool, mosquitto.port)
        try:
            filler = fill(disk)
            assert link.send_alert(_alert("while-full")) is False and "cannot be written" in link.spool_error
            wait_until(lambda: link.pending() == 0, 10, "the alert published from memory acknowledged")
            for _ in range(2):  # a whole retry done (the next starts after it), as large as the alert: still no room
                tried = link._spool_tried_at
                wait_until(lambda tried=tried: link._spool_tried_at > tried, 10)
            assert "cannot be written" in link.spool_error
            filler.unlink()
            wait_until(lambda: link.spool_error == "", 10, "the spool writable again, with no new alert")
            assert spool.count() == 0 and link.pending() == 0
        finally:
            stop()
            spool.close()


def test_alerts_held_in_memory_are_spooled_once_the_disk_has_room_and_sent_once(tmp_path, mosquitto, monkeypatch):
    """Disk full and broker down: alerts wait in memory only (lost if the process dies). Before: they stayed there
    even after space was freed. Now they are written to the spool as soon as it has room (durable again, counted
    once), and when the broker is back each arrives once: the spool does not hand them to paho a second time."""
    import time

    import drywallqa.edge.mqtt_link as link_module
    from drywallqa.edge.mqtt_link import EdgeLink
    from drywallqa.edge.payloads import StatusPayload
    from drywallqa.edge.settings import MqttSettings
    from drywallqa.edge.spool import Spool

    monkeypatch.setattr(link_module, "SPOOL_RETRY_S", 0.1)
    collector = Collector(mosquitto.port, "drywallqa/dev-ack/alerts")
    assert collector.connected.wait(10)
    mosquitto.stop()  # its persistent session keeps the collector's subscription
    with small_disk(tmp_path / "disk") as disk:
        path = disk / "spool.sqlite"
        spool = Spool(path)

        def status(state: str) -> StatusPayload:
            return StatusPayload(device_id="dev-ack", state=state, timestamp=time.time())

        link = EdgeLink(MqttSettings(host="127.0.0.1", port=mosquitto.port, device_id="dev-ack", reconnect_max_s=1),
                        spool, status=status, on_command=lambda cmd: None).start()
        try:
            filler = fill(disk)
            held = ["held-0", "held-1"]
            assert [link.send_alert(_alert(event_id)) for event_id in held] == [False, False]
            assert link.pending() == 2 and spool.count() == 0
            filler.unlink()
            wait_until(lambda: spool.count() == 2 and link.spool_error == "", 10, "the held alerts spooled")
            assert link.pending() == 2  # not counted twice
            mosquitto.start()
            wait_until(lambda: link.pending() == 0, 20, "the held alerts delivered")
            assert link.send_alert(_alert("after", 100)) is True  # in order after any second sending of the held
            wait_until(lambda: link.pending() == 0, 10, "the alert after")
        finally:
            link.stop(status("offline"))
            spool.close()
        again = Spool(path)  # the next start: nothing left to send
        assert again.count() == 0
        again.close()
    wait_until(lambda: "after" in [a["event_id"] for a in collector.payloads("alerts")], 10, "the alert after")
    collector.close()
    assert [a["event_id"] for a in collector.payloads("alerts")] == [*held, "after"]
