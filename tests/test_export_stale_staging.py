"""Staging folders left in the output folder by exports killed outright (SIGKILL, the OOM killer, a power cut),
which cannot clean up after themselves: the next export removes them, and never one of an export still running."""

from __future__ import annotations

import os
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from drywallqa.cli import main
from drywallqa.export.pipeline import STAGING_PREFIX, _host_tag, _pid_namespace, _process_start
from drywallqa.export.random_weights import write_random_weights

ROOT = Path(__file__).resolve().parents[1]

# `drywallqa export` whose ONNX export, once its file is in the staging folder, says so and then waits: an export
# caught mid-way, to be killed (or left running) by the test.
PAUSE_ONCE_STAGED = (
    "import sys, time\n"
    "import drywallqa.export.onnx_export as onnx_export\n"
    "export_onnx = onnx_export.export_onnx\n"
    "def export_then_wait(*args, **kwargs):\n"
    "    path = export_onnx(*args, **kwargs)\n"
    "    print(path, flush=True)\n"
    "    time.sleep(600)\n"
    "onnx_export.export_onnx = export_then_wait\n"
    "from drywallqa.cli import main\n"
    "sys.exit(main(sys.argv[1:]))\n"
)


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    return write_random_weights(tmp_path_factory.mktemp("w") / "w.safetensors", "effnet_lite0_fpn", (64, 64))


def _export(weights: Path, out: Path) -> None:
    assert main(["export", "--weights", str(weights), "--target", "onnx", "--size", "64", "64", "--out", str(out)]) == 0


def _start_paused_export(weights: Path, out: Path, log: Path, wrapper: tuple[str, ...] = ()) -> subprocess.Popen:
    cmd = [*wrapper, sys.executable, "-c", PAUSE_ONCE_STAGED, "export", "--weights", str(weights), "--target",
           "onnx", "--size", "64", "64", "--out", str(out)]
    with log.open("w") as stderr:  # a file, not a pipe nobody reads that could fill and stall the export
        return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=stderr, text=True)


def _staged_folder(proc: subprocess.Popen, log: Path) -> Path:
    """The staging folder of a paused export, once its ONNX is written there."""
    ready, _, _ = select.select([proc.stdout], [], [], 300)
    line = proc.stdout.readline() if ready else ""
    assert line, log.read_text()[-2000:]
    staged = Path(line.strip())
    assert staged.is_file() and staged.parent.name.startswith(STAGING_PREFIX), staged
    return staged.parent


def test_the_next_export_removes_what_a_killed_export_left_and_keeps_a_running_ones(weights, tmp_path):
    """Before: the staging folder (a hidden .export-* with a half-made set) of an export killed with SIGKILL stayed
    in the models folder for good, one more at each such kill."""
    out = tmp_path / "models"
    killed_log, running_log = tmp_path / "killed.log", tmp_path / "running.log"
    killed, running = _start_paused_export(weights, out, killed_log), _start_paused_export(weights, out, running_log)
    try:
        killed_staging, running_staging = _staged_folder(killed, killed_log), _staged_folder(running, running_log)
        killed.send_signal(signal.SIGKILL)
        assert killed.wait(timeout=60) == -signal.SIGKILL
        assert killed_staging.is_dir()  # what SIGKILL leaves
        _export(weights, out)
        assert not killed_staging.exists()
        assert sorted(p.name for p in out.iterdir()) == sorted([running_staging.name, "w.onnx"])
        assert (running_staging / "w.onnx").is_file()  # the running export's half-made set is untouched
        assert running.poll() is None
    finally:
        for proc in (killed, running):
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
            proc.communicate(timeout=60)


def _a_dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", ""])
    proc.wait(timeout=60)
    return proc.pid  # reaped: no process has it now (pids are not reused that fast)


def test_staging_folders_are_judged_by_their_owner_and_age(weights, tmp_path):
    """Folders as dead, reused-pid, other-machine, other-namespace and older-DrywallQA exports name them, all made
    for real."""
    out = tmp_path / "models"
    namespace, me = _pid_namespace(), os.getpid()
    host = _host_tag(namespace)
    other_host = format(int(host, 16) ^ 1, "08x")
    other_namespace = _host_tag(str(int(namespace) + 1) if namespace and namespace.isdigit() else "4026531999")
    unknown_namespace = _host_tag(None)  # an export on this host that could not read its PID namespace
    day_old = time.time() - 25 * 3600
    folders = {
        f"{STAGING_PREFIX}{host}-{_a_dead_pid()}-12345-abc": False,  # its process is gone
        f"{STAGING_PREFIX}{host}-{me}-{_process_start(me) + 1}-abc": False,  # its pid is now another process's
        f"{STAGING_PREFIX}{host}-{me}-{_process_start(me)}-abc": True,  # this process: still running
        f"{STAGING_PREFIX}{other_host}-{_a_dead_pid()}-12345-abc": True,  # another machine: cannot be told
        # A container on the host network (same host name, own pids): its pid means nothing here.
        f"{STAGING_PREFIX}{other_namespace}-{_a_dead_pid()}-12345-abc": True,
        f"{STAGING_PREFIX}{other_namespace}-{me}-{_process_start(me) + 1}-abc": True,
        f"{STAGING_PREFIX}{unknown_namespace}-{_a_dead_pid()}-12345-now": True,
        f"{STAGING_PREFIX}{unknown_namespace}-{_a_dead_pid()}-12345-day": False,
        f"{STAGING_PREFIX}old_day": False,  # an older DrywallQA's, a day old
        f"{STAGING_PREFIX}old_now": True,  # an older DrywallQA's, maybe running
    }
    for name in folders:
        (out / name).mkdir(parents=True)
        (out / name / "w.onnx").write_bytes(b"half-made")
    for name in folders:
        if name.endswith("day"):
            os.utime(out / name, (day_old, day_old))
    _export(weights, out)
    kept = {name for name in folders if (out / name).is_dir()}
    assert kept == {name for name, keep in folders.items() if keep}
    assert (out / "w.onnx").stat().st_size > len(b"half-made")


def _in_new_pid_namespace() -> tuple[str, ...]:
    """A command prefix that runs a command as pid 1 of a PID namespace of its own, with its own /proc, like a
    container on the host network (same host name); the test is skipped where that is not allowed."""
    wrapper = ("unshare", "--pid", "--fork", "--mount-proc", "--kill-child")
    if shutil.which("unshare") is None:
        pytest.skip("needs unshare (util-linux)")
    probe = subprocess.run([*wrapper, "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot make a PID namespace here: {probe.stderr.strip()}")
    return wrapper


def test_an_export_in_another_pid_namespace_is_left_alone(weights, tmp_path):
    """Before: an export in a container on the host network (same host name, its own pids) named its folder with
    its pid there, 1 here; an export on the host found pid 1 to be another process (init) and deleted the running
    export's staging folder mid-way. Now the PID namespace is part of the host tag: another namespace's folder
    counts as another machine's."""
    out = tmp_path / "models"
    log = tmp_path / "contained.log"
    contained = _start_paused_export(weights, out, log, _in_new_pid_namespace())
    try:
        staging = _staged_folder(contained, log)
        _export(weights, out)
        assert (staging / "w.onnx").is_file(), sorted(p.name for p in out.iterdir())
        assert contained.poll() is None
    finally:
        if contained.poll() is None:
            contained.send_signal(signal.SIGKILL)  # unshare --kill-child takes its child along
        contained.communicate(timeout=60)


# `drywallqa export` that stops inside the ONNX trace, once the traced file is written: killed there, the export
# can clean up nothing.
PAUSE_IN_TRACE = (
    "import sys, time, torch.onnx\n"
    "trace = torch.onnx.export\n"
    "def trace_then_wait(model, args, f, *a, **kw):\n"
    "    trace(model, args, f, *a, **kw)\n"
    "    print(f, flush=True)\n"
    "    time.sleep(600)\n"
    "torch.onnx.export = trace_then_wait\n"
    "from drywallqa.cli import main\n"
    "sys.exit(main(sys.argv[1:]))\n"
)


def test_an_export_killed_mid_trace_leaves_nothing_in_the_system_temp_folder(weights, tmp_path):
    """Before: the traced graph went to a folder in the system temp folder, which an export killed outright left
    there for good (tens of MB each for hrnet). Now it is written inside the staging folder, which the next
    export removes."""
    out, temp = tmp_path / "models", tmp_path / "systemtmp"
    temp.mkdir()
    log = tmp_path / "killed.log"
    cmd = [sys.executable, "-c", PAUSE_IN_TRACE, "export", "--weights", str(weights), "--target", "onnx", "--size",
           "64", "64", "--out", str(out)]
    with log.open("w") as stderr:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=stderr, text=True,
                                env={**os.environ, "TMPDIR": str(temp)})
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 300)
        traced = Path(proc.stdout.readline().strip()) if ready else None
        assert traced is not None and traced.is_file(), log.read_text()[-2000:]
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=60) == -signal.SIGKILL
        staging = next(p for p in traced.parents if p.name.startswith(STAGING_PREFIX))
        assert staging.parent == out
        assert list(temp.iterdir()) == []
        _export(weights, out)
        assert sorted(p.name for p in out.iterdir()) == ["w.onnx"]
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
