"""Adverse conditions a device meets over weeks, with real processes and files: the alert spool's disk fills up
or turns read-only mid-run, the broker refuses the credentials."""

from __future__ import annotations

import contextlib
import os
import subprocess
from pathlib import Path

import pytest
from _edge_helpers import clean_env, edge_cmd, write_config
from _mqtt_fixtures import Collector, mosquitto_fixture, wait_until

pytestmark = pytest.mark.slow
mosquitto = pytest.fixture(mosquitto_fixture, name="mosquitto")

LITE = Path(__file__).resolve().parents[1] / "models" / "exported" / "lite_effnet_lite0.onnx"


@pytest.fixture
def lite_model() -> Path:
    if not LITE.is_file():
        pytest.skip(f"{LITE} is not exported")
    return LITE


@contextlib.contextmanager
def small_disk(path: Path, size: str = "1m"):
    """A real file system of `size` at `path` (tmpfs; needs root)."""
    path.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small file system needs root")
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)]).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)])


def fill(disk: Path) -> Path:
    """Write a file until the disk is full; returns it (delete it to free the space)."""
    filler = disk / "filler"
    with open(filler, "wb", buffering=0) as f, contextlib.suppress(OSError):
        while True:
            f.write(b"\0" * 4096)
    return filler


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
