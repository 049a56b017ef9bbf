"""Edge runtime settings: a YAML file, overridden by DRYWALLQA_* environment variables (nested with `__`).

Example: DRYWALLQA_MQTT__HOST=broker.local overrides `mqtt.host`. A bad value stops start-up with
`ConfigError`, whose message names each offending field and what it allows.
"""

from __future__ import annotations

import json
import os
import re
import socket
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PositiveInt,
    PrivateAttr,
    ValidationError,
    ValidatorFunctionWrapHandler,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError
from pydantic_settings import (
    BaseSettings,
    InitSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
)

from drywallqa.edge.payloads import MAX_ID_CHARS

ENV_PREFIX = "DRYWALLQA_"
DEFAULT_CONFIG_NAME = "edge.yaml"


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names the field(s) and what is allowed."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SourceSettings(_Section):
    uri: str = Field(
        default="demo",
        description="demo | camera index (0) | /dev/videoN | rtsp://, http(s):// URL | video file | folder | glob",
    )
    width: int | None = Field(default=None, gt=0, description="requested capture width (cameras)")
    height: int | None = Field(default=None, gt=0, description="requested capture height (cameras)")
    fps: float | None = Field(default=None, gt=0,
                              description="pace frames at this rate (default: demo 10 fps; a file at its own rate "
                                          "when realtime, else every frame as fast as the model goes)")
    realtime: bool | None = Field(
        default=None,
        description="True: newest frame only, older ones dropped (default for cameras, streams, demo). "
        "False: every frame handed over in order (default for files and folders). Not with watch: true",
    )
    loop: bool = Field(default=False, description="restart video files / folders at the end (not a watched folder, "
                                                   "which never ends)")
    watch: bool = Field(
        default=False,
        description="folders and globs: keep watching for new images, each processed once when it has stopped "
                    "changing (oldest first), and never end; what was processed is recorded beside the alert "
                    "spool, so a restart goes on where it stopped. False: the images there at the start, then the "
                    "end. Every photo counts, so realtime: true is refused with it. A video file: waited for while "
                    "it is not there, if its folder exists (or lies where a drive is mounted later: /media, "
                    "/run/media, /mnt, an /etc/fstab mount point); a folder that does not exist is an error",
    )
    stall_timeout_s: float = Field(default=5.0, gt=0, description="no frame for this long -> reopen")
    reconnect_min_s: float = Field(default=0.5, gt=0)
    reconnect_max_s: float = Field(default=10.0, gt=0)
    demo_size: tuple[PositiveInt, PositiveInt] = Field(default=(480, 640), description="demo frame height, width")

    @field_validator("uri")
    @classmethod
    def _not_empty(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must not be empty; use 'demo', a camera index, a URL, a file, folder or glob")
        return v.strip()

    @model_validator(mode="after")
    def _watch_is_lossless(self) -> SourceSettings:
        if self.watch and self.realtime:
            raise ValueError("watch: true and realtime: true cannot go together: realtime keeps only the newest "
                             "frame and would skip photos of a watched folder, which hands out every photo once. "
                             "Remove realtime (a watched folder is read in order, every photo) or watch")
        return self


class ModelSettings(_Section):
    path: str = Field(default="hrnet", description="exported model (.onnx, .xml, .engine) or a profile: hrnet | lite")
    backend: Literal["auto", "openvino", "onnxruntime", "tensorrt"] = "auto"
    threads: int | None = Field(default=None, gt=0)
    openvino_cpu_isa: Literal["native", "avx2", "avx512_core"] = Field(
        default="native",
        description="cap OpenVINO's CPU kernels at this instruction set for a float (FP32/FP16 IR) model; INT8 "
                    "models keep the native one (VNNI). On CPUs that run AVX-512 as two halves (AMD Zen 4) avx2 "
                    "made hrnet 3-7% faster; `drywallqa bench` measures both on your machine")
    openvino_device: str = Field(
        default="CPU",
        pattern=r"^[A-Za-z][A-Za-z0-9_.:,]*$",
        description="OpenVINO device: CPU, GPU (an Intel NUC's iGPU), NPU, or AUTO to let OpenVINO choose; the "
                    "hrnet profile is meant for an accelerator. Checked against the machine's devices at start",
    )
    flip_tta: bool = Field(
        default=False,
        description="average each frame's probabilities with its two mirror images: 3x the network time for about "
                    "+0.6 crack and +1.4 taping IoU points with lite (MODEL.md); for slow-moving cameras")
    opencv_threads: int = Field(
        default=1, ge=0,
        description="OpenCV's thread pool for decoding, resizing and analysis (0: OpenCV's default). 1 keeps its "
                    "spinning workers off the cores the network uses: on 2 cores that is ~1.4 ms of CPU per frame")


FRACTION_METRICS = ("area_fraction", "mean_confidence")  # both lie in [0, 1]


class RuleSettings(_Section):
    """One alert rule: `metric >= min` held for `persistence_frames` frames, then quiet for `cooldown_s`."""

    prompt: str = Field(description="prompt or class name the rule watches, e.g. 'segment crack'")
    metric: Literal["area_fraction", "skeleton_length_px", "region_count", "mean_confidence"] = "area_fraction"
    min: float = Field(ge=0.0, description="the rule fires when metric >= min (min 0 fires on any frame)")
    persistence_frames: int = Field(default=3, ge=1, description="consecutive frames of a camera or video")
    cooldown_s: float = Field(default=60.0, ge=0.0, description="per class")
    # Set by EdgeSettings: the source is photos (a folder, glob or image file, not looped), each judged alone.
    _photos: bool = PrivateAttr(default=False)

    @field_validator("min", "persistence_frames", "cooldown_s", mode="before")
    @classmethod
    def _not_a_bool(cls, v: Any) -> Any:
        """pydantic would read true as 1: `min: yes` on area_fraction would then wait for a frame all crack."""
        if isinstance(v, bool):
            raise ValueError(f"must be a number, not {str(v).lower()} (YAML reads yes/no, on/off and true/false "
                             f"as true or false)")
        return v

    @model_validator(mode="after")
    def _reachable(self) -> RuleSettings:
        if self.metric in FRACTION_METRICS and self.min > 1.0:
            hint = f" (a percentage? {self.min:g} % is {self.min / 100:g})" if self.min <= 100 else ""
            raise ValueError(f"min {self.min:g} can never be reached: {self.metric} is a fraction between 0 and 1"
                             f"{hint}")
        return self

    @property
    def applied_persistence_frames(self) -> int:
        """1 on photos: consecutive photos show different walls, so a crack in one photo must alert by itself."""
        return 1 if self._photos else self.persistence_frames

    @property
    def applied_cooldown_s(self) -> float:
        """0 on photos: every photo with a finding alerts. A cool-down in processing time would keep the alerts of
        all but the first of a batch synced at once, and fewer the faster the device."""
        return 0.0 if self._photos else self.cooldown_s


def rule_label(index: int, rule: Any) -> str:
    """'alert rule 2: {prompt: segment crack, min: 0.01}': a rule as the user counts (from 1, in the order of the
    file) and wrote it (a RuleSettings: the fields it set), so an error says which of several rules is meant."""
    if isinstance(rule, BaseModel):  # 80, not 80.0, for `min: 80`
        rule = {k: int(v) if isinstance(v, float) and v.is_integer() else v
                for k, v in rule.model_dump(include=rule.model_fields_set).items()}
    try:  # one flow-style item, e.g. {prompt: crack, min: 5} or crack, as YAML writes it
        text = yaml.safe_dump([rule], default_flow_style=True, sort_keys=False, allow_unicode=True,
                              width=2**20).strip()[1:-1]
    except yaml.YAMLError:
        text = repr(rule)
    return f"alert rule {index + 1}: {text if len(text) <= 160 else text[:157] + '...'}"


class AnalysisSettings(_Section):
    prompts: list[str] = Field(default_factory=lambda: ["segment crack", "segment taping area"], min_length=1)
    aliases: dict[str, str] = Field(
        default_factory=dict,
        description="this site's own wordings -> a class name or one of the model's prompts, e.g. "
                    "{'hairline crack': crack}; usable in prompts, alert rules and set_prompts, and published as "
                    "written. Checked against the model at start-up")
    min_region_area_px: int = Field(default=16, ge=0, description="smaller connected regions are ignored")
    max_regions: int = Field(default=20, ge=0, description="regions listed per class (largest first)")
    skeleton_classes: list[str] = Field(default_factory=lambda: ["crack"])
    skeleton_max_side: int = Field(default=256, ge=32, description="thin each crack region at most this size (speed; lengths are scaled back, within ~1% of full size on test lines)")


class TlsSettings(_Section):
    enabled: bool = False
    ca_certs: str | None = None
    certfile: str | None = None
    keyfile: str | None = None
    insecure: bool = Field(default=False, description="skip hostname verification (testing only)")

    @model_validator(mode="after")
    def _files_exist(self) -> TlsSettings:
        if self.enabled:
            for name in ("ca_certs", "certfile", "keyfile"):
                value = getattr(self, name)
                if value and not Path(value).expanduser().is_file():
                    raise ValueError(f"{name}: no such file {value!r}")
        return self


# A camera's name on a device with several (`instance`): it goes into a unit name, a state folder, file names and
# the MQTT device id.
INSTANCE_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}")


class MqttSettings(_Section):
    host: str = "127.0.0.1"
    port: int = Field(default=1883, ge=1, le=65535)
    prefix: str = "drywallqa"
    device_id: str = Field(default_factory=socket.gethostname)
    username: str | None = None
    password: str | None = None
    keepalive_s: int = Field(default=30, ge=5)
    tls: TlsSettings = Field(default_factory=TlsSettings)
    embedded_broker: Literal["auto", "always", "never"] = Field(
        default="auto",
        description="auto: spawn mosquitto on 127.0.0.1 when host is loopback and nothing listens there",
    )
    detections_max_hz: float = Field(default=2.0, ge=0.0, description="0 disables detections")
    detections_preview: bool = True
    preview_max_side: int = Field(default=320, ge=32)
    snapshot_max_side: int = Field(default=640, ge=32)
    status_interval_s: float = Field(default=10.0, gt=0)
    inflight_window: int = Field(default=10, ge=1, description="alerts handed to the client before a PUBACK")
    reconnect_max_s: int = Field(default=10, ge=1, description="broker reconnect backoff 1 s doubling up to this")

    @field_validator("prefix", "device_id")
    @classmethod
    def _topic_safe(cls, v: str) -> str:
        if not v or any(ch in v for ch in "+#\0") or v.startswith("/"):
            raise ValueError("must be non-empty, without '+', '#' or a leading '/'")
        return v


class SpoolSettings(_Section):
    path: str | None = Field(default=None, description="default: $STATE_DIRECTORY or ~/.local/state/drywallqa")
    max_rows: int = Field(default=10_000, ge=1)
    max_mb: float = Field(default=200.0, gt=0)
    flush_timeout_s: float = Field(default=5.0, ge=0)

    def resolved_path(self, instance: str | None = None) -> Path:
        """spool.path, else spool.sqlite in the service's state folder (each camera's unit has its own), else
        ~/.local/state/drywallqa/spool[-<instance>].sqlite: one spool per runtime, which locks it."""
        if self.path:
            return Path(self.path).expanduser()
        base = os.environ.get("STATE_DIRECTORY")
        if base:
            return Path(base.split(":")[0]) / "spool.sqlite"
        xdg = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
        return Path(xdg) / "drywallqa" / (f"spool-{instance}.sqlite" if instance else "spool.sqlite")


class EdgeSettings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        extra="forbid",
        yaml_file=None,
    )

    source: SourceSettings = Field(default_factory=SourceSettings)
    model: ModelSettings = Field(default_factory=ModelSettings)
    analysis: AnalysisSettings = Field(default_factory=AnalysisSettings)
    alerts: list[RuleSettings] = Field(default_factory=list, description="alert rules; none (`alerts: []`, "
                                       "`alerts: {}` or `alerts:` with every rule commented out): no alerts")
    mqtt: MqttSettings = Field(default_factory=MqttSettings)
    spool: SpoolSettings = Field(default_factory=SpoolSettings)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    instance: str | None = Field(
        default=None,
        description="this camera's name on a device with several (`edge install-service --instance NAME`); "
                    "mqtt.device_id then defaults to <host name>-NAME (and, outside systemd, the spool to "
                    "spool-NAME.sqlite)",
    )

    @field_validator("instance")
    @classmethod
    def _instance_name(cls, v: str | None) -> str | None:
        if v is not None and not INSTANCE_NAME.fullmatch(v):
            raise ValueError("use 1-32 lower-case letters, digits, '-' or '_', starting with a letter or digit "
                             "(e.g. front, rear, cam-2)")
        return v

    @field_validator("alerts", mode="before")
    @classmethod
    def _rule_list(cls, v: Any) -> Any:
        if v is None or (isinstance(v, dict) and not v):  # `alerts:` with every rule commented out, `alerts: {}`
            return []
        if isinstance(v, dict) and not all(str(k).isdigit() for k in v):  # {"0": ...}: items set in the environment
            raise PydanticCustomError(  # a list_type error still, which _env_note explains for the environment
                "list_type", "must be a list of rules, each starting with '- ' under `alerts:`, e.g. "
                "'  - {prompt: segment crack, metric: area_fraction, min: 0.01}'")
        return v

    @field_validator("alerts", mode="wrap")
    @classmethod
    def _errors_name_their_rule(cls, v: Any, handler: ValidatorFunctionWrapHandler) -> list[RuleSettings]:
        """Each error inside a rule carries `rule_label` in its ctx: `alerts.3.min` alone leaves a user counting
        from 0 through a long list (format_validation_error shows it)."""
        try:
            return handler(v)
        except ValidationError as exc:
            errors = []
            for err in exc.errors():
                ctx = dict(err.get("ctx") or {})
                index = err["loc"][0] if err["loc"] else None
                if isinstance(v, list) and isinstance(index, int) and 0 <= index < len(v):
                    ctx["rule"] = rule_label(index, v[index])
                errors.append({"type": PydanticCustomError(err["type"], err["msg"], ctx or None),
                               "loc": err["loc"], "input": err["input"]})
            raise ValidationError.from_exception_data(exc.title, errors) from None

    @field_validator("alerts")
    @classmethod
    def _no_repeated_rule(cls, rules: list[RuleSettings]) -> list[RuleSettings]:
        """A rule written twice is most likely a copy whose prompt or threshold was meant to change: the rule meant
        (e.g. one on taping) would be missing unseen."""
        seen: dict[str, int] = {}
        for i, rule in enumerate(rules):
            key = json.dumps(rule.model_dump(), sort_keys=True)
            if key in seen:
                raise PydanticCustomError(
                    "repeated_rule", f"{rule_label(i, rule)} repeats {rule_label(seen[key], rules[seen[key]])} "
                    f"(the same prompt, metric, min, persistence_frames and cooldown_s): remove one, or change it to "
                    f"the rule you meant")
            seen[key] = i
        return rules

    @model_validator(mode="after")
    def _rules_on_photos(self) -> EdgeSettings:
        """Photos (a folder, a glob, an image file) are judged one by one: see RuleSettings.applied_*. Not with
        `loop: true`, which shows the same photos again at every pass: the cool-down keeps those from alerting again.
        A watched folder never ends, so it never loops: `loop` does not apply to it."""
        from drywallqa.edge.sources import classify_uri  # it imports this module

        looped = self.source.loop and not self.source.watch
        photos = classify_uri(self.source.uri, self.source.watch) == "images" and not looped
        for rule in self.alerts:
            rule._photos = photos
        return self

    @model_validator(mode="after")
    def _check(self) -> EdgeSettings:
        if self.source.reconnect_max_s < self.source.reconnect_min_s:
            raise ValueError("source.reconnect_max_s must be >= source.reconnect_min_s")
        if self.instance and "device_id" not in self.mqtt.model_fields_set:
            # read at start, not written into the config: a device cloned from an image takes its own host name
            self.mqtt.device_id = f"{socket.gethostname()}-{self.instance}"
        if len(self.mqtt.device_id) > MAX_ID_CHARS:  # a long FQDN as the host name, say
            raise ValueError(f"mqtt.device_id {self.mqtt.device_id[:40]!r}... is {len(self.mqtt.device_id)} characters "
                             f"long: at most {MAX_ID_CHARS} (the dashboard refuses longer ids); set a shorter one")
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Priority, highest first: explicit arguments, environment, the YAML file.
        # The file's settings as load_settings read and checked them (pydantic-settings' YAML source is an
        # InitSettingsSource over the same yaml.safe_load of the file: this one does not read the file again).
        yaml_data = _YAML_DATA.get("data")
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if yaml_data is not None:
            sources.append(InitSettingsSource(settings_cls, init_kwargs=yaml_data))
        return tuple(sources)


# The YAML file's settings for the next EdgeSettings() construction (load_settings sets them, then clears them).
_YAML_DATA: dict[str, dict[str, Any] | None] = {"data": None}


def default_config_path() -> Path:
    """The packaged configs/edge.yaml."""
    return Path(str(resources.files("drywallqa.configs").joinpath(DEFAULT_CONFIG_NAME)))


def format_validation_error(exc: ValidationError, origin: str) -> str:
    lines = [f"invalid edge configuration ({origin}):"]
    for err in exc.errors():
        field = ".".join(str(p) for p in err["loc"]) or "(top level)"
        if "rule" in err.get("ctx", {}):  # an error inside an alert rule: which one, as written
            field += f" ({err['ctx']['rule']})"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown setting (check the spelling; see configs/edge.yaml for every setting)"
        allowed = err.get("ctx", {}).get("expected")
        extra = f" (allowed: {allowed})" if allowed and str(allowed) not in msg else ""
        got = err.get("input")
        got_text = f"; got {got!r}" if not isinstance(got, dict | list) and got is not None else ""
        lines.append(f"  {field}: {msg}{extra}{got_text}{_env_note(err['loc'], err['type'])}")
    lines.append(f"  (environment overrides use the prefix {ENV_PREFIX} and '__' between levels, "
                 f"e.g. {ENV_PREFIX}MQTT__HOST)")
    return "\n".join(lines)


_SEQUENCE_ERRORS = ("list_type", "tuple_type", "set_type", "frozen_set_type")


def _env_note(loc: tuple[Any, ...], error_type: str = "") -> str:
    """Which DRYWALLQA_* variable set this field (or the section holding it, or items inside it), if one did: the
    error is not in the YAML file then."""
    env = {k.upper(): k for k in os.environ}
    for n in range(len(loc), 0, -1):
        name = ENV_PREFIX + "__".join(str(p) for p in loc[:n]).upper()
        if name in env:
            return f" (set by the environment: {env[name]})" if n == len(loc) else \
                f" (the environment's {env[name]} sets this section)"
    whole = ENV_PREFIX + "__".join(str(p) for p in loc).upper()
    inside = sorted(env[k] for k in env if k.startswith(whole + "__"))
    if not inside:
        return ""
    if error_type in _SEQUENCE_ERRORS:  # DRYWALLQA_ALERTS__0__MIN: pydantic-settings makes {"0": ...} of it
        return (f" (set by the environment: {', '.join(inside)}; a list cannot be set item by item: set the whole "
                f"list as JSON in {whole}, every item in full, or edit it in the YAML file)")
    return f" (set by the environment: {', '.join(inside)})"


def read_config_file(path: Path) -> dict[str, Any]:
    """The settings mapping of a YAML config file; ConfigError saying what is wrong with the file."""
    if path.is_dir():
        raise ConfigError(f"config file {path} is a directory; give the YAML file in it, e.g. {path / DEFAULT_CONFIG_NAME}")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    except OSError as exc:
        raise ConfigError(f"config file {path} cannot be read: {exc.strerror or exc}") from exc
    if data is None:
        raise ConfigError(f"config file {path} holds no settings (it is empty or only comments); copy "
                          f"{default_config_path()} there, or write '{{}}' to run on the built-in defaults")
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of settings, got {type(data).__name__}")
    return data


def load_settings(config: str | Path | None = None, **overrides: Any) -> EdgeSettings:
    """Read the YAML file (default: the packaged configs/edge.yaml), apply env overrides, validate."""
    path = Path(config) if config is not None else default_config_path()
    data = read_config_file(path)
    check_environment()
    _YAML_DATA["data"] = data
    try:
        return EdgeSettings(**overrides)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, str(path))) from exc
    except SettingsError as exc:  # an environment value pydantic-settings cannot parse (lists, sections: JSON)
        where = ", ".join(_env_vars_not_json()) or f"a value ({exc})"
        raise ConfigError(f"invalid edge configuration (environment): {where} is not valid JSON. A list or a whole section given in "
                          f"the environment must be JSON, e.g. {ENV_PREFIX}ANALYSIS__PROMPTS="
                          f"'[\"segment crack\"]'; a single setting needs '__', e.g. {ENV_PREFIX}MQTT__HOST") from exc
    finally:
        _YAML_DATA["data"] = None


def _is_complex(annotation: Any) -> bool:
    """Whether pydantic-settings reads this field from the environment as JSON (a list, dict, tuple or section)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return True
    origin = get_origin(annotation)
    if origin in (list, dict, tuple, set):
        return True
    return origin is not None and any(_is_complex(a) for a in get_args(annotation) if a is not type(None))


def _env_vars_not_json(environ: Mapping[str, str] | None = None) -> list[str]:
    """The DRYWALLQA_* variables that set a list or a section with a value that is not JSON."""
    env = os.environ if environ is None else environ
    bad = []
    for var, value in env.items():
        if not var.upper().startswith(ENV_PREFIX):
            continue
        model: Any = EdgeSettings
        annotation: Any = None
        for part in var[len(ENV_PREFIX):].lower().split("__"):
            fields = getattr(model, "model_fields", None)
            if not fields or part not in fields:
                annotation = None
                break
            annotation = model = fields[part].annotation
        if annotation is not None and _is_complex(annotation):
            try:
                json.loads(value)
            except ValueError:
                bad.append(var)
    return bad


def _service_link(var: str, env: Mapping[str, str]) -> bool:
    """A variable Kubernetes gives every pod for a Service of its namespace: a Service named drywallqa-mqtt (a
    broker beside the edge) sets DRYWALLQA_MQTT_PORT=tcp://10.0.0.11:1883 next to DRYWALLQA_MQTT_SERVICE_HOST.
    Not a mistyped mqtt.port, which would hold a number; refusing it would keep the edge from ever starting."""
    if not var.upper().endswith("_PORT"):
        return False
    return (f"{var[:-len('_PORT')]}_SERVICE_HOST" in env
            and env[var].lower().startswith(("tcp://", "udp://", "sctp://")))


def check_environment(environ: Mapping[str, str] | None = None) -> None:
    """Refuse DRYWALLQA_<SECTION>_<KEY> (one underscore) for a real setting: pydantic-settings would ignore it
    silently, and a broker host typed that way means a device publishing to the wrong place. Likewise
    DRYWALLQA_<NOT A SECTION>__<KEY> (DRYWALLQA_MQQT__HOST): only the edge's settings use '__'. Other
    DRYWALLQA_* variables belong to other tools and are left alone."""
    env = os.environ if environ is None else environ
    sections = {name: field.annotation for name, field in EdgeSettings.model_fields.items()}
    for var in env:
        if not var.upper().startswith(ENV_PREFIX) or _service_link(var, env):
            continue
        rest = var[len(ENV_PREFIX):].lower()
        head = rest.split("__", 1)[0]
        if "__" in rest and head not in sections:  # only the edge's settings use '__' (others: DRYWALLQA_X_Y)
            raise ConfigError(f"environment variable {var} is not read: {head!r} is not a section of the edge "
                              f"configuration (sections: {', '.join(sections)}), e.g. {ENV_PREFIX}MQTT__HOST")
        for section, model in sections.items():
            fields = getattr(model, "model_fields", None)
            if fields and rest.startswith(section + "_") and not rest.startswith(section + "__") \
                    and rest[len(section) + 1:] in fields:
                raise ConfigError(f"environment variable {var} is not read: a setting inside a section needs "
                                  f"'__', i.e. {ENV_PREFIX}{section.upper()}__{rest[len(section) + 1:].upper()}")
