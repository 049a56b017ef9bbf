"""Work that used to be done twice is done once: the calibration photos listed once per export, each weights file
loaded once per bench, a crack's length measured without a full-size distance map, SIGTERM handled by one helper."""

from __future__ import annotations

import argparse
import signal

import numpy as np
import pytest

from drywallqa.export.random_weights import write_random_weights


def _parse(argv: list[str]) -> argparse.Namespace:
    from drywallqa.export import cli

    parser = argparse.ArgumentParser(prog="drywallqa")
    cli.register(parser.add_subparsers(dest="command"))
    return parser.parse_args(argv)


def _counting(monkeypatch: pytest.MonkeyPatch, module, name: str) -> list[int]:
    """Replace module.name with a wrapper that calls the real one and counts the calls (in the returned list)."""
    real, calls = getattr(module, name), []

    def wrapper(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapper)
    return calls


def _calibrations(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, str]]:
    """(calibration images, their source) of every INT8 calibration set made, by the real calibration_set."""
    from drywallqa.export import calibration

    real, made = calibration.calibration_set, []

    def wrapper(*args, **kwargs):
        images, source = real(*args, **kwargs)
        made.append((len(images), source))
        return images, source

    monkeypatch.setattr(calibration, "calibration_set", wrapper)
    return made


def test_export_lists_the_calibration_photos_of_its_config_once(tmp_path, monkeypatch):
    """--calib-config is checked before the export (an empty config stops it early) and that same list of photos
    is what INT8 is calibrated on: the data folders are globbed once, not once per use."""
    from _foundation_fixtures import small_project

    from drywallqa.cli import main
    from drywallqa.train.data import prepare

    data = small_project(tmp_path / "site", n_crack=3, n_wall=3)
    assert main(["data", "split", "--config", str(data)]) == 0
    weights = write_random_weights(tmp_path / "w.safetensors", "effnet_lite0_fpn", (64, 64))
    listings = _counting(monkeypatch, prepare, "collect_records")
    calibrations = _calibrations(monkeypatch)
    args = _parse(["export", "--weights", str(weights), "--target", "openvino", "--out", str(tmp_path / "m"),
                   "--calib", "4", "--calib-config", str(data)])
    assert args.func(args) == 0
    assert len(listings) == 1
    ((count, source),) = calibrations  # calibrated on the config's photos, the list made by the early check
    assert count > 0 and source.startswith("data.yaml train split, ")
    assert (tmp_path / "m" / "w_int8.xml").is_file()


class _Stop(Exception):
    """Ends the bench after its export, before any timing worker runs."""


def test_bench_loads_each_weights_file_once(tmp_path, monkeypatch):
    """The bench loads every file up front (a file that is not a checkpoint stops it before any measurement); the
    export then takes that model over instead of reading and rebuilding it again."""
    from drywallqa.export import bench
    from drywallqa.train import checkpoint

    weights = write_random_weights(tmp_path / "w.safetensors", "effnet_lite0_fpn", (64, 64))

    def fake_worker(job: dict, workdir, threads: int) -> dict:
        if job["job"] == "matmul":
            return {"gflops": 1.0}
        raise _Stop

    monkeypatch.setattr(bench, "run_worker", fake_worker)
    monkeypatch.setattr(bench, "load_sources", lambda: ([np.zeros((*bench.SOURCE_HW, 3), np.uint8)], "synthetic"))
    loads = _counting(monkeypatch, checkpoint, "load_weights")
    work = tmp_path / "work"
    args = _parse(["bench", "--weights", str(weights), "--size", "64", "64", "--calib", "1",
                   "--workdir", str(work), "--json", str(tmp_path / "b.json")])
    with pytest.raises(_Stop):
        args.func(args)
    assert len(loads) == 1
    assert (work / "w_64x64" / "w_int8.xml").is_file()  # the export did run, on the model loaded up front


def test_bench_exports_the_file_as_it_is_now_when_it_changed_since_it_was_checked(tmp_path):
    """Review: the files are loaded up front and a later model's export comes minutes later. A weights file rewritten
    meanwhile (a training run) must be exported as it is now, since made_from.json records its size and mtime then:
    the model loaded earlier is not taken over."""
    import onnxruntime as ort

    from drywallqa.export import bench
    from drywallqa.export.pipeline import run_export

    weights = write_random_weights(tmp_path / "w.safetensors", "effnet_lite0_fpn", (32, 32), seed=0)
    checked = bench.load_checked([weights])
    write_random_weights(weights, "effnet_lite0_fpn", (32, 32), seed=1)  # rewritten meanwhile: other weights
    made = bench.prepare_artifacts(weights, (32, 32), 1, tmp_path / "work", loaded=checked[weights])["onnx"]
    now = run_export(weights, "onnx", tmp_path / "now", size=(32, 32))["onnx"]
    image = np.random.default_rng(0).integers(0, 256, (1, 32, 32, 3), dtype=np.uint8)

    def probs(path):
        return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"image": image})[0]

    np.testing.assert_allclose(probs(made), probs(now), atol=1e-5)


MEASURE_LARGE_CRACK = """
import json, tracemalloc
import cv2, numpy as np
from drywallqa.findings import measure

h, w = 6000, 8000
mask = np.zeros((h, w), np.uint8)
cv2.line(mask, (500, 1000), (7500, 1000), 255, 15)  # 7000 px long, 15 px wide: a crack upsampled ~15x
cv2.line(mask, (4000, 1500), (4000, 5500), 255, 15)  # 4000 px long
probs = np.zeros((h, w), np.float32)  # made before tracing: measure's inputs are not its allocations
tracemalloc.start()
length = measure(mask, probs)[4]
peak = tracemalloc.get_traced_memory()[1]
tracemalloc.stop()
print(json.dumps({"length": length, "peak": peak, "pixels": h * w}))
"""


def test_crack_length_of_a_large_photo_is_measured_shrunk_within_a_few_percent():
    """A 48 MP mask: the length is right (a horizontal and a vertical crack, so both axes' scales count) and no
    full-size float32 map (the distance transform's, 4 bytes a pixel) is made on the way. Measured in a process of
    its own: tracemalloc stopped while other threads of the test session allocate (numpy tracks its buffers with it)
    can crash Python 3.11 (CPython gh-128679, fixed in 3.12 and 3.13 only)."""
    import json
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", MEASURE_LARGE_CRACK], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout.splitlines()[-1])
    assert got["length"] == pytest.approx(7000 + 4000, rel=0.03)
    assert got["peak"] < 4 * got["pixels"]


SIGTERM_INSIDE_ONLY = """
import signal, threading
from drywallqa.train.interrupts import sigterm_as_interrupt

seen = []
signal.signal(signal.SIGTERM, lambda signum, _frame: seen.append(signum))
try:
    with sigterm_as_interrupt():
        signal.raise_signal(signal.SIGTERM)
    print("no interrupt")
except KeyboardInterrupt:
    print("interrupted inside")
signal.raise_signal(signal.SIGTERM)  # outside: the previous handler again
print("outside", seen == [signal.SIGTERM])
errors = []

def off_main():
    try:
        with sigterm_as_interrupt():  # Python cannot set handlers here: a no-op, not a ValueError
            pass
    except BaseException as exc:
        errors.append(exc)

t = threading.Thread(target=off_main)
t.start()
t.join()
print("off main thread", errors == [])
"""


def test_sigterm_is_an_interrupt_inside_the_helper_only():
    """In a process of its own: a real SIGTERM raised inside the pytest process, after the whole suite has loaded
    its libraries, ended the run with a segmentation fault here (never alone, never in a plain process)."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", SIGTERM_INSIDE_ONLY], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split("\n")[:3] == ["interrupted inside", "outside True", "off main thread True"], proc.stdout


class _Started(Exception):
    """Stands in for training: run_from_args got as far as asking to end with its launcher."""


def test_training_takes_sigterm_as_an_interrupt_and_gives_the_handler_back(monkeypatch):
    """`drywallqa train` stops on SIGTERM like Ctrl-C from before end_with_parent (whose SIGTERM, for a torchrun
    worker orphaned already, must meet that handler) and, returning, leaves the process's handler as it was."""
    from drywallqa.train import cli, worker_lifetime

    during: list[object] = []

    def fake_end_with_parent() -> bool:
        during.append(signal.getsignal(signal.SIGTERM))
        raise _Started

    monkeypatch.setattr(worker_lifetime, "end_with_parent", fake_end_with_parent)

    def mine(_signum, _frame) -> None:
        return None

    previous = signal.signal(signal.SIGTERM, mine)
    try:
        with pytest.raises(_Started):
            cli.run_from_args(argparse.Namespace())
        assert during == [signal.default_int_handler]
        assert signal.getsignal(signal.SIGTERM) is mine
    finally:
        signal.signal(signal.SIGTERM, previous)
