"""Write a safetensors file readable like any other file the user makes."""

from __future__ import annotations

import os
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_safetensors(tensors: dict, path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """safetensors writes a private temporary file and renames it, so its files come out mode 0600 whatever the
    umask: a model trained by one user (or by a service account) could not be read by the edge service or a
    colleague. Give it the mode any new file gets (0666 less the umask, usually 0644)."""
    from safetensors.torch import save_file

    path = Path(path)
    save_file(tensors, str(path), metadata=metadata)
    path.chmod(0o666 & ~_umask())
    return path
