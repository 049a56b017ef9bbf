"""Output folders are checked before any work: a run that can't write its results should stop at once,
not after minutes of inference."""

from __future__ import annotations

import tempfile
from pathlib import Path


class OutputDirError(OSError):
    """An output folder that cannot be created or written; the message says why."""


def ensure_writable_dir(path: str | Path) -> Path:
    """Create `path` if needed and prove it takes a file; raise OutputDirError otherwise."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError as exc:
        raise OutputDirError(f"cannot use {path} as the output folder: a file of that name exists") from exc
    except NotADirectoryError as exc:
        raise OutputDirError(f"cannot create the output folder {path}: part of that path is a file") from exc
    except OSError as exc:
        raise OutputDirError(f"cannot create the output folder {path}: {exc.strerror or exc}") from exc
    try:
        with tempfile.NamedTemporaryFile(dir=path, prefix=".drywallqa-write-check-"):
            pass
    except OSError as exc:
        raise OutputDirError(f"cannot write to the output folder {path}: {exc.strerror or exc}") from exc
    return path
