"""Access control: a shared token, required whenever the dashboard listens beyond loopback; signed session cookies
that expire and that sign-out revokes; and a per-address limit on wrong tokens, with the client's address taken
from X-Forwarded-For only when the request comes from a configured trusted proxy."""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import math
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
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
MAX_REVOKED_SESSIONS = 10_000  # signed-out cookies remembered until they expire; beyond: a new signing key
SESSION_ID_HEX = 32  # a cookie's random id: 128 bits

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


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


@dataclass(frozen=True)
class Session:
    """What a valid cookie says: its random id, when it expires (unix time) and which signing key signed it (the
    count of keys replaced before it)."""

    session_id: str
    expires: float
    key_generation: int = 0


class TokenAuth:
    """Checks a bearer token or a session cookie `<issued unix time>.<random id>.<HMAC(key, context|issued|id)>`.
    The key is random, made at start-up and kept only in memory: the token never sits in a cookie, and a restart
    (or a new token, which needs one) signs everyone out. A cookie expires `session_s` after sign-in; sign-out
    revokes its id until then. At most `max_revoked` ids are kept: past that, the key is replaced, which signs
    everyone out, so no revocation is ever forgotten and memory stays bounded."""

    def __init__(
        self,
        token: str | None,
        session_s: float = DEFAULT_SESSION_HOURS * 3600,
        clock: Callable[[], float] = time.time,
        max_revoked: int = MAX_REVOKED_SESSIONS,
    ) -> None:
        self.token = token or None
        self.session_s = session_s
        self.clock = clock
        self.max_revoked = max_revoked
        self._key = secrets.token_bytes(32)
        self._key_generation = 0  # keys replaced so far: a session signed with an older one is void
        self._revoked: dict[str, float] = {}  # session id -> when its cookie expires
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.token is not None

    @property
    def revoked_count(self) -> int:
        return len(self._revoked)

    def check_token(self, candidate: str) -> bool:
        return bool(self.token) and hmac.compare_digest(candidate.encode(), self.token.encode())

    def _sign(self, issued: str, session_id: str) -> str:
        message = SESSION_CONTEXT + f"{issued}|{session_id}".encode()
        return hmac.new(self._key, message, hashlib.sha256).hexdigest()

    def session_value(self) -> str:
        """A new session cookie's value, issued now, with a fresh id."""
        issued, session_id = str(int(self.clock())), secrets.token_hex(SESSION_ID_HEX // 2)
        return f"{issued}.{session_id}.{self._sign(issued, session_id)}"

    def _session(self, value: str) -> Session | None:
        """The session of a cookie this process signed that has not expired (revoked or not), else None."""
        if not self.enabled:
            return None
        generation = self._key_generation  # read before the check: a key replaced meanwhile voids the session
        parts = value.split(".")
        if len(parts) != 3:
            return None
        issued, session_id, signature = parts
        if not (issued.isascii() and issued.isdigit() and len(issued) <= 12):
            return None
        if not (len(session_id) == SESSION_ID_HEX and all(c in "0123456789abcdef" for c in session_id)):
            return None
        if not hmac.compare_digest(signature.encode(), self._sign(issued, session_id).encode()):
            return None
        age = self.clock() - int(issued)
        if not -CLOCK_SKEW_S <= age < self.session_s:
            return None
        return Session(session_id, expires=int(issued) + self.session_s, key_generation=generation)

    def session_valid(self, value: str) -> bool:
        return self.session(value) is not None

    def session(self, value: str) -> Session | None:
        """The session of cookie `value` if it is valid now (signed by the current key, not expired, not signed
        out), else None."""
        session = self._session(value)
        return session if session is not None and self.still_valid(session) else None

    def still_valid(self, session: Session) -> bool:
        """Whether a session found valid earlier still is: not expired since, not signed out, and its key not
        replaced. Cheap (no signature check), for a long request such as the event stream to ask often."""
        if not self.clock() < session.expires:
            return False
        with self._lock:
            return session.key_generation == self._key_generation and session.session_id not in self._revoked

    def revoke(self, value: str) -> bool:
        """Sign out the session of cookie `value` on the server, so that a copy of it is refused too. False when
        the value is no valid cookie (nothing to revoke)."""
        session = self._session(value)
        if session is None:
            return False
        with self._lock:
            self._forget_expired()
            if session.session_id in self._revoked:
                return True
            if len(self._revoked) >= self.max_revoked:
                self._replace_key()
            else:
                self._revoked[session.session_id] = session.expires
        return True

    def _forget_expired(self) -> None:
        """Drop the revocations of cookies that have expired anyway (under the lock)."""
        now = self.clock()
        for session_id in [s for s, expires in self._revoked.items() if now >= expires]:
            del self._revoked[session_id]

    def _replace_key(self) -> None:
        """Void every cookie at once: the revocation list is full (under the lock)."""
        log.warning(
            "%d sign-outs within %.0f h: every session is signed out (new signing key), to keep the list of "
            "signed-out cookies bounded", len(self._revoked), self.session_s / 3600,
        )
        self._key = secrets.token_bytes(32)
        self._key_generation += 1
        self._revoked.clear()


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


def _ip(text: str) -> IPAddress | None:
    """The IP address in `text` (brackets and a port allowed, as some proxies send them; an IPv4-mapped IPv6
    address as the IPv4 one), else None."""
    try:
        ip = ipaddress.ip_address(host_name(text))
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def trusted_proxy_networks(values: Iterable[str]) -> tuple[IPNetwork, ...]:
    """The --trusted-proxy values as networks: an address (a /32 or /128) or a network like 10.0.0.1/30. A
    network wider than one address is logged as a warning: a client inside it is believed about its own
    X-Forwarded-For, which is rarely meant."""
    networks = []
    for value in values:
        try:
            network = ipaddress.ip_network(value.strip(), strict=False)
        except ValueError:
            raise AuthConfigError(f"--trusted-proxy {value!r} is not an IP address or network") from None
        if network.num_addresses > 1:
            log.warning(
                "--trusted-proxy %s trusts %d addresses: any client among them is a 'proxy' whose own "
                "X-Forwarded-For entries are believed, so it can pose as ever new addresses and escape the limit "
                "on wrong tokens; list only the proxies' exact addresses, never a network that clients are in",
                network, network.num_addresses,
            )
        networks.append(network)
    return tuple(networks)


def _trusted(ip: IPAddress, proxies: Sequence[IPNetwork]) -> bool:
    return any(ip in network for network in proxies)


def forwarded_client(peer: str, forwarded_for: Sequence[str], proxies: Sequence[IPNetwork]) -> str:
    """The client's address: the peer's, unless the peer is one of the trusted `proxies`; then the right-most
    address of the X-Forwarded-For headers (`forwarded_for`, in order) that is not a trusted proxy. Each proxy
    appends the address it was connected from, so the entries left of that one are whatever the client sent,
    and ignored. Junk where an address should be stops the walk at the last proxy's address."""
    peer_ip = _ip(peer)
    if peer_ip is None or not _trusted(peer_ip, proxies):
        return peer
    client = peer_ip
    hops = [hop for header in forwarded_for for hop in header.split(",")]
    for hop in reversed(hops):
        hop_ip = _ip(hop)
        if hop_ip is None:
            break
        client = hop_ip
        if not _trusted(hop_ip, proxies):
            break
    return str(client)


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
