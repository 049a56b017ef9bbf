"""Dashboard access and transport security against real processes: a TLS mosquitto with logins (and client
certificates), the `drywallqa dashboard` command in a child process, and real HTTP requests."""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import http.client
import json
import logging
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from _dashboard_fixtures import (
    POST_HEADERS,
    PREFIX,
    SecuredBroker,
    http_get,
    http_post,
    running_dashboard,
    running_mosquitto,
    secured_mosquitto,
)
from _mqtt_fixtures import Mosquitto, free_port, wait_until

from drywallqa.dashboard.auth import COOKIE_NAME
from drywallqa.dashboard.bridge import BrokerConfig
from drywallqa.dashboard.cli import main as dashboard_main
from drywallqa.dashboard.server import DashboardApp, DashboardConfig


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


# --- sign-in: expiring signed sessions and a limit on wrong tokens ---------------------------------------------
TOKEN = "a-long-enough-token"
FORM = {"Content-Type": "application/x-www-form-urlencoded"}
T0 = 1_700_000_000.0


class FakeClock:
    """Unix time that a test moves on by hand."""

    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@contextlib.contextmanager
def _guarded_dashboard(tmp_path: Path, clock: FakeClock, **overrides) -> Iterator[DashboardApp]:
    """A dashboard with a token; its broker is down (sign-in needs none), so no mosquitto is needed."""
    with running_dashboard(tmp_path, free_port(), token=TOKEN, clock=clock, **overrides) as app:
        yield app


def _sign_in(app: DashboardApp, token: str = TOKEN, source: str | None = None) -> tuple[int, dict, bytes]:
    return http_post(app, "/login", f"token={token}", FORM, source)


def _cookie_of(headers: dict) -> str:
    return headers["Set-Cookie"].split(";")[0]


def _old_style_signed(token: str, issued: int) -> str:
    """A cookie as signed before sign-out revoked sessions: `<issued>.<HMAC(token, context|issued)>`."""
    sig = hmac.new(token.encode(), b"drywallqa-dashboard-session|" + str(issued).encode(), hashlib.sha256)
    return f"{COOKIE_NAME}={issued}.{sig.hexdigest()}"


def _signed_at(app: DashboardApp, clock: FakeClock, issued: float) -> str:
    """A cookie that `app` signed at unix time `issued`."""
    now, clock.now = clock.now, issued
    try:
        return f"{COOKIE_NAME}={app.auth.session_value()}"
    finally:
        clock.now = now


def test_a_session_cookie_expires(tmp_path: Path) -> None:
    """Before: the cookie was HMAC(token, constant), valid for ever (until the token changed), without Max-Age."""
    clock = FakeClock()
    with _guarded_dashboard(tmp_path, clock, session_hours=2.0) as app:
        code, headers, _ = _sign_in(app)
        assert code == 303, code
        attrs = [a.strip() for a in headers["Set-Cookie"].split(";")]
        assert "Max-Age=7200" in attrs and "HttpOnly" in attrs and "SameSite=Strict" in attrs, attrs
        cookie = _cookie_of(headers)
        issued, session_id, sig = cookie.removeprefix(f"{COOKIE_NAME}=").split(".")  # <issued>.<id>.<HMAC>
        assert issued == str(int(T0)) and len(session_id) == 32 and len(sig) == 64, cookie
        clock.now = T0 + 7199
        assert http_get(app, "/api/state", {"Cookie": cookie})[0] == 200
        clock.now = T0 + 7200
        assert http_get(app, "/api/state", {"Cookie": cookie})[0] == 401
        code, headers, _ = http_get(app, "/", {"Cookie": cookie})
        assert code == 303 and headers["Location"] == "/login"
        # Behind a TLS proxy the cookie is also Secure.
        code, headers, _ = http_post(app, "/login", f"token={TOKEN}", {**FORM, "X-Forwarded-Proto": "https"})
        assert code == 303 and "Secure" in [a.strip() for a in headers["Set-Cookie"].split(";")]


def test_a_tampered_or_old_style_cookie_is_refused(tmp_path: Path) -> None:
    clock = FakeClock()
    with _guarded_dashboard(tmp_path, clock, session_hours=1.0) as app:
        cookie = _cookie_of(_sign_in(app)[1])
        name, _, value = cookie.partition("=")
        issued, session_id, sig = value.split(".")
        assert issued == str(int(T0)) and len(sig) == 64, value
        assert http_get(app, "/api/state", {"Cookie": cookie})[0] == 200
        flipped = sig[:-1] + ("0" if sig[-1] != "0" else "1")
        other_id = session_id[:-1] + ("0" if session_id[-1] != "0" else "1")
        old_style = hmac.new(TOKEN.encode(), b"drywallqa-dashboard-session", hashlib.sha256).hexdigest()
        for bad in (
            f"{int(T0) + 3000}.{session_id}.{sig}",  # a later issue time, to live longer, with the old signature
            f"{issued}.{other_id}.{sig}",  # another session's id (one not signed out) with this signature
            f"{issued}.{session_id}.{flipped}",
            f"{issued}.{session_id}.",
            f"{issued}.{sig}",
            sig,
            old_style,  # the cookie before expiry: no issue time
            _old_style_signed(TOKEN, int(T0)).partition("=")[2],  # the cookie before revocation: no id
            "",
        ):
            assert http_get(app, "/api/state", {"Cookie": f"{name}={bad}"})[0] == 401, bad
        for digits in (f"{issued}\xb2", "\u0661" * 10):  # isdigit() but not ASCII: refused, not a crash
            assert app.auth.session_valid(f"{digits}.{session_id}.{sig}") is False
        assert app.auth.session_valid(f"{issued}.{session_id.upper()}.{sig}") is False


def test_a_cookie_from_the_future_is_refused(tmp_path: Path) -> None:
    """A correctly signed cookie dated more than a minute ahead (clock skew, or a forged lifetime) is refused."""
    clock = FakeClock()
    with _guarded_dashboard(tmp_path, clock) as app:
        assert http_get(app, "/api/state", {"Cookie": _signed_at(app, clock, T0 + 30)})[0] == 200  # small skew
        assert http_get(app, "/api/state", {"Cookie": _signed_at(app, clock, T0 + 120)})[0] == 401
        assert http_get(app, "/api/state", {"Cookie": _signed_at(app, clock, T0 - 3600)})[0] == 200


def test_sign_out_revokes_a_copied_cookie(tmp_path: Path) -> None:
    """Before: sign-out only asked the browser to drop its cookie; a copy of it (another tab's, a stolen one)
    still opened the dashboard until it expired. Now the server refuses that session; others stay signed in."""
    clock = FakeClock()
    with _guarded_dashboard(tmp_path, clock) as app:
        mine, other = _cookie_of(_sign_in(app)[1]), _cookie_of(_sign_in(app)[1])  # signed in the same second
        copy = mine
        code, headers, _ = http_get(app, "/logout", {"Cookie": mine})
        assert code == 303 and "Max-Age=0" in headers["Set-Cookie"], (code, headers)
        assert http_get(app, "/api/state", {"Cookie": copy})[0] == 401
        code, headers, _ = http_get(app, "/", {"Cookie": copy})
        assert code == 303 and headers["Location"] == "/login"
        assert http_get(app, "/api/state", {"Cookie": other})[0] == 200
        assert http_get(app, "/logout", {"Cookie": copy})[0] == 303  # signing out twice is harmless
        assert http_get(app, "/logout")[0] == 303 and app.auth.revoked_count == 1  # no cookie: nothing to revoke
        assert _sign_in(app)[0] == 303  # signing in again gives a fresh, valid session


def test_sign_outs_are_remembered_in_bounded_memory(tmp_path: Path, caplog) -> None:
    """A signed-out session is remembered until its cookie would have expired, then forgotten. When more are
    signed out within a session's lifetime than the list holds, everyone is signed out (a new signing key) rather
    than a revoked cookie working again."""
    clock = FakeClock()
    with _guarded_dashboard(tmp_path, clock, session_hours=1.0) as app:
        app.auth.max_revoked = 2
        first, second = _cookie_of(_sign_in(app)[1]), _cookie_of(_sign_in(app)[1])
        for cookie in (first, second):
            http_get(app, "/logout", {"Cookie": cookie})
        assert app.auth.revoked_count == 2
        clock.now = T0 + 1800
        keeps, third = _cookie_of(_sign_in(app)[1]), _cookie_of(_sign_in(app)[1])
        clock.now = T0 + 3600  # the first two cookies have expired: their revocations are dropped
        http_get(app, "/logout", {"Cookie": third})
        assert app.auth.revoked_count == 1
        assert http_get(app, "/api/state", {"Cookie": third})[0] == 401
        assert http_get(app, "/api/state", {"Cookie": keeps})[0] == 200
        fourth, fifth = _cookie_of(_sign_in(app)[1]), _cookie_of(_sign_in(app)[1])
        http_get(app, "/logout", {"Cookie": fourth})
        assert app.auth.revoked_count == 2
        http_get(app, "/logout", {"Cookie": fifth})  # the list is full: a new key signs everyone out
        assert app.auth.revoked_count == 0
        for cookie in (third, keeps, fourth, fifth):
            assert http_get(app, "/api/state", {"Cookie": cookie})[0] == 401, cookie
        assert http_get(app, "/api/state", {"Cookie": _cookie_of(_sign_in(app)[1])})[0] == 200
    assert any("every session is signed out" in r.getMessage() for r in caplog.records)


def test_a_restart_signs_everyone_out(tmp_path: Path) -> None:
    """The signing key lives only in the dashboard's memory, like the list of signed-out sessions: a cookie
    from before a restart is refused, so a restart cannot bring a signed-out cookie back. Before: any cookie
    stayed valid across restarts until it expired."""
    clock = FakeClock()
    with _guarded_dashboard(tmp_path, clock) as app:
        cookie = _cookie_of(_sign_in(app)[1])
        assert http_get(app, "/api/state", {"Cookie": cookie})[0] == 200
    with _guarded_dashboard(tmp_path, clock) as app:
        assert http_get(app, "/api/state", {"Cookie": cookie})[0] == 401
        assert http_get(app, "/api/state", {"Cookie": _cookie_of(_sign_in(app)[1])})[0] == 200


class _EventStream:
    """A live /events request on a raw socket: the bytes received so far, and whether the server has closed it."""

    def __init__(self, app: DashboardApp, headers: dict[str, str]) -> None:
        self.sock = socket.create_connection(app.address, timeout=0.1)
        head = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
        self.sock.sendall(f"GET /events HTTP/1.1\r\nHost: 127.0.0.1\r\n{head}\r\n".encode())
        self.received, self.closed = b"", False
        assert self.read_until(lambda got: b"event: state" in got), self.received[:300]
        assert self.received.split(b"\r\n")[0].split()[1] == b"200", self.received[:300]

    def read_until(self, done: Callable[[bytes], bool], timeout: float = 5.0) -> bool:
        """Read until `done(received)`, the end of the stream or `timeout` seconds; whether `done` came true."""
        deadline = time.monotonic() + timeout
        while not done(self.received) and not self.closed and time.monotonic() < deadline:
            try:
                chunk = self.sock.recv(65536)
            except TimeoutError:
                continue
            self.closed = not chunk
            self.received += chunk
        return done(self.received)

    def ends(self, timeout: float = 5.0) -> bool:
        """Whether the server closes the stream within `timeout` seconds."""
        self.read_until(lambda _: False, timeout)
        return self.closed

    def gets(self, text: bytes) -> bool:
        return self.read_until(lambda got: text in got) and not self.closed

    def close(self) -> None:
        self.sock.close()


@contextlib.contextmanager
def _event_streams(app: DashboardApp, *headers: dict[str, str]) -> Iterator[list[_EventStream]]:
    streams: list[_EventStream] = []
    try:
        for h in headers:
            streams.append(_EventStream(app, h))
        yield streams
    finally:
        for stream in streams:
            stream.close()


def test_an_open_event_stream_ends_when_its_session_is_signed_out(tmp_path: Path) -> None:
    """Before: the session was checked only when /events connected, so a stream opened with a copy of the cookie
    (another tab's, a stolen one) kept getting the live state and alerts after sign-out, and after the key was
    replaced (too many sign-outs). Now the session is checked again before each event (and heartbeat): the
    stream closes instead; other sessions' streams go on. The heartbeat is an hour here, so only the events
    can have ended the streams."""
    clock = FakeClock()
    with _guarded_dashboard(tmp_path, clock, heartbeat_s=3600.0) as app:
        mine, other = _cookie_of(_sign_in(app)[1]), _cookie_of(_sign_in(app)[1])
        bearer = {"Authorization": f"Bearer {TOKEN}"}
        with _event_streams(app, {"Cookie": mine}, {"Cookie": other}, bearer) as (stolen, others, script):
            assert http_get(app, "/logout", {"Cookie": mine})[0] == 303
            assert http_get(app, "/api/state", {"Cookie": mine})[0] == 401
            app.state.publish("alert", {"secret": "published after sign-out"})
            assert stolen.ends() and b"published after sign-out" not in stolen.received, stolen.received[-500:]
            assert others.gets(b"published after sign-out") and script.gets(b"published after sign-out")
            # Sign-outs beyond the list's size replace the key: every session ends, and so does its stream.
            app.auth.max_revoked = 1
            assert http_get(app, "/logout", {"Cookie": _cookie_of(_sign_in(app)[1])})[0] == 303
            app.state.publish("alert", {"secret": "after the new key"})
            assert others.ends() and b"after the new key" not in others.received, others.received[-500:]
            assert script.gets(b"after the new key")  # a bearer token is no session: its stream goes on
        assert http_get(app, "/events", {"Cookie": other})[0] == 401


def test_an_open_event_stream_ends_when_its_session_expires(tmp_path: Path) -> None:
    """Before: a stream opened before the cookie expired went on for as long as the connection held. Now it
    closes at the first heartbeat (or event) after the expiry."""
    clock = FakeClock()
    with _guarded_dashboard(tmp_path, clock, session_hours=1.0, heartbeat_s=0.25) as app:
        cookie = _cookie_of(_sign_in(app)[1])
        with _event_streams(app, {"Cookie": cookie}) as (stream,):
            clock.now = T0 + 3599
            assert stream.read_until(lambda got: got.count(b": ping") >= 3)  # heartbeats while still valid
            assert not stream.closed
            clock.now = T0 + 3600
            assert stream.ends(timeout=3.0), stream.received[-500:]


def _forwarded(client: str) -> dict[str, str]:
    """A proxy's request for `client`, whose own X-Forwarded-For (a lie) the proxy kept on the left."""
    return {**FORM, "X-Forwarded-For": f"{uuid.uuid4().int % 256}.0.0.1, {client}"}


def test_wrong_tokens_behind_a_trusted_proxy_count_per_forwarded_client(tmp_path: Path) -> None:
    """Before: behind a reverse proxy every client had the proxy's address, so one guesser locked every user out
    of sign-in. With --trusted-proxy, a request from the proxy is counted under the right-most address of
    X-Forwarded-For that is not a trusted proxy; what a client puts in the header itself is ignored, and from any
    other peer the header counts for nothing."""
    clock = FakeClock()
    with _guarded_dashboard(tmp_path, clock, trusted_proxies=["127.0.0.1", "10.0.0.0/8"]) as app:
        guesser = "198.51.100.7"
        for i in range(5):
            assert http_post(app, "/login", f"token=wrong-{i}-token", _forwarded(guesser))[0] == 401
        code, headers, _ = http_post(app, "/login", f"token={TOKEN}", _forwarded(guesser))
        assert code == 429 and headers.get("Retry-After") == "60", (code, headers)  # the right token, refused
        through_two_proxies = {**FORM, "X-Forwarded-For": f"{guesser}, 10.1.2.3"}
        assert http_post(app, "/login", f"token={TOKEN}", through_two_proxies)[0] == 429
        assert http_post(app, "/login", f"token={TOKEN}", _forwarded("198.51.100.8"))[0] == 303  # another user
        in_two_headers = f"POST /login HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: {guesser}\r\n"
        assert _raw_sign_in(app, in_two_headers + "X-Forwarded-For: 10.9.9.9\r\n") == 429
        assert _raw_sign_in(app, in_two_headers + "X-Forwarded-For: 198.51.100.9\r\n") == 303
        # A peer that is not a trusted proxy: its header is ignored, it is counted under its own address.
        for i in range(5):
            spoofed = _forwarded(f"203.0.113.{i}")
            assert http_post(app, "/login", f"token=wrong-{i}-token", spoofed, "127.0.0.2")[0] == 401
        assert http_post(app, "/login", f"token={TOKEN}", _forwarded("203.0.113.99"), "127.0.0.2")[0] == 429
        assert http_post(app, "/login", f"token={TOKEN}", _forwarded("203.0.113.0"))[0] == 303  # not counted
        clock.now = T0 + 60  # a throttled client is refused only until its minute is over
        assert http_post(app, "/login", f"token={TOKEN}", _forwarded(guesser))[0] == 303


def _raw_sign_in(app: DashboardApp, head: str) -> int:
    """POST the right token with a hand-written request head (for repeated headers); the answer's status."""
    body = f"token={TOKEN}"
    request = f"{head}Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {len(body)}\r\n\r\n{body}"
    with socket.create_connection(app.address, timeout=10) as conn:
        conn.sendall(request.encode())
        return int(conn.makefile("rb").readline().split()[1])


def test_forwarded_client_address_rules() -> None:
    from drywallqa.dashboard.auth import forwarded_client, trusted_proxy_networks

    proxies = trusted_proxy_networks(["127.0.0.1", "10.0.0.0/8", "2001:db8:1::/48"])
    assert forwarded_client("192.0.2.1", ["198.51.100.7"], proxies) == "192.0.2.1"  # not a proxy: header ignored
    assert forwarded_client("127.0.0.1", [], proxies) == "127.0.0.1"  # no header: the proxy's own address
    assert forwarded_client("::ffff:127.0.0.1", ["198.51.100.7"], proxies) == "198.51.100.7"
    assert forwarded_client("127.0.0.1", ["1.2.3.4, 198.51.100.7, 10.0.0.2"], proxies) == "198.51.100.7"
    assert forwarded_client("127.0.0.1", ["198.51.100.7:4711"], proxies) == "198.51.100.7"
    assert forwarded_client("127.0.0.1", ["[2001:db8:2::5]:443, 2001:db8:1::9"], proxies) == "2001:db8:2::5"
    assert forwarded_client("127.0.0.1", ["10.0.0.3, 10.0.0.2"], proxies) == "10.0.0.3"  # only proxies: left-most
    assert forwarded_client("127.0.0.1", ["198.51.100.7, unknown"], proxies) == "127.0.0.1"  # junk: the proxy
    assert forwarded_client("127.0.0.1", ["198.51.100.7, unknown, 10.0.0.2"], proxies) == "10.0.0.2"
    assert forwarded_client("127.0.0.1", ["198.51.100.7"], ()) == "127.0.0.1"  # no trusted proxy: never trusted


def test_a_trusted_proxy_network_wider_than_one_address_is_warned_about(tmp_path: Path, caplog) -> None:
    """Every client inside a trusted network counts as a proxy, so its own X-Forwarded-For entries are believed
    and it can rotate made-up addresses past the limit on wrong tokens. Before: `--trusted-proxy 10.0.0.0/8`
    was suggested and taken silently; now such a network is named in a warning at start, exact addresses not."""
    caplog.set_level(logging.WARNING, logger="drywallqa.dashboard")
    exact = ["127.0.0.1", "192.0.2.7/32", "::1", "2001:db8::5/128"]
    wide = ["10.0.0.0/8", "2001:db8:1::/64", "192.0.2.8/31"]
    with _guarded_dashboard(tmp_path, FakeClock(), trusted_proxies=exact + wide) as app:
        assert len(app.trusted_proxies) == 7
        warned = [r.getMessage() for r in caplog.records if "--trusted-proxy" in r.getMessage()]
        assert [m.split()[1] for m in warned] == wide, warned
        assert all(r.levelno == logging.WARNING for r in caplog.records if "--trusted-proxy" in r.getMessage())
        assert "exact addresses" in warned[0] and "16777216 addresses" in warned[0], warned[0]


def _start_dashboard_command(tmp_path: Path, *extra: str) -> tuple[subprocess.Popen, str]:
    """`python -m drywallqa.dashboard` with a token file, its broker down; the process and its URL."""
    (tmp_path / "token").write_text(TOKEN)
    cmd = [sys.executable, "-m", "drywallqa.dashboard", "--port", "0", "--store", str(tmp_path / "cli.sqlite"),
           "--review-root", str(tmp_path), "--mqtt-port", str(free_port()), "--token-file", str(tmp_path / "token"),
           *extra]
    env = {k: v for k, v in os.environ.items() if not k.startswith("DRYWALLQA_")}
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True)
    line = ""
    while "dashboard on" not in line:
        line = proc.stderr.readline()
        if not line and proc.poll() is not None:
            raise AssertionError(f"the dashboard exited: {proc.stderr.read()[-2000:]}")
    return proc, line.split("dashboard on ", 1)[1].split()[0]


def test_the_trusted_proxy_option_of_the_command(tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit, match="--trusted-proxy 'proxy.local' is not an IP address or network"):
        dashboard_main(["--port", "0", "--store", str(tmp_path / "s.sqlite"), "--trusted-proxy", "proxy.local"])
    proc, url = _start_dashboard_command(tmp_path, "--trusted-proxy", "127.0.0.1", "--trusted-proxy", "10.0.0.0/8")
    try:
        host, port = url.removeprefix("http://").rsplit(":", 1)

        def sign_in(token: str, client: str) -> int:
            conn = http.client.HTTPConnection(host, int(port), timeout=10)
            try:
                conn.request("POST", "/login", f"token={token}", _forwarded(client))
                return conn.getresponse().status
            finally:
                conn.close()

        assert [sign_in("wrong-token", "198.51.100.7") for _ in range(6)] == [401] * 5 + [429]
        assert sign_in(TOKEN, "198.51.100.8") == 303
    finally:
        proc.terminate()
        proc.communicate(timeout=30)
    assert proc.returncode == 0


def test_wrong_tokens_are_throttled_per_address(tmp_path: Path, caplog) -> None:
    """Before: the sign-in form checked every guess at full speed. Now the 6th try within a minute of 5 wrong ones
    gets 429 with Retry-After, even with the right token, until the minute has passed; other addresses are not
    affected, and the refusals are logged once."""
    caplog.set_level(logging.INFO, logger="drywallqa.dashboard")
    clock = FakeClock()
    with _guarded_dashboard(tmp_path, clock) as app:
        for i in range(5):
            clock.now = T0 + i
            code, _, body = _sign_in(app, f"wrong-token-{i}")
            assert code == 401 and b"Wrong token" in body, (i, code)
        clock.now = T0 + 20
        code, headers, body = _sign_in(app)  # the right token, but too late
        assert code == 429 and headers.get("Retry-After") == "40" and b"try again in 40 s" in body, (code, headers)
        assert "Set-Cookie" not in headers
        for _ in range(3):
            assert _sign_in(app)[0] == 429
        assert _sign_in(app, source="127.0.0.2")[0] == 303  # another address signs in
        clock.now = T0 + 60  # the window has passed
        code, headers, _ = _sign_in(app)
        assert code == 303 and headers["Set-Cookie"].startswith(COOKIE_NAME)
    refused = [r for r in caplog.records if "refused sign-in" in r.getMessage()]
    assert len(refused) == 1 and refused[0].levelno == logging.WARNING, [r.getMessage() for r in refused]
    assert TOKEN not in caplog.text


def test_a_right_token_clears_the_count(tmp_path: Path) -> None:
    clock = FakeClock()
    with _guarded_dashboard(tmp_path, clock) as app:
        for _ in range(4):
            assert _sign_in(app, "wrong-token")[0] == 401
        assert _sign_in(app)[0] == 303
        for _ in range(5):
            assert _sign_in(app, "wrong-token")[0] == 401  # a fresh count: five more before the limit
        assert _sign_in(app, "wrong-token")[0] == 429


def test_wrong_bearer_tokens_count_too(tmp_path: Path) -> None:
    """A script's wrong `Authorization: Bearer` is a guess like the form's; a signed-in browser is not locked out."""
    clock = FakeClock()
    with _guarded_dashboard(tmp_path, clock) as app:
        cookie = _cookie_of(_sign_in(app)[1])
        for i in range(5):
            assert http_get(app, "/api/state", {"Authorization": f"Bearer wrong-{i}-token"})[0] == 401
        code, headers, body = http_get(app, "/api/state", {"Authorization": f"Bearer {TOKEN}"})
        assert code == 429 and headers.get("Retry-After") == "60", (code, headers)
        assert "try again in 60 s" in json.loads(body)["error"]
        command = {**POST_HEADERS, "Authorization": f"Bearer {TOKEN}"}
        assert http_post(app, "/api/devices/cam-1/forget", b"", command)[0] == 429
        assert _sign_in(app)[0] == 429
        assert http_get(app, "/api/state", {"Cookie": cookie})[0] == 200


def test_the_throttle_tracks_a_bounded_number_of_addresses() -> None:
    from drywallqa.dashboard.auth import MAX_TRACKED_CLIENTS, SignInThrottle, client_key

    clock = FakeClock()
    throttle = SignInThrottle(clock=clock)
    for _ in range(5):
        throttle.record("10.0.0.1", ok=False)
    assert throttle.retry_after("10.0.0.1") == 60
    for i in range(3 * MAX_TRACKED_CLIENTS):
        throttle.record(f"10.1.{i // 256}.{i % 256}", ok=False)
    assert len(throttle) == MAX_TRACKED_CLIENTS
    assert throttle.retry_after("10.0.0.1") == 0  # the oldest address was dropped first
    # One IPv6 host owns a /64: it is counted as one client, whatever address it picks in it.
    for i in range(5):
        throttle.record(f"2001:db8::{i + 1:x}", ok=False)
    assert throttle.retry_after("2001:db8::ffff:1") == 60 and throttle.retry_after("2001:db8:0:1::1") == 0
    assert client_key("::ffff:192.0.2.7") == "192.0.2.7" == client_key("192.0.2.7")
    clock.now += 60
    assert throttle.retry_after("2001:db8::1") == 0


def test_the_session_lifetime_must_be_positive(tmp_path: Path, capsys) -> None:
    for value in ("0", "-3"):
        with pytest.raises(SystemExit):
            dashboard_main(["--port", "0", "--store", str(tmp_path / "s.sqlite"), "--session-hours", value])
        assert "--session-hours: must be more than 0" in capsys.readouterr().err, value
    with pytest.raises(SystemExit, match="--session-hours must be a number of hours above 0"):
        dashboard_main(["--port", "0", "--store", str(tmp_path / "s.sqlite"), "--session-hours", "inf"])


def test_another_apps_odd_cookie_does_not_sign_the_user_out(tmp_path: Path) -> None:
    """A browser sends the dashboard every cookie of its host name, those of apps on other ports too. Before:
    SimpleCookie gave up on the whole header at the first value with a blank or a backslash (which browsers
    accept), so the session cookie after it was never seen and signing in again did not help."""
    clock = FakeClock()
    with _guarded_dashboard(tmp_path, clock) as app:
        cookie = _cookie_of(_sign_in(app)[1])
        for header in (f"grafana_prefs=dark mode; {cookie}", f"path=C:\\temp; {cookie}", f"{cookie}; note=a b",
                       f'quoted="x y"; {cookie}'):
            assert http_get(app, "/api/state", {"Cookie": header})[0] == 200, header
        for header in (f"note=a b; {COOKIE_NAME}=forged.0000", f"{COOKIE_NAME}; x=1", "=; ;"):
            assert http_get(app, "/api/state", {"Cookie": header})[0] == 401, header


def test_a_clock_set_back_does_not_lock_an_address_out_for_the_step() -> None:
    """The throttle's window is dated on the wall clock. Before: when the clock was set back (an NTP step, an RTC
    that ran ahead), an address with 5 wrong tokens was refused for the whole step, an hour here, not a minute."""
    from drywallqa.dashboard.auth import SignInThrottle

    clock = FakeClock()
    throttle = SignInThrottle(clock=clock)
    for _ in range(5):
        throttle.record("10.0.0.1", ok=False)
    assert throttle.retry_after("10.0.0.1") == 60
    clock.now = T0 - 3600
    assert 0 <= throttle.retry_after("10.0.0.1") <= 60
