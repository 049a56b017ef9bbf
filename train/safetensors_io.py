"""Write a safetensors file readable like any other file the user makes."""

from __future__ import annotations

import os
from pathlib import Path


def _umask() -> int:
    """The process umask, read without changing it where Linux reports it (os.umask can only read by
    setting, which would briefly give another thread's new files mode 0666)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_safetensors(tensors: dict, path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """safetensors writes a private temporary file and renames it, so its files come out mode 0600 whatever the
    umask: a model trained by one user (or by a service account) could not be read by the edge service or a
    colleague. Give a new file the mode any new file gets (0666 less the umask, usually 0644); a rewritten one
    keeps its own."""
    from safetensors.torch import save_file

    path = Path(path)
    try:
        mode = path.stat().st_mode & 0o777  # a file rewritten in place (set_thresholds) keeps its mode
    except FileNotFoundError:
        mode = 0o666 & ~_umask()
    save_file(tensors, str(path), metadata=metadata)
    path.chmod(mode)
    return path
