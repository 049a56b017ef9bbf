"""`drywallqa dashboard`: serve the live web dashboard for one MQTT broker."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from drywallqa.argtypes import positive_float, positive_int

TOKEN_ENV = "DRYWALLQA_DASHBOARD_TOKEN"
MQTT_PASSWORD_ENVS = ("DRYWALLQA_DASHBOARD_MQTT_PASSWORD", "DRYWALLQA_MQTT__PASSWORD")


def default_store_path() -> Path:
    state_home = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state_home) / "drywallqa" / "dashboard.sqlite"


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"port must be an integer, got {text!r}") from exc
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"port must be 0-65535, got {value}")
    return value


class _HelpWithDefaults(argparse.ArgumentDefaultsHelpFormatter):
    """Shows '(default: X)' only where X means something: an option whose default is worked out at run time
    (None, '') says what it is in its own help text instead of '(default: None)', and a flag or a repeatable option
    left out is not '(default: False)' or '(default: [])'."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False or action.default == "" or action.default == []:
            return action.help
        return super()._get_help_string(action)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "dashboard",
        help="serve the live web dashboard (devices, frames, figures, alerts) for one MQTT broker",
        description=(
            "Serve a web page with live data from the edge devices on one MQTT broker: online state, latest "
            "annotated frame, area and crack-length figures, and alerts to filter and acknowledge. Also opens "
            "predicted-mask folders and eval reports at /review. Listening beyond loopback requires a token "
            f"({TOKEN_ENV} or --token-file); put it behind a TLS reverse proxy (see dashboard/README.md)."
        ),
        formatter_class=_HelpWithDefaults,
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (non-loopback needs a token)")
    p.add_argument("--port", type=_port, default=8080, help="HTTP port (0: any free port)")
    p.add_argument("--token-file", type=Path, help=f"file holding the access token (else ${TOKEN_ENV})")
    p.add_argument(
        "--session-hours",
        type=positive_float,
        default=12.0,
        help="a sign-in lasts this long, then the browser asks for the token again",
    )
    p.add_argument(
        "--allow-host",
        action="append",
        default=[],
        metavar="NAME",
        help="without a token the page answers only to loopback names (a guard against DNS rebinding); also "
        "answer to NAME, e.g. a reverse proxy's that forwards its Host header (repeatable)",
    )
    p.add_argument(
        "--trusted-proxy",
        action="append",
        default=[],
        metavar="ADDR",
        help="a reverse proxy's exact address (repeatable, one per proxy): for requests from it, the sign-in limit "
        "on wrong tokens counts the right-most address in X-Forwarded-For that is not a trusted proxy; the header "
        "is ignored from anyone else, and everywhere without this option. Never name a network that clients sit "
        "in (e.g. 10.0.0.0/8): each of them could then forge the header and dodge the limit (a network wider "
        "than one address is logged as a warning)",
    )
    p.add_argument(
        "--store", type=Path, default=None, help=f"SQLite file for alerts and acks [{default_store_path()}]"
    )
    p.add_argument("--max-alerts", type=positive_int, default=2000, help="alerts kept in the store (oldest dropped)")
    p.add_argument(
        "--max-devices",
        type=positive_int,
        default=500,
        help="devices tracked at most: a device beyond it replaces the offline device silent longest (else the "
        "device silent longest), logged once; a guard against a broker client publishing under many device ids",
    )
    p.add_argument(
        "--device-timeout",
        type=positive_float,
        default=45.0,
        help="seconds without a message after which an online device is shown as silent (edge status: every 10 s)",
    )
    p.add_argument(
        "--review-root",
        type=Path,
        action="append",
        default=None,
        help="folder under which /review may open images, masks and reports (repeatable) [current folder]",
    )
    g = p.add_argument_group("MQTT broker")
    g.add_argument("--mqtt-host", default="127.0.0.1", help="the MQTT broker the edge devices publish to")
    g.add_argument("--mqtt-port", type=_port, default=1883, help="its port (8883 is usual with TLS)")
    g.add_argument(
        "--prefix", default="drywallqa", help="topic prefix: <prefix>/<device>/status|detections|..."
    )
    g.add_argument(
        "--mqtt-username",
        default=None,
        help=f"user name at the broker; the password comes from ${MQTT_PASSWORD_ENVS[0]} (or "
        f"${MQTT_PASSWORD_ENVS[1]}), never from the command line",
    )
    g.add_argument("--mqtt-tls", action="store_true", help="TLS to the broker, verified with the system's CAs")
    g.add_argument("--mqtt-tls-ca", default=None, help="CA file; enables TLS to the broker")
    g.add_argument(
        "--mqtt-tls-cert", default=None, help="client certificate (PEM) for a broker that requires one; enables TLS"
    )
    g.add_argument("--mqtt-tls-key", default=None, help="the client certificate's private key (PEM, unencrypted)")
    g.add_argument(
        "--mqtt-tls-insecure",
        action="store_true",
        help="do not check that the broker's certificate names --mqtt-host (testing only)",
    )
    g.add_argument(
        "--client-id", default="", help="MQTT client id (stable, for a persistent session) [drywallqa-dashboard-<host name>]"
    )
    p.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    p.set_defaults(func=run)


def _read_token(args: argparse.Namespace) -> str | None:
    if args.token_file is not None:
        try:
            token = args.token_file.read_text(encoding="utf-8").strip()
        except UnicodeDecodeError as exc:
            raise SystemExit(f"drywallqa dashboard: token file {args.token_file} is not UTF-8 text") from exc
        except OSError as exc:
            raise SystemExit(f"drywallqa dashboard: cannot read --token-file: {exc}") from exc
        if not token:
            raise SystemExit(f"drywallqa dashboard: token file {args.token_file} is empty")
        return token
    return (os.environ.get(TOKEN_ENV) or "").strip() or None


def run(args: argparse.Namespace) -> int:
    from drywallqa.vocab import VocabularyError

    from .auth import AuthConfigError
    from .bridge import BrokerConfig, BrokerConfigError
    from .server import DashboardApp, DashboardConfig
    from .store import StoreError

    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    for root in args.review_root or []:
        if not root.expanduser().is_dir():
            raise SystemExit(f"drywallqa dashboard: --review-root {root} is not a folder")
    password = next((os.environ[e] for e in MQTT_PASSWORD_ENVS if os.environ.get(e)), None)
    config = DashboardConfig(
        host=args.host,
        port=args.port,
        token=_read_token(args),
        allowed_hosts=args.allow_host,
        session_hours=args.session_hours,
        trusted_proxies=args.trusted_proxy,
        store_path=args.store or default_store_path(),
        review_roots=args.review_root or [Path.cwd()],
        max_alerts=args.max_alerts,
        max_devices=args.max_devices,
        device_timeout_s=args.device_timeout,
        broker=BrokerConfig(
            host=args.mqtt_host,
            port=args.mqtt_port,
            prefix=args.prefix,
            client_id=args.client_id,
            username=args.mqtt_username,
            password=password,
            tls=args.mqtt_tls,
            tls_ca=args.mqtt_tls_ca,
            tls_cert=args.mqtt_tls_cert,
            tls_key=args.mqtt_tls_key,
            tls_insecure=args.mqtt_tls_insecure,
        ),
    )
    try:
        app = DashboardApp(config)
    except (AuthConfigError, StoreError, BrokerConfigError, VocabularyError) as exc:
        raise SystemExit(f"drywallqa dashboard: {exc}") from exc
    except OSError as exc:
        raise SystemExit(f"drywallqa dashboard: cannot listen on {args.host}:{args.port}: {exc}") from exc
    print(
        f"DrywallQA dashboard on {app.url} (broker {config.broker.url}, store {config.store_path})",
        file=sys.stderr,
    )
    import contextlib
    import signal

    signal.signal(signal.SIGTERM, lambda *_: app.stopping.set())
    with contextlib.suppress(KeyboardInterrupt):
        app.serve_forever()
    return 0


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry (`python -m drywallqa.dashboard`), same options as `drywallqa dashboard`."""
    parser = argparse.ArgumentParser(prog="drywallqa")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["dashboard", *(argv if argv is not None else sys.argv[1:])])
    return args.func(args)
