"""Files replaced whole and durably: a crash or power cut leaves the old content or the new, never a torn or empty
file."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


def replace_durably(path: Path, data: bytes) -> None:
    """Write `data` to a staging file beside `path`, fsync it, rename it over `path`, fsync the folder (the rename
    itself durable, where the file system allows). Without the fsync a power cut after the rename can leave `path`
    empty. A failed write (a full disk) removes the staging file and leaves `path` as it was; raises OSError."""
    tmp = path.with_name(f"{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise
    with contextlib.suppress(OSError):
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
