"""A device whose clock was never set (no real-time clock, no network time: it boots in 1970) says so in its
status's last_error, after any real error, until the clock is set."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest
from _edge_helpers import write_config
from _mqtt_fixtures import free_port

from drywallqa.edge.payloads import EARLIEST_PLAUSIBLE_TIME
from drywallqa.edge.runner import EdgeRunner, clock_problem
from drywallqa.edge.settings import load_settings

LITE = Path(__file__).resolve().parents[1] / "models" / "exported" / "lite_effnet_lite0.onnx"
BOOTED_IN_1970 = 180.0  # three minutes after the epoch: a board without a real-time clock, just booted


def test_the_message_says_what_the_clock_reads_and_how_to_set_it():
    said = clock_problem(BOOTED_IN_1970)
    assert said.startswith("the system clock reads 1970-01-01 00:03 UTC: it was never set"), said
    assert "sudo timedatectl set-ntp true" in said and "real-time clock" in said
    assert clock_problem(EARLIEST_PLAUSIBLE_TIME - 1).startswith("the system clock reads 2019-12-31 23:59 UTC")
    assert clock_problem(EARLIEST_PLAUSIBLE_TIME) == clock_problem(time.time()) == ""


def test_a_clock_never_set_is_in_last_error_after_any_real_error_until_it_is_set(tmp_path, caplog):
    if not LITE.is_file():
        pytest.skip(f"{LITE} is not exported")
    cfg = write_config(tmp_path / "edge.yaml", uri="demo", model=LITE, port=free_port(),
                       spool=tmp_path / "state" / "spool.sqlite")
    runner = EdgeRunner(load_settings(cfg))
    clock = [BOOTED_IN_1970]
    runner._wall_clock = lambda: clock[0]
    caplog.set_level(logging.INFO, logger="drywallqa.edge.runner")
    runner.setup()
    try:
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert [w for w in warnings if "system clock" in w] == [clock_problem(BOOTED_IN_1970)], warnings
        status = runner.status("online")
        assert status.timestamp == BOOTED_IN_1970 and status.last_error == clock_problem(BOOTED_IN_1970)

        runner.last_error = "frame 3: ValueError: odd shape"  # a real error comes first
        assert runner.status("online").last_error == "frame 3: ValueError: odd shape"
        runner.last_error = ""

        clock[0] = time.time()  # network time synced
        caplog.clear()
        assert runner.status("online").last_error == ""
        assert [r.getMessage() for r in caplog.records if "system clock" in r.getMessage()] == [
            "the system clock is set now: statuses and alerts carry true times again"]
    finally:
        runner.shutdown()
