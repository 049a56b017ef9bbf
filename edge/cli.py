"""`drywallqa edge ...`: run the live loop, check a config, time the model, install or remove the systemd unit."""

from __future__ import annotations

import argparse
import difflib
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from drywallqa.argtypes import positive_float, positive_int

if TYPE_CHECKING:
    from drywallqa.edge.settings import EdgeSettings

# Exit statuses of `edge run` and `edge check-config`. A wrong setting (a value, a prompt or alias, a model file
# missing or not ours, TLS files, an embedded broker that cannot be) exits EXIT_CONFIG, sysexits' EX_CONFIG, which
# the unit's RestartPreventExitStatus= keeps systemd from restarting ten times in vain. A failure a restart may cure
# exits EXIT_START_FAILED and is retried: the embedded broker's port still taken, a GPU not yet up, a missing video
# file (it may live on a drive mounted late at boot).
EXIT_CONFIG = 78
EXIT_START_FAILED = 1

# `edge run --wait-for-spool` (the unit) waits while another runtime holds the alert spool, and meanwhile asks
# systemd for this much more start-up time at each look: the unit's TimeoutStartSec, so the start-up that follows
# the wait has the time any start has.
SPOOL_WAIT_EXTEND_S = 120


def register(subparsers: argparse._SubParsersAction) -> None:
    edge = subparsers.add_parser(
        "edge", help="edge runtime: live camera -> model -> alerts over MQTT",
        description="Run the edge runtime on a device. Settings come from a YAML file, overridden by "
                    "DRYWALLQA_<SECTION>__<KEY> environment variables (e.g. DRYWALLQA_MQTT__HOST=broker).")
    sub = edge.add_subparsers(dest="edge_command", required=True,
                              metavar="{run,check-config,bench,install-service,uninstall-service}")

    run = sub.add_parser("run", help="run the live loop (Ctrl-C / SIGTERM / SIGHUP stops it cleanly)",
                         description="Capture frames, segment the configured prompts, publish detections and "
                                     "alerts over MQTT. With the default config it needs no camera and no broker: "
                                     "synthetic demo frames and an embedded mosquitto on 127.0.0.1.")
    _add_config(run)
    run.add_argument("--max-frames", type=positive_int, default=None, metavar="N",
                     help="stop after N processed frames")
    run.add_argument("--duration", type=positive_float, default=None, metavar="S", help="stop after S seconds")
    run.add_argument("--source", default=None, help="override source.uri (demo, 0, /dev/video0, URL, file, folder)")
    run.add_argument("--model", default=None, help="override model.path (hrnet, lite or a model file)")
    run.add_argument("--watch", action="store_true",
                     help="a folder or glob source: keep watching it for new images (source.watch: true)")
    run.add_argument("--stats-json", type=Path, default=None, help="write loop statistics here at exit")
    run.add_argument("--wait-for-spool", action="store_true",
                     help="while another runtime holds the alert spool (e.g. a manual `edge run`), wait for it to "
                          "end instead of exiting 1; the systemd unit runs with it, so that it starts by itself "
                          "once the other run ends instead of failing until systemd gives up")
    _add_env_file(run)
    run.set_defaults(func=_cmd_run)

    check = sub.add_parser("check-config", help="validate a config (and the model/prompts with --model-check)",
                           description="Print the effective settings (YAML + environment) or a clear error.")
    _add_config(check)
    check.add_argument("--model-check", action="store_true", help="also load the model and resolve the prompts")
    _add_env_file(check)
    check.set_defaults(func=_cmd_check)

    bench = sub.add_parser(
        "bench", help="time the exported model on this device, as `edge run` loads it (no torch needed)",
        description="Time pre-processing, the network and the decision rule per frame for the config's model (or "
                    "each --model, side by side), on the backend and threads `edge run` would use. Size a device "
                    "from this, run on it.")
    _add_config(bench)
    bench.add_argument("--model", action="append", default=None, metavar="PATH|PROFILE",
                       help="a model file or profile instead of the config's model.path; give it again to compare "
                            "several (e.g. an FP16 and an INT8 file) in one run")
    bench.add_argument("--backend", choices=("auto", "openvino", "onnxruntime", "tensorrt"), default=None,
                       help="override model.backend")
    bench.add_argument("--threads", type=positive_int, default=None, help="override model.threads")
    bench.add_argument("--frame-size", type=_frame_size, default=(480, 640), metavar="WxH",
                       help="the camera frame resized to the model's input (default 640x480)")
    bench.add_argument("--iters", type=positive_int, default=30, help="frames per round (default 30)")
    bench.add_argument("--rounds", type=positive_int, default=3, help="rounds, the models taking turns (default 3)")
    bench.add_argument("--json", type=Path, default=None, metavar="PATH", help="also write the rows here")
    _add_env_file(bench)
    bench.set_defaults(func=_cmd_bench)

    inst = sub.add_parser("install-service", help="install the systemd unit (Type=notify, watchdog)",
                          description="Write drywallqa-edge.service and an environment file, then enable and "
                                      "(re)start it (exit 1 if systemd cannot). Needs root unless --prefix points "
                                      "elsewhere; --dry-run only prints what would be written.")
    inst.add_argument("--prefix", type=Path, default=Path("/"), help="file system root to install under (tests)")
    inst.add_argument("--config", type=Path, default=None,
                      help="config path the service reads (copied from the packaged default if missing; default "
                           "/etc/drywallqa/edge.yaml, or edge-NAME.yaml with --instance)")
    inst.add_argument("--instance", default=None, metavar="NAME",
                      help="a further camera of this device: drywallqa-edge-NAME.service, with its own config, "
                           "mqtt.device_id (<host name>-NAME), state folder and alert spool, and "
                           "/etc/drywallqa/edge-NAME.env read after edge.env")
    inst.add_argument("--user", default="drywallqa", help="service user (created with useradd when missing)")
    inst.add_argument("--exec", dest="exec_path", default=None,
                      help="the drywallqa (or python) the unit runs; `edge run` (or `-m drywallqa.edge run`) is "
                           "added to a bare program; a full command is used as given (default: this "
                           "environment's drywallqa)")
    inst.add_argument("--dry-run", action="store_true", help="print the files instead of writing them")
    inst.add_argument("--no-enable", action="store_true",
                      help="only write the files: no systemctl daemon-reload, enable and restart")
    inst.set_defaults(func=_cmd_install)

    uninst = sub.add_parser("uninstall-service", help="stop, disable and remove the systemd unit (keeps the config, "
                                                      "secrets and undelivered alerts)",
                            description="Stop and disable drywallqa-edge.service (or a camera's unit with "
                                        "--instance) and remove its unit file. The config, the environment file "
                                        "and the state folder with undelivered alerts stay: an install again takes "
                                        "them up.")
    uninst.add_argument("--prefix", type=Path, default=Path("/"), help="file system root it was installed under")
    uninst.add_argument("--instance", default=None, metavar="NAME", help="the unit of camera NAME "
                                                                       "(drywallqa-edge-NAME.service)")
    uninst.set_defaults(func=_cmd_uninstall)


def _frame_size(text: str) -> tuple[int, int]:
    """'640x480' -> (480, 640), i.e. (height, width)."""
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give WIDTHxHEIGHT, e.g. 640x480") from None
    if w < 1 or h < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: width and height must be at least 1")
    return h, w


def _add_config(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, default=None,
                   help="YAML settings (default: the packaged configs/edge.yaml)")


def _add_env_file(p: argparse.ArgumentParser) -> None:
    p.add_argument("--env-file", type=Path, action="append", default=None, metavar="PATH",
                   help="read DRYWALLQA_* overrides from this systemd environment file, as the service does "
                        "(e.g. /etc/drywallqa/edge.env), instead of from this shell's environment; given twice, "
                        "the second file's lines win, as with a unit's two EnvironmentFile= lines")


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level), format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr, force=True)


def _load(args: argparse.Namespace, **overrides):
    from drywallqa.edge.settings import load_settings

    if args.env_file:
        _refuse_misspelt_prefix(_use_env_file(args.env_file), " in " + " or ".join(str(p) for p in args.env_file))
    else:
        _refuse_misspelt_prefix(os.environ)
    return load_settings(args.config, **overrides)


def _refuse_misspelt_prefix(environ: Mapping[str, str], where: str = "") -> None:
    """ConfigError for a variable meant for the runtime whose prefix is misspelt (DRYWALQA_MQTT__HOST in edge.env):
    the settings read only DRYWALLQA_*, so the service would run on the config's value without a word. Only a
    name whose rest names a setting counts: the check sees the whole environment at every start, where other
    programs' DRYWALL_* variables (Kubernetes' DRYWALL_QA_SERVICE_HOST for a Service drywall-qa) are no mistake."""
    from drywallqa.edge.settings import ENV_PREFIX, ConfigError, EdgeSettings

    want = ENV_PREFIX.rstrip("_")
    for name in environ:
        upper = name.upper()
        if upper.startswith(ENV_PREFIX):
            continue
        for cut in (i for i, ch in enumerate(upper[:len(ENV_PREFIX) + 4]) if ch == "_"):
            rest = upper[cut + 1:]
            if rest.lower().split("__", 1)[0] not in EdgeSettings.model_fields:
                continue
            if difflib.SequenceMatcher(None, upper[:cut].replace("_", ""), want).ratio() >= 0.8:
                raise ConfigError(f"environment variable {name}{where} is not read: the runtime reads only names "
                                  f"that start with {ENV_PREFIX} (did you mean {ENV_PREFIX}{rest}?)")


def _use_env_file(paths: list[Path]) -> dict[str, str]:
    """Make this process's DRYWALLQA_* environment the files', as systemd gives the service (a later file's line
    wins; ConfigError if one is unreadable); returns the files' variables. The shell's own DRYWALLQA_* variables
    are dropped, since the service never sees them."""
    from drywallqa.edge.envfile import read_env_file
    from drywallqa.edge.settings import ENV_PREFIX

    values: dict[str, str] = {}
    for path in paths:
        values.update(read_env_file(path, strict=True))
    dropped = sorted(k for k in os.environ if k.upper().startswith(ENV_PREFIX) and k not in values)
    for name in dropped:
        del os.environ[name]
    if dropped:
        print(f"note: ignoring {', '.join(dropped)} from this shell: the service sees only "
              f"{' and '.join(str(p) for p in paths)}", file=sys.stderr)
    os.environ.update(values)
    return values


def _cmd_run(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from drywallqa.contract import InvalidModelError
    from drywallqa.edge.backends import BackendUnavailableError
    from drywallqa.edge.broker import BrokerError, BrokerSettingError
    from drywallqa.edge.runner import EdgeRunner
    from drywallqa.edge.settings import ConfigError, format_validation_error
    from drywallqa.edge.sources import SourceError
    from drywallqa.vocab import UnknownPromptError

    try:
        settings = _load(args)
        if args.source is not None or args.model is not None or args.watch:
            data = settings.model_dump()
            if args.source is not None:
                data["source"]["uri"] = args.source
            if args.watch:
                data["source"]["watch"] = True
            if args.model is not None:
                data["model"]["path"] = args.model
            try:
                settings = type(settings).model_validate(data)
            except ValidationError as exc:
                raise ConfigError(format_validation_error(exc, "--source / --model")) from exc
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    _setup_logging(settings.log_level)
    runner = EdgeRunner(settings, max_frames=args.max_frames, duration_s=args.duration)

    def _stop(signum, _frame) -> None:
        logging.getLogger(__name__).info("signal %d: finishing the current frame and stopping", signum)
        runner.stop()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    # A closed terminal (an ssh session that drops while `edge run` runs in it) stops it cleanly too, not mid-frame
    # with the last will; under nohup SIGHUP stays ignored.
    if hasattr(signal, "SIGHUP") and signal.getsignal(signal.SIGHUP) is not signal.SIG_IGN:
        signal.signal(signal.SIGHUP, _stop)
    if args.wait_for_spool and not _wait_for_spool(settings, runner.stop_event):
        return 0  # stopped while waiting: nothing was started
    try:
        runner.setup()
    except (ConfigError, UnknownPromptError, InvalidModelError, BackendUnavailableError, BrokerSettingError,
            ValueError) as exc:
        runner.shutdown()
        print(f"error: cannot start the edge runtime: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except (SourceError, BrokerError, RuntimeError, OSError) as exc:
        runner.shutdown()
        print(f"error: cannot start the edge runtime (the service retries this): {exc}", file=sys.stderr)
        return EXIT_START_FAILED
    stats = runner.run()
    summary = {
        "frames_processed": stats.processed, "frame_errors": stats.errors, "alerts": stats.alerts,
        "detections_published": stats.detections,
        "frames_dropped": runner.capture.stats.dropped if runner.capture else 0,
        "frames_corrupt": runner.capture.stats.corrupt if runner.capture else 0,
        "source_reopens": runner.capture.stats.reopens if runner.capture else 0,
    }
    print(json.dumps(summary))
    if args.stats_json is not None:
        args.stats_json.write_text(json.dumps({**summary, "latencies_ms": stats.latencies_ms,
                                               "inference_ms": stats.inference_ms}))
    return 0


def _wait_for_spool(settings: EdgeSettings, stop: threading.Event) -> bool:
    """Wait, before loading anything, while another runtime holds the alert spool; False if stopped meanwhile.
    Exiting 1 instead, a service would be restarted every RestartSec until StartLimitBurst, then left failed for
    good: a manual run of more than a minute would stop the device's service until the next boot. Under systemd
    the wait shows in `systemctl status` (STATUS=), keeps the start from timing out, and feeds the watchdog."""
    from drywallqa.edge.sdnotify import Watchdog, notify
    from drywallqa.edge.spool import SpoolInUse, wait_for_spool

    log = logging.getLogger(__name__)
    path = settings.spool.resolved_path(settings.instance)
    watchdog = Watchdog()
    holders: list[str] = []  # each holder seen, said once

    def busy(exc: SpoolInUse) -> None:
        if not holders or holders[-1] != exc.holder:
            holders.append(exc.holder)
            who = "another process" if exc.holder == "unknown" else f"pid {exc.holder}"
            log.warning("the alert spool %s is held by %s, most likely another DrywallQA edge runtime (e.g. a manual "
                        "`edge run`): waiting for it to end before starting", path, who)
            notify(f"STATUS=waiting for {who} to release the alert spool {path}")
        notify(f"EXTEND_TIMEOUT_USEC={SPOOL_WAIT_EXTEND_S * 1_000_000}")
        watchdog.kick()

    started = time.monotonic()
    free = wait_for_spool(path, stop, busy)
    if free and holders:
        log.info("the alert spool %s is free after %.0f s: starting", path, time.monotonic() - started)
    return free


def _cmd_check(args: argparse.Namespace) -> int:
    from drywallqa.edge.settings import ConfigError
    from drywallqa.edge.sources import SourceError, check_source_exists

    try:
        settings = _load(args)
        # As `edge run` does first: a missing video file stops it (with source.watch it is waited for).
        check_source_exists(settings.source.uri, settings.source.watch)
    except (ConfigError, SourceError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    if args.model_check:
        from drywallqa.edge.runner import EdgeRunner, load_segmenter

        try:
            runner = EdgeRunner(settings)
            path, runner.segmenter = load_segmenter(settings.model, settings.analysis.aliases)
            runner.meta = runner.segmenter.metadata
            watched = runner.resolve_prompts(settings.analysis.prompts)
            runner.resolve_rules(watched)  # the same checks `edge run` makes at start-up
        except (ConfigError, ValueError, FileNotFoundError, RuntimeError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_CONFIG
        print(f"model {path}: watching " + ", ".join(f"{w.prompt!r} -> {w.class_name}" for w in watched))
    safe = settings.model_dump(mode="json")
    if safe["mqtt"].get("password"):
        safe["mqtt"]["password"] = "***"
    print(json.dumps(safe, indent=2))
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from drywallqa.contract import InvalidModelError
    from drywallqa.edge.backends import BackendUnavailableError
    from drywallqa.edge.bench import format_rows, run_bench, write_json
    from drywallqa.edge.runner import load_segmenter
    from drywallqa.edge.settings import ConfigError

    try:
        settings = _load(args)
        model = settings.model.model_copy(update={k: v for k, v in (("backend", args.backend),
                                                                     ("threads", args.threads)) if v is not None})
        models = []
        for spec in args.model or [model.path]:
            path, segmenter = load_segmenter(model.model_copy(update={"path": spec}))
            models.append((str(path), segmenter))
    except (ConfigError, InvalidModelError, BackendUnavailableError, FileNotFoundError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    rows = run_bench(models, frame_hw=args.frame_size, iters=args.iters, rounds=args.rounds)
    print(format_rows(rows, model.threads))
    if args.json is not None:
        write_json(rows, args.json, model)
    return 0


def _cmd_install(args: argparse.Namespace) -> int:
    from drywallqa.edge.service import install_service

    return install_service(prefix=args.prefix, config=args.config, user=args.user, exec_path=args.exec_path,
                           dry_run=args.dry_run, enable=not args.no_enable, instance=args.instance)


def _cmd_uninstall(args: argparse.Namespace) -> int:
    from drywallqa.edge.service import uninstall_service

    return uninstall_service(prefix=args.prefix, instance=args.instance)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="drywallqa")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)
