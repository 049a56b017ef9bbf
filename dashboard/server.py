"""HTTP side: static page, JSON API, Server-Sent Events and the review pages, on a stdlib ThreadingHTTPServer."""

from __future__ import annotations

import html
import json
import logging
import math
import mimetypes
import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from urllib.parse import parse_qs, quote, unquote, unquote_to_bytes, urlencode, urlsplit

from drywallqa.imageio import IMAGE_SUFFIXES
from drywallqa.vocab import load_vocabulary

from .auth import (
    COOKIE_NAME,
    DEFAULT_SESSION_HOURS,
    SignInThrottle,
    TokenAuth,
    bearer_token,
    check_auth_config,
    forwarded_client,
    host_allowed,
    trusted_proxy_networks,
)
from .bridge import BrokerConfig, DeviceOfflineError, MqttBridge
from .export import alerts_csv, all_alerts, export_filename
from .review import (
    BROWSER_IMAGE_SUFFIXES,
    ReviewError,
    find_item,
    list_review,
    mask_problems,
    render_overlay,
    resolve_under,
)
from .state import DEFAULT_MAX_DEVICES, LiveState
from .store import AlertStore, StoreError

log = logging.getLogger(__name__)

ALERT_PAGE = 100  # alerts a page shows at first and adds per "show older"; the rest stay in the store
REVIEW_FILE_SUFFIXES = set(IMAGE_SUFFIXES) | {".html", ".htm", ".css", ".js", ".json", ".csv", ".txt", ".svg"}
# Files under a review root (an eval report, an SVG, any .html someone left there) are served on the dashboard's
# own origin, where a script could call its API with the signed-in user's cookie: let them show images and
# styles (the eval report's are inline and data: URIs) and run nothing.
REVIEW_FILE_CSP = "default-src 'none'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; font-src 'self' data:"
INCLUDE_ACKED_VALUES = {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False}
STATIC_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css",
}


@dataclass
class DashboardConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    token: str | None = field(default=None, repr=False)  # never in a log line or a traceback
    allowed_hosts: list[str] = field(default_factory=list)  # Host names accepted without a token (a proxy's)
    store_path: Path = Path("dashboard.sqlite")
    review_roots: list[Path] = field(default_factory=list)
    broker: BrokerConfig = field(default_factory=BrokerConfig)
    heartbeat_s: float = 10.0
    max_alerts: int = 2000
    max_devices: int = DEFAULT_MAX_DEVICES  # devices tracked; beyond it the longest-silent (offline first) go
    device_timeout_s: float = 45.0  # a device silent this long is shown as "silent" (edge status every 10 s)
    session_hours: float = DEFAULT_SESSION_HOURS  # a sign-in cookie expires this long after sign-in
    # Reverse proxies (addresses or networks) whose X-Forwarded-For names the client for the sign-in throttle;
    # from any other peer the header is ignored.
    trusted_proxies: list[str] = field(default_factory=list)


class DashboardApp:
    """Wires the store, live state, MQTT bridge and HTTP server together. `clock` (unix time) dates sessions and
    sign-in failures; tests pass one they can advance."""

    def __init__(self, config: DashboardConfig, clock: Callable[[], float] = time.time) -> None:
        check_auth_config(config.host, config.token, config.session_hours)
        self.classes = list(load_vocabulary().classes)  # read once: a broken prompts.yaml stops the start, not pages
        self.config = config
        self.auth = TokenAuth(config.token, session_s=config.session_hours * 3600, clock=clock)
        self.throttle = SignInThrottle(clock=clock)
        self.trusted_proxies = trusted_proxy_networks(config.trusted_proxies)
        self.review_roots = [Path(r).expanduser().resolve() for r in config.review_roots]
        self.store = AlertStore(config.store_path, max_alerts=config.max_alerts)
        self.state = LiveState(max_devices=config.max_devices)
        self.bridge = MqttBridge(config.broker, self.state, self.store)
        self.stopping = threading.Event()
        self.httpd = _Server((config.host, config.port), _Handler)
        self.httpd.app = self
        self._thread: threading.Thread | None = None
        self._stopped = False

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.httpd.server_address[:2]
        return str(host), int(port)

    @property
    def url(self) -> str:
        host, port = self.address
        return f"http://{'[' + host + ']' if ':' in host else host}:{port}"

    def start(self) -> DashboardApp:
        """Start the bridge and serve HTTP on a background thread (used by tests and `serve_forever`)."""
        self.bridge.start()
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="dashboard-http", daemon=True)
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        self.start()
        try:
            while not self.stopping.wait(1.0):
                pass
        finally:
            self.stop()

    def stop(self) -> None:
        """Idempotent: stops HTTP (ending SSE streams), the MQTT bridge and closes the store."""
        if self._stopped:
            return
        self._stopped = True
        self.stopping.set()
        self.state.publish("_close", {})  # wake every SSE handler so it returns
        self.httpd.shutdown()
        self.httpd.server_close()
        self.bridge.stop()
        self.store.close()

    def full_state(self) -> dict:
        return {
            "devices": self.state.devices_json(),
            "broker": self.state.broker_json(),
            "alerts": self.store.alerts(limit=ALERT_PAGE),
            "alert_counts": self.store.counts(),
            "classes": self.classes,
            "auth": self.auth.enabled,
            "device_timeout_s": self.config.device_timeout_s,
            "server_time": time.time(),
        }


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    app: DashboardApp


class _Throttled(Exception):
    """The client sent too many wrong tokens lately; it may try again in `retry_after` seconds."""

    def __init__(self, retry_after: float) -> None:
        super().__init__(retry_after)
        self.retry_after = retry_after


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    server_version = "DrywallQA-Dashboard"
    sys_version = ""

    # --- plumbing ---------------------------------------------------------------------------------
    @property
    def app(self) -> DashboardApp:
        return self.server.app

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - stdlib signature
        log.debug("%s %s", self.address_string(), format % args)

    def _cookies(self) -> dict[str, str]:
        """The request's cookies, name -> value (the first of a name), read pair by pair. A browser sends every
        cookie of the host name, other ports' apps' too; SimpleCookie drops the whole header at the first value
        it finds malformed (a blank, a backslash), and with it the session cookie, for good."""
        cookies: dict[str, str] = {}
        for pair in self.headers.get("Cookie", "").split(";"):
            name, sep, value = pair.partition("=")
            name, value = name.strip(), value.strip()
            if sep and name and name not in cookies:
                cookies[name] = value[1:-1] if len(value) >= 2 and value[0] == value[-1] == '"' else value
        return cookies

    def _send(
        self, status: int, body: bytes, content_type: str, headers: dict[str, str] | None = None
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Referrer-Policy", "no-referrer")
        self.send_header("X-Frame-Options", "DENY")  # no other site may frame a page and steer its clicks
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, data: object, status: int = 200, headers: dict[str, str] | None = None) -> None:
        body = json.dumps(data).encode()
        self._send(status, body, "application/json", {"Cache-Control": "no-store", **(headers or {})})

    def _error(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        if self.path.startswith("/api/") or "json" in self.headers.get("Accept", ""):
            self._json({"error": message}, status, headers)
        else:
            page = _page("Error", f"<p class='error'>{html.escape(message)}</p>")
            self._send(status, page, "text/html; charset=utf-8", headers)

    def _redirect(self, location: str, headers: dict[str, str] | None = None) -> None:
        self._send(HTTPStatus.SEE_OTHER, b"", "text/plain", {"Location": location, **(headers or {})})

    def _authorized(self) -> bool:
        """A bearer token (checked like a sign-in, so it counts against the throttle), else the session cookie."""
        auth = self.app.auth
        if not auth.enabled:
            return True
        token = bearer_token(self.headers.get("Authorization"))
        if token is not None:
            return self._try_token(token)
        return auth.session_valid(self._cookies().get(COOKIE_NAME, ""))

    def _client(self) -> str:
        """The client's address: the peer's, or from X-Forwarded-For when the peer is a trusted proxy."""
        forwarded_for = self.headers.get_all("X-Forwarded-For") or []
        return forwarded_client(self.client_address[0], forwarded_for, self.app.trusted_proxies)

    def _try_token(self, token: str) -> bool:
        """Check a token unless this client sent too many wrong ones lately (raises _Throttled then). A right
        token is refused too while the client is throttled: else a guesser would learn it by the answer."""
        client = self._client()
        wait = self.app.throttle.retry_after(client)
        if wait > 0:
            raise _Throttled(wait)
        ok = self.app.auth.check_token(token)
        self.app.throttle.record(client, ok)
        return ok

    def _too_many(self, wait: float) -> None:
        seconds = max(1, math.ceil(wait))
        message = f"Too many wrong tokens from your address: try again in {seconds} s."
        headers = {"Retry-After": str(seconds)}
        if self.command == "POST" and urlsplit(self.path).path == "/login":
            return self._send(429, _login_page(message), "text/html; charset=utf-8", headers)
        self._error(429, message, headers)

    def _host_refused(self) -> bool:
        """Without a token, answer only requests addressed to a loopback name (or an allowed one): else any web
        page the supervisor opens could point its own host name at 127.0.0.1 (DNS rebinding) and then read the
        dashboard and send commands as a same-origin script. Sends the refusal; True when refused."""
        host = self.headers.get("Host")
        if self.app.auth.enabled or host_allowed(host, self.app.config.allowed_hosts):
            return False
        self._error(403, f"this dashboard has no token and answers only on a loopback address, not at Host {host!r}; "
                         "set a token or add --allow-host for a reverse proxy's name")
        return True

    def _read_body(self, limit: int = 64 * 1024) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        if length < 0:
            raise ValueError("negative Content-Length")
        if length > limit:
            raise ValueError("request body too large")
        return self.rfile.read(length) if length else b""

    # --- dispatch ---------------------------------------------------------------------------------
    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        path, query = url.path, parse_qs(url.query)
        if self._host_refused():
            return None
        try:
            if path == "/healthz":
                return self._json({"ok": True, "broker_connected": self.app.state.broker.connected})
            if path == "/login":
                return self._send(200, _login_page(), "text/html; charset=utf-8")
            if path == "/logout":
                self.app.auth.revoke(self._cookies().get(COOKIE_NAME, ""))  # a copy of the cookie ends here too
                expired = f"{COOKIE_NAME}=; Path=/; Max-Age=0; HttpOnly; SameSite=Strict"
                return self._redirect("/login", {"Set-Cookie": expired})
            if path.startswith("/static/"):
                return self._static(path[len("/static/") :])
            if not self._authorized():
                if path.startswith("/api/") or path == "/events":
                    return self._json({"error": "authentication required"}, 401)
                return self._redirect("/login")
            if path == "/":
                return self._static("index.html")
            if path == "/events":
                return self._events()
            if path == "/api/state":
                return self._json(self.app.full_state())
            if path == "/api/alerts":
                return self._json(self._alerts(query))
            if path == "/api/alerts.csv":
                return self._alerts_csv(query)
            parts = [unquote(p) for p in path.strip("/").split("/")]
            if len(parts) == 3 and parts[0] == "alerts" and parts[2] == "snapshot.jpg":
                return self._alert_snapshot(parts[1])
            if len(parts) == 3 and parts[0] == "devices" and parts[2] == "frame.jpg":
                return self._jpeg(self.app.state.frame(parts[1]), f"no frame yet for device {parts[1]!r}")
            if path == "/review":
                return self._review(query)
            if path == "/review/overlay.jpg":
                return self._overlay(query)
            if path.startswith("/review/files/"):
                return self._review_file(path[len("/review/files/") :])
            return self._error(404, f"no such page: {path}")
        except ReviewError as exc:
            return self._error(400, str(exc))
        except (BrokenPipeError, ConnectionResetError):
            return None
        except OSError as exc:  # a review file or folder the dashboard may not read, or one that vanished
            name = Path(exc.filename).name if isinstance(exc.filename, str) else "a file"
            return self._error(403 if isinstance(exc, PermissionError) else 500, f"cannot read {name}: {exc.strerror}")
        except _Throttled as exc:
            return self._too_many(exc.retry_after)

    def do_POST(self) -> None:
        path = urlsplit(self.path).path
        if self._host_refused():
            return None
        try:
            if path == "/login":
                return self._login()
            if not self._authorized():
                return self._json({"error": "authentication required"}, 401)
            # A custom header cannot be sent cross-site without a CORS preflight, which we never grant.
            if self.headers.get("X-DrywallQA") != "1":
                return self._json({"error": "missing X-DrywallQA: 1 header"}, 403)
            parts = [unquote(p) for p in path.strip("/").split("/")]
            if len(parts) == 4 and parts[:2] == ["api", "alerts"] and parts[3] in ("ack", "unack"):
                return self._ack(parts[2], parts[3] == "ack")
            if len(parts) == 4 and parts[:2] == ["api", "devices"] and parts[3] == "snapshot":
                try:
                    request_id = self.app.bridge.request_snapshot(parts[2])
                except ConnectionError as exc:
                    return self._json({"error": str(exc)}, 503)
                except DeviceOfflineError as exc:
                    return self._json({"error": str(exc), "sent": False}, 409)
                return self._json({"request_id": request_id}, 202)
            if len(parts) == 4 and parts[:2] == ["api", "devices"] and parts[3] == "forget":
                try:
                    self.app.bridge.forget_device(parts[2])
                except ConnectionError as exc:
                    return self._json({"error": str(exc)}, 503)
                return self._json({"forgotten": parts[2]})
            return self._json({"error": f"no such endpoint: {path}"}, 404)
        except _Throttled as exc:
            return self._too_many(exc.retry_after)
        except StoreError as exc:  # a full disk: say so, instead of closing the connection without an answer
            return self._json({"error": str(exc)}, 503)
        except ValueError as exc:
            return self._json({"error": str(exc)}, 400)
        except (BrokenPipeError, ConnectionResetError):
            return None

    # --- handlers ---------------------------------------------------------------------------------
    def _static(self, name: str) -> None:
        if "/" in name or name.startswith("."):
            return self._error(404, "no such file")
        res = resources.files("drywallqa.dashboard").joinpath("static", name)
        if not res.is_file():
            return self._error(404, f"no such file: {name}")
        ctype = STATIC_TYPES.get(Path(name).suffix, "application/octet-stream")
        self._send(200, res.read_bytes(), ctype, {"Cache-Control": "no-cache"})

    def _login(self) -> None:
        form = parse_qs(self._read_body().decode("utf-8", "replace"))
        token = (form.get("token") or [""])[0]
        if not self.app.auth.enabled:
            return self._redirect("/")
        if not self._try_token(token):
            return self._send(401, _login_page("Wrong token."), "text/html; charset=utf-8")
        auth = self.app.auth
        attributes = f"Path=/; Max-Age={int(auth.session_s)}; HttpOnly; SameSite=Strict"
        cookie = f"{COOKIE_NAME}={auth.session_value()}; {attributes}"
        if self.headers.get("X-Forwarded-Proto") == "https":
            cookie += "; Secure"
        self._redirect("/", {"Set-Cookie": cookie})

    def _alerts(self, query: dict[str, list[str]]) -> list[dict]:
        cls, include_acked = _alert_filter(query)
        try:
            limit = max(1, min(5000, int((query.get("limit") or ["500"])[0])))
        except ValueError as exc:
            raise ReviewError("limit must be an integer") from exc
        before = None
        if query.get("before"):
            try:
                before = (float(query["before"][0]), (query.get("before_id") or [""])[0])
            except ValueError as exc:
                raise ReviewError(
                    "before must be the sort_time (a number) of the last alert of the previous page"
                ) from exc
            if not math.isfinite(before[0]):
                raise ReviewError("before must be a finite number: the sort_time of the previous page's last alert")
        return self.app.store.alerts(class_name=cls, include_acked=include_acked, limit=limit, before=before)

    def _alerts_csv(self, query: dict[str, list[str]]) -> None:
        """Every alert the store holds that matches the filter, newest first, as a CSV download (UTF-8 with a
        byte order mark, which Excel needs to read accents in notes right)."""
        cls, include_acked = _alert_filter(query)
        body = alerts_csv(all_alerts(self.app.store, cls, include_acked)).encode("utf-8-sig", "replace")
        headers = {
            "Cache-Control": "no-store",
            "Content-Disposition": f'attachment; filename="{export_filename(time.time())}"',
        }
        self._send(200, body, "text/csv; charset=utf-8", headers)

    def _ack(self, event_id: str, ack: bool) -> None:
        data = _ack_body(self._read_body())
        try:
            if ack:
                self.app.store.acknowledge(
                    event_id, by=str(data.get("by") or ""), note=str(data.get("note") or "")
                )
            else:
                self.app.store.unacknowledge(event_id)
        except KeyError:
            return self._json({"error": _unknown_alert(event_id)}, 404)
        item = self.app.store.get(event_id)
        if item is None:  # an undo for an alert dropped since the page showed it: nothing to undo
            return self._json({"error": _unknown_alert(event_id)}, 404)
        self.app.bridge.announce_alert(item)
        self._json(item)

    def _alert_snapshot(self, event_id: str) -> None:
        data = self.app.store.snapshot(event_id)
        if data is None:
            return self._error(404, _unknown_alert(event_id))
        self._jpeg(data, f"alert {event_id!r} came without a usable picture (the page footer said why)")

    def _jpeg(self, data: bytes | None, missing: str) -> None:
        if not data:
            return self._error(404, missing)
        self._send(200, data, "image/jpeg", {"Cache-Control": "private, max-age=3600"})

    def _events(self) -> None:
        if self.command == "HEAD":
            return self._send(200, b"", "text/event-stream")
        app = self.app
        signed_in = self._still_signed_in()
        if not signed_in():  # signed out or expired since the check a moment ago
            return self._json({"error": "authentication required"}, 401)
        sub = app.state.subscribe()
        try:
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-store")
            self.send_header("X-Accel-Buffering", "no")  # nginx: do not buffer the stream
            self.end_headers()
            self._sse("state", app.full_state(), retry_ms=2000)
            # The stream lives as long as its session: checked at every heartbeat and before every event, it ends
            # at sign-out, expiry or a new key, even for a copy of the cookie (the browser then finds /api/state
            # refused and goes to the sign-in page).
            while not app.stopping.is_set():
                if sub.needs_resync:
                    if not signed_in():
                        break
                    sub.needs_resync = False
                    self._sse("state", app.full_state())
                try:
                    name, data = sub.get(timeout=app.config.heartbeat_s)
                except queue.Empty:
                    if not signed_in():
                        break
                    self.wfile.write(b": ping\n\n")
                    self.wfile.flush()
                    continue
                if name == "_close" or not signed_in():
                    break
                self._sse(name, data)
        except (BrokenPipeError, ConnectionResetError, OSError):
            pass  # the browser went away
        finally:
            app.state.unsubscribe(sub)

    def _still_signed_in(self) -> Callable[[], bool]:
        """A cheap re-check of what authorized this request (its bearer token or the session of its cookie), for
        a long request to ask again as it goes on."""
        auth = self.app.auth
        if not auth.enabled:
            return lambda: True
        token = bearer_token(self.headers.get("Authorization"))
        if token is not None:
            return lambda: auth.check_token(token)  # no throttle: the token was counted when the stream opened
        session = auth.session(self._cookies().get(COOKIE_NAME, ""))
        if session is None:
            return lambda: False
        return lambda: auth.still_valid(session)

    def _sse(self, name: str, data: dict, retry_ms: int | None = None) -> None:
        msg = f"event: {name}\ndata: {json.dumps(data)}\n\n"
        if retry_ms is not None:
            msg = f"retry: {retry_ms}\n" + msg
        self.wfile.write(msg.encode())
        self.wfile.flush()

    # --- review -----------------------------------------------------------------------------------
    def _review_dirs(self, query: dict[str, list[str]]) -> tuple[Path, Path | None]:
        roots = self.app.review_roots
        images = resolve_under((query.get("images") or [""])[0], roots, want_dir=True)
        masks_arg = (query.get("masks") or [""])[0]
        masks = resolve_under(masks_arg, roots, want_dir=True) if masks_arg else None
        return images, masks

    def _review(self, query: dict[str, list[str]]) -> None:
        report = (query.get("report") or [""])[0]
        if report:
            return self._redirect(
                self._file_url(resolve_under(report, self.app.review_roots, want_dir=False))
            )
        if not query.get("images"):
            return self._send(200, _review_form(self.app.review_roots), "text/html; charset=utf-8")
        images, masks = self._review_dirs(query)
        listing = list_review(images, masks)
        try:
            offset = max(0, int((query.get("offset") or ["0"])[0]))
        except ValueError as exc:
            raise ReviewError("offset must be an integer") from exc
        self._send(200, _review_page(self, images, masks, listing, offset), "text/html; charset=utf-8")

    def _overlay(self, query: dict[str, list[str]]) -> None:
        images, masks = self._review_dirs(query)
        item = find_item(images, masks, (query.get("id") or [""])[0])
        jpeg, problems = render_overlay(item, plain=(query.get("plain") or [""])[0] == "1")
        headers = {"Cache-Control": "no-cache"}
        if problems:
            headers["X-Mask-Problems"] = "; ".join(problems)[:1000].encode("ascii", "replace").decode()
        self._send(200, jpeg, "image/jpeg", headers)

    def _file_url(self, path: Path) -> str:
        for i, root in enumerate(self.app.review_roots):
            if path == root or root in path.parents:
                return f"/review/files/{i}/{quote(os.fsencode(path.relative_to(root)))}"  # any file name bytes
        raise ReviewError(f"{path} is outside the review roots")

    def _review_file(self, rest: str) -> None:
        index, _, rel = rest.partition("/")
        roots = self.app.review_roots
        if not index.isdigit() or int(index) >= len(roots):
            return self._error(404, "no such review root")
        path = resolve_under(str(roots[int(index)] / os.fsdecode(unquote_to_bytes(rel))), roots, want_dir=False)
        if path.suffix.lower() not in REVIEW_FILE_SUFFIXES:
            return self._error(403, f"file type {path.suffix!r} is not served")
        ctype = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        if ctype.startswith("text/"):
            ctype += "; charset=utf-8"
        headers = {"Cache-Control": "no-cache", "Content-Security-Policy": REVIEW_FILE_CSP}
        self._send(200, path.read_bytes(), ctype, headers)


def _alert_filter(query: dict[str, list[str]]) -> tuple[str | None, bool]:
    """The class (None: all) and include_acked (default: yes) of an alert listing; ReviewError (a 400) for an
    include_acked that is not a yes or a no, rather than reading a typo as "yes"."""
    cls = (query.get("class") or [""])[0] or None
    include_acked = (query.get("include_acked") or ["1"])[0]
    value = INCLUDE_ACKED_VALUES.get(include_acked.strip().lower())
    if value is None:
        raise ReviewError(f"include_acked must be 1 or 0 (or true/false, yes/no), not {include_acked!r}")
    return cls, value


def _ack_body(body: bytes) -> dict:
    """The optional JSON body of an ack or undo; ValueError (a 400) saying what is expected."""
    expected = 'expected a JSON object such as {"by": "name", "note": "text"}, or no body'
    try:
        data = json.loads(body) if body.strip() else {}
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"the request body is not JSON ({exc}): {expected}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"the request body is a JSON {type(data).__name__}: {expected}")
    return data


def _unknown_alert(event_id: str) -> str:
    return (f"unknown alert {event_id!r}: the store no longer holds it (the oldest alerts are dropped beyond "
            "--max-alerts) or never did; reload the page for the current list")


# --- server-rendered pages (small; the live page is static/index.html) --------------------------------
def _page(title: str, body: str) -> bytes:
    return (
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        f"<title>{html.escape(title)} - DrywallQA</title><link rel='stylesheet' href='/static/style.css'></head>"
        f"<body><header><a href='/'>DrywallQA dashboard</a> <span>{html.escape(title)}</span></header>"
        f"<main>{body}</main></body></html>"
    ).encode()


def _login_page(message: str = "") -> bytes:
    note = f"<p class='error'>{html.escape(message)}</p>" if message else ""
    return _page(
        "Sign in",
        f"{note}<form method='post' action='/login' class='login'><label>Access token "
        "<input type='password' name='token' autocomplete='current-password' autofocus></label>"
        "<button type='submit'>Sign in</button></form>",
    )


def _review_form(roots: list[Path]) -> bytes:
    root_list = (
        "".join(f"<li><code>{html.escape(str(r))}</code></li>" for r in roots)
        or "<li>none (review disabled)</li>"
    )
    return _page(
        "Review",
        "<form method='get' action='/review' class='review-form'>"
        "<label>Images folder <input name='images' size='60'></label>"
        "<label>Masks folder <input name='masks' size='60'></label><button>Open</button></form>"
        "<form method='get' action='/review' class='review-form'>"
        "<label>Eval HTML report <input name='report' size='60'></label><button>Open report</button></form>"
        f"<p>Allowed roots:</p><ul>{root_list}</ul>",
    )


PAGE_SIZE = 50


def _review_page(handler: _Handler, images: Path, masks: Path | None, listing, offset: int) -> bytes:
    base = {"images": str(images), **({"masks": str(masks)} if masks else {})}
    items = listing.items[offset : offset + PAGE_SIZE]
    rows = []
    for item in items:
        chips = (
            "".join(
                f"<a class='chip cls-{html.escape(m.class_name or 'other')}' href='{handler._file_url(m.path)}' "
                f"target='_blank'>{html.escape(m.prompt_part)}</a>"
                for m in item.masks
            )
            or "<span class='muted'>no masks</span>"
        )
        overlay = "/review/overlay.jpg?" + urlencode({**base, "id": item.image_id})
        shown = (handler._file_url(item.image) if item.image.suffix.lower() in BROWSER_IMAGE_SUFFIXES
                 else overlay + "&plain=1")  # HEIC, TIFF: rendered as a JPEG, since a browser cannot show them
        problems = mask_problems(item)  # the overlay stretches a wrong-size mask: say so where it is seen
        warn = (
            "<p class='warn mask-problems'>" + "<br>".join(html.escape(p) for p in problems) + "</p>"
            if problems
            else ""
        )
        rows.append(
            f"<figure class='review-item' data-image-id='{html.escape(item.image_id)}'>"
            f"<figcaption><b>{html.escape(item.image_id)}</b> {chips}{warn}</figcaption>"
            f"<div class='pair'><img loading='lazy' alt='image' src='{html.escape(shown)}'>"
            f"<img loading='lazy' alt='masks' class='overlay' src='{overlay}'></div></figure>"
        )
    nav = []
    if offset > 0:
        nav.append(
            f"<a href='/review?{urlencode({**base, 'offset': max(0, offset - PAGE_SIZE)})}'>previous</a>"
        )
    if offset + PAGE_SIZE < len(listing.items):
        nav.append(f"<a href='/review?{urlencode({**base, 'offset': offset + PAGE_SIZE})}'>next</a>")
    orphans = (
        f"<p class='warn'>{len(listing.orphan_masks)} mask file(s) match no image, e.g. "
        f"<code>{html.escape(listing.orphan_masks[0].name)}</code></p>"
        if listing.orphan_masks
        else ""
    )
    if listing.unnamed:
        example = listing.unnamed[0].name.encode("utf-8", "replace").decode("utf-8")
        orphans += (f"<p class='warn'>{len(listing.unnamed)} file(s) skipped: their names are not UTF-8 (e.g. "
                    f"<code>{html.escape(example)}</code>); rename them to review them</p>")
    summary = (
        f"<p>{len(listing.items)} images in <code>{html.escape(str(images))}</code>"
        + (f", masks from <code>{html.escape(str(masks))}</code>" if masks else ", no mask folder given")
        + f"; showing {offset + 1 if items else 0}-{offset + len(items)}. {' | '.join(nav)}</p>"
    )
    return _page("Review", summary + orphans + "".join(rows))
