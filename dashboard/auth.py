"""Access control: a shared token, required whenever the dashboard listens beyond loopback; signed session cookies
that expire; and a per-address limit on wrong tokens."""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from drywallqa.edge.broker import is_loopback
from drywallqa.edge.mqtt_link import LogThrottle

log = logging.getLogger(__name__)

COOKIE_NAME = "drywallqa_session"
MIN_TOKEN_LENGTH = 8
DEFAULT_SESSION_HOURS = 12.0
SESSION_CONTEXT = b"drywallqa-dashboard-session|"
CLOCK_SKEW_S = 60.0  # a cookie issued further in the future than this is refused
MAX_FAILURES = 5  # wrong tokens an address may send per window before it is refused without a check
FAILURE_WINDOW_S = 60.0
MAX_TRACKED_CLIENTS = 1024


class AuthConfigError(ValueError):
    """The dashboard would be reachable from the network without a token, or the token is too weak."""


def check_auth_config(host: str, token: str | None, session_hours: float = DEFAULT_SESSION_HOURS) -> None:
    if token is not None and len(token) < MIN_TOKEN_LENGTH:
        raise AuthConfigError(f"the dashboard token must be at least {MIN_TOKEN_LENGTH} characters")
    if not token and not is_loopback(host):
        raise AuthConfigError(
            f"refusing to listen on {host!r} without a token: anyone on the network could read the site data. "
            "Set DRYWALLQA_DASHBOARD_TOKEN (or --token-file FILE), or listen on 127.0.0.1 behind a reverse proxy."
        )
    if not (session_hours > 0 and math.isfinite(session_hours)):
        raise AuthConfigError(f"--session-hours must be a number of hours above 0, not {session_hours}")


def host_name(host: str) -> str:
    """The name in a Host header or an --allow-host value: lower case, without port, brackets or final dot."""
    host = host.strip().lower()
    if host.startswith("["):  # [::1]:8080
        name = host[1 : host.find("]")] if "]" in host else host[1:]
    else:
        name = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
    return name.rstrip(".")


def host_allowed(host_header: str | None, allowed: list[str]) -> bool:
    """Whether a request's Host header names a loopback address or one of `allowed` (ports ignored on both
    sides). A request without one (HTTP/1.0, a script) is not a browser's and passes."""
    if host_header is None:
        return True
    name = host_name(host_header)
    return is_loopback(name) or name in {host_name(a) for a in allowed}


def bearer_token(authorization: str | None) -> str | None:
    """The token of an `Authorization: Bearer TOKEN` header (any case of `Bearer`, RFC 9110), else None."""
    scheme, _, credentials = (authorization or "").strip().partition(" ")
    return credentials.strip() if scheme.lower() == "bearer" else None


class TokenAuth:
    """Checks a bearer token or a session cookie `<issued unix time>.<HMAC(token, context | issued)>`: the token
    itself never sits in a cookie, a cookie expires `session_s` after sign-in, and a new token voids them all."""

    def __init__(
        self,
        token: str | None,
        session_s: float = DEFAULT_SESSION_HOURS * 3600,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.token = token or None
        self.session_s = session_s
        self.clock = clock

    @property
    def enabled(self) -> bool:
        return self.token is not None

    def check_token(self, candidate: str) -> bool:
        return bool(self.token) and hmac.compare_digest(candidate.encode(), self.token.encode())

    def _sign(self, issued: str) -> str:
        assert self.token is not None
        return hmac.new(self.token.encode(), SESSION_CONTEXT + issued.encode(), hashlib.sha256).hexdigest()

    def session_value(self) -> str:
        """A new session cookie's value, issued now."""
        issued = str(int(self.clock()))
        return f"{issued}.{self._sign(issued)}"

    def session_valid(self, value: str) -> bool:
        if not self.enabled:
            return False
        issued, _, signature = value.partition(".")
        if not (issued.isascii() and issued.isdigit() and len(issued) <= 12):
            return False
        if not hmac.compare_digest(signature.encode(), self._sign(issued).encode()):
            return False
        age = self.clock() - int(issued)
        return -CLOCK_SKEW_S <= age < self.session_s


def client_key(address: str) -> str:
    """The key a client's wrong tokens are counted under: its IP address; for IPv6 its /64, as one host
    usually holds a whole /64 and could otherwise try from a fresh address each time."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


@dataclass
class _Failures:
    since: float  # the first wrong token of the current window
    count: int = 0
    refusals: LogThrottle = field(default_factory=LogThrottle)  # refused attempts: logged once a minute


class SignInThrottle:
    """Wrong tokens per client address: after `max_failures` within `window_s` of the first, the address is
    refused (without a token check) until that window has passed; a right token clears its count. At most
    `max_clients` addresses are tracked (the least recently failed one is dropped), so memory stays bounded."""

    def __init__(
        self,
        max_failures: int = MAX_FAILURES,
        window_s: float = FAILURE_WINDOW_S,
        max_clients: int = MAX_TRACKED_CLIENTS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.max_failures = max_failures
        self.window_s = window_s
        self.max_clients = max_clients
        self.clock = clock
        self._clients: OrderedDict[str, _Failures] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._clients)

    def _current(self, key: str, now: float) -> _Failures | None:
        entry = self._clients.get(key)
        if entry is not None and not 0 <= now - entry.since < self.window_s:  # over, or the clock was set back
            del self._clients[key]
            return None
        return entry

    def retry_after(self, client: str) -> float:
        """Seconds until `client` may try a token again; 0 when it may now. Logs refusals, once a minute."""
        key = client_key(client)
        with self._lock:
            now = self.clock()
            entry = self._current(key, now)
            if entry is None or entry.count < self.max_failures:
                return 0.0
            wait = entry.since + self.window_s - now
            if entry.refusals.hit():
                log.warning(
                    "refused sign-in from %s: %d wrong tokens within %.0f s, %d attempt(s) refused so far; "
                    "it may retry in %.0f s", key, entry.count, self.window_s, entry.refusals.count, wait,
                )
            return wait

    def record(self, client: str, ok: bool) -> None:
        """Count a wrong token, or clear the client's count after a right one."""
        key = client_key(client)
        with self._lock:
            if ok:
                self._clients.pop(key, None)
                return
            now = self.clock()
            entry = self._current(key, now) or _Failures(since=now)
            entry.count += 1
            self._clients[key] = entry
            self._clients.move_to_end(key)
            while len(self._clients) > self.max_clients:
                self._clients.popitem(last=False)
