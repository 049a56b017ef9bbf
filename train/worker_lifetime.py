"""A torchrun worker ends with its launcher: a launcher killed with SIGKILL cannot stop its workers, which would
otherwise go on training (and holding the GPU) as orphans."""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def end_with_parent(parent: int | None = None) -> bool:
    """Under torchrun on Linux, have the kernel send this process SIGTERM when its parent (the launcher) dies.

    SIGTERM then ends the worker as any SIGTERM does (train/cli.py: like Ctrl-C; checkpoints are written whole
    or not at all). `parent` is the launcher's pid, read as early as possible (default: now). A parent that died
    before the request was made sends nothing, so that case gets the same SIGTERM here. Returns whether the
    request was made: not outside torchrun (LOCAL_RANK / TORCHELASTIC_RUN_ID unset) nor off Linux.
    """
    if not sys.platform.startswith("linux") or not {"LOCAL_RANK", "TORCHELASTIC_RUN_ID"} & os.environ.keys():
        return False
    parent = os.getppid() if parent is None else parent
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):  # no prctl in this C library
        return False
    if os.getppid() != parent:  # orphaned already (re-parented to init or a subreaper)
        os.kill(os.getpid(), signal.SIGTERM)
    return True
