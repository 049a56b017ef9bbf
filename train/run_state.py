"""A training run's files under runs/<name>/: checked before any work, checkpoints written whole or not at all,
and the random state of every process, so that a resumed run goes on as an uninterrupted one would."""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist


class TrainError(ValueError):
    """Training cannot start or go on (a bad config value, a checkpoint that cannot be resumed); the message
    says what to change. Nothing is written when this is raised."""


# Settings whose change on resume only matters to the record: not reported as a change of the run.
_BOOKKEEPING = ("output", "runs_dir", "extra", "log_every", "val_every", "val_batch", "val_limit_per_class")


def writable_folder(folder: str | Path, what: str) -> Path:
    """Create `folder` and prove a file can be written there, before hours of work depend on it."""
    folder = Path(folder)
    probe = folder / f".write-test-{os.getpid()}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise TrainError(f"cannot write the {what} {folder}: {exc.strerror or exc}; give a folder this user can "
                         f"write to") from exc
    return folder


def save_atomic(payload: dict, path: Path) -> None:
    """torch.save to a temporary file, then rename: a kill or a full disk leaves the previous file as it was.
    A failed write removes its partial temporary file (it would only take space on a full disk)."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    except BaseException as exc:  # Ctrl-C too: no partial file stays behind
        tmp.unlink(missing_ok=True)
        if not isinstance(exc, OSError | RuntimeError):  # torch reports a short write as RuntimeError
            raise
        kept = f"{path} is left as it was" if path.exists() else f"no {path.name} was written"
        raise TrainError(f"cannot write checkpoint {path}: {type(exc).__name__}: {str(exc)[:200]} (disk full? "
                         f"folder not writable?); {kept}") from exc


def load_checkpoint(path: Path, device: torch.device, run_name: str) -> dict:
    """The checkpoint at `path`, or TrainError naming it (truncated, foreign): it is never overwritten silently."""
    try:
        ckpt = torch.load(path, map_location=device, weights_only=False)
        if not isinstance(ckpt, dict):
            raise TypeError(f"holds a {type(ckpt).__name__}, not a training checkpoint")
        return ckpt
    except Exception as exc:
        raise cannot_resume(path, run_name, f"{type(exc).__name__}: {str(exc)[:300]}") from exc


def cannot_resume(path: Path, run_name: str, why: str) -> TrainError:
    return TrainError(f"cannot resume from {path}: {why}. It is left as it is; move it away to start run "
                      f"{run_name!r} again, or give this run another name")


def changed_settings(saved: dict, now: dict) -> list[str]:
    """'key old -> new' for every training setting that differs from the checkpoint's config."""
    return [f"{k} {saved[k]!r} -> {now[k]!r}" for k in now
            if k not in _BOOKKEEPING and k in saved and _plain(saved[k]) != _plain(now[k])]


def _plain(value):
    return list(value) if isinstance(value, tuple) else value


def rng_states(world: int, device: torch.device) -> list[dict]:
    """Every process's random generator states, in rank order (one collective under DDP: call it on all ranks).
    Augmentation and prompt sampling draw from them, on the CPU and, when training there, on the GPU."""
    own = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        own["cuda"] = torch.cuda.get_rng_state(device)
    if world == 1:
        return [own]
    states: list = [None] * world
    dist.all_gather_object(states, own)
    return states


def restore_rng(ckpt: dict, rank: int, device: torch.device, seed: int, step: int) -> None:
    """This rank's saved generator state; a rank the checkpoint has none for (it was written by fewer processes)
    gets a fresh seed of its own rather than replaying the random draws it made at the start of the run."""
    states = ckpt.get("rng_ranks") or ([{"cpu": ckpt["rng_cpu"]}] if "rng_cpu" in ckpt else [])  # older: rank 0's
    if rank >= len(states):
        torch.manual_seed(seed + rank + 1_000_003 * (step + 1))  # also seeds every CUDA device
        return
    torch.set_rng_state(states[rank]["cpu"].cpu())  # map_location moved it to the training device
    if device.type == "cuda" and "cuda" in states[rank]:
        torch.cuda.set_rng_state(states[rank]["cuda"].cpu(), device)
