"""MQTT payload schema (versioned): the one contract between the edge runtime and the dashboard.

Topics, under `<prefix>/<device_id>/`:
- `status`     retained, QoS 1: StatusPayload (also the last-will message, state="offline")
- `detections` QoS 0, rate-limited: DetectionPayload (per-frame summary)
- `alerts`     QoS 1: AlertPayload (unique event_id; consumers deduplicate on it)
- `cmd`        inbound: CommandPayload (pause, resume, set_prompts, snapshot)
- `snapshot`   QoS 1: SnapshotPayload (reply to a snapshot command: the latest frame with masks drawn)
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

PAYLOAD_VERSION = 1

TOPIC_STATUS = "status"
TOPIC_DETECTIONS = "detections"
TOPIC_ALERTS = "alerts"
TOPIC_CMD = "cmd"
TOPIC_SNAPSHOT = "snapshot"
# Device ids (a topic level) and alert event ids: consumers (the dashboard) refuse longer ones, and the edge's config
# refuses a longer mqtt.device_id, so that no device publishes what its dashboard drops.
MAX_ID_CHARS = 128
EARLIEST_PLAUSIBLE_TIME = 1577836800.0  # 2020-01-01 UTC: a message timestamped before it comes from an unset clock


class _Payload(BaseModel):
    """Every payload: numbers must be finite (a NaN or Infinity is not JSON, and would break a dashboard that reads
    it back), and `version` must be this schema's."""

    model_config = ConfigDict(allow_inf_nan=False)


Version = Literal[PAYLOAD_VERSION]  # a payload of another version is refused, not half-read


def topic(prefix: str, device_id: str, leaf: str) -> str:
    return f"{prefix.rstrip('/')}/{device_id}/{leaf}"


class Region(_Payload):
    bbox: tuple[int, int, int, int] = Field(description="x, y, width, height in source pixels")
    area_px: int
    skeleton_length_px: float | None = Field(default=None, description="cracks only")


class ClassResult(_Payload):
    class_name: str
    prompt: str
    area_fraction: float = Field(ge=0.0, le=1.0)
    region_count: int = Field(ge=0)
    regions: list[Region] = Field(default_factory=list)
    skeleton_length_px: float = Field(default=0.0, description="total crack skeleton length; 0 for other classes")
    mean_confidence: float = Field(ge=0.0, le=1.0, description="mean probability inside the mask (0 if empty)")


class StatusPayload(_Payload):
    version: Version = PAYLOAD_VERSION
    device_id: str
    state: Literal["online", "offline", "paused"]
    timestamp: float
    model: str = ""
    source: str = ""
    source_state: str = Field(default="", description="e.g. open, reconnecting, stalled, ended")
    prompts: list[str] = Field(default_factory=list)
    frames_processed: int = 0
    frames_dropped: int = 0
    frames_corrupt: int = 0
    fps: float = 0.0
    spooled_alerts: int = 0
    spool_dropped: int = Field(default=0, description="alerts dropped (oldest first) because the spool was full")
    frames_reopened: int = Field(default=0, description="times the source was reopened after a failure")
    last_error: str = Field(default="", description="latest source / command error, for operators")
    last_will: bool = Field(
        default=False,
        description="true only on the last will the broker sends when the device vanished without a clean stop; "
        "its figures date from the device's latest status before its connection was lost, so consumers keep "
        "their last known figures and take the time the message arrived as the time it went offline",
    )


class DetectionPayload(_Payload):
    version: Version = PAYLOAD_VERSION
    device_id: str
    frame_id: int
    timestamp: float
    width: int
    height: int
    inference_ms: float
    results: list[ClassResult]
    preview_jpeg_b64: str | None = Field(default=None, description="small JPEG with masks drawn, when enabled")


class AlertPayload(_Payload):
    version: Version = PAYLOAD_VERSION
    event_id: str = Field(description="unique per alert; consumers deduplicate on it")
    device_id: str
    timestamp: float
    frame_id: int
    class_name: str
    prompt: str
    rule: str = Field(description="which threshold fired, e.g. 'area_fraction>=0.01'")
    area_fraction: float
    skeleton_length_px: float = 0.0
    region_count: int = 0
    mean_confidence: float = 0.0
    persisted_frames: int = Field(default=1, description="consecutive frames the condition held")
    snapshot_jpeg_b64: str = Field(description="JPEG of the frame with the mask drawn on it, base64")


MAX_COMMAND_PROMPTS = 32
MAX_COMMAND_TEXT = 200  # characters of one prompt or request id


class CommandPayload(_Payload):
    """Bounded: a rejected prompt is quoted in `status.last_error`, sent with every status until the next accepted
    set_prompts, and a request id comes back in the snapshot; a junk command must not make those megabytes."""

    version: Version = PAYLOAD_VERSION
    command: Literal["pause", "resume", "set_prompts", "snapshot"]
    prompts: list[Annotated[str, Field(max_length=MAX_COMMAND_TEXT)]] | None = Field(
        default=None, max_length=MAX_COMMAND_PROMPTS)
    request_id: str | None = Field(default=None, max_length=MAX_COMMAND_TEXT)


class SnapshotPayload(_Payload):
    version: Version = PAYLOAD_VERSION
    device_id: str
    timestamp: float
    frame_id: int
    request_id: str | None = None
    jpeg_b64: str
