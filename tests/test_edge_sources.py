"""Frame sources and the capture thread: newest-frame handover, corrupt frames, reopen after loss or stall."""

from __future__ import annotations

import http.server
import json
import os
import resource
import shutil
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from _edge_helpers import make_video, run_as_nobody
from _mqtt_fixtures import wait_until

from drywallqa.edge.capture import Capture
from drywallqa.edge.sources import (
    DemoSource,
    FrameSource,
    ImageListSource,
    check_source_exists,
    classify_uri,
    make_source,
)


def _drain(cap: Capture, seconds: float) -> list:
    frames, deadline = [], time.monotonic() + seconds
    while time.monotonic() < deadline:
        f = cap.get(0.1)
        if f is not None:
            frames.append(f)
        elif cap.finished:
            break
    return frames


def test_classify_uri(tmp_path):
    assert classify_uri("demo") == "demo"
    assert classify_uri("0") == classify_uri("/dev/video3") == "camera"
    # the stable names udev gives a camera: a camera that is late at boot, not a missing video file
    by_id = "/dev/v4l/by-id/usb-Logitech_HD_Webcam_C615-video-index0"
    assert classify_uri(by_id) == classify_uri("/dev/v4l/by-path/pci-0000:00:14.0-usb-0:1:1.0-video-index0") == "camera"
    check_source_exists(by_id)  # no SourceError: cameras are retried, not refused at start
    assert classify_uri("rtsp://cam/stream") == classify_uri("http://cam/mjpg") == "stream"
    assert classify_uri(str(tmp_path)) == classify_uri(str(tmp_path / "*.jpg")) == "images"
    assert classify_uri(str(tmp_path / "a.mp4")) == "file"


def test_demo_source_frames():
    src = DemoSource((60, 80))
    src.open()
    a, b = src.read(), src.read()
    assert a.shape == (60, 80, 3) and a.dtype == np.uint8 and not np.array_equal(a, b)


def test_folder_with_corrupt_images_counts_and_skips(tmp_path):
    for i in range(4):
        cv2.imwrite(str(tmp_path / f"{i}_ok.jpg"), np.full((32, 48, 3), 60 * i, np.uint8))
    (tmp_path / "1_bad.jpg").write_bytes(b"\xff\xd8not a jpeg at all")
    (tmp_path / "2_trunc.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    cap = Capture(ImageListSource(str(tmp_path)), realtime=False).start()
    frames = _drain(cap, 10)
    cap.stop()
    assert len(frames) == 4 and cap.stats.corrupt == 2 and cap.stats.state == "ended"
    assert [f.frame_id for f in frames] == [0, 1, 2, 3]


def test_realtime_hands_over_newest_and_counts_drops(tmp_path):
    video = make_video(tmp_path / "v.avi", 40, fps=100.0)
    cap = Capture(make_source(str(video)), realtime=True).start()  # paced at 100 fps: outruns the consumer
    got = []
    while not cap.finished:
        f = cap.get(0.5)
        if f is not None:
            got.append(f.frame_id)
            time.sleep(0.05)
    cap.stop()
    assert cap.stats.captured == 40 and cap.stats.dropped == 40 - len(got) > 0
    assert got == sorted(got)  # never an older frame after a newer one


def test_video_file_that_disappears_is_reopened(tmp_path):
    video = make_video(tmp_path / "v.avi", 10)
    backup = tmp_path / "backup.avi"
    shutil.copy(video, backup)
    states: list[str] = []
    cap = Capture(make_source(str(video)), realtime=False, loop=True, fps=50, reconnect_min_s=0.1,
                  reconnect_max_s=0.3, on_state=states.append).start()
    assert len(_drain(cap, 0.5)) > 0
    video.unlink()
    assert wait_until(lambda: (cap.get(0.05), cap.stats.state)[1] == "reconnecting", 10)
    assert "video file" in cap.stats.last_error
    shutil.copy(backup, video)  # a copy may be caught half written: not openable yet, but new, so it is retried
    assert wait_until(lambda: cap.get(0.1) is not None and cap.stats.state == "open", 10)
    cap.stop()
    assert cap.stats.reopens >= 1 and "reconnecting" in states
    assert cap.stats.last_error == "", cap.stats  # frames flow again: before, the old error stayed for good


def _zero_a_frame(video: Path, index: int) -> None:
    """Overwrite the start of one MJPEG frame of `video` with zeros, as a bad sector leaves it (the file keeps its
    size and its index: only that frame cannot be decoded)."""
    data = bytearray(video.read_bytes())
    starts = [i for i in range(len(data) - 1) if data[i] == 0xFF and data[i + 1] == 0xD8]  # JPEG start markers
    data[starts[index]:starts[index] + 200] = bytes(200)
    video.write_bytes(bytes(data))


def test_video_file_with_an_undecodable_frame_skips_it_and_plays_on(tmp_path):
    """OpenCV's grab() fails on one undecodable MJPEG frame and reads on after it. Before, that failed grab was
    taken for the end of the file: the run stopped there ('source ended', exit 0) and the rest went unseen."""
    video = make_video(tmp_path / "v.avi", 12)
    reference = [f.image for f in _drain(Capture(make_source(str(video)), realtime=False).start(), 10)]
    _zero_a_frame(video, 5)
    cap = Capture(make_source(str(video)), realtime=False).start()
    frames = _drain(cap, 10)
    cap.stop()
    assert cap.stats.state == "ended" and cap.stats.corrupt == 1 and cap.stats.reopens == 0, cap.stats
    assert len(frames) == 11 and [f.frame_id for f in frames] == list(range(11))
    assert all(np.array_equal(f.image, r) for f, r in zip(frames, reference[:5] + reference[6:], strict=True))


def test_video_file_cut_short_says_so(tmp_path):
    video = make_video(tmp_path / "v.avi", 30)
    data = video.read_bytes()
    video.write_bytes(data[: len(data) // 2])  # a copy that broke off half way
    cap = Capture(make_source(str(video)), realtime=False).start()
    frames = _drain(cap, 10)
    cap.stop()
    assert 0 < len(frames) < 20 and cap.stats.state == "ended"
    assert "cut short" in cap.stats.last_error and "of the 30 frames" in cap.stats.last_error, cap.stats
    whole = make_video(tmp_path / "whole.avi", 30)  # a whole file ends without complaint
    cap = Capture(make_source(str(whole)), realtime=False).start()
    assert len(_drain(cap, 10)) == 30
    cap.stop()
    assert cap.stats.last_error == "" and cap.stats.corrupt == 0


def test_looping_a_source_with_no_readable_frame_backs_off_instead_of_spinning(tmp_path):
    """`loop: true` on a folder whose images are all corrupt, or on a video with no frame yet: before, the source
    was restarted at once, forever, one warning per pass: thousands of log lines a second and a core at 100 %."""
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "broken.jpg").write_bytes(b"\xff\xd8not a jpeg")
    empty = tmp_path / "empty.avi"
    cv2.VideoWriter(str(empty), cv2.VideoWriter_fourcc(*"MJPG"), 10.0, (64, 48)).release()  # a header, no frame
    for source in (ImageListSource(str(folder)), make_source(str(empty))):
        cap = Capture(source, realtime=False, loop=True, reconnect_min_s=0.2, reconnect_max_s=0.4).start()
        assert _drain(cap, 1.5) == []
        cap.stop()
        assert cap.stats.corrupt <= 10 and cap.stats.reopens <= 10, cap.stats
        assert "not one frame could be read" in cap.stats.last_error, cap.stats


class _MjpegHandler(http.server.BaseHTTPRequestHandler):
    """An MJPEG stream of grey frames. `frame(first, sent)` gives each frame's JPEG bytes, or None to stall (the
    connection held open, nothing sent). Here: the first connection sends 5 frames, then stalls; later ones send
    frames forever."""

    connections = 0
    stop = threading.Event()
    period_s = 0.05
    good = cv2.imencode(".jpg", np.full((48, 64, 3), 128, np.uint8))[1].tobytes()

    def log_message(self, *args) -> None:
        pass

    def frame(self, first: bool, sent: int) -> bytes | None:
        return None if first and sent >= 5 else self.good

    def do_GET(self) -> None:  # noqa: N802
        type(self).connections += 1
        first = type(self).connections == 1
        self.send_response(200)
        self.send_header("Content-Type", "multipart/x-mixed-replace; boundary=frame")
        self.end_headers()
        sent = 0
        try:
            while not self.stop.is_set():
                data = self.frame(first, sent)
                if data is None:
                    self.stop.wait(30)  # stall: keep the socket open, send nothing
                    return
                self.wfile.write(b"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: "
                                 + str(len(data)).encode() + b"\r\n\r\n" + data + b"\r\n")
                sent += 1
                time.sleep(self.period_s)
        except OSError:
            return


@pytest.mark.slow
def test_http_stream_that_stalls_is_reopened():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _MjpegHandler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/stream.mjpg"
    src = make_source(url, timeout_s=2.0)
    cap = Capture(src, realtime=True, stall_timeout_s=2.0, reconnect_min_s=0.2, reconnect_max_s=0.5).start()
    try:
        if not wait_until(lambda: cap.get(0.1) is not None or cap.stats.state == "reconnecting", 15) \
                or cap.stats.captured == 0:
            pytest.skip(f"OpenCV's FFmpeg backend cannot read MJPEG over HTTP here ({cap.stats.last_error})")
        assert wait_until(lambda: (cap.get(0.1), cap.stats.reopens)[1] >= 1, 30), cap.stats
        n = cap.stats.captured
        assert wait_until(lambda: (cap.get(0.1), cap.stats.captured)[1] > n + 3, 15)
        assert _MjpegHandler.connections >= 2
    finally:
        cap.stop(timeout=10)
        _MjpegHandler.stop.set()
        server.shutdown()


class _CorruptingMjpegHandler(_MjpegHandler):
    """Frames forever, every tenth one undecodable (its JPEG data zeroed); the connection stays up."""

    connections = 0
    stop = threading.Event()
    period_s = 0.02

    def frame(self, first: bool, sent: int) -> bytes | None:
        return bytes(len(self.good)) if sent % 10 == 9 else self.good


@pytest.mark.slow
def test_http_stream_with_undecodable_frames_skips_them_without_reconnecting():
    """One bad frame in a live stream is a counted, skipped frame. Before, each one dropped and reopened the
    stream (frames lost while it reconnected, `frames_reopened` counting bad frames, not outages)."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _CorruptingMjpegHandler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/stream.mjpg"
    cap = Capture(make_source(url, timeout_s=2.0), realtime=False, reconnect_min_s=0.2).start()
    try:
        if not wait_until(lambda: cap.get(0.1) is not None or cap.stats.state == "reconnecting", 15) \
                or cap.stats.captured == 0:
            pytest.skip(f"OpenCV's FFmpeg backend cannot read MJPEG over HTTP here ({cap.stats.last_error})")
        assert wait_until(lambda: (cap.get(0.1), cap.stats.corrupt)[1] >= 3, 15), cap.stats
        assert cap.stats.reopens == 0 and _CorruptingMjpegHandler.connections == 1, cap.stats
        assert cap.stats.captured >= 3 * 8
    finally:
        cap.stop(timeout=10)
        _CorruptingMjpegHandler.stop.set()
        server.shutdown()


def test_missing_source_keeps_retrying_without_crash(tmp_path):
    cap = Capture(make_source(str(tmp_path / "missing.mp4")), realtime=True, reconnect_min_s=0.05,
                  reconnect_max_s=0.1).start()
    assert wait_until(lambda: cap.stats.state == "reconnecting", 5)
    assert cap.get(0.3) is None and not cap.finished
    cap.stop()
    assert "not found" in cap.stats.last_error


def test_image_list_reads_rgb(tmp_path: Path):
    bgr = np.zeros((10, 12, 3), np.uint8)
    bgr[..., 2] = 255  # red in BGR
    cv2.imwrite(str(tmp_path / "red.png"), bgr)
    src = ImageListSource(str(tmp_path / "*.png"))
    src.open()
    assert tuple(src.read()[0, 0]) == (255, 0, 0)


class _CountingCamera(FrameSource):
    """A 100 fps live source that counts grabs and decodes (each frame's pixels hold its grab number)."""

    kind = "camera"
    live = True

    def __init__(self) -> None:
        super().__init__("counting")
        self.grabs = 0
        self.decodes = 0

    def open(self) -> None:
        pass

    def read(self) -> np.ndarray:
        self.grab()
        return self.retrieve()

    def grab(self) -> None:
        time.sleep(0.01)
        self.grabs += 1

    def retrieve(self) -> np.ndarray:
        self.decodes += 1
        return np.full((8, 8, 3), self.grabs, np.uint8)


def test_realtime_decodes_only_the_frames_a_slow_consumer_can_take():
    src = _CountingCamera()
    cap = Capture(src, realtime=True).start()
    ages = []
    try:
        for _ in range(20):
            frame = cap.get(timeout=1.0)
            assert frame is not None
            ages.append(src.grabs - int(frame.image[0, 0, 0]))  # frames grabbed since this one
            time.sleep(0.05)  # a model at ~20 fps behind a 100 fps camera
    finally:
        cap.stop()
    # about one decode per frame taken (20), not one per grab (~100; fewer on a loaded machine)
    assert src.decodes <= 35 and src.grabs >= 2 * src.decodes, (src.decodes, src.grabs)
    assert cap.stats.dropped >= src.grabs - src.decodes
    assert sorted(ages)[len(ages) // 2] <= 2  # and what it hands over is still fresh


def test_folder_file_deleted_mid_run_is_skipped_and_a_reopen_does_not_replay(tmp_path):
    from drywallqa.edge.sources import CorruptFrame, EndOfSource

    for i in range(5):
        cv2.imwrite(str(tmp_path / f"f{i}.png"), np.full((8, 8, 3), 40 * i, np.uint8))
    src = ImageListSource(str(tmp_path))
    src.open()
    assert [int(src.read()[0, 0, 0]) for _ in range(2)] == [0, 40]
    (tmp_path / "f2.png").unlink()
    with pytest.raises(CorruptFrame, match="disappeared"):
        src.read()  # one missing file is one skipped frame, not a broken source
    src.close()
    src.open()  # a reopen (after an error) goes on after the last image handed out
    assert int(src.read()[0, 0, 0]) == 120
    assert int(src.read()[0, 0, 0]) == 160
    with pytest.raises(EndOfSource):
        src.read()
    src.open()  # after the end (loop: true) it starts again
    assert int(src.read()[0, 0, 0]) == 0


def test_video_renamed_while_open_still_ends_and_a_reopen_resumes(tmp_path):
    from drywallqa.edge.sources import EndOfSource

    video = make_video(tmp_path / "v.avi", 6)
    src = make_source(str(video))
    src.open()
    first = [src.read() for _ in range(3)]
    src.close()
    src.open()  # reopened after an error: the next frame, not frame 0 again
    fourth = src.read()
    assert not np.array_equal(fourth, first[0]) and not np.array_equal(fourth, first[2])
    video.rename(tmp_path / "moved.avi")  # the open file still reads to its end, and then it has ended
    src.read(), src.read()
    with pytest.raises(EndOfSource):
        src.read()
    src.close()


def test_missing_video_file_is_refused_at_start(tmp_path):
    from drywallqa.edge.sources import SourceError, check_source_exists

    with pytest.raises(SourceError, match="video file not found"):
        check_source_exists(str(tmp_path / "missing.mp4"))
    with pytest.raises(SourceError, match="video file or folder not found"):
        check_source_exists("/dev/vide0")  # a typo of a camera device is a file path that does not exist
    check_source_exists(str(make_video(tmp_path / "v.avi", 2)))  # these may appear later, so they pass:
    for uri in ("demo", "0", "/dev/video9", "rtsp://cam/stream", str(tmp_path / "nofolder" / "*.jpg"),
                f"{tmp_path / 'nofolder'}/"):  # a trailing slash says folder, not a video file
        check_source_exists(uri)
    from drywallqa.edge.sources import classify_uri

    assert classify_uri(f"{tmp_path / 'nofolder'}/") == "images" and classify_uri(str(tmp_path / "nofolder")) == "file"


def test_a_missing_folder_says_so_and_is_read_once_it_appears(tmp_path):
    """Before: 'photos/' that did not exist was taken for a video file ('video file not found'), and a folder
    missing while read said 'no images found in' it, as an empty one does."""
    from drywallqa.edge.sources import ImageListSource, SourceError, make_source

    folder = tmp_path / "photos"
    src = make_source(f"{folder}/")
    assert isinstance(src, ImageListSource)
    with pytest.raises(SourceError, match="folder not found"):
        src.open()
    folder.mkdir()
    with pytest.raises(SourceError, match="no images found"):
        src.open()
    cv2.imwrite(str(folder / "a.png"), np.full((8, 8, 3), 7, np.uint8))
    src.open()
    assert int(src.read()[0, 0, 0]) == 7
    photo = make_source(str(tmp_path / "later.png"))  # one photo, not there yet
    with pytest.raises(SourceError, match="image not found"):
        photo.open()


def test_a_glob_read_once_in_a_missing_folder_names_the_folder(tmp_path):
    """Before: a glob whose folder was not there said 'no images found in' the glob, as an empty folder does, while
    the same glob watched said 'folder not found'. Both now name the missing folder."""
    from drywallqa.edge.sources import SourceError, make_source

    uri = str(tmp_path / "card" / "DCIM" / "*.jpg")
    for watch in (False, True):
        with pytest.raises(SourceError, match=r"folder not found: '.*DCIM' \(of '.*\*\.jpg'\)"):
            make_source(uri, watch=watch).open()
    (tmp_path / "card" / "DCIM").mkdir(parents=True)
    with pytest.raises(SourceError, match="no images found"):
        make_source(uri).open()
    make_source(uri, watch=True).open()  # a watched folder may be empty


def test_watch_takes_a_missing_video_path_for_a_video_file_not_a_folder(tmp_path):
    """Before: with source.watch, a video path not there yet (a drive mounted late) was taken for a folder to watch,
    and then waited for as 'folder not found: .../site.mp4' for ever, even after the file came. It is a video file,
    waited for as one (tests/test_edge_waiting_sources.py): the start check lets it through with watch and refuses it
    without."""
    from drywallqa.edge.sources import (
        CvCaptureSource,
        SourceError,
        check_source_exists,
        classify_uri,
        make_source,
    )

    video = tmp_path / "site.mp4"
    assert classify_uri(str(video), watch=True) == "file"
    assert classify_uri(str(tmp_path / "later"), watch=True) == "images"  # no suffix: a folder to come
    check_source_exists(str(video), watch=True)  # waited for
    with pytest.raises(SourceError, match="video file not found"):
        check_source_exists(str(video), watch=False)
    assert isinstance(make_source(str(video), watch=True), CvCaptureSource)


# -- a source's error once it has recovered ---------------------------------------------------------------------


def test_status_stops_reporting_a_source_error_once_frames_flow_again(tmp_path):
    """A camera that was down and came back: before, `status.last_error` kept saying why it had been down, for as
    long as the device ran. A still-current error keeps its place: while the source is down, its error comes before
    a rejected command."""
    from _edge_helpers import write_config

    from drywallqa.edge.runner import EdgeRunner
    from drywallqa.edge.settings import load_settings

    camera = tmp_path / "camera"
    uri = str(camera / "*.png")
    cfg = write_config(tmp_path / "edge.yaml", uri=uri, model=tmp_path / "m.onnx", port=1, spool=tmp_path / "s.db")
    runner = EdgeRunner(load_settings(cfg))
    runner.capture = Capture(make_source(uri), realtime=False, reconnect_min_s=0.05, reconnect_max_s=0.1).start()
    try:
        assert wait_until(lambda: runner.capture.stats.state == "reconnecting", 5, "the source down")
        runner.last_error = "set_prompts rejected: unknown prompt 'x'"
        assert "folder not found" in runner.status("online").last_error  # what is wrong now comes first
        (tmp_path / "new").mkdir()
        for i in range(3):
            cv2.imwrite(str(tmp_path / "new" / f"{i}.png"), np.full((16, 16, 3), 50 * i, np.uint8))
        (tmp_path / "new").rename(camera)  # all at once: a glob read once is listed when it opens
        assert len(_drain(runner.capture, 10)) == 3
        assert runner.status("online").last_error == "set_prompts rejected: unknown prompt 'x'"
        runner.last_error = ""
        assert runner.status("online").last_error == "", runner.capture.stats
    finally:
        runner.capture.stop()


# -- a video file that cannot be opened -------------------------------------------------------------------------


def _age(path: Path, seconds: float = 600.0) -> Path:
    """Date a file's modification `seconds` back: written long ago, not being copied in now."""
    then = time.time() - seconds
    os.utime(path, (then, then))
    return path


@pytest.mark.parametrize("loop", [False, True])
def test_a_video_file_that_cannot_be_opened_ends_the_source_naming_it(tmp_path, loop):
    """Before, a file that is not a video (or is empty) was reopened for ever, `reconnecting`, with a warning at
    each try. It ends now, with the file and the reason in last_error; with `loop: true` too (a loop restarts a file
    at its end; it does not wait for a broken file to be mended)."""
    notes = tmp_path / "walls.mp4"
    notes.write_text("meeting notes, not a video\n" * 50)
    _age(notes)  # not being copied in: a new file is retried for a few seconds (the next test)
    cap = Capture(make_source(str(notes)), realtime=False, loop=loop, reconnect_min_s=0.05,
                  reconnect_max_s=0.1).start()
    assert wait_until(lambda: cap.finished, 5, "the source ended"), cap.stats
    cap.stop()
    assert cap.stats.state == "ended" and cap.stats.reopens == 0 and cap.get(0.1) is None, cap.stats
    assert str(notes) in cap.stats.last_error and "no video decoder recognises it" in cap.stats.last_error


def test_a_video_file_still_being_written_is_retried_until_it_settles(tmp_path):
    """A file that cannot be opened but changed in the last seconds may still be being copied in: retried, and once
    it has not changed for a while (here: dated back), it ends the source."""
    empty = tmp_path / "walls.avi"
    empty.write_bytes(b"")
    cap = Capture(make_source(str(empty)), realtime=False, reconnect_min_s=0.05, reconnect_max_s=0.1).start()
    try:
        assert wait_until(lambda: cap.stats.state == "reconnecting", 5, "retried while new")
        assert "the file is empty" in cap.stats.last_error and "still be being written" in cap.stats.last_error
        _age(empty)
        assert wait_until(lambda: cap.finished, 5, "the source ended once the file settled"), cap.stats
        assert cap.stats.last_error == f"cannot read video file {str(empty)!r}: the file is empty"
    finally:
        cap.stop()


def test_a_video_file_that_cannot_be_opened_is_refused_at_start(tmp_path):
    from drywallqa.edge.sources import SourceError

    notes = tmp_path / "walls.mp4"
    notes.write_text("not a video")
    _age(notes)
    with pytest.raises(SourceError, match=r"source.uri: cannot read video file .*walls.mp4.*no video decoder"):
        check_source_exists(str(notes))


# -- a watched folder ---------------------------------------------------------------------------------------------


def _photo(path: Path, value: int, age_s: float | None = None) -> Path:
    cv2.imwrite(str(path), np.full((24, 32, 3), value, np.uint8))
    return _age(path, age_s) if age_s is not None else path


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def test_a_watched_folder_hands_out_each_new_image_once_in_order(tmp_path):
    """An inspector's tablet syncs photos into a folder: before, the folder was listed once at the start and the
    source ended, so photos that came later were never seen. Watched, it never ends: every image, old and new, once,
    by modification time then name; one still being written waits until it has stopped changing; hidden files (a
    sync tool's partial downloads) are left alone; waiting for more costs no CPU."""
    from drywallqa.edge.sources import WatchedFolderSource

    folder = tmp_path / "sync"
    folder.mkdir()
    _photo(folder / "b.png", 10, age_s=300)  # older than a.png: first
    _photo(folder / "a.png", 20, age_s=200)
    (folder / "._a.png").write_bytes(b"\x00\x05\x16\x07 macOS metadata")
    states: list[str] = []
    cap = Capture(WatchedFolderSource(str(folder), poll_s=0.1, settle_s=0.5), realtime=False,
                  on_state=states.append).start()
    try:
        got = [int(f.image[0, 0, 0]) for f in _drain(cap, 2)]
        assert got == [10, 20] and cap.stats.state == "waiting" and not cap.finished, (got, cap.stats)
        cpu = _cpu_seconds()
        time.sleep(1.0)
        assert _cpu_seconds() - cpu < 0.3 and cap.get(0.1) is None  # idle: polls, does not spin

        data = cv2.imencode(".png", np.full((24, 32, 3), 30, np.uint8))[1].tobytes()
        with open(folder / "c.png", "wb") as f:  # a slow copy: 1 s of writing, each part sooner than settle_s
            for part in range(10):
                f.write(data[part * len(data) // 10:(part + 1) * len(data) // 10])
                f.flush()
                assert cap.get(0.1) is None, "an image was read while it was being written"
        _photo(folder / "d.png", 40)
        got = [int(f.image[0, 0, 0]) for f in _drain(cap, 3)]
        assert got == [30, 40], got
        assert cap.get(1.0) is None and cap.stats.corrupt == 0 and cap.stats.reopens == 0, cap.stats
        assert states.count("waiting") >= 2 and "ended" not in states
    finally:
        cap.stop()


def test_a_watched_folder_reopened_after_an_error_does_not_replay(tmp_path):
    """The folder of a network share or SD card that goes away and comes back: while it is gone a read is a
    SourceError (reconnected with backoff), also for a glob whose folder is gone, and its empty mount point forgets
    nothing. Before, a read while it was gone listed nothing, no error, and the record of what had been handed out
    was wiped: everything was handed out again when it came back."""
    from drywallqa.edge.sources import NoNewFrame, SourceError, WatchedFolderSource

    folder = tmp_path / "sync"
    folder.mkdir()
    for i in range(2):
        _photo(folder / f"p{i}.png", 10 * i, age_s=100 - i)
    src = WatchedFolderSource(str(folder), poll_s=0.1, settle_s=0.5, forget_s=0.0)
    by_glob = WatchedFolderSource(str(folder / "*.png"), poll_s=0.1, settle_s=0.5, forget_s=0.0)
    src.open()
    by_glob.open()
    assert [int(src.read()[0, 0, 0]) for _ in range(2)] == [0, 10]
    assert [int(by_glob.read()[0, 0, 0]) for _ in range(2)] == [0, 10]
    for s in (src, by_glob):
        with pytest.raises(NoNewFrame):
            s.read()
    moved = folder.rename(tmp_path / "away")
    for s in (src, by_glob):
        with pytest.raises(SourceError, match="folder not found"):
            s.read()
        s.close()
        with pytest.raises(SourceError, match="folder not found"):
            s.open()
    folder.mkdir()  # the share's mount point, empty while it is not mounted
    for s in (src, by_glob):
        s.open()
        with pytest.raises(NoNewFrame):
            s.read()
    folder.rmdir()
    moved.rename(folder)
    _photo(folder / "p2.png", 20, age_s=1)
    for s in (src, by_glob):
        assert int(s.read()[0, 0, 0]) == 20
        with pytest.raises(NoNewFrame):
            s.read()


def test_a_watched_folder_briefly_gone_does_not_replay_its_photos(tmp_path):
    """The same through the capture thread: the folder is gone for several polls, then back; nothing is handed out
    again, the source was reconnected, and its error is cleared once it can be listed again."""
    from drywallqa.edge.sources import WatchedFolderSource

    folder = tmp_path / "sync"
    folder.mkdir()
    _photo(folder / "a.png", 10, age_s=300)
    _photo(folder / "b.png", 20, age_s=200)
    cap = Capture(WatchedFolderSource(str(folder), poll_s=0.1, settle_s=0.5), realtime=False,
                  reconnect_min_s=0.1, reconnect_max_s=0.2).start()
    try:
        assert [int(f.image[0, 0, 0]) for f in _drain(cap, 2.0)] == [10, 20]
        away = folder.rename(tmp_path / "away")  # unmounted / replaced for a moment
        wait_until(lambda: cap.stats.state == "reconnecting", 5, "the source to reconnect")
        assert "folder not found" in cap.stats.last_error
        time.sleep(0.5)  # several tries while it is gone
        away.rename(folder)
        replayed = [int(f.image[0, 0, 0]) for f in _drain(cap, 2.0)]
        assert replayed == [], f"photos handed out again after the folder came back: {replayed}"
        assert cap.stats.state == "waiting" and cap.stats.last_error == "" and cap.stats.reopens >= 1, cap.stats
    finally:
        cap.stop()


def _write_slowly(path: Path, data: bytes, stall_s: float) -> None:
    """A copy that stalls half-way (a Wi-Fi sync) for longer than the settle time."""
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])
        f.flush()
        time.sleep(stall_s)
        f.write(data[len(data) // 2:])


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_a_photo_whose_copy_stalls_waits_for_its_end(tmp_path, suffix):
    """A JPEG without its end marker or a PNG without IEND is a copy still going on: not read while it is young, even
    though it has not changed for longer than the settle time. Before, it was read half-written (corrupt), and never
    read complete."""
    from drywallqa.edge.sources import WatchedFolderSource

    folder = tmp_path / "sync"
    folder.mkdir()
    data = cv2.imencode(suffix, np.full((24, 32, 3), 77, np.uint8))[1].tobytes()
    cap = Capture(WatchedFolderSource(str(folder), poll_s=0.1, settle_s=0.5), realtime=False).start()
    try:
        _write_slowly(folder / f"slow{suffix}", data, 1.5)  # 1.5 s > settle_s here (> 2 s with the defaults)
        got = [int(f.image[0, 0, 0]) for f in _drain(cap, 2.0)]
        assert len(got) == 1 and abs(got[0] - 77) <= 2, f"complete photo not processed once: {got}, {cap.stats}"
        assert cap.stats.corrupt == 0, cap.stats
    finally:
        cap.stop()


def test_a_watched_folder_takes_heic_phone_photos(tmp_path, caplog):
    """An iPhone syncing into the watched folder writes HEIC by default. Before, those photos were not even listed:
    the device looked idle while photos piled up. Each is now read upright (pi-heif); one cut short is skipped as a
    corrupt frame, once, with a log line that names it."""
    from drywallqa.edge.sources import WatchedFolderSource

    heic = Path(__file__).parent / "data" / "synthetic_rotated.heic"
    folder = tmp_path / "sync"
    folder.mkdir()
    shutil.copy(heic, folder / "IMG_0001.HEIC")
    (folder / "IMG_0002.heic").write_bytes(heic.read_bytes()[:400])
    cv2.imwrite(str(folder / "IMG_0003.jpg"), np.full((24, 32, 3), 77, np.uint8))
    cap = Capture(WatchedFolderSource(str(folder), poll_s=0.1, settle_s=0.2), realtime=False).start()
    frames: list = []
    try:  # until both photos and the cut-short one are handled (a loaded CI machine may take a while), then a bit more
        wait_until(lambda: bool(frames.extend(_drain(cap, 0.2))) or (len(frames) >= 2 and cap.stats.corrupt >= 1), 30)
        frames += _drain(cap, 0.5)
        assert sorted(f.image.shape for f in frames) == [(24, 32, 3), (64, 48, 3)] and cap.stats.corrupt == 1, (
            [f.image.shape for f in frames], cap.stats)
    finally:
        cap.stop()
    assert "IMG_0002.heic" in caplog.text and "HEIC/HEIF photo that could not be decoded" in caplog.text


def test_a_photo_read_before_its_copy_finished_is_read_again_complete(tmp_path):
    """What was handed out is remembered by path, size and modification time: a photo read half-written (a format
    without an end marker, or a copy stalled past the wait for one) is read again once it is complete, and so is a
    photo replaced after it was processed. Before, a path once handed out was never read again."""
    from drywallqa.edge.sources import WatchedFolderSource

    folder = tmp_path / "sync"
    folder.mkdir()
    data = cv2.imencode(".bmp", np.full((24, 32, 3), 77, np.uint8))[1].tobytes()
    cap = Capture(WatchedFolderSource(str(folder), poll_s=0.1, settle_s=0.5), realtime=False).start()
    try:
        _write_slowly(folder / "slow.bmp", data, 1.5)
        got = [int(f.image[0, 0, 0]) for f in _drain(cap, 2.0)]
        assert got == [77] and cap.stats.corrupt == 1, f"complete photo never processed: {got}, {cap.stats}"
        _photo(folder / "slow.bmp", 88)  # retaken and synced again under the same name
        assert [int(f.image[0, 0, 0]) for f in _drain(cap, 2.0)] == [88]
        assert cap.get(0.5) is None
    finally:
        cap.stop()


def _record_lines(path: Path) -> list[list]:
    """The record's lines of photos done ([path, size, mtime_ns]; not the attempt lines)."""
    return [item for item in map(json.loads, path.read_text().splitlines()[1:]) if len(item) == 3]


def test_a_watched_folder_goes_on_where_it_stopped_after_a_restart(tmp_path):
    """The record of the photos processed is kept in a file: a new source (the service restarted) hands out only
    what was not done, a photo handed out but never done (in flight when the process died) included, so a crash
    replays at most the photos in flight and loses none. Before, every restart processed the whole folder again."""
    from drywallqa.edge.sources import NoNewFrame, WatchedFolderSource, watch_record_path

    folder = tmp_path / "sync"
    folder.mkdir()
    for i in range(3):
        _photo(folder / f"p{i}.png", 10 * (i + 1), age_s=100 - i)
    record = watch_record_path(tmp_path / "state" / "spool.sqlite", str(folder))
    assert record.parent == tmp_path / "state" and record.name.startswith("spool.watched-")
    assert record != watch_record_path(tmp_path / "state" / "spool.sqlite", str(tmp_path / "other"))

    def started() -> WatchedFolderSource:
        src = WatchedFolderSource(str(folder), poll_s=0.1, settle_s=0.5, record_path=record)
        src.open()
        return src

    src = started()
    assert int(src.read()[0, 0, 0]) == 10
    src.done(src.key)
    assert int(src.read()[0, 0, 0]) == 20  # in flight when the process dies: never done
    assert [p for p, _, _ in _record_lines(record)] == [str(folder / "p0.png")]

    src = started()  # restarted
    got = []
    for _ in range(2):
        got.append(int(src.read()[0, 0, 0]))
        src.done(src.key)
    assert got == [20, 30]
    with pytest.raises(NoNewFrame):
        src.read()
    src.close()
    with pytest.raises(NoNewFrame):
        started().read()

    (folder / "p1.png").unlink()
    _photo(folder / "p1.png", 99, age_s=1)  # replaced since: processed again, once
    src = started()
    assert int(src.read()[0, 0, 0]) == 99
    src.done(src.key)
    with pytest.raises(NoNewFrame):
        started().read()


def test_a_watched_folders_record_stays_as_small_as_the_folder(tmp_path):
    """Photos moved away are forgotten (once missing for forget_s from a listing that holds others), and the record
    file is rewritten without them: it does not grow with every photo ever processed."""
    from drywallqa.edge.sources import NoNewFrame, WatchedFolderSource

    folder = tmp_path / "sync"
    folder.mkdir()
    record = tmp_path / "record.jsonl"
    src = WatchedFolderSource(str(folder), poll_s=0.1, settle_s=0.5, forget_s=0.0, record_path=record)
    src.open()
    for batch in range(4):
        for i in range(50):
            _photo(folder / f"b{batch}_{i:02d}.png", batch + i, age_s=60)
        for _ in range(50):
            src.read()
            src.done(src.key)
        with pytest.raises(NoNewFrame):
            src.read()
        for old in folder.glob(f"b{batch}_*.png"):  # the photos of a batch are archived once processed
            if not old.name.endswith("_49.png"):
                old.unlink()
    _photo(folder / "last.png", 5, age_s=60)
    src.read()
    src.done(src.key)
    lines = record.read_text().splitlines()
    assert len(lines) <= 2 * 5 + 64 + 1, len(lines)  # at most twice the photos still there, plus some slack
    assert {p for p, _, _ in _record_lines(record)} >= {str(p) for p in folder.iterdir()}


def test_a_damaged_watched_folder_record_is_moved_aside_and_does_not_stop_the_source(tmp_path, caplog):
    """A record file that cannot be parsed (a worn SD card) is logged, moved aside for inspection, and a fresh one
    started with what could be read; a last line cut short by a power cut only means that photo is read again."""
    from drywallqa.edge.sources import NoNewFrame, WatchedFolderSource, watch_record_path

    folder = tmp_path / "sync"
    folder.mkdir()
    for i in range(3):
        _photo(folder / f"p{i}.png", 10 * (i + 1), age_s=100 - i)
    record = watch_record_path(tmp_path / "spool.sqlite", str(folder))

    def values(src: WatchedFolderSource) -> list[int]:
        got = []
        while True:
            try:
                got.append(int(src.read()[0, 0, 0]))
            except NoNewFrame:
                return got
            src.done(src.key)

    record.write_bytes(b"\x00\x17\xff garbage \xfe\n")
    src = WatchedFolderSource(str(folder), poll_s=0.1, settle_s=0.5, record_path=record)
    assert src.record_moved_aside is not None and src.record_moved_aside.read_bytes().startswith(b"\x00\x17")
    assert "is damaged" in caplog.text and str(src.record_moved_aside) in caplog.text
    src.open()
    assert values(src) == [10, 20, 30]

    text = [line for i, line in enumerate(record.read_text().splitlines()) if i == 0 or len(json.loads(line)) == 3]
    record.write_text("\n".join(text[:2]) + "\n" + "{not json}\n" + "\n".join(text[2:]) + "\n")  # one bad line
    caplog.clear()
    src = WatchedFolderSource(str(folder), poll_s=0.1, settle_s=0.5, record_path=record)
    assert src.record_moved_aside is not None and "1 line(s)" in caplog.text
    src.open()
    assert values(src) == []  # the lines that could be read are kept

    record.write_text("\n".join(text[:3]) + "\n" + text[3][:10])  # the last line cut by a power cut
    caplog.clear()
    src = WatchedFolderSource(str(folder), poll_s=0.1, settle_s=0.5, record_path=record)
    assert src.record_moved_aside is None and "cut short" in caplog.text
    src.open()
    assert values(src) == [30]
    assert len(_record_lines(record)) == 3 and record.read_text().endswith("\n")


def test_a_watched_folder_refuses_realtime(tmp_path):
    """realtime keeps only the newest frame: with a watched folder it silently skipped photos. The combination is a
    clear ConfigError; a watched folder alone is read in order, every photo."""
    import yaml

    from drywallqa.edge.settings import ConfigError, load_settings

    cfg = tmp_path / "edge.yaml"
    cfg.write_text(yaml.safe_dump({"source": {"uri": str(tmp_path), "watch": True, "realtime": True}}))
    with pytest.raises(ConfigError, match="watch: true and realtime: true cannot go together"):
        load_settings(cfg)
    cfg.write_text(yaml.safe_dump({"source": {"uri": str(tmp_path), "watch": True}}))
    assert load_settings(cfg).source.realtime is None  # the runtime then takes every frame (a folder is not live)


def test_watch_on_a_source_that_is_not_a_folder_is_ignored_with_a_warning(tmp_path, caplog):
    """Before: `--watch` on a camera, a stream or the demo silently did nothing. It is not refused: a device
    configured to watch a folder may be pointed at a camera for a test (`--source /dev/video0`), and watch can only
    be switched on from the command line. On a video file it does something (tests/test_edge_waiting_sources.py:
    waited for while missing or still being copied), and the log says that instead."""
    import logging

    import yaml

    from drywallqa.edge.settings import load_settings
    from drywallqa.edge.sources import CvCaptureSource, DemoSource, WatchedFolderSource

    video = make_video(tmp_path / "v.avi", 2)
    cfg = tmp_path / "edge.yaml"
    for uri, kind in (("demo", "demo"), ("0", "camera"), ("rtsp://cam/s", "stream"), (str(video), "file")):
        cfg.write_text(yaml.safe_dump({"source": {"uri": uri, "watch": True}}))
        assert load_settings(cfg).source.watch
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="drywallqa.edge.sources"):
            src = make_source(uri, watch=True)
        assert isinstance(src, DemoSource if kind == "demo" else CvCaptureSource)
        if kind == "file":
            assert "ignored" not in caplog.text
            continue
        assert f"is a {kind} source, so it is ignored" in caplog.text and repr(uri) in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="drywallqa.edge.sources"):
        assert isinstance(make_source(str(tmp_path), watch=True), WatchedFolderSource)
        make_source("demo")  # without watch: nothing to warn about
    assert "ignored" not in caplog.text


@pytest.mark.slow
def test_edge_run_watch_after_a_kill_goes_on_where_it_stopped(tmp_path):
    """`edge run --watch` killed (-9) mid-folder and started again: the photos whose results were out are not
    processed again, the others are, none lost. Before, every start processed the whole folder again."""
    import signal
    import subprocess

    from _edge_helpers import clean_env, edge_cmd, write_config
    from _mqtt_fixtures import free_port

    from drywallqa.edge.sources import watch_record_path

    lite = Path(__file__).resolve().parents[1] / "models" / "exported" / "lite_effnet_lite0.onnx"
    if not lite.is_file():
        pytest.skip(f"{lite} is not exported")
    folder = tmp_path / "sync"
    folder.mkdir()
    photos = 8
    for i in range(photos):
        _photo(folder / f"p{i}.png", 20 * i, age_s=60 - i)
    spool = tmp_path / "state" / "spool.sqlite"
    cfg = write_config(tmp_path / "edge.yaml", uri=str(folder), model=lite, port=free_port(), spool=spool, rules=[],
                       source={"fps": 3.0})
    record = watch_record_path(spool, str(folder))

    def recorded() -> int:
        return len(_record_lines(record)) if record.exists() else 0

    proc = subprocess.Popen(edge_cmd(cfg, "--watch"), env=clean_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: recorded() >= 2 or proc.poll() is not None, 90)
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    done_before = recorded()
    assert 2 <= done_before < photos
    stats = tmp_path / "stats.json"
    second = subprocess.run(edge_cmd(cfg, "--watch", "--duration", "6", "--stats-json", str(stats)), env=clean_env(),
                            capture_output=True, text=True, timeout=120)
    assert second.returncode == 0, second.stderr[-3000:]
    assert json.loads(stats.read_text())["frames_processed"] == photos - done_before, second.stderr[-3000:]
    assert sorted(p for p, _, _ in _record_lines(record)) == sorted(str(p) for p in folder.iterdir())
    third = subprocess.run(edge_cmd(cfg, "--watch", "--duration", "2", "--stats-json", str(stats)), env=clean_env(),
                           capture_output=True, text=True, timeout=120)
    assert third.returncode == 0 and json.loads(stats.read_text())["frames_processed"] == 0, third.stderr[-3000:]


@pytest.mark.slow
def test_edge_run_watch_processes_photos_that_arrive_until_max_frames(tmp_path):
    """`edge run --source FOLDER --watch --max-frames N`: photos dropped into the folder while it runs are processed,
    and the run ends after N of them (without --watch it would have ended after the photo there at the start)."""
    import subprocess

    from _edge_helpers import clean_env, edge_cmd, write_config
    from _mqtt_fixtures import free_port

    lite = Path(__file__).resolve().parents[1] / "models" / "exported" / "lite_effnet_lite0.onnx"
    if not lite.is_file():
        pytest.skip(f"{lite} is not exported")
    folder = tmp_path / "sync"
    folder.mkdir()
    _photo(folder / "first.png", 60, age_s=60)
    cfg = write_config(tmp_path / "edge.yaml", uri=str(folder), model=lite, port=free_port(),
                       spool=tmp_path / "spool.sqlite", rules=[])
    stats = tmp_path / "stats.json"
    proc = subprocess.Popen(edge_cmd(cfg, "--watch", "--max-frames", "3", "--stats-json", str(stats)),
                            env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(3.0)
        assert proc.poll() is None, proc.communicate()[1][-3000:]  # still watching after the first photo
        for i in range(2):
            _photo(folder / f"later{i}.png", 90 + i)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-3000:]
    assert json.loads(stats.read_text())["frames_processed"] == 3, err[-3000:]


def _watch_values(src) -> list:
    """What a watched source hands out until it has nothing new: each photo's first pixel, 'corrupt' for a skip;
    each photo read is done at once."""
    from drywallqa.edge.sources import CorruptFrame, NoNewFrame

    got: list = []
    while True:
        try:
            got.append(int(src.read()[0, 0, 0]))
        except NoNewFrame:
            return got
        except CorruptFrame:
            got.append("corrupt")
            continue
        src.done(src.key)


def _run_watch_as_nobody(folder: Path, record: Path) -> list:
    """A fresh source (a restart) run to the end of the folder in a forked child that is user 'nobody'."""
    from drywallqa.edge.sources import WatchedFolderSource
    from drywallqa.imageio import read_image_rgb

    read_image_rgb(next(folder.glob("p0.png")))  # PIL's plugins imported before the child drops root

    def watch() -> list:
        src = WatchedFolderSource(str(folder), poll_s=0.1, settle_s=0.5, record_path=record)
        src.open()
        got = _watch_values(src)
        src.close()
        return got

    return run_as_nobody(watch)


@pytest.mark.skipif(os.geteuid() != 0, reason="runs the source as 'nobody' to get a real EACCES")
def test_a_watched_photo_that_cannot_be_opened_for_a_moment_is_not_recorded_done():
    """A transient I/O error on a photo (an SMB share's file still locked by the syncing PC, EIO/ESTALE on a network
    share, an SD card pulled mid-read) is not an undecodable photo: it is skipped for now, not recorded as processed,
    and read once it can be (here after a restart). Here: EACCES for a moment (mode 000, as a non-root reader)."""
    import tempfile

    base = Path(tempfile.mkdtemp(dir="/tmp", prefix="watch-eacces-"))  # pytest's tmp_path is closed to 'nobody'
    try:
        base.chmod(0o777)
        folder = base / "share"
        folder.mkdir()
        folder.chmod(0o755)
        for i in range(3):
            _photo(folder / f"p{i}.png", 10 * (i + 1), age_s=100 - i).chmod(0o644)
        record = base / "spool.watched-x.jsonl"
        (folder / "p1.png").chmod(0o000)  # locked / unreadable for a moment; its size and mtime stay
        assert _run_watch_as_nobody(folder, record) == [10, "corrupt", 30]
        (folder / "p1.png").chmod(0o644)  # readable again (chmod changes ctime only)
        assert _run_watch_as_nobody(folder, record) == [20]
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_a_watched_photo_that_cannot_be_read_is_retried_then_given_up(tmp_path, caplog):
    """An image that fails with an I/O error (here EISDIR: a folder named like a photo, a real OSError for any user)
    is handed out again after a wait that doubles, is not recorded meanwhile (a restart tries it again), and after
    io_attempts failures it is logged and recorded done, so it can neither spin nor block the folder."""
    from drywallqa.edge.sources import WatchedFolderSource

    folder = tmp_path / "sync"
    folder.mkdir()
    _photo(folder / "p0.png", 10, age_s=60)
    (folder / "p1.png").mkdir()
    _age(folder / "p1.png", 50)
    record = tmp_path / "rec.jsonl"

    def source() -> WatchedFolderSource:
        src = WatchedFolderSource(str(folder), poll_s=0.05, settle_s=0.5, retry_s=0.3, io_attempts=3,
                                  record_path=record)
        src.open()
        return src

    src = source()
    assert _watch_values(src) == [10, "corrupt"]
    assert _watch_values(src) == []  # not at once: after retry_s
    src.close()
    assert [p for p, _, _ in _record_lines(record)] == [str(folder / "p0.png")]  # a failed read is not done

    src = source()  # a restart tries it again
    got: list = []
    deadline = time.monotonic() + 10
    while got.count("corrupt") < 3 and time.monotonic() < deadline:
        got += _watch_values(src)
        time.sleep(0.05)
    assert got == ["corrupt"] * 3, got
    assert "could not be read 3 times" in caplog.text and str(folder / "p1.png") in caplog.text
    time.sleep(1.5)
    assert _watch_values(src) == []  # given up: recorded done
    src.close()
    assert str(folder / "p1.png") in [p for p, _, _ in _record_lines(record)]


def test_the_same_folder_spelled_with_a_trailing_slash_keeps_its_record(tmp_path):
    """watch_record_path hashes os.path.abspath(uri), so '/srv/photos' and '/srv/photos/' share one record file, and
    its header's uri is compared the same way: editing the config (or --source) so processes nothing again."""
    from drywallqa.edge.sources import WatchedFolderSource, watch_record_path

    folder = tmp_path / "sync"
    folder.mkdir()
    for i in range(3):
        _photo(folder / f"p{i}.png", 10 * (i + 1), age_s=100 - i)
    spool = tmp_path / "spool.sqlite"
    record = watch_record_path(spool, str(folder))
    assert record == watch_record_path(spool, str(folder) + "/")

    src = WatchedFolderSource(str(folder), poll_s=0.1, settle_s=0.5, record_path=record)
    src.open()
    assert _watch_values(src) == [10, 20, 30]
    src.close()

    src = WatchedFolderSource(str(folder) + "/", poll_s=0.1, settle_s=0.5, record_path=record)
    src.open()
    assert src.record_moved_aside is None and _watch_values(src) == []


@pytest.mark.parametrize("bad_line", ["null", "7", "true", '{"a": 1}', '["p", 1]'])
def test_a_watched_folder_record_line_that_is_json_but_not_an_entry_is_a_damaged_line(tmp_path, bad_line):
    """A line that is JSON but not a [path, size, mtime_ns] list must not raise out of WatchedFolderSource() (the
    service would crash-loop): the record is moved aside like any damaged one."""
    from drywallqa.edge.sources import WatchedFolderSource

    folder = tmp_path / "sync"
    folder.mkdir()
    _photo(folder / "p0.png", 10, age_s=60)
    record = tmp_path / "rec.jsonl"
    record.write_text(json.dumps({"drywallqa-watched": 1, "uri": str(folder)}) + "\n" + bad_line + "\n")
    src = WatchedFolderSource(str(folder), poll_s=0.1, settle_s=0.5, record_path=record)
    assert src.record_moved_aside is not None
    src.open()
    assert _watch_values(src) == [10]


def test_a_glob_over_several_shares_does_not_replay_one_that_was_offline(tmp_path):
    """A glob whose wildcard is a folder (/mnt/tablets/*/*.jpg, one share per tablet): a share that is offline leaves
    the listing non-empty (the other shares), but its photos are not forgotten while their folder is gone, so they
    are not processed again when it is back. (forget_s=0 stands for a share offline past 10 minutes.)"""
    from drywallqa.edge.sources import WatchedFolderSource

    root = tmp_path / "tablets"
    for name, value in (("a", 10), ("b", 20)):
        (root / name).mkdir(parents=True)
        _photo(root / name / f"{name}.png", value, age_s=60)
    uri = str(root / "*" / "*.png")
    src = WatchedFolderSource(uri, poll_s=0.1, settle_s=0.5, forget_s=0.0, record_path=tmp_path / "rec.jsonl")
    src.open()
    assert sorted(_watch_values(src)) == [10, 20]
    (root / "b").rename(tmp_path / "b-offline")  # tablet b's share unmounted
    assert _watch_values(src) == []
    (tmp_path / "b-offline").rename(root / "b")  # back
    assert _watch_values(src) == []
    (root / "a" / "a.png").rename(tmp_path / "a.png")  # a photo gone from a folder that is there: forgotten
    assert _watch_values(src) == []
    (tmp_path / "a.png").rename(root / "a" / "a.png")
    assert _watch_values(src) == [10]


_CRASH_AFTER_ONE_READ = """
import os, signal, sys
from drywallqa.edge.sources import WatchedFolderSource
src = WatchedFolderSource(sys.argv[1], poll_s=0.1, settle_s=0.5, record_path=sys.argv[2])
src.open()
src.read()
os.kill(os.getpid(), signal.SIGKILL)  # the decoder or the model crashed on it, OOM, the watchdog
"""


def test_a_watched_photo_that_kills_the_runtime_every_time_is_skipped_after_three_tries(tmp_path, caplog):
    """A photo that crashes or hangs the runtime each time it is processed would be taken first after every restart
    and block the folder for ever: each hand-out is journalled, and one taken by 3 runs that all died with it is
    skipped at the next start, logged naming it and reported (given_up). A compaction of the record keeps the count;
    a photo read but not processed at a clean close is not counted."""
    import subprocess
    import sys

    from drywallqa.edge.sources import WatchedFolderSource

    folder = tmp_path / "sync"
    folder.mkdir()
    _photo(folder / "p0.png", 10, age_s=60)  # the killer: oldest, so taken first
    _photo(folder / "p1.png", 20, age_s=50)
    record = tmp_path / "rec.jsonl"

    def source() -> WatchedFolderSource:
        src = WatchedFolderSource(str(folder), poll_s=0.1, settle_s=0.5, record_path=record)
        src.open()
        return src

    src = source()  # taken, then a clean stop before it was processed: no crash, not counted
    src.read()
    src.close()
    for run in range(3):
        if run == 2:
            with record.open("a") as f:
                f.write('["half a li')  # a torn last line: the record is rewritten (compacted) at load
        crash = subprocess.run([sys.executable, "-c", _CRASH_AFTER_ONE_READ, str(folder), str(record)],
                               capture_output=True, text=True, timeout=60)
        assert crash.returncode == -9, crash.stderr[-2000:]
    caplog.clear()
    src = source()
    assert src.given_up == [str(folder / "p0.png")] and src.record_moved_aside is None
    assert "skipped" in caplog.text and str(folder / "p0.png") in caplog.text
    assert _watch_values(src) == [20]
    src.close()
    src = source()  # recorded done: skipped silently from now on
    assert src.given_up == [] and _watch_values(src) == []


def test_a_photo_skipped_for_stopping_the_runtime_is_named_in_last_error(tmp_path):
    from _edge_helpers import write_config
    from _mqtt_fixtures import free_port

    from drywallqa.edge.runner import EdgeRunner
    from drywallqa.edge.settings import load_settings
    from drywallqa.edge.sources import WATCH_MAX_ATTEMPTS, watch_record_path

    lite = Path(__file__).resolve().parents[1] / "models" / "exported" / "lite_effnet_lite0.onnx"
    if not lite.is_file():
        pytest.skip(f"{lite} is not exported")
    folder = tmp_path / "sync"
    folder.mkdir()
    photo = _photo(folder / "huge.png", 10, age_s=60)
    st = photo.stat()
    spool = tmp_path / "state" / "spool.sqlite"
    record = watch_record_path(spool, str(folder))
    record.parent.mkdir()
    record.write_text(json.dumps({"drywallqa-watched": 1, "uri": str(folder)}) + "\n"
                      + (json.dumps([str(photo), st.st_size, st.st_mtime_ns, "attempt"]) + "\n") * WATCH_MAX_ATTEMPTS)
    cfg = write_config(tmp_path / "edge.yaml", uri=str(folder), model=lite, port=free_port(), spool=spool,
                       source={"watch": True})
    runner = EdgeRunner(load_settings(cfg)).setup()
    try:
        last_error = runner.status("online").last_error
        assert "skipped 1 photo(s)" in last_error and str(photo) in last_error, last_error
    finally:
        runner.shutdown()


def test_a_damaged_watch_record_is_named_in_last_error(tmp_path):
    """The runner reports what the source found wrong at start (here a watched folder's record moved aside)
    through FrameSource.start_notice, which every source has."""
    from _edge_helpers import write_config
    from _mqtt_fixtures import free_port

    from drywallqa.edge.runner import EdgeRunner
    from drywallqa.edge.settings import load_settings
    from drywallqa.edge.sources import watch_record_path

    lite = Path(__file__).resolve().parents[1] / "models" / "exported" / "lite_effnet_lite0.onnx"
    if not lite.is_file():
        pytest.skip(f"{lite} is not exported")
    folder = tmp_path / "sync"
    folder.mkdir()
    spool = tmp_path / "state" / "spool.sqlite"
    record = watch_record_path(spool, str(folder))
    record.parent.mkdir()
    record.write_bytes(b"\x00\x17\xff garbage \xfe\n")
    cfg = write_config(tmp_path / "edge.yaml", uri=str(folder), model=lite, port=free_port(), spool=spool,
                       source={"watch": True})
    runner = EdgeRunner(load_settings(cfg)).setup()
    try:
        last_error = runner.status("online").last_error
        assert "watched-folder record was damaged: moved aside to" in last_error, last_error
        assert runner.capture is not None and runner.capture.source.ongoing_error == ""
    finally:
        runner.shutdown()
