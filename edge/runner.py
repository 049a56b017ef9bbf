"""The live loop: capture -> model -> per-class analysis -> alert rules -> MQTT, until stopped.

Three stages overlap: capture (its own thread, newest frame only), inference (the loop thread) and
analysis + alerts + publishing (one worker thread, frames in order), so region analysis and MQTT run
while the model already works on the next frame.
One bad frame (decode error, odd shape, analysis failure) is logged and counted, never fatal. Each frame is
handed back to the capture (`Capture.done`) once its results are published or spooled, or it failed: a watched
folder then records its photo as processed, so a restart processes again only the photos in flight. Stop
(SIGTERM) finishes the frames in flight, flushes the spool (bounded wait), publishes `offline`.
"""

from __future__ import annotations

import collections
import difflib
import logging
import os
import queue
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import numpy as np

from drywallqa.edge.alerts import (
    AlertEngine,
    PhotoKey,
    cooldowns_path,
    make_alert,
    read_cooldowns,
    write_cooldowns,
)
from drywallqa.edge.analysis import WatchedClass, analyze_class
from drywallqa.edge.broker import EmbeddedBroker, maybe_start_embedded
from drywallqa.edge.capture import Capture, CaptureStats, Frame
from drywallqa.edge.mqtt_link import EdgeLink
from drywallqa.edge.payloads import (
    EARLIEST_PLAUSIBLE_TIME,
    ClassResult,
    CommandPayload,
    DetectionPayload,
    SnapshotPayload,
    StatusPayload,
)
from drywallqa.edge.render import draw_masks, jpeg_b64
from drywallqa.edge.sdnotify import Watchdog, notify
from drywallqa.edge.settings import (
    ConfigError,
    EdgeSettings,
    ModelSettings,
    RuleSettings,
    SpoolSettings,
    rule_label,
)
from drywallqa.edge.sources import check_source_exists, make_source, watch_record_path
from drywallqa.edge.spool import (
    Spool,
    damaged_notice,
    is_damaged,
    is_disk_state,
    lock_spool,
    move_aside,
    spool_path_mistake,
)
from drywallqa.paths import PROFILES, exported_dir
from drywallqa.vocab import UnknownPromptError

if TYPE_CHECKING:
    from drywallqa.contract import ModelMetadata
    from drywallqa.edge.inference import PromptSegmenter

log = logging.getLogger(__name__)

# What `drywallqa export --target openvino` writes, best first: INT8 costs no measurable IoU (MODEL.md) and runs
# 2-3x faster than FP32 (3.1x on a Zen 4, 2.0x on a Zen 3 without VNNI: `drywallqa edge bench`).
_EXPORTED_IRS = ("_int8.xml", "_fp16.xml")
_OPENVINO_SUFFIXES = (*_EXPORTED_IRS, ".xml")
_SUFFIXES_BY_BACKEND = {
    "openvino": (*_OPENVINO_SUFFIXES, ".onnx"),
    "onnxruntime": (".onnx",),
    "tensorrt": (".engine", ".plan"),
}


def _suffixes_for(backend: str) -> tuple[str, ...]:
    """Which exported files a profile name may mean, best first. `auto` takes a TensorRT engine first where
    TensorRT runs (a Jetson), since there the ONNX would run on the CPU."""
    if backend != "auto":
        return _SUFFIXES_BY_BACKEND[backend]
    from drywallqa.edge.backends import auto_backend_name, tensorrt_unavailable_reason

    # The IRs only where `auto` runs an ONNX on OpenVINO too (x86): elsewhere (an ARM board, a Jetson without its
    # engine) ONNX Runtime runs the profile's ONNX, as it did before the IRs were looked for.
    on_cpu = _SUFFIXES_BY_BACKEND["openvino"] if auto_backend_name(Path("model.onnx")) == "openvino" else (".onnx",)
    engines = _SUFFIXES_BY_BACKEND["tensorrt"]
    return (*engines, *on_cpu) if tensorrt_unavailable_reason() is None else (*on_cpu, *engines)


def load_segmenter(model: ModelSettings, aliases: dict[str, str] | None = None) -> tuple[Path, PromptSegmenter]:
    """The model file that `model` names, loaded on its backend and wrapped as the settings ask; `aliases`
    (analysis.aliases) are checked against the model's prompt table here (ConfigError)."""
    from drywallqa.edge.backends import load_backend
    from drywallqa.edge.inference import PromptSegmenter
    from drywallqa.vocab import VocabularyError

    path, metadata = _resolve_model(model.path, model.backend)
    backend = load_backend(path, model.backend, model.threads, model.openvino_cpu_isa, model.openvino_device,
                           metadata=metadata)
    try:
        return path, PromptSegmenter(backend, flip_tta=model.flip_tta, aliases=aliases)
    except VocabularyError as exc:
        raise ConfigError(f"analysis.aliases: {exc} (model {path.name})") from exc


# A source call (open, read, decode) that has not returned for max(STUCK_SOURCE_MIN_S, STUCK_SOURCE_STALLS x
# source.stall_timeout_s) is hung: OpenCV's open and read timeouts are source.stall_timeout_s.
STUCK_SOURCE_MIN_S = 60.0
STUCK_SOURCE_STALLS = 6

# Snapshot requests that arrive before the first frame was analysed wait for it, at most this many (oldest dropped).
SNAPSHOT_WAITING_MAX = 8
SNAPSHOT_WAITING = "snapshot requested before the first frame: answered once a frame has been analysed"
SET_PROMPTS_REJECTED = "set_prompts rejected: "


def _metadata_or_none(path: Path) -> ModelMetadata | None:
    from drywallqa.contract import InvalidModelError
    from drywallqa.edge.backends import read_metadata

    try:
        return read_metadata(path)
    except (InvalidModelError, OSError, ImportError):  # ImportError: an IR where OpenVINO is not installed
        return None


def _weights_of(meta: ModelMetadata | None) -> str | None:
    from drywallqa.contract import WEIGHTS_HASH_KEY

    return meta.extra.get(WEIGHTS_HASH_KEY) if meta is not None else None


def _why_not_the_onnx_model(ours: ModelMetadata | None, theirs: ModelMetadata) -> str:
    """How an IR's metadata fails to show it is the model of the ONNX beside it; '' when it is."""
    if ours is None:
        return "its metadata cannot be read"
    if not _weights_of(ours):
        return "it records no weights (an export of an older DrywallQA), so it may be another model"
    if _weights_of(ours) != _weights_of(theirs):
        return "it was made from other weights"
    if (ours.input.height, ours.input.width) != (theirs.input.height, theirs.input.width):
        return "it was exported at another input size"
    return ""


def _may_run(chosen: Path, onnx: Path) -> tuple[bool, ModelMetadata | None]:
    """Whether a profile runs `chosen` rather than the ONNX beside it, and `chosen`'s metadata when it was read (for
    the loader: an engine's sidecar read twice would be warned about twice). Every export rewrites the ONNX, so an IR
    not shown to be its model is left from an earlier export (a fine-tune or a new threshold exported with --target
    onnx, or an export of an older DrywallQA): passed over, said, and the ONNX runs, as before IRs were looked for. An
    engine, built on the device, is still taken (the ONNX would run on the CPU), said if made from other weights."""
    theirs = _metadata_or_none(onnx) if chosen != onnx and onnx.is_file() else None
    if theirs is None:
        return True, None  # no ONNX to compare with (a broken one is said when it is loaded)
    ours = _metadata_or_none(chosen)
    if chosen.name.endswith(_EXPORTED_IRS):
        why = _why_not_the_onnx_model(ours, theirs)
        if why:
            log.warning("model %s passed over: %s (compared with %s beside it, which every export rewrites); "
                        "running %s. Export again with --target openvino (or all) to run the IR", chosen.name, why,
                        onnx.name, onnx.name)
        return not why, ours
    if _weights_of(ours) and _weights_of(theirs) and _weights_of(ours) != _weights_of(theirs):
        log.warning("model %s was made from other weights than %s beside it (an export since left it): running %s; "
                    "rebuild it (export/build_engine.sh on the Jetson export of these weights), or delete it", chosen.name,
                    onnx.name, chosen.name)
    return True, ours


def resolve_model_path(spec: str, backend: str = "auto") -> Path:
    """A profile name (hrnet | lite) -> its exported file; otherwise the path itself, which must exist."""
    return _resolve_model(spec, backend)[0]


def _resolve_model(spec: str, backend: str) -> tuple[Path, ModelMetadata | None]:
    """resolve_model_path, with the file's metadata where choosing it read that (None: the loader reads it)."""
    if spec in PROFILES:
        folder, stem = exported_dir(), PROFILES[spec]
        tried = [folder / f"{stem}{suf}" for suf in _suffixes_for(backend)]
        for p in tried:
            if p.is_file():
                runs, metadata = _may_run(p, folder / f"{stem}.onnx")
                if runs:
                    return p, metadata
        how = (
            f"build one on the device with export/build_engine.sh from `drywallqa export --profile {spec} "
            f"--target jetson` (see Dockerfile.jetson)"
            if backend == "tensorrt"
            else f"run `drywallqa export --profile {spec} --target all`"
        )
        raise ConfigError(
            f"model.path: profile {spec!r} has no exported model for backend {backend!r} "
            f"(looked for {', '.join(str(p) for p in tried)}); {how} or set model.path to a .onnx/.xml/.engine file"
        )
    path = Path(spec).expanduser()
    if path.is_dir():
        raise ConfigError(f"model.path: {path} is a folder, not a model file (give the .onnx/.xml/.engine file, or "
                          f"a profile: {', '.join(PROFILES)})")
    if not path.is_file():
        raise ConfigError(f"model.path: file not found: {path} (or use a profile: {', '.join(PROFILES)})")
    return path, None


def unwatched_rules(engine: AlertEngine, rules: list[RuleSettings], watched: list[WatchedClass],
                    raise_as: type[Exception]) -> None:
    """Raise `raise_as` when an alert rule watches a class that no analysed prompt covers: it could never fire.
    `rules` are the settings' rules the engine was made from, in its order: the message names each as written."""
    classes = {w.class_name for w in watched}
    unwatched = [(i, rule.class_name) for i, rule in enumerate(engine.rules) if rule.class_name not in classes]
    if unwatched:
        which = "; ".join(f"alerts.{i} ({rule_label(i, rules[i])}) watches {name!r}" for i, name in unwatched)
        raise raise_as(f"alerts: rules watch class(es) {sorted({name for _, name in unwatched})}, but the prompts "
                       f"{[w.prompt for w in watched]} cover none of them: {which}; add a prompt for each, or "
                       f"remove the rule")


def open_spool(settings: SpoolSettings, instance: str | None = None) -> Spool:
    """The alert spool, or a ConfigError naming spool.path when it cannot be created or is not a spool.

    A damaged spool (an SQLite file whose pages are corrupt, e.g. after a power cut on a worn SD card) would stop
    every start of an unattended device: it is moved aside, kept for recovery (`sqlite3 FILE .recover`), and a
    fresh spool is started; `moved_aside` names where it went. A disk that is full, read-only or failing at start is
    a state of the device, not of its config: the runtime starts with the spool unopened (`Spool.unopened`), alerts
    published from memory, and the file tried again until it opens; a path that cannot be a spool whatever the disk's
    state (spool_path_mistake) is a ConfigError even then."""
    path = settings.resolved_path(instance)
    moved_aside = None
    lock_fd = -1
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Held from the first read to the fresh spool, across the move-aside: meanwhile no other runtime opens a
        # spool here (which this one would then move aside, or be refused by).
        lock_fd = lock_spool(path)
        try:
            spool = Spool(path, settings.max_rows, int(settings.max_mb * 2**20), lock_fd=lock_fd)
        except sqlite3.DatabaseError as exc:
            if not is_damaged(exc):
                raise
            moved_aside = move_aside(path)
            log.error("%s", damaged_notice(path, exc, moved_aside))
            spool = Spool(path, settings.max_rows, int(settings.max_mb * 2**20), lock_fd=lock_fd)
    except BaseException as exc:
        if not isinstance(exc, (OSError, sqlite3.Error)):
            if lock_fd >= 0:
                os.close(lock_fd)
            raise
        mistake = spool_path_mistake(path, exc)  # first: on a full or read-only disk it would look like its state
        if not mistake and is_disk_state(path, exc):
            # the device runs meanwhile, still holding the lock if it got it; the file is tried again
            return Spool.unopened(path, settings.max_rows, int(settings.max_mb * 2**20), str(exc), lock_fd)
        if lock_fd >= 0:
            os.close(lock_fd)
        raise ConfigError(f"spool.path: cannot open the alert spool {path}: {mistake or exc} (set spool.path to a "
                          f"writable file, e.g. under $STATE_DIRECTORY)") from exc
    spool.moved_aside = moved_aside
    return spool


def _photo_of(frame: Frame) -> PhotoKey | None:
    """The watched photo (path, size, mtime_ns) a frame is, which names it across restarts; None for the frames of a
    camera, stream or video (their alerts keep random event_ids)."""
    key = frame.key
    if isinstance(key, tuple) and len(key) == 3 and isinstance(key[0], str):
        return key  # type: ignore[return-value]
    return None


def clock_problem(now: float) -> str:
    """What is wrong with a system clock reading `now` (seconds since the epoch), or "" if it is plausible: a device
    without a real-time clock or network time boots in 1970, and stamps every message with that."""
    if now >= EARLIEST_PLAUSIBLE_TIME:
        return ""
    reads = datetime.fromtimestamp(max(now, 0.0), timezone.utc).strftime("%Y-%m-%d %H:%M")
    return (f"the system clock reads {reads} UTC: it was never set, so alerts and statuses carry wrong times (a "
            "dashboard lists them by the time it receives them). Turn on network time (sudo timedatectl set-ntp "
            "true) or fit a real-time clock")


@dataclass
class LoopStats:
    processed: int = 0
    errors: int = 0
    alerts: int = 0
    detections: int = 0
    fps: float = 0.0
    latencies_ms: list[float] = field(default_factory=list)  # capture -> published, per processed frame
    inference_ms: list[float] = field(default_factory=list)  # model call alone (resize in + network)


class EdgeRunner:
    def __init__(self, settings: EdgeSettings, *, max_frames: int | None = None, duration_s: float | None = None,
                 keep_latencies: int = 10_000) -> None:
        self.settings = settings
        self.max_frames = max_frames
        self.duration_s = duration_s
        self.keep_latencies = keep_latencies
        self.stats = LoopStats()
        self.stop_event = threading.Event()
        self.paused = False
        self.last_error = ""
        self._wall_clock = time.time  # what status() reads the time from (a test sets a clock never set)
        self._clock_said = ""  # the clock problem last logged ("" once the clock was found set)
        self._commands: queue.Queue[CommandPayload] = queue.Queue()
        self._last_status = 0.0
        self._last_detection = 0.0
        # The newest analysed frame and its masks (model grid), drawn only when a snapshot is asked for.
        self._last_analysed: tuple[Frame, dict[str, np.ndarray]] | None = None
        # request_ids of snapshot commands waiting for the first analysed frame; the lock orders them with it.
        self._snapshots_waiting: collections.deque[str | None] = collections.deque(maxlen=SNAPSHOT_WAITING_MAX)
        self._snapshot_lock = threading.Lock()
        self.broker: EmbeddedBroker | None = None
        self.link: EdgeLink | None = None
        self.capture: Capture | None = None
        self.spool: Spool | None = None
        self._spool_aside_said: Path | None = None  # the damaged spool last reported in last_error
        self._cooldowns: Path | None = None  # the classes' last alert times, kept over a restart (cooldowns_path)
        self._cooldowns_failed = False  # its latest write failed (said once)
        # Inferred frames waiting for analysis; small, so the model never runs far ahead of publishing.
        self._post_queue: queue.Queue[tuple[Frame, np.ndarray, float] | None] = queue.Queue(maxsize=2)
        self._post_thread: threading.Thread | None = None

    # -- start-up --------------------------------------------------------------------------------------
    def setup(self) -> EdgeRunner:
        """Load the model, resolve prompts and rules, open spool, broker link and source (errors stop here)."""
        s = self.settings
        if s.model.opencv_threads:
            cv2.setNumThreads(s.model.opencv_threads)
        check_source_exists(s.source.uri, s.source.watch)
        self._clock_error(self._wall_clock())
        self.model_path, self.segmenter = load_segmenter(s.model, s.analysis.aliases)
        self.meta = self.segmenter.metadata
        self.watched = self.resolve_prompts(s.analysis.prompts)
        self.engine = self.resolve_rules(self.watched)
        log.info("model %s (%s, backend %s), watching %s", self.model_path.name, self.meta.architecture,
                 self.segmenter.backend.name, [(w.prompt, w.class_name) for w in self.watched])

        self.spool = open_spool(s.spool, s.instance)
        self._note_spool_moved_aside()
        self._carry_over_cooldowns()
        if self.spool.count():
            log.info("spool %s holds %d undelivered alert(s); replaying them first", self.spool.path,
                     self.spool.count())
        self.broker = maybe_start_embedded(s.mqtt.embedded_broker, s.mqtt.host, s.mqtt.port)
        self.link = EdgeLink(s.mqtt, self.spool, status=self.status, on_command=self._commands.put).start()

        # A watched folder keeps the photos it processed beside the spool (one runtime holds it), so a restart goes on
        # where it stopped.
        src = make_source(s.source.uri, width=s.source.width, height=s.source.height,
                          timeout_s=s.source.stall_timeout_s, demo_size=s.source.demo_size, watch=s.source.watch,
                          watch_record=watch_record_path(self.spool.path, s.source.uri))
        self.last_error = src.start_notice() or self.last_error
        realtime = s.source.realtime if s.source.realtime is not None else src.live
        self.capture = Capture(src, realtime=realtime, loop=s.source.loop, fps=s.source.fps,
                               stall_timeout_s=s.source.stall_timeout_s, reconnect_min_s=s.source.reconnect_min_s,
                               reconnect_max_s=s.source.reconnect_max_s, on_state=self._on_source_state)
        self.capture.start()
        return self

    def resolve_rules(self, watched: list[WatchedClass]) -> AlertEngine:
        """The alert rules, each checked to watch a class that `watched` analyses (else it could never fire)."""
        for i, rule in enumerate(self.settings.alerts):  # a prompt not known: which rule (analysis.prompts has one too)
            try:
                self._resolve_class(rule.prompt)
            except UnknownPromptError as exc:
                raise ConfigError(f"alerts.{i} ({rule_label(i, rule)}): {exc}") from exc
        engine = AlertEngine.from_settings(self.settings.alerts, self._resolve_class)
        unwatched_rules(engine, self.settings.alerts, watched, raise_as=ConfigError)
        if any((r.applied_persistence_frames, r.applied_cooldown_s) != (r.persistence_frames, r.cooldown_s)
               for r in self.settings.alerts):
            log.info("source %s is photos: the alert rules judge each photo alone (persistence_frames 1, cooldown_s "
                     "0; the config's values apply to a camera or video)", self.settings.source.uri)
        skeleton_classes = self.settings.analysis.skeleton_classes
        unknown = [c for c in skeleton_classes if c not in self.meta.classes]
        if unknown:  # a typo ('cracks') would leave every length 0 and every length rule silent
            near = difflib.get_close_matches(unknown[0], self.meta.classes, n=1)
            raise ConfigError(f"analysis.skeleton_classes: {unknown[0]!r} is not a class of the model"
                              f"{f' (did you mean {near[0]!r}?)' if near else ''}; its classes: "
                              f"{', '.join(self.meta.classes)}")
        for i, rule in enumerate(engine.rules):  # a length is measured only for these classes: 0 for the others
            if rule.metric == "skeleton_length_px" and rule.min > 0 and rule.class_name not in skeleton_classes:
                raise ConfigError(f"alerts.{i} ({rule_label(i, self.settings.alerts[i])}): a skeleton_length_px "
                                  f"rule on class {rule.class_name!r} could never "
                                  f"fire: lengths are measured only for analysis.skeleton_classes "
                                  f"{skeleton_classes} (the model's classes: {', '.join(self.meta.classes)})")
        return engine

    def _resolve_class(self, prompt_or_class: str) -> str:
        if prompt_or_class in self.meta.classes:
            return prompt_or_class
        return self.segmenter.vocabulary.resolve(prompt_or_class)

    def resolve_prompts(self, prompts: list[str]) -> list[WatchedClass]:
        """Prompts -> watched classes (one per class, first prompt wins); UnknownPromptError lists known ones."""
        out: dict[str, WatchedClass] = {}
        for prompt in prompts:
            cls = self._resolve_class(prompt)
            if cls not in out:
                out[cls] = WatchedClass(cls, self.meta.classes.index(cls), prompt, float(self.meta.thresholds[cls]),
                                        self.meta.mask_shape(cls))
        return list(out.values())

    # -- status ------------------------------------------------------------------------------------------
    def status(self, state: str) -> StatusPayload:
        """`state` "online" is "paused" while paused: the status sent on (re)connecting says so too."""
        cap = self.capture.stats if self.capture else None
        if state == "online" and self.paused:
            state = "paused"
        now = self._wall_clock()
        clock = self._clock_error(now)
        return StatusPayload(
            device_id=self.settings.mqtt.device_id,
            state=state,  # type: ignore[arg-type]
            timestamp=now,
            model=getattr(self, "model_path", Path("")).name,
            source=self.settings.source.uri,
            source_state=cap.state if cap else "",
            prompts=[w.prompt for w in getattr(self, "watched", [])],
            frames_processed=self.stats.processed,
            frames_dropped=cap.dropped if cap else 0,
            frames_corrupt=cap.corrupt if cap else 0,
            frames_reopened=cap.reopens if cap else 0,
            fps=round(self.stats.fps, 2),
            spooled_alerts=self._undelivered_alerts(),
            spool_dropped=self.link.spool_dropped if self.link else 0,
            last_error=self._last_error(cap) or clock or self._snapshot_hint(),
        )

    def _carry_over_cooldowns(self) -> None:
        """A restart (the watchdog, a crash loop, an update) keeps each class's cool-down: it does not alert again
        at once on the crack it alerted on a minute ago."""
        if any(rule.cooldown_s > 0 for rule in self.engine.rules):
            self._cooldowns = cooldowns_path(self.spool.path)
            self.engine.carry_over(read_cooldowns(self._cooldowns), time.monotonic(), time.time())

    def _record_cooldowns(self, now_mono: float) -> None:
        if self._cooldowns is None:
            return
        try:
            write_cooldowns(self._cooldowns, self.engine.fired_wall_times(now_mono, time.time()))
        except OSError as exc:  # a full disk: the alert itself went out; only a restart's cool-down is at stake
            if not self._cooldowns_failed:
                log.warning("alert cool-downs %s cannot be written (%s): a restart would alert again at once",
                            self._cooldowns, exc)
            self._cooldowns_failed = True
        else:
            self._cooldowns_failed = False

    def _note_spool_moved_aside(self) -> None:
        """A damaged spool moved aside, at start or when a spool unopened at start opened later: said in last_error,
        once."""
        aside = self.spool.moved_aside if self.spool is not None else None
        if aside is not None and aside != self._spool_aside_said:
            self._spool_aside_said = aside
            self.last_error = f"alert spool was damaged: moved aside to {aside}, started afresh"

    def _undelivered_alerts(self) -> int:
        """Every alert not yet acknowledged: spooled, and kept in memory while the spool cannot be written."""
        if self.link is not None:
            return self.link.pending()
        return self.spool.count() if self.spool else 0

    def _last_error(self, cap: CaptureStats | None) -> str:
        """What is wrong now before what went wrong once: a spool that cannot be written (alerts or deliveries), a
        broker that keeps closing the connection, a source being reconnected or ended by an error (each cleared when it is over), then
        the latest rejected command or failed frame, then the source's last error (cleared once frames flow again
        after a reopen). Only when there is none does status() say that the clock was never set, and then that a
        snapshot request waits for the first frame. A rejected command must not hide, for as long as the device
        runs, why its camera is down."""
        self._note_spool_moved_aside()
        now = ((self.spool.open_error if self.spool else "") or self.link.spool_error
               or (self.spool.ack_error if self.spool else "") or self.link.link_error if self.link else "")
        if not now and self.capture is not None:
            now = self.capture.source.ongoing_error
        if not now and cap is not None and cap.state in ("reconnecting", "ended"):
            now = cap.last_error
        return now or self.last_error or (cap.last_error if cap else "")

    def _clock_error(self, now: float) -> str:
        """clock_problem(now), logged when it starts (a warning) and when it ends (NTP synced after boot)."""
        problem = clock_problem(now)
        if problem and not self._clock_said:
            log.warning("%s", problem)
        elif self._clock_said and not problem:
            log.info("the system clock is set now: statuses and alerts carry true times again")
        self._clock_said = problem
        return problem

    def _snapshot_hint(self) -> str:
        """A snapshot request waiting for the first frame is only a hint: never in place of an error."""
        return SNAPSHOT_WAITING if self._snapshots_waiting else ""

    def _publish_status(self) -> None:
        if self.link is not None:
            self.link.send_status(self.status("online"))  # "paused" while paused: status() says so
        self._last_status = time.monotonic()

    def _on_source_state(self, state: str) -> None:
        notify(f"STATUS=source {state}")
        self._last_status = 0.0  # publish soon from the loop thread

    # -- commands (queued by the MQTT thread, run on the loop thread) -----------------------------------------
    def _handle_command(self, cmd: CommandPayload) -> None:
        log.info("command: %s", cmd.command)
        if cmd.command == "pause":
            self.paused = True
        elif cmd.command == "resume":
            self.paused = False
        elif cmd.command == "set_prompts":
            try:
                if not cmd.prompts:
                    raise ValueError("set_prompts needs a non-empty 'prompts' list")
                watched = self.resolve_prompts(cmd.prompts)
                unwatched_rules(self.engine, self.settings.alerts, watched, raise_as=ValueError)  # not quiet unseen
                self.watched = watched
                if self.last_error.startswith(SET_PROMPTS_REJECTED):  # not an unrelated error (a failed frame)
                    self.last_error = ""
            except ValueError as exc:  # UnknownPromptError is a ValueError
                self.last_error = f"{SET_PROMPTS_REJECTED}{exc}"
                log.error(self.last_error)
        elif cmd.command == "snapshot":
            self._send_snapshot(cmd.request_id)
        self._publish_status()

    def _send_snapshot(self, request_id: str | None) -> None:
        """Answer now, or once the first frame is analysed (a dashboard waits for its request_id)."""
        with self._snapshot_lock:
            if self._last_analysed is None:
                if len(self._snapshots_waiting) == SNAPSHOT_WAITING_MAX:
                    log.warning("snapshot request %r dropped: %d newer ones wait for the first frame",
                                self._snapshots_waiting[0], SNAPSHOT_WAITING_MAX)
                self._snapshots_waiting.append(request_id)  # the oldest goes when full
                return
        self._publish_snapshot(request_id)

    def _answer_waiting_snapshots(self) -> None:
        """The first frame is analysed: one snapshot for each request that waited for it."""
        with self._snapshot_lock:
            waiting = list(self._snapshots_waiting)
            self._snapshots_waiting.clear()
        if not waiting:
            return
        for request_id in waiting:
            self._publish_snapshot(request_id)
        self._last_status = 0.0  # the status's snapshot hint goes: say so on the broker soon

    def _publish_snapshot(self, request_id: str | None) -> None:
        if self.link is None or self._last_analysed is None:
            return
        frame, masks = self._last_analysed
        side = self.settings.mqtt.snapshot_max_side
        self.link.send_snapshot(SnapshotPayload(
            device_id=self.settings.mqtt.device_id, timestamp=time.time(), frame_id=frame.frame_id,
            request_id=request_id, jpeg_b64=jpeg_b64(draw_masks(frame.image, masks, max_side=side), side)))

    # -- the loop --------------------------------------------------------------------------------------
    def process(self, frame: Frame) -> None:
        """Both stages for one frame, synchronously (the loop itself overlaps them; see run)."""
        self.analyze_and_publish(frame, *self.infer(frame))

    def infer(self, frame: Frame) -> tuple[np.ndarray, float]:
        """Probabilities on the model's grid (analysis reports in source pixels) and the time it took."""
        t0 = time.perf_counter()
        probs = self.segmenter.model_probabilities(frame.image)
        return probs, (time.perf_counter() - t0) * 1000

    def analyze_and_publish(self, frame: Frame, probs: np.ndarray, inference_ms: float) -> list[ClassResult]:
        """Measure each watched class, run the alert rules, publish; returns the frame's measurements."""
        s = self.settings
        source_hw = frame.image.shape[:2]
        now_mono = time.monotonic()
        want_detection = s.mqtt.detections_max_hz > 0 and now_mono - self._last_detection >= 1 / s.mqtt.detections_max_hz
        results, masks = [], {}
        for w in self.watched:
            result, mask = analyze_class(
                probs[w.class_index], w, min_region_area_px=s.analysis.min_region_area_px,
                max_regions=s.analysis.max_regions,
                with_skeleton=self._skeleton_wanted(w.class_name, want_detection, now_mono),
                skeleton_max_side=s.analysis.skeleton_max_side, source_hw=source_hw)
            results.append(result)
            masks[w.class_name] = mask  # on the model's grid; draw_masks scales it to what it draws
        with self._snapshot_lock:
            self._last_analysed = (frame, masks)
        if self._snapshots_waiting:  # answered now, before an alert or detection could fail this frame
            self._answer_waiting_snapshots()
        firings = self.engine.update(results, now_mono)
        for firing in firings:
            snap_masks = {firing.result.class_name: masks[firing.result.class_name]}
            side = s.mqtt.snapshot_max_side
            snapshot = jpeg_b64(draw_masks(frame.image, snap_masks, max_side=side), side)
            alert = make_alert(firing, device_id=s.mqtt.device_id, frame_id=frame.frame_id,
                               timestamp=frame.wall_time, snapshot_b64=snapshot, photo=_photo_of(frame))
            if not self.link.send_alert(alert):
                frame.alerts_in_memory = True  # not spooled: a restart before the broker has it loses it
            self.stats.alerts += 1
            log.info("alert %s: %s %s (frame %d)", alert.event_id, alert.class_name, alert.rule, frame.frame_id)
        if firings:
            self._record_cooldowns(now_mono)
        if want_detection:
            h, w = source_hw
            preview = None
            if s.mqtt.detections_preview:  # drawn at the preview's size: a small drawing for a small JPEG
                side = s.mqtt.preview_max_side
                preview = jpeg_b64(draw_masks(frame.image, masks, max_side=side), side, 70)
            if self.link.send_detection(DetectionPayload(
                    device_id=s.mqtt.device_id, frame_id=frame.frame_id, timestamp=frame.wall_time, width=w,
                    height=h, inference_ms=round(inference_ms, 2), results=results, preview_jpeg_b64=preview)):
                self.stats.detections += 1
            self._last_detection = now_mono
        if len(self.stats.latencies_ms) < self.keep_latencies:
            self.stats.latencies_ms.append((time.monotonic() - frame.t_capture) * 1000)
            self.stats.inference_ms.append(inference_ms)
        return results

    def _skeleton_wanted(self, class_name: str, want_detection: bool, now: float) -> bool:
        """Thin a class's regions only when something reads the length: a detection published with this frame,
        or an alert of the class (not while the class cools down after one). On a wall with a crack in view
        this skips most thinning, the costliest part of the analysis."""
        if class_name not in self.settings.analysis.skeleton_classes:
            return False
        return want_detection or self.engine.can_fire(class_name, now)

    def run(self) -> LoopStats:
        """Run until stopped, the source ends, or --max-frames / --duration is reached; always shuts down."""
        try:
            self.run_frames(self.max_frames, self.duration_s)
        finally:
            self.shutdown()
        return self.stats

    def run_frames(self, max_frames: int | None = None, duration_s: float | None = None) -> int:
        """The loop until stopped, the source ends, or `max_frames` / `duration_s` is reached, then the frames
        in flight are analysed and published. Leaves source, broker link and spool open, so it can be called
        again (the loop benchmark alternates it with model-only timing); returns the frames submitted."""
        assert self.capture is not None and self.link is not None
        watchdog = Watchdog()
        # A source call stuck this long is a hang no timeout ended: stop the watchdog, systemd restarts the process.
        stuck_limit = max(STUCK_SOURCE_MIN_S, STUCK_SOURCE_STALLS * self.settings.source.stall_timeout_s)
        hang_error = ""  # the hung source call reported in last_error, until it returns
        notify("READY=1")
        notify(f"STATUS=running {self.settings.source.uri}")
        started = time.monotonic()
        fps_t, fps_n = time.monotonic(), 0
        submitted = 0  # frames inferred and handed to the analysis worker
        self._post_thread = threading.Thread(target=self._post_worker, name="drywallqa-post", daemon=True)
        self._post_thread.start()
        try:
            while not self.stop_event.is_set():
                stuck = self.capture.stuck_for()
                if stuck < stuck_limit:
                    watchdog.kick()
                    if hang_error:
                        self._hang_over(hang_error)
                        hang_error = ""
                elif not hang_error:
                    hang_error = self._report_hang(stuck)
                while not self._commands.empty():
                    self._handle_command(self._commands.get_nowait())
                if time.monotonic() - self._last_status >= self.settings.mqtt.status_interval_s:
                    self._publish_status()
                if duration_s is not None and time.monotonic() - started >= duration_s:
                    break
                if self.paused:
                    # Take no frames: a file or folder waits where it is (nothing skipped), a camera's frames are
                    # replaced by newer ones and counted as dropped.
                    self.stop_event.wait(0.1)
                    continue
                frame = self.capture.get(timeout=0.2)
                if frame is None:
                    if self.capture.finished:
                        log.info("source ended")
                        break
                    continue
                try:
                    probs, inference_ms = self.infer(frame)
                except Exception as exc:  # noqa: BLE001 - one bad frame never stops the loop
                    self._frame_failed(frame, exc)
                    self.capture.done(frame)  # not tried again: a photo the model fails on must not loop forever
                else:
                    self._post_queue.put((frame, probs, inference_ms))
                    submitted += 1
                fps_n += 1
                if time.monotonic() - fps_t >= 2.0:
                    self.stats.fps = fps_n / (time.monotonic() - fps_t)
                    fps_t, fps_n = time.monotonic(), 0
                if max_frames is not None and submitted >= max_frames:
                    break
        finally:
            self._drain_post_worker()
        return submitted

    def _report_hang(self, stuck_s: float) -> str:
        """Say (log, status) that a source call has not returned for `stuck_s`; returns the error reported."""
        self.last_error = (f"source {self.settings.source.uri}: a read has not returned for {stuck_s:.0f} s; "
                           f"the systemd watchdog (if any) will restart the runtime")
        log.error("%s", self.last_error)
        notify("STATUS=source read hung")
        self._last_status = 0.0  # say so on the broker now
        return self.last_error

    def _hang_over(self, hang_error: str) -> None:
        """The hung source call returned: its error leaves last_error, unless a newer one replaced it."""
        log.info("source %s: the hung read returned", self.settings.source.uri)
        if self.last_error == hang_error:
            self.last_error = ""
        self._last_status = 0.0

    def _frame_failed(self, frame: Frame, exc: Exception) -> None:
        self.stats.errors += 1
        self.last_error = f"frame {frame.frame_id}: {type(exc).__name__}: {exc}"
        log.exception("frame %d failed; continuing", frame.frame_id, exc_info=exc)

    def _post_worker(self) -> None:
        """Analysis, alert rules and publishing, one frame at a time in capture order."""
        while True:
            item = self._post_queue.get()
            if item is None:
                return
            frame, probs, inference_ms = item
            try:
                self.analyze_and_publish(frame, probs, inference_ms)
                self.stats.processed += 1
            except Exception as exc:  # noqa: BLE001 - one bad frame never stops the loop
                self._frame_failed(frame, exc)
            # Its alerts are spooled: a watched folder records the photo as processed. Not if one was kept in memory
            # only (the spool could not be written): the photo is then processed again after a restart.
            if self.capture is not None and not frame.alerts_in_memory:
                self.capture.done(frame)

    def _drain_post_worker(self) -> None:
        """Finish the frames already inferred (their alerts must not be lost), then stop the worker."""
        if self._post_thread is None:
            return
        self._post_queue.put(None)
        self._post_thread.join()
        self._post_thread = None

    def stop(self) -> None:
        self.stop_event.set()

    def shutdown(self) -> None:
        notify("STOPPING=1")
        if self.capture is not None:
            self.capture.stop()
        if self.link is not None:
            flushed = self.link.flush(self.settings.spool.flush_timeout_s)
            if not flushed:
                log.warning("%d alert(s) still undelivered; they stay in the spool %s for the next start",
                            self.link.pending(), self.spool.path if self.spool else "")
            self.link.stop(self.status("offline"))
            self.link = None
        if self.spool is not None:
            self.spool.close()
            self.spool = None
        if self.broker is not None:
            self.broker.stop()
            self.broker = None
