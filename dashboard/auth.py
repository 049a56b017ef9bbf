"""Access control: a shared token, required whenever the dashboard listens beyond loopback."""

from __future__ import annotations

import hashlib
import hmac

from drywallqa.edge.broker import is_loopback

COOKIE_NAME = "drywallqa_session"
MIN_TOKEN_LENGTH = 8


class AuthConfigError(ValueError):
    """The dashboard would be reachable from the network without a token, or the token is too weak."""


def check_auth_config(host: str, token: str | None) -> None:
    if token is not None and len(token) < MIN_TOKEN_LENGTH:
        raise AuthConfigError(f"the dashboard token must be at least {MIN_TOKEN_LENGTH} characters")
    if not token and not is_loopback(host):
        raise AuthConfigError(
            f"refusing to listen on {host!r} without a token: anyone on the network could read the site data. "
            "Set DRYWALLQA_DASHBOARD_TOKEN (or --token-file FILE), or listen on 127.0.0.1 behind a reverse proxy."
        )


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


class TokenAuth:
    """Checks a bearer token or a session cookie derived from the token (the token itself never sits in a cookie)."""

    def __init__(self, token: str | None) -> None:
        self.token = token or None
        self._session = (
            hmac.new(self.token.encode(), b"drywallqa-dashboard-session", hashlib.sha256).hexdigest()
            if self.token
            else ""
        )

    @property
    def enabled(self) -> bool:
        return self.token is not None

    def check_token(self, candidate: str) -> bool:
        return bool(self.token) and hmac.compare_digest(candidate.encode(), self.token.encode())

    def session_value(self) -> str:
        return self._session

    def allowed(self, authorization: str | None, cookies: dict[str, str]) -> bool:
        if not self.enabled:
            return True
        scheme, _, credentials = (authorization or "").strip().partition(" ")
        if scheme.lower() == "bearer":  # auth schemes are case-insensitive (RFC 9110)
            return self.check_token(credentials.strip())
        value = cookies.get(COOKIE_NAME, "")
        return bool(value) and hmac.compare_digest(value.encode(), self._session.encode())
