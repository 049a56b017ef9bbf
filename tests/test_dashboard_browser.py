"""The live page in headless Chromium against a real mosquitto: devices, figures, alerts with snapshots,
filter and acknowledge (surviving a reload), broker restart, and the page's own stream dropping.

Set DRYWALLQA_DASHBOARD_SCREENSHOT=/path/shot.png to keep the screenshot somewhere else than the test's tmp dir.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from _dashboard_fixtures import (
    alert,
    detection,
    make_jpeg,
    running_dashboard,
    running_mosquitto,
    running_publisher,
    status,
)
from _mqtt_fixtures import wait_until

from drywallqa.edge.payloads import TOPIC_ALERTS, TOPIC_DETECTIONS, TOPIC_STATUS

CHROMIUM = os.environ.get("DRYWALLQA_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
TIMEOUT_MS = 15_000

sync_api = pytest.importorskip(
    "playwright.sync_api", reason="playwright is not installed (pip install playwright)"
)
if not (Path(CHROMIUM).exists() or shutil.which(CHROMIUM)):
    pytest.skip(f"chromium not found at {CHROMIUM} (apt-get install chromium)", allow_module_level=True)

pytestmark = pytest.mark.slow


def _loaded(page, selector: str) -> bool:
    return page.eval_on_selector(selector, "img => img.complete && img.naturalWidth > 0")


def test_live_page_end_to_end(tmp_path: Path) -> None:
    expect = sync_api.expect
    shot = Path(os.environ.get("DRYWALLQA_DASHBOARD_SCREENSHOT") or tmp_path / "dashboard.png")

    with (
        running_mosquitto(tmp_path) as broker,
        running_dashboard(tmp_path, broker.port) as app,
        sync_api.sync_playwright() as pw,
    ):
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.set_default_timeout(TIMEOUT_MS)
            page.goto(app.url + "/")
            expect(page.locator("#stream-status")).to_have_attribute("data-state", "connected")
            expect(page.locator("#broker-status")).to_have_attribute("data-state", "connected")

            # --- a device reports: status, a detection with a preview, two alerts with real JPEG snapshots
            with running_publisher(broker.port) as pub:
                pub.publish("wall-cam-1", TOPIC_STATUS, status("wall-cam-1"), retain=True)
                pub.publish(
                    "wall-cam-1", TOPIC_DETECTIONS, detection("wall-cam-1", preview=make_jpeg(320, 240))
                )
                pub.publish(
                    "wall-cam-1", TOPIC_ALERTS, alert("wall-cam-1", "evt-crack-1", make_jpeg(160, 120))
                )
                pub.publish(
                    "wall-cam-1",
                    TOPIC_ALERTS,
                    alert("wall-cam-1", "evt-tape-1", make_jpeg(160, 120, (200, 60, 0)), class_name="taping"),
                )

            card = page.locator("article.device[data-device='wall-cam-1']")
            expect(card.locator(".state")).to_have_text("online")
            crack = card.locator("table.figures tr[data-class='crack']")
            expect(crack.locator(".area")).to_have_text("1.50 %")
            expect(crack.locator(".length")).to_have_text("123 px")
            expect(card.locator("tr[data-class='taping'] .area")).to_have_text("25.00 %")
            page.wait_for_function(
                "document.querySelector(\"article.device[data-device='wall-cam-1'] img.frame\")?.naturalWidth === 320"
            )

            crack_alert = page.locator("li.alert[data-event-id='evt-crack-1']")
            expect(crack_alert).to_contain_text("skeleton_length_px>=80")
            expect(page.locator("li.alert")).to_have_count(2)
            page.wait_for_function(
                "document.querySelector(\"li.alert[data-event-id='evt-crack-1'] img\")?.naturalWidth === 160"
            )
            snap_href = crack_alert.locator("a.snap").get_attribute("href")
            res = page.request.get(app.url + snap_href)
            assert res.ok and res.headers["content-type"] == "image/jpeg" and res.body()[:2] == b"\xff\xd8"

            # --- filter by class
            page.select_option("#alert-class", "taping")
            expect(page.locator("li.alert")).to_have_count(1)
            expect(page.locator("li.alert")).to_have_attribute("data-event-id", "evt-tape-1")
            page.select_option("#alert-class", "")

            # --- acknowledge; the ack is kept server side and survives a reload
            crack_alert.locator("button.ack").click()
            expect(page.locator("li.alert")).to_have_count(1)  # acknowledged ones are hidden by default
            page.reload()
            expect(page.locator("#stream-status")).to_have_attribute("data-state", "connected")
            expect(page.locator("li.alert")).to_have_count(1)
            page.check("#show-acked")
            expect(page.locator("li.alert.acked[data-event-id='evt-crack-1']")).to_contain_text(
                "acknowledged"
            )
            expect(page.locator("#alert-count")).to_have_text("(1 open, 1 acknowledged; showing 2)")
            page.screenshot(path=str(shot), full_page=True)

            # --- the broker goes away: the page says so, keeps the last known state, and recovers
            broker.stop()
            expect(page.locator("#broker-status")).to_have_attribute("data-state", "disconnected")
            expect(page.locator("#banner")).to_contain_text("disconnected from the MQTT broker")
            expect(card.locator(".state")).to_have_text("online")
            page.screenshot(path=str(shot.with_name(shot.stem + "_disconnected.png")), full_page=True)
            broker.start()
            expect(page.locator("#broker-status")).to_have_attribute(
                "data-state", "connected", timeout=20_000
            )
            expect(page.locator("#banner")).to_be_hidden()
            with running_publisher(broker.port) as pub:
                pub.publish("wall-cam-1", TOPIC_STATUS, status("wall-cam-1", state="paused"), retain=True)
            expect(card.locator(".state")).to_have_text("paused")

            # --- the dashboard server itself goes away: the browser shows its stream dropped
            app.stop()
            expect(page.locator("#stream-status")).to_have_attribute("data-state", "disconnected")
            expect(page.locator("#banner")).to_contain_text("Lost the live connection")
        finally:
            browser.close()
    wait_until(shot.exists, 1, "screenshot file")
    assert shot.stat().st_size > 10_000
    print(f"dashboard screenshot: {shot}")


def test_alert_burst_paging_and_device_lifecycle(tmp_path: Path) -> None:
    """A device replaying a long outage's spool floods the page with alerts: the page stays usable, shows the
    newest page, and pages older ones in from the server, also after a reload. A device that falls silent is
    flagged, one that dies shows its last will, and "forget device" removes it."""
    expect = sync_api.expect
    burst = 260
    with (
        running_mosquitto(tmp_path) as broker,
        running_dashboard(tmp_path, broker.port, device_timeout_s=2.0) as app,
        sync_api.sync_playwright() as pw,
    ):
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.set_default_timeout(TIMEOUT_MS)
            page.on("dialog", lambda dialog: dialog.accept())
            page.goto(app.url + "/")
            expect(page.locator("#stream-status")).to_have_attribute("data-state", "connected")
            snap = make_jpeg(64, 48)
            with running_publisher(broker.port) as pub:
                pub.publish("cam-b", TOPIC_STATUS, status("cam-b"), retain=True)
                for i in range(burst):
                    kind = "taping" if i % 10 == 0 else "crack"
                    pub.publish("cam-b", TOPIC_ALERTS,
                                alert("cam-b", f"evt-{i:04d}", snap, class_name=kind, timestamp=1e9 + i))

            alerts = page.locator("li.alert")
            expect(page.locator("#alert-count")).to_have_text(f"({burst} open, 0 acknowledged; showing 100)")
            expect(alerts).to_have_count(100)
            expect(alerts.first).to_have_attribute("data-event-id", f"evt-{burst - 1:04d}")
            older = page.locator("#older-alerts")
            for shown in (200, burst):
                older.click()
                expect(alerts).to_have_count(shown)
            expect(older).to_be_hidden()
            expect(alerts.last).to_have_attribute("data-event-id", "evt-0000")

            page.reload()  # the newest page again, and the rest still a click away
            expect(alerts).to_have_count(100)
            older.click()
            older.click()
            expect(alerts).to_have_count(burst)
            page.select_option("#alert-class", "taping")  # the filter asks the server, not only the loaded page
            expect(alerts).to_have_count(burst // 10)
            expect(older).to_be_hidden()

            # --- cam-b sent nothing for longer than the timeout: flagged silent, and it may be forgotten
            card = page.locator("article.device[data-device='cam-b']")
            expect(card.locator(".state")).to_have_text("silent", timeout=12_000)

            # --- cam-c dies: its last will (figures from its connection's start) arrives live
            with running_publisher(broker.port) as pub:
                pub.publish("cam-c", TOPIC_STATUS, status("cam-c", frames_processed=900), retain=True)
                cam_c = page.locator("article.device[data-device='cam-c']")
                expect(cam_c.locator(".state")).to_have_text("online")
                will = status("cam-c", state="offline", frames_processed=0, timestamp=1e9, last_will=True)
                pub.publish("cam-c", TOPIC_STATUS, will, retain=True)
            expect(cam_c.locator(".state")).to_have_text("offline")
            expect(cam_c).to_contain_text("connection lost without a clean stop")
            expect(cam_c).to_contain_text("900 frames")

            card.locator("button.forget").click()
            expect(card).to_have_count(0)
            page.reload()
            expect(page.locator("#stream-status")).to_have_attribute("data-state", "connected")
            expect(cam_c).to_have_count(1)
            expect(card).to_have_count(0)
        finally:
            browser.close()
