"""Dashboard access and transport security against real processes: a TLS mosquitto with logins (and client
certificates), the `drywallqa dashboard` command in a child process, and real HTTP requests."""

from __future__ import annotations

import http.client
import json
import logging
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from _dashboard_fixtures import (
    PREFIX,
    SecuredBroker,
    http_get,
    http_post,
    running_dashboard,
    running_mosquitto,
    secured_mosquitto,
)
from _mqtt_fixtures import Mosquitto, wait_until

from drywallqa.dashboard.bridge import BrokerConfig
from drywallqa.dashboard.cli import main as dashboard_main
from drywallqa.dashboard.server import DashboardApp, DashboardConfig

POST_HEADERS = {"X-DrywallQA": "1", "Content-Type": "application/json"}


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[Mosquitto]:
    with running_mosquitto(tmp_path) as broker:
        yield broker


def _tls_broker_config(broker: SecuredBroker, **kw) -> BrokerConfig:
    base = dict(host="127.0.0.1", port=broker.port, prefix=PREFIX, client_id=f"dash-{uuid.uuid4().hex[:8]}",
                username=broker.username, password=broker.password, tls_ca=str(broker.ca), keepalive=5,
                reconnect_max_s=1)
    return BrokerConfig(**{**base, **kw})


def _detail(app: DashboardApp) -> str:
    return app.state.broker.detail


def test_a_refused_mqtt_login_is_named_on_the_page_and_logged_once(tmp_path: Path, caplog) -> None:
    """Before: the page said 'connection lost (Unspecified error)' and the log had that line at every retry, never
    that the broker refused the login."""
    caplog.set_level(logging.INFO, logger="drywallqa.dashboard")
    with secured_mosquitto(tmp_path) as broker:
        config = _tls_broker_config(broker, password="wrong-password-9")
        with running_dashboard(tmp_path, broker.port, broker=config) as app:
            wait_until(lambda: broker.log().count("not authorised") >= 3, 20, "three refused logins")
            detail = _detail(app)
    assert "refused" in detail and "Not authorized" in detail and "--mqtt-username" in detail, detail
    logged = [r.getMessage() for r in caplog.records if r.name.startswith("drywallqa.dashboard")]
    refused = [m for m in logged if "refused" in m]
    assert len(refused) == 1 and "Not authorized" in refused[0], logged
    assert not [m for m in logged if "Unspecified error" in m], logged
    assert not [m for m in caplog.text.splitlines() if "wrong-password-9" in m]


def test_an_untrusted_broker_certificate_is_named(tmp_path: Path, caplog) -> None:
    """Before: a wrong --mqtt-tls-ca logged nothing and the page said only 'cannot reach broker ...; retrying'."""
    caplog.set_level(logging.INFO, logger="drywallqa.dashboard")
    with secured_mosquitto(tmp_path) as broker:
        config = _tls_broker_config(broker, tls_ca=str(broker.other_ca))
        with running_dashboard(tmp_path, broker.port, broker=config) as app:
            wait_until(lambda: "certificate" in _detail(app), 20, "the certificate problem on the page")
            detail = _detail(app)
    assert "mqtts://127.0.0.1" in detail and "--mqtt-tls-ca" in detail, detail
    assert any("certificate" in r.getMessage() and r.levelno >= logging.WARNING for r in caplog.records)


def _dashboard_command(tmp_path: Path, broker: SecuredBroker, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "drywallqa.dashboard", "--port", "0", "--store", str(tmp_path / "cli.sqlite"),
        "--review-root", str(tmp_path), "--mqtt-host", "127.0.0.1", "--mqtt-port", str(broker.port),
        "--prefix", PREFIX, "--client-id", f"cli-{uuid.uuid4().hex[:8]}", "--mqtt-username", broker.username,
        "--mqtt-tls-ca", str(broker.ca), *extra,
    ]


def _health(url: str) -> dict:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        conn.request("GET", "/healthz")
        return json.loads(conn.getresponse().read())
    finally:
        conn.close()


def test_the_command_logs_in_with_a_client_certificate_and_an_env_password(tmp_path: Path) -> None:
    """A broker that requires client certificates (as the edge can use): before, the dashboard had no option for
    one. The password comes from the environment only, and never shows in the output."""
    with secured_mosquitto(tmp_path, require_certificate=True) as broker:
        env = {k: v for k, v in os.environ.items() if not k.startswith("DRYWALLQA_")}
        env["DRYWALLQA_DASHBOARD_MQTT_PASSWORD"] = broker.password
        cmd = _dashboard_command(tmp_path, broker, "--mqtt-tls-cert", str(broker.client_cert),
                                 "--mqtt-tls-key", str(broker.client_key))
        assert broker.password not in " ".join(cmd)  # nothing secret in argv (visible in ps)
        proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True)
        try:
            line = ""
            while "dashboard on" not in line:
                line = proc.stderr.readline()
                assert line or proc.poll() is None, "the dashboard exited"
            url = line.split("dashboard on ", 1)[1].split()[0]
            wait_until(lambda: _health(url)["broker_connected"], 30, "the dashboard's TLS login at the broker")
        finally:
            proc.terminate()
            _, rest = proc.communicate(timeout=30)
    assert proc.returncode == 0, rest[-2000:]
    assert broker.password not in line + rest


def test_tls_options_that_cannot_work_stop_the_start(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("DRYWALLQA_DASHBOARD_TOKEN", raising=False)
    (tmp_path / "cert.pem").write_text("-----BEGIN CERTIFICATE-----\nnope\n-----END CERTIFICATE-----\n")
    base = ["--port", "0", "--store", str(tmp_path / "s.sqlite")]
    cases = [
        ([*base, "--mqtt-tls-key", str(tmp_path / "cert.pem")], "--mqtt-tls-key needs --mqtt-tls-cert"),
        ([*base, "--mqtt-tls-insecure"], "--mqtt-tls-insecure without TLS"),
        ([*base, "--mqtt-tls-cert", str(tmp_path / "missing.pem")], "--mqtt-tls-cert"),
        ([*base, "--mqtt-tls-cert", str(tmp_path / "cert.pem")], "cannot load them"),
    ]
    for argv, expected in cases:
        with pytest.raises(SystemExit) as exc:
            dashboard_main(argv)
        assert expected in str(exc.value), (argv, exc.value)


def test_without_a_token_only_loopback_host_names_are_answered(tmp_path: Path, mosquitto: Mosquitto) -> None:
    """DNS rebinding: a page from attacker.example whose name then resolves to 127.0.0.1 sends its requests with
    `Host: attacker.example`; before, the token-less dashboard answered them (state, commands) like its own."""
    with running_dashboard(tmp_path, mosquitto.port, allowed_hosts=["qa.example.com"]) as app:
        port = app.address[1]
        foreign = {"Host": f"attacker.example:{port}"}
        code, _, body = http_get(app, "/api/state", foreign)
        assert code == 403 and b"--allow-host" in body
        assert http_get(app, "/events", foreign)[0] == 403
        assert http_post(app, "/api/devices/cam-1/forget", b"", {**POST_HEADERS, **foreign})[0] == 403
        for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}", "qa.example.com", "QA.example.com."):
            assert http_get(app, "/api/state", {"Host": host})[0] == 200, host
    token = "a-long-enough-token"
    with running_dashboard(tmp_path, mosquitto.port, token=token) as app:  # a token guards any name (a proxy's)
        headers = {"Host": "qa.example.com", "Authorization": f"Bearer {token}"}
        assert http_get(app, "/api/state", headers)[0] == 200


def test_pages_may_not_be_framed_by_another_site(tmp_path: Path, mosquitto: Mosquitto) -> None:
    """Clickjacking: before, any site could show the live page (forget device, acknowledge) in an invisible frame."""
    with running_dashboard(tmp_path, mosquitto.port) as app:
        for path in ("/", "/login", "/review", "/api/state"):
            code, headers, _ = http_get(app, path)
            assert code == 200 and headers.get("X-Frame-Options") == "DENY", (path, headers)


def test_a_device_id_cannot_reach_other_topics(tmp_path: Path, mosquitto: Mosquitto) -> None:
    """`/api/devices/a%2Fb/forget` cleared the retained message of `<prefix>/a/b/status`, any topic level deep;
    a device id is one topic level."""
    with running_dashboard(tmp_path, mosquitto.port) as app:
        wait_until(lambda: app.state.broker.connected, 10, "the broker link")
        for action in ("snapshot", "forget"):
            code, _, body = http_post(app, f"/api/devices/cam-1%2Fcmd/{action}", b"", POST_HEADERS)
            assert code == 400 and b"invalid device id" in body, (action, code, body)
        assert http_post(app, "/api/devices/cam-1/snapshot", b"", POST_HEADERS)[0] == 202


def test_the_bearer_scheme_is_case_insensitive(tmp_path: Path, mosquitto: Mosquitto) -> None:
    """RFC 9110: `bearer TOKEN` is `Bearer TOKEN`; before, it was refused (401)."""
    token = "a-long-enough-token"
    with running_dashboard(tmp_path, mosquitto.port, token=token) as app:
        for scheme in ("Bearer", "bearer", "BEARER"):
            assert http_get(app, "/api/state", {"Authorization": f"{scheme} {token}"})[0] == 200, scheme
        assert http_get(app, "/api/state", {"Authorization": "bearer wrong-token-123"})[0] == 401
        assert http_get(app, "/api/state", {"Authorization": f"Basic {token}"})[0] == 401


def test_secrets_stay_out_of_reprs(tmp_path: Path) -> None:
    config = DashboardConfig(token="token-abcdefgh", broker=BrokerConfig(password="mqtt-secret-xyz"))
    assert "token-abcdefgh" not in repr(config) and "mqtt-secret-xyz" not in repr(config)


def test_allow_host_values_are_compared_without_port_or_brackets() -> None:
    from drywallqa.dashboard.auth import host_allowed

    assert host_allowed("qa.example.com", ["qa.example.com:443"])  # a proxy name given with its port
    assert host_allowed("[fe80::1]:8080", ["[fe80::1]"])
    assert host_allowed("QA.Example.com.:8443", ["qa.example.com"])
    assert not host_allowed("attacker.example", ["qa.example.com:443"])
