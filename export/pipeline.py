"""`drywallqa export`: weights -> ONNX, OpenVINO FP16 + INT8, Jetson FP16 ONNX, all carrying the metadata."""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

from drywallqa.contract import WEIGHTS_HASH_KEY
from drywallqa.edge.backends import file_sha256
from drywallqa.export.metadata import build_metadata

if TYPE_CHECKING:
    from drywallqa.contract import ModelMetadata
    from drywallqa.train.checkpoint import CheckpointInfo
    from drywallqa.train.models.segmenter import Segmenter

log = logging.getLogger(__name__)

TARGETS = ("onnx", "openvino", "jetson", "all")


INTERMEDIATE_DIR = "intermediate"  # inside the staging folder: files a target is made from, not shipped
STAGING_PREFIX = ".export-"
# A staging folder is named .export-<host>-<pid>-<process start>-<random>: the export that made it can be told
# alive or dead by the next export on the same machine, a pid reused by another program included. <host> stands
# for the host name and the PID namespace together: a container on the host network shares the name but not the
# pids, and its exports count as another machine's.
_OWNED_STAGING = re.compile(r"^\.export-(?P<host>[0-9a-f]{8})-(?P<pid>\d+)-(?P<start>\d+)-")
NOT_RUNNING, START_UNKNOWN = -1, 0  # what _process_start says instead of a start time
UNOWNED_STALE_AFTER_S = 24 * 3600  # a staging folder of an older DrywallQA (no owner in its name) is left this long
# What makes two exported files the same model for a device (precision, dynamic batch and `extra` may differ).
CONTRACT_FIELDS = ("profile", "architecture", "version", "classes", "prompts", "thresholds", "mask_shapes",
                   "text_encoder", "data_fingerprint")


def run_export(
    weights: str | Path,
    target: str,
    out_dir: str | Path,
    size: tuple[int, int] | None = None,
    dynamic_batch: bool = False,
    calib: int = 300,
    calib_config: str | Path | None = None,
    calib_paths: list[Path] | None = None,
    loaded: tuple[Segmenter, CheckpointInfo] | None = None,
) -> dict[str, Path]:
    """Returns {artifact name: path}. The FP32 ONNX is always written (the other targets start from it).
    `calib_paths`: the INT8 calibration photos when the caller has listed them already (calibration_paths of
    `calib_config`); None lists them here. `loaded`: load_weights(weights) when the caller has loaded it already
    (the bench checks every file before it measures), so the file is not read twice; None loads it here.

    Every file is first written to a staging folder inside `out_dir` and moved into place (a rename each) only
    once all of them are made: an export that fails or is interrupted (Ctrl-C during INT8 calibration, a full
    disk) leaves the files already in `out_dir` as they were, not a half-written model or a mixed set. An export
    killed outright (SIGKILL, the OOM killer, a power cut) cannot remove its staging folder: the next export into
    `out_dir` does."""
    if target not in TARGETS:
        raise ValueError(f"unknown target {target!r}; choose one of {TARGETS}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(out_dir)
    staging = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{_owner_tag(os.getpid())}-", dir=out_dir))
    try:
        made = _export_into(weights, target, staging, size, dynamic_batch, calib, calib_config, calib_paths,
                            loaded)
        for path in sorted(staging.iterdir(), key=lambda p: p.suffix == ".xml"):  # an IR's .bin before its .xml
            if path.is_file():  # folders hold intermediates (INTERMEDIATE_DIR), removed with the staging
                os.replace(path, out_dir / path.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return {name: out_dir / path.name for name, path in made.items()}


def remove_stale_staging(out_dir: Path) -> list[Path]:
    """Remove the staging folders in `out_dir` left by exports that died without their clean-up (SIGKILL, the OOM
    killer, a power cut); returns them. The folder of an export still running, in this process or another, or on
    another machine sharing `out_dir`, is kept."""
    removed = []
    for folder in sorted(out_dir.glob(f"{STAGING_PREFIX}*")):
        if folder.is_dir() and not folder.is_symlink() and _is_stale(folder):
            shutil.rmtree(folder, ignore_errors=True)
            if not folder.exists():
                log.info("removed %s, the staging folder of an export that did not finish", folder)
                removed.append(folder)
    return removed


def _is_stale(folder: Path) -> bool:
    owner = _OWNED_STAGING.match(folder.name)
    # Named by an older DrywallQA (no owner), or on this host by an export that could not tell its PID namespace:
    # its pid may be any container's here, so only the folder's age tells.
    if owner is None or owner["host"] == _host_tag(None):
        return time.time() - folder.stat().st_mtime > UNOWNED_STALE_AFTER_S
    namespace = _pid_namespace()
    if namespace is None or owner["host"] != _host_tag(namespace):
        return False  # another machine's (or container's) export: its processes cannot be seen from here
    start = _process_start(int(owner["pid"]))
    return start != START_UNKNOWN and str(start) != owner["start"]  # dead, or its pid now another program's


def _owner_tag(pid: int) -> str:
    return f"{_host_tag(_pid_namespace())}-{pid}-{_process_start(pid)}"


def _host_tag(pid_namespace: str | None) -> str:
    """Eight hex digits for this host name and `pid_namespace` (see _pid_namespace; None: unknown)."""
    return hashlib.sha256(f"{socket.gethostname()}|pid-ns:{pid_namespace}".encode()).hexdigest()[:8]


def _pid_namespace() -> str | None:
    """Which PID namespace this process is in, the space its pids mean something in: the inode of
    /proc/self/ns/pid on Linux, '-' elsewhere (no such namespaces); None when Linux does not say (no /proc)."""
    if not sys.platform.startswith("linux"):
        return "-"
    try:
        return str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        return None


def _process_start(pid: int) -> int:
    """When `pid` started, in clock ticks since boot (Linux /proc): with the pid, it names one process, whereas a
    pid alone is reused. NOT_RUNNING for no such process (or a zombie: killed, not yet reaped); START_UNKNOWN for a
    live process whose start cannot be read (no /proc, or another user's process hidden by hidepid)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return NOT_RUNNING
    except PermissionError:
        pass  # another user's process: alive
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()  # the name before may hold spaces
    except OSError:
        return START_UNKNOWN
    if fields[0] == "Z":
        return NOT_RUNNING
    return int(fields[19])  # field 22 of proc(5)


def _export_into(weights: str | Path, target: str, out_dir: Path, size: tuple[int, int] | None, dynamic_batch: bool,
                 calib: int, calib_config: str | Path | None = None,
                 calib_paths: list[Path] | None = None,
                 loaded: tuple[Segmenter, CheckpointInfo] | None = None) -> dict[str, Path]:
    from drywallqa.export.onnx_export import export_onnx
    from drywallqa.train.checkpoint import load_weights

    model, info = loaded if loaded is not None else load_weights(weights)
    size = tuple(size or info.input_size)
    stem = Path(weights).stem
    meta = build_metadata(info, embed_dim=int(model.prompt_embeddings.shape[1]), input_size=size,
                          dynamic_batch=dynamic_batch, model_name=stem)
    meta.extra[WEIGHTS_HASH_KEY] = file_sha256(Path(weights))
    out: dict[str, Path] = {}
    onnx_path = export_onnx(model, meta, out_dir / f"{stem}.onnx", dynamic_batch=dynamic_batch)
    out["onnx"] = onnx_path
    if target in ("openvino", "all"):
        from drywallqa.export.calibration import calibration_set
        from drywallqa.export.openvino_export import export_openvino, quantize_int8

        out["openvino_fp16"] = export_openvino(onnx_path, out_dir / f"{stem}_fp16.xml", meta, fp16=True)
        if calib > 0:
            images, source = calibration_set(calib, size, calib_config, calib_paths)
            out["openvino_int8"] = quantize_int8(onnx_path, out_dir / f"{stem}_int8.xml", meta, images, source)
    if target in ("jetson", "all"):
        from drywallqa.export.jetson import make_jetson_onnx

        static = onnx_path
        if dynamic_batch:
            static = export_onnx(model, meta, out_dir / INTERMEDIATE_DIR / f"{stem}_static.onnx", dynamic_batch=False)
        out["jetson_onnx"] = make_jetson_onnx(static, out_dir / f"{stem}_jetson_fp16.onnx")
        out["jetson_metadata"] = out["jetson_onnx"].with_suffix(".json")  # build_engine.sh binds it to the engine
    return out


def export_family(stem: str) -> list[str]:
    """Every file an export of weights `stem` may write, any target, and the engine export/build_engine.sh builds
    from its Jetson ONNX by default."""
    return [f"{stem}.onnx", f"{stem}_fp16.xml", f"{stem}_int8.xml", f"{stem}_jetson_fp16.onnx", f"{stem}.engine",
            f"{stem}.plan"]


def stale_siblings(out_dir: str | Path, made: dict[str, Path]) -> list[str]:
    """The files in `out_dir` of the same model name as this export's `made` files, not remade by it, that are another
    model than they are: made from other weights, or with another decision rule, vocabulary or input size (an
    earlier export with another --target; an engine built before). Each as 'name (what differs)'. A device given one
    of them would run the old model, so the export says so."""
    from drywallqa.edge.backends import read_metadata

    out_dir = Path(out_dir)
    reference = read_metadata(made["onnx"])
    made_names = {p.name for p in made.values()}
    stale = []
    for name in export_family(made["onnx"].stem):
        path = out_dir / name
        if name in made_names or not path.is_file():
            continue
        why = _how_it_differs(reference, path)
        if why:
            stale.append(f"{name} ({why})")
    return stale


def _how_it_differs(reference: ModelMetadata, path: Path) -> str:
    from drywallqa.contract import InvalidModelError, ModelMetadata
    from drywallqa.edge.backends import TENSORRT_SUFFIXES, read_metadata

    try:
        if path.suffix in TENSORRT_SUFFIXES:  # the metadata build_engine.sh wrote beside it, taken from its ONNX
            sidecar = path.with_suffix(".json")
            if not sidecar.is_file():
                return ""  # built by hand: nothing tells what it was built from
            other = ModelMetadata.from_json(sidecar.read_text(encoding="utf-8"), source=str(sidecar))
        else:
            other = read_metadata(path)
    except (InvalidModelError, OSError, ValueError) as exc:
        return f"its metadata cannot be read: {str(exc).splitlines()[0][:200]}"
    fields = [f for f in CONTRACT_FIELDS if getattr(reference, f) != getattr(other, f)]
    if (reference.input.height, reference.input.width) != (other.input.height, other.input.width):
        fields.append("input size")
    ours, theirs = reference.extra.get(WEIGHTS_HASH_KEY), other.extra.get(WEIGHTS_HASH_KEY)
    if not fields and ours and theirs and ours != theirs:  # an older DrywallQA's export does not say: its contract tells
        fields.append("made from other weights")
    return ", ".join(fields)
