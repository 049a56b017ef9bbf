"""Training interrupted and resumed: the schedule and random streams go on where they were, under torchrun too;
a full disk or an unwritable folder is one clear line and leaves the last checkpoint as it was; a killed torchrun
launcher takes its workers with it."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from drywallqa.train.trainer import TrainConfig, TrainError, lr_at, step_progress, train  # noqa: E402
from drywallqa.train.training_data import InMemoryData  # noqa: E402
from tests._train_fixtures import random_embeddings, tiny_train_config, write_synthetic_cache  # noqa: E402


def _config(tmp_path: Path, **changes) -> TrainConfig:
    cfg = TrainConfig.from_yaml(tiny_train_config(tmp_path / "cfg.yaml", tmp_path / "out.safetensors",
                                                  tmp_path / "runs"))
    return dataclasses.replace(cfg, **changes)


def _train(tmp_path: Path, cfg: TrainConfig, log=lambda _: None) -> Path:
    """In-process training on the synthetic cache (written once), with the vocabulary's random embeddings."""
    cache = tmp_path / "cache"
    if not cache.exists():
        write_synthetic_cache(cache)
    data = InMemoryData.from_cache(cache, 64, "train")
    vocab, emb, _ = random_embeddings()
    torch.set_num_threads(1)
    return train(cfg, data, None, emb, list(vocab.all_prompts), "random", vocab=vocab, log=log)


def _log(tmp_path: Path, name: str = "tiny") -> list[dict]:
    return [json.loads(line) for line in (tmp_path / "runs" / name / "log.jsonl").read_text().splitlines()]


def _interrupt_at(line_start: str):
    """A log function that stops the run like Ctrl-C when a line starting with `line_start` is printed
    (the epoch line comes before that epoch's checkpoint)."""
    def log(line: str) -> None:
        if line.startswith(line_start):
            raise KeyboardInterrupt
    return log


def _cli(cfg_path: Path, cache: Path, torchrun: bool = False, args: tuple[str, ...] = (),
         limit_file_bytes: int | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "drywallqa.train.cli", "--config", str(cfg_path), "--cache", str(cache), *args]
    if torchrun:
        launcher = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
        cmd = [launcher, "--standalone", "--nproc_per_node", "2", *cmd[1:]]

    def limit() -> None:  # a full disk, as a process sees it: writes past the limit fail (EFBIG)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_file_bytes, limit_file_bytes))

    return subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          timeout=600, preexec_fn=limit if limit_file_bytes else None)


def test_resume_with_another_batch_size_keeps_the_schedule_at_its_epoch(tmp_path):
    """Resumed with other steps per epoch (another batch size, or torchrun after one process), the cosine stands
    where a run at the new size stands after the finished epochs, not where the old step count would put it."""
    cfg = _config(tmp_path, epochs=4, max_steps_per_epoch=None)  # 8 images, batch 2: 4 steps an epoch
    with pytest.raises(KeyboardInterrupt):
        _train(tmp_path, cfg, log=_interrupt_at("[tiny] epoch 2/4"))
    assert [r["epoch"] for r in _log(tmp_path)] == [1]
    lines: list[str] = []
    _train(tmp_path, dataclasses.replace(cfg, batch_size=4), log=lines.append)  # 2 steps an epoch
    assert any("resumed from" in line and "at epoch 1/4" in line and "batch_size 2 -> 4" in line for line in lines)
    log = _log(tmp_path)
    assert [r["epoch"] for r in log] == [1, 2, 3, 4]
    # an epoch's lr is that of its last step; at batch 4 epoch e ends at step 2e - 1 of 8
    expected = [lr_at(2 * e - 1, cfg.lr, cfg.warmup_steps, step_progress(2 * e - 1, 8, cfg.warmup_steps))
                for e in (2, 3, 4)]
    assert [r["lr"] for r in log[1:]] == pytest.approx(expected)


def test_a_time_budgeted_run_goes_on_when_asked_for_more_epochs(tmp_path):
    """In a time-budgeted run `epochs` is a cap: a run that stopped at its cap continues when it is raised."""
    cfg = _config(tmp_path, epochs=1, time_budget_s=3600.0)
    _train(tmp_path, cfg)
    assert [r["epoch"] for r in _log(tmp_path)] == [1]
    lines: list[str] = []
    _train(tmp_path, dataclasses.replace(cfg, epochs=3), log=lines.append)
    assert [r["epoch"] for r in _log(tmp_path)] == [1, 2, 3]
    assert any("at epoch 1/3" in line for line in lines)


def test_a_checkpoint_of_another_architecture_is_refused_by_name(tmp_path):
    _train(tmp_path, _config(tmp_path, epochs=1))
    last = tmp_path / "runs" / "tiny" / "last.pt"
    before = last.read_bytes()
    with pytest.raises(TrainError, match="holds a effnet_lite0_fpn model and this config trains hrnet_w18"):
        _train(tmp_path, _config(tmp_path, epochs=2, architecture="hrnet_w18"))
    assert last.read_bytes() == before


@pytest.mark.slow  # four processes that each load torch and the text encoder
def test_a_full_disk_while_checkpointing_is_one_line_and_keeps_the_last_checkpoint(tmp_path):
    write_synthetic_cache(tmp_path / "cache")
    cfg_path = tiny_train_config(tmp_path / "cfg.yaml", tmp_path / "out.safetensors", tmp_path / "runs", epochs=1)
    assert _cli(cfg_path, tmp_path / "cache").returncode == 0
    last, out = tmp_path / "runs" / "tiny" / "last.pt", tmp_path / "out.safetensors"
    saved, weights = last.read_bytes(), out.read_bytes()
    # epoch 2 trains, then its checkpoint does not fit
    res = _cli(cfg_path, tmp_path / "cache", args=("--epochs", "2"), limit_file_bytes=1 << 20)
    assert res.returncode == 2, res.stderr[-2000:]
    assert "cannot write checkpoint" in res.stderr and "is left as it was" in res.stderr
    assert "Traceback" not in res.stderr
    assert last.read_bytes() == saved and sorted(p.name for p in last.parent.iterdir()) == ["last.pt", "log.jsonl"]
    # the finished run asked again: only its weights are written, and they do not fit either
    res = _cli(cfg_path, tmp_path / "cache", limit_file_bytes=1 << 20)
    assert res.returncode == 2, res.stderr[-2000:]
    assert "cannot write the weights" in res.stderr and "Traceback" not in res.stderr
    assert out.read_bytes() == weights and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    # with room again the run goes on from the checkpoint that was kept
    res = _cli(cfg_path, tmp_path / "cache", args=("--epochs", "2"))
    assert res.returncode == 0 and "resumed from" in res.stdout, res.stderr[-2000:]
    assert [r["epoch"] for r in _log(tmp_path)] == [1, 2]


def test_a_run_folder_or_output_folder_that_cannot_be_written_is_refused_before_training(tmp_path):
    write_synthetic_cache(tmp_path / "cache")
    (tmp_path / "afile").write_text("not a folder")
    cfg_path = tiny_train_config(tmp_path / "cfg.yaml", tmp_path / "out.safetensors", tmp_path / "afile" / "runs")
    res = _cli(cfg_path, tmp_path / "cache")
    assert res.returncode == 2 and "cannot write the runs folder" in res.stderr, res.stderr[-2000:]
    assert "Traceback" not in res.stderr and "text encoder" not in res.stdout  # nothing was loaded first
    cfg = _config(tmp_path, output=str(tmp_path / "afile" / "out.safetensors"))
    with pytest.raises(TrainError, match="cannot write the folder of the output weights"):
        _train(tmp_path, cfg)
    assert not (tmp_path / "runs" / "tiny" / "last.pt").exists()  # refused before the first epoch


def _head_config(tmp_path: Path) -> TrainConfig:
    from drywallqa.train.checkpoint import CheckpointInfo, save_weights
    from drywallqa.train.models.segmenter import build_segmenter

    vocab, emb, cls = random_embeddings()
    torch.manual_seed(0)
    info = CheckpointInfo("hrnet_w18", "hrnet", list(vocab.classes), vocab.all_prompts, cls.tolist(), "random",
                          {c: 0.5 for c in vocab.classes}, (64, 64))
    init = save_weights(build_segmenter("hrnet_w18", emb, cls, 2), info, tmp_path / "init.safetensors")
    return _config(tmp_path, name="head", architecture="hrnet_w18", profile="hrnet", frozen_encoder=True,
                   init_weights=str(init), max_steps_per_epoch=1, log_every=1)


def test_a_head_finetune_checkpoint_cut_short_is_named_and_left_alone(tmp_path):
    from drywallqa.train.head_finetune import finetune_head

    write_synthetic_cache(tmp_path / "cache")
    data = InMemoryData.from_cache(tmp_path / "cache", 64, "train")
    cfg = _head_config(tmp_path)
    torch.set_num_threads(1)
    finetune_head(cfg, data, None, log=lambda _: None)
    run = tmp_path / "runs" / "head"
    last = run / "last.pt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])  # killed mid-write by the old code
    cut = last.read_bytes()
    with pytest.raises(TrainError, match="cannot resume from .*last.pt.*move it away"):
        finetune_head(cfg, data, None, log=lambda _: None)
    assert last.read_bytes() == cut
    last.unlink()
    (run / "features" / "done.json").write_text('{"done": 4, "ke')  # the feature cache's record cut short
    lines: list[str] = []
    finetune_head(cfg, data, None, log=lines.append)
    assert any(line.startswith("feature cache 8/8") for line in lines)  # rebuilt, not a crash


def test_a_head_finetune_under_torchrun_is_refused(tmp_path):
    """Every process of a torchrun job would build the same feature cache and write the same checkpoint."""
    write_synthetic_cache(tmp_path / "cache")
    cfg_path = tmp_path / "head.yaml"
    cfg = _head_config(tmp_path)
    cfg_path.write_text("\n".join(f"{k}: {json.dumps(v)}" for k, v in dataclasses.asdict(cfg).items()
                                  if k in ("name", "architecture", "profile", "output", "runs_dir", "frozen_encoder",
                                           "init_weights", "cache_size", "crop", "batch_size")) + "\n")
    env = {**os.environ, "WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}  # what torchrun gives each process
    res = subprocess.run([sys.executable, "-m", "drywallqa.train.cli", "--config", str(cfg_path), "--cache",
                          str(tmp_path / "cache")], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 2 and "runs in one process" in res.stderr, res.stderr[-2000:]
    assert not (tmp_path / "runs" / "head").exists()


@pytest.mark.slow
def test_torchrun_resume_goes_on_with_each_ranks_own_random_stream(tmp_path):
    """Two epochs straight and one epoch + a resumed second give the same weights under torchrun: each rank
    resumes its own augmentation and prompt draws (rank 1 used to replay rank 0's). Only rank 0 reports."""
    from safetensors.torch import load_file

    write_synthetic_cache(tmp_path / "cache")
    results = {}
    for name, sessions in (("straight", [2]), ("resumed", [1, 2])):
        folder = tmp_path / name
        folder.mkdir()
        # all in warm-up: the lr does not depend on the planned epochs, so both runs follow one schedule
        cfg_path = tiny_train_config(folder / "cfg.yaml", folder / "out.safetensors", folder / "runs", epochs=1)
        cfg_path.write_text(cfg_path.read_text().replace("warmup_steps: 2", "warmup_steps: 100"))
        for epochs in sessions:
            res = _cli(cfg_path, tmp_path / "cache", torchrun=True, args=("--epochs", str(epochs)))
            assert res.returncode == 0, res.stderr[-3000:]
        results[name] = (folder, res.stdout)
    (straight, _), (resumed, stdout) = results["straight"], results["resumed"]
    assert stdout.count("resumed from") == 1
    assert _log(straight) == [{**r, "epoch_s": r2["epoch_s"]} for r, r2 in zip(_log(resumed), _log(straight),
                                                                                 strict=True)]
    a, b = (load_file(folder / "out.safetensors") for folder in (straight, resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_checkpoint_without_random_state_resumes_with_a_fresh_seed():
    """A checkpoint of another tool (model, optimizer, state, but no rng_* keys) is no KeyError."""
    from drywallqa.train.run_state import restore_rng

    restore_rng({}, 0, torch.device("cpu"), seed=3, step=7)
    first = torch.rand(4)
    restore_rng({}, 0, torch.device("cpu"), seed=3, step=7)
    assert torch.equal(first, torch.rand(4))  # seeded from seed, rank and step: reproducible


_CHILD = """
import os, signal, sys, time
from drywallqa.train.worker_lifetime import end_with_parent
signal.signal(signal.SIGTERM, signal.default_int_handler)  # as train/cli.py does
parent, late, marker = int(sys.argv[1]), sys.argv[2] == "late", sys.argv[3]
try:
    while late and os.getppid() == parent:  # the launcher dies before the worker asks to follow it
        time.sleep(0.02)
    print(end_with_parent(parent), flush=True)
    time.sleep(120)
except KeyboardInterrupt:  # SIGTERM, handled as the training CLI handles it
    open(marker, "w").write("interrupted")
    sys.exit(130)
"""
_PARENT = """
import os, subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", sys.argv[1], str(os.getpid()), *sys.argv[2:]])
print(child.pid, flush=True)
time.sleep(120)
"""


def _gone(pid: int, within_s: float) -> bool:
    """Whether process `pid` has ended (a zombie no one reaped has ended too) within `within_s` seconds."""
    deadline = time.monotonic() + within_s
    while True:
        try:
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                return True
        except (FileNotFoundError, ProcessLookupError):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
@pytest.mark.parametrize("late", [False, True], ids=["launcher-killed", "launcher-gone-before-the-request"])
def test_a_worker_ends_when_its_launcher_is_killed(tmp_path, late):
    """A real launcher process is SIGKILLed; its worker (LOCAL_RANK set, as torchrun sets it) gets SIGTERM and
    ends through the CLI's interruption path, also when the launcher was gone before the worker asked."""
    marker = tmp_path / "interrupted"
    env = {**os.environ, "LOCAL_RANK": "0"}
    parent = subprocess.Popen([sys.executable, "-c", _PARENT, _CHILD, "late" if late else "now", str(marker)],
                              stdout=subprocess.PIPE, text=True, env=env, start_new_session=True)
    try:
        child = int(parent.stdout.readline())
        if not late:
            assert parent.stdout.readline().strip() == "True"  # the request is made, the worker sleeps on
        parent.kill()
        parent.wait()
        assert _gone(child, within_s=10), "the worker outlived its launcher"
        assert marker.read_text() == "interrupted"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(parent.pid, signal.SIGKILL)  # the worker too, should it have outlived the launcher
        parent.stdout.close()


def test_outside_torchrun_no_parent_death_signal_is_asked_for(monkeypatch):
    from drywallqa.train.worker_lifetime import end_with_parent

    for name in ("LOCAL_RANK", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(name, raising=False)
    assert end_with_parent() is False  # a plain `drywallqa train` (nohup, systemd) is left as it was


def _children(pid: int) -> list[int]:
    """The processes whose parent is `pid` (from /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            pass
    return found


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_torchrun_workers_stop_when_the_launcher_is_killed_and_keep_the_checkpoint(tmp_path):
    write_synthetic_cache(tmp_path / "cache")
    cfg_path = tiny_train_config(tmp_path / "cfg.yaml", tmp_path / "out.safetensors", tmp_path / "runs",
                                 epochs=100_000)
    launcher = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    proc = subprocess.Popen([launcher, "--standalone", "--nproc_per_node", "2", "-m", "drywallqa.train.cli",
                             "--config", str(cfg_path), "--cache", str(tmp_path / "cache")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True)
    log, workers = tmp_path / "runs" / "tiny" / "log.jsonl", []
    try:
        deadline = time.monotonic() + 240
        while not (log.exists() and len(log.read_text().splitlines()) >= 2):  # training, checkpoints written
            assert proc.poll() is None and time.monotonic() < deadline, "training did not start"
            time.sleep(0.2)
        workers = _children(proc.pid)
        assert len(workers) == 2
        proc.kill()
        proc.wait()
        assert all(_gone(pid, within_s=20) for pid in workers), "workers outlived torchrun"
    finally:
        proc.kill()
        proc.wait()
        for pid in workers:  # torchrun starts each worker in a session of its own: not in proc's group
            if not _gone(pid, within_s=0):
                os.kill(pid, signal.SIGKILL)
    last = tmp_path / "runs" / "tiny" / "last.pt"
    assert torch.load(last, weights_only=False)["state"]["epoch"] >= 2  # whole, the run resumes from it
    assert not last.with_name("last.pt.tmp").exists()
