"""Alert rules: `metric >= min` for N consecutive frames, then a per-class cool-down."""

from __future__ import annotations

import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from drywallqa.edge.durable import replace_durably
from drywallqa.edge.payloads import AlertPayload, ClassResult
from drywallqa.edge.settings import RuleSettings

log = logging.getLogger(__name__)

PhotoKey = tuple[str, int, int]  # a watched photo's path, size and mtime_ns (WatchedFolderSource's frame key)
# The uuid5 namespace of photo_event_id: fixed for good (another one would give every photo's alerts new ids).
_PHOTO_ALERTS = uuid.UUID("5c0f7d2e-3b1a-5e8c-9d4f-0a6b2c8e1f37")


@dataclass
class Rule:
    class_name: str
    metric: str
    min: float
    persistence_frames: int
    cooldown_s: float

    @property
    def label(self) -> str:
        return f"{self.metric}>={self.min:g}"

    def holds(self, result: ClassResult) -> bool:
        return float(getattr(result, self.metric)) >= self.min


@dataclass
class Firing:
    rule: Rule
    result: ClassResult
    persisted_frames: int


@dataclass
class AlertEngine:
    rules: list[Rule]
    _streak: dict[int, int] = field(default_factory=dict)
    _last_fired: dict[str, float] = field(default_factory=dict)

    @classmethod
    def from_settings(cls, rules: list[RuleSettings], resolve) -> AlertEngine:
        """`resolve(prompt_or_class) -> class name` (raises UnknownPromptError for unknown prompts)."""
        return cls([Rule(resolve(r.prompt), r.metric, r.min, r.applied_persistence_frames, r.applied_cooldown_s)
                    for r in rules])

    def carry_over(self, fired_wall: dict[str, float], now: float, now_wall: float) -> None:
        """Cool-downs from before a restart: `fired_wall` maps a class to the wall-clock time of its last alert
        (`fired_wall_times` of the previous run). `now` is monotonic, as `update` takes it; a time ahead of `now_wall`
        (the clock stepped back since) counts as just fired."""
        for class_name, fired in fired_wall.items():
            if any(rule.class_name == class_name for rule in self.rules):
                self._last_fired[class_name] = now - max(0.0, now_wall - fired)

    def fired_wall_times(self, now: float, now_wall: float) -> dict[str, float]:
        """Each class's last alert as a wall-clock time, for `carry_over` after a restart."""
        return {c: now_wall - (now - t) for c, t in self._last_fired.items()}

    def can_fire(self, class_name: str, now: float) -> bool:
        """Whether any rule of `class_name` could fire at `now`: it has one, and is not cooling down.

        The live loop skips costly measurements (crack skeletons) that no alert could carry: during a
        cool-down a length rule's streak therefore restarts, so after it the rule needs
        `persistence_frames` fresh frames, as it did for its first alert.
        """
        last = self._last_fired.get(class_name)
        return any(rule.class_name == class_name and (last is None or now - last >= rule.cooldown_s)
                   for rule in self.rules)

    def update(self, results: list[ClassResult], now: float | None = None) -> list[Firing]:
        """Feed one frame's results; returns the rules that fire on this frame (at most one per class)."""
        now = time.monotonic() if now is None else now
        by_class = {r.class_name: r for r in results}
        fired: list[Firing] = []
        fired_classes: set[str] = set()
        for i, rule in enumerate(self.rules):
            result = by_class.get(rule.class_name)
            if result is None or not rule.holds(result):
                self._streak[i] = 0
                continue
            self._streak[i] = self._streak.get(i, 0) + 1
            if self._streak[i] < rule.persistence_frames or rule.class_name in fired_classes:
                continue
            last = self._last_fired.get(rule.class_name)
            if last is not None and now - last < rule.cooldown_s:
                continue
            self._last_fired[rule.class_name] = now
            fired_classes.add(rule.class_name)
            fired.append(Firing(rule, result, self._streak[i]))
        return fired


def photo_event_id(device_id: str, photo: PhotoKey, class_name: str, rule: str) -> str:
    """The event_id of an alert on a watched photo: the same in every run for the same photo (path, size, mtime_ns),
    class and rule. A photo whose alert reached the broker from memory only (spool disk full) is processed again
    after a restart; its alert then repeats the id, and consumers drop it as the duplicate it is."""
    path, size, mtime_ns = photo
    return uuid.uuid5(_PHOTO_ALERTS, json.dumps([device_id, path, size, mtime_ns, class_name, rule])).hex


def make_alert(firing: Firing, *, device_id: str, frame_id: int, timestamp: float, snapshot_b64: str,
               photo: PhotoKey | None = None) -> AlertPayload:
    """An alert of `firing`; its event_id is random, or photo_event_id for a frame that is a watched `photo`."""
    r = firing.result
    event_id = (photo_event_id(device_id, photo, r.class_name, firing.rule.label) if photo is not None
                else uuid.uuid4().hex)
    return AlertPayload(
        event_id=event_id,
        device_id=device_id,
        timestamp=timestamp,
        frame_id=frame_id,
        class_name=r.class_name,
        prompt=r.prompt,
        rule=firing.rule.label,
        area_fraction=r.area_fraction,
        skeleton_length_px=r.skeleton_length_px,
        region_count=r.region_count,
        mean_confidence=r.mean_confidence,
        persisted_frames=firing.persisted_frames,
        snapshot_jpeg_b64=snapshot_b64,
    )


def cooldowns_path(spool_path: Path) -> Path:
    """Where a runtime keeps its classes' last alert times: beside its alert spool (one runtime holds that)."""
    return spool_path.with_name(f"{spool_path.name}.cooldowns.json")


def read_cooldowns(path: Path) -> dict[str, float]:
    """{class: wall-clock time of its last alert} as the previous run wrote it; {} when there is none or it cannot be
    read (logged: the cool-downs then start afresh, as before this file existed)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return {str(k): float(v) for k, v in data.items()}
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, TypeError, AttributeError) as exc:
        log.warning("alert cool-downs %s cannot be read (%s): they start afresh", path, exc)
        return {}


def write_cooldowns(path: Path, fired_wall: dict[str, float]) -> None:
    """Replace the file whole (a crash or power cut leaves the old one or the new one, never half of one or an empty
    one); raises OSError."""
    replace_durably(path, json.dumps(fired_wall).encode())
