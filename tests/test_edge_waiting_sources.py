"""Sources that are waited for: a watched video file not there yet (a USB drive mounted late at boot; a folder that
does not exist is a config error, a name with a typo gets a 'did you mean'), a watched folder's record under another
spelling of its path, and float TIFFs (thermal / HDR pipelines) read as RGB uint8."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from _edge_helpers import make_video, start_edge, write_config
from _mqtt_fixtures import Collector, mosquitto_fixture, wait_until

from drywallqa.edge.capture import Capture
from drywallqa.edge.settings import ConfigError
from drywallqa.edge.sources import (
    CvCaptureSource,
    EndOfSource,
    NoNewFrame,
    SourceConfigError,
    SourceError,
    WatchedFolderSource,
    _may_be_mounted_later,
    check_source_exists,
    make_source,
    watch_record_path,
)
from drywallqa.imageio import ImageReadError, read_image_rgb

mosquitto = pytest.fixture(mosquitto_fixture, name="mosquitto")


def _drain(cap: Capture, timeout: float) -> list:
    frames, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline and not cap.finished:
        frame = cap.get(timeout=0.2)
        if frame is not None:
            frames.append(frame)
            cap.done(frame)
    return frames


def _arrive(video: Path, frames: int) -> Path:
    """The video written beside its place, then renamed into it: there all at once, as on a drive just mounted."""
    make_video(video.with_name("incoming.avi"), frames)
    _settled(video.with_name("incoming.avi"))  # written long ago, e.g. on the drive's own camera
    os.replace(video.with_name("incoming.avi"), video)
    return video


def _settled(path: Path) -> None:
    os.utime(path, (time.time() - 60, time.time() - 60))


# -- a watched video file not there yet ------------------------------------------------------------------------


def test_a_watched_video_file_not_there_yet_is_waited_for_then_played(tmp_path):
    """Before: with source.watch, a video file not there yet (/mnt/usb/site.mp4, the drive mounted late) made
    `edge run` exit 1 at start, and systemd's start limit soon left the service failed. The user asked to wait: it
    is waited for (reconnecting, last_error naming the file), then played once it is there. Without watch, a missing
    video file still stops the start (a typo). Its folder is there (an empty mount point): a folder that is not is
    a configuration error, see below."""
    video = tmp_path / "usb" / "site.avi"
    video.parent.mkdir()
    with pytest.raises(SourceError, match="video file not found"):
        check_source_exists(str(video))
    check_source_exists(str(video), watch=True)  # no SourceError: waited for
    src = make_source(str(video), watch=True)
    assert isinstance(src, CvCaptureSource) and src.kind == "file"
    cap = Capture(src, realtime=False, reconnect_min_s=0.05, reconnect_max_s=0.2).start()
    try:
        wait_until(lambda: cap.stats.state == "reconnecting" and str(video) in cap.stats.last_error, 5,
                   "the source waiting for the video file")
        assert "not found" in cap.stats.last_error and "waiting for it to appear" in cap.stats.last_error
        assert not cap.finished
        _arrive(video, 6)
        frames = _drain(cap, 10)
        assert len(frames) == 6 and frames[0].image.shape == (120, 160, 3)
        assert cap.stats.state == "ended" and cap.stats.last_error == ""  # played to its end; the wait is over
    finally:
        cap.stop()


def test_a_watched_video_still_being_copied_is_played_whole_once_it_settles(tmp_path):
    """Review: a watched video file that appears while it is still being copied (its header complete, its frames
    not) was played up to the copied part and then ended for good (no loop: `edge run` exits 0 and systemd does not
    restart it), the rest never analysed. It is opened only once it has not changed for FILE_SETTLE_S, and an end
    while it still changes is a pause: the source reopens later and goes on from the frame it stopped at."""
    whole = make_video(tmp_path / "whole.avi", 60).read_bytes()
    video = tmp_path / "site.avi"
    video.write_bytes(whole[: len(whole) // 2])  # half copied, changed just now
    src = make_source(str(video), watch=True)
    with pytest.raises(SourceError, match="changed 0 s ago: opened once it has not changed"):
        src.open()
    _settled(video)  # the copy stalled long enough to look finished: it is opened
    src.open()
    read = 0
    with pytest.raises(SourceError, match="it may still be being copied; going on from frame"):
        while True:
            src.read()
            read += 1
            if read == 10:
                os.utime(video)  # meanwhile the copy goes on: the file changes
    assert 0 < read < 60
    video.write_bytes(whole)  # the copy completes
    _settled(video)
    src.open()  # reopened: on from where it stopped, not from the start
    rest = 0
    with pytest.raises(EndOfSource) as end:
        while True:
            src.read()
            rest += 1
    assert read + rest == 60 and end.value.problem == ""
    src.close()


def test_check_config_accepts_a_watched_video_file_not_there_yet(tmp_path):
    cfg = tmp_path / "edge.yaml"
    for watch, code in ((True, 0), (False, 78)):  # 78: EX_CONFIG, as before without watch
        cfg.write_text(f"source: {{uri: {tmp_path / 'site.mp4'}, watch: {str(watch).lower()}}}\n"
                       f"mqtt: {{embedded_broker: never, port: 1}}\nspool: {{path: {tmp_path / 's.sqlite'}}}\n")
        env = {k: v for k, v in os.environ.items() if not k.startswith("DRYWALLQA_") and k != "NOTIFY_SOCKET"}
        proc = subprocess.run([sys.executable, "-m", "drywallqa.edge", "check-config", "--config", str(cfg)],
                              env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == code, (watch, proc.stderr[-2000:])
        said = "waiting for it to appear (source.watch: true)" if watch else "source.uri: video file not found"
        assert said in proc.stderr, proc.stderr[-2000:]


@pytest.mark.slow
def test_edge_run_waits_for_a_watched_video_file_and_publishes_it_once_there(tmp_path, mosquitto):
    """The runtime itself: it stays up, its status says what it waits for, and the file's frames are analysed."""
    pytest.importorskip("torch", reason="exporting the random test model needs torch")
    from _export_fixtures import export_random_model

    model = export_random_model(tmp_path / "model", size=(64, 64))
    video = tmp_path / "usb" / "site.avi"
    video.parent.mkdir()  # the drive's mount point, empty until it is mounted
    cfg = write_config(tmp_path / "edge.yaml", uri=str(video), model=model, port=mosquitto.port,
                       spool=tmp_path / "spool.sqlite", source={"watch": True}, mqtt={"status_interval_s": 0.5})
    collector = Collector(mosquitto.port, "drywallqa/dev1/#")
    assert collector.connected.wait(10)
    log = tmp_path / "edge.log"
    proc = start_edge(cfg, log=log)
    try:
        waiting = wait_until(lambda: [s for s in collector.payloads("status") if s.get("source_state") == "reconnecting"
                                      and str(video) in s.get("last_error", "")], 90, "status: waiting for the file")
        assert "waiting for it to appear" in waiting[-1]["last_error"]
        assert proc.poll() is None, log.read_text()[-3000:]
        _arrive(video, 4)
        wait_until(lambda: len(collector.payloads("detections")) >= 1, 60, "detections from the video")
        assert proc.wait(60) == 0, log.read_text()[-3000:]  # played to its end (no loop): a clean stop
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        collector.close()
    assert collector.payloads("status")[-1]["frames_processed"] == 4


def test_a_watched_video_file_in_a_folder_that_does_not_exist_is_a_config_error(tmp_path):
    """Before: with source.watch, a mistyped folder ('vidoes') was waited for for ever, `check-config` only warning.
    A folder that does not exist cannot receive the file: a configuration error (SourceConfigError: a ConfigError,
    so `edge run` and `check-config` exit 78) naming the folder and the close folder names beside it."""
    (tmp_path / "videos").mkdir()
    uri = str(tmp_path / "vidoes" / "site_cam.mp4")
    with pytest.raises(SourceConfigError) as info:
        check_source_exists(uri, watch=True)
    assert isinstance(info.value, ConfigError) and isinstance(info.value, SourceError)
    message = str(info.value)
    assert message.startswith(f"source.uri: the folder of the video file {uri!r} does not exist: "
                              f"{tmp_path / 'vidoes'}.")
    assert f"Did you mean {tmp_path / 'videos'}?" in message and "Correct the path" in message
    deeper = str(tmp_path / "site-12" / "cam" / "site.mp4")  # the first missing folder of the path is named
    with pytest.raises(SourceConfigError, match=f"does not exist: {tmp_path / 'site-12'}\\. Correct the path"):
        check_source_exists(deeper, watch=True)


def test_a_watched_video_file_where_a_drive_is_mounted_later_is_still_waited_for(tmp_path):
    """The case watch on a video file is for: a folder under /media, /run/media or /mnt (udisks or by hand), or under
    an /etc/fstab mount point not mounted yet, may be missing until the drive is: no error there."""
    check_source_exists(f"/media/drywallqa-test-no-such-drive-{os.getpid()}/site.mp4", watch=True)  # no error
    check_source_exists(f"/mnt/drywallqa-test-no-such-drive-{os.getpid()}/cam/site.mp4", watch=True)
    fstab = tmp_path / "fstab"
    point = tmp_path / "drive one"
    fstab.write_text(f"# a comment\nUUID=0a1b  /  ext4  defaults  0 1\n"
                     f"LABEL=CAM {str(point).replace(' ', chr(92) + '040')} exfat nofail 0 0\n")
    assert _may_be_mounted_later(point / "cam", fstab)  # the fstab point, not mounted
    assert _may_be_mounted_later(point, fstab)
    assert not _may_be_mounted_later(tmp_path / "other" / "cam", fstab)
    assert not _may_be_mounted_later(point / "cam", tmp_path / "no-fstab")


def test_a_missing_video_file_names_the_close_files_beside_it(tmp_path):
    """A video file name with a typo in a folder that exists: still waited for (with watch), but the warning at start,
    the source's error (the status's last_error) and the refusal without watch name the close files there."""
    (tmp_path / "site_cam.mp4").write_bytes(b"")
    (tmp_path / "Site_Cam2.MP4").write_bytes(b"")
    (tmp_path / "notes.txt").write_bytes(b"")
    uri = str(tmp_path / "site-cam.mp4")
    with pytest.raises(SourceError, match="not found: .*site-cam.mp4'; did you mean site_cam.mp4 or Site_Cam2.MP4\\? "):
        check_source_exists(uri)
    check_source_exists(uri, watch=True)  # waited for: no error
    cap = Capture(make_source(uri, watch=True), realtime=False, reconnect_min_s=0.05, reconnect_max_s=0.2).start()
    try:
        wait_until(lambda: cap.stats.state == "reconnecting" and cap.stats.last_error, 5, "the source waiting")
        assert cap.stats.last_error == (f"video file not found: {uri} (waiting for it to appear; did you mean "
                                        f"site_cam.mp4 or Site_Cam2.MP4?)")
    finally:
        cap.stop()
    far = str(tmp_path / "zzz.mp4")  # nothing close: no hint
    with pytest.raises(SourceError) as info:
        make_source(far, watch=True).open()
    assert str(info.value) == f"video file not found: {far} (waiting for it to appear)"


def test_check_config_names_close_files_for_a_watched_video_file_not_there(tmp_path):
    (tmp_path / "site_cam.mp4").write_bytes(b"")
    cfg = tmp_path / "edge.yaml"
    cfg.write_text(f"source: {{uri: {tmp_path / 'site-cam.mp4'}, watch: true}}\n"
                   f"mqtt: {{embedded_broker: never, port: 1}}\nspool: {{path: {tmp_path / 's.sqlite'}}}\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("DRYWALLQA_") and k != "NOTIFY_SOCKET"}
    proc = subprocess.run([sys.executable, "-m", "drywallqa.edge", "check-config", "--config", str(cfg)], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "waiting for it to appear (source.watch: true); did you mean site_cam.mp4?" in proc.stderr, proc.stderr


# -- a watched folder's record under another spelling of its path -----------------------------------------------


def _png(path: Path, value: int) -> None:
    cv2.imwrite(str(path), np.full((8, 8, 3), value, np.uint8))
    os.utime(path, (time.time() - 60, time.time() - 60))  # settled


def _process_all(src: WatchedFolderSource) -> int:
    src.open()
    done = 0
    try:
        while True:
            src.read()
            src.done(src.key)
            done += 1
    except NoNewFrame:
        return done
    finally:
        src.close()


@pytest.mark.parametrize("first, second", [
    ("{d}/in", "{d}/in/"), ("{d}/in", "{d}/./in"), ("{d}/in", "{d}//in"), ("{d}/in", "/{d}/in"),
    ("{d}/in/*.png", "{d}//in/*.png"), ("{d}/in/*.png", "{d}/./in/*.png"), ("{d}/in/*.png", "{d}/x/../in/*.png"),
])
def test_a_watched_folder_spelled_differently_keeps_its_record(tmp_path, first, second):
    """Before: the same folder spelled another way after a config edit ('/data//in/*.jpg' for '/data/in/*.jpg', or
    '//data/in') processed every photo again: a new record, or the same record with the photos under other paths."""
    (tmp_path / "in").mkdir()
    (tmp_path / "x").mkdir()
    for i in range(3):
        _png(tmp_path / "in" / f"{i}.png", 40 * i)
    first, second = first.format(d=tmp_path), second.format(d=tmp_path)
    spool = tmp_path / "state" / "spool.sqlite"
    assert watch_record_path(spool, first) == watch_record_path(spool, second)
    assert _process_all(WatchedFolderSource(first, record_path=watch_record_path(spool, first))) == 3
    assert _process_all(WatchedFolderSource(second, record_path=watch_record_path(spool, second))) == 0
    _png(tmp_path / "in" / "3.png", 200)
    assert _process_all(WatchedFolderSource(second, record_path=watch_record_path(spool, second))) == 1


def test_records_of_a_normal_path_keep_their_name_and_an_old_relative_record_still_holds(tmp_path, monkeypatch):
    """Records already on devices: a normal path's record name is the hash of the path as before, and a record that
    a relative uri wrote (its photos under relative paths) still marks them as done."""
    spool = tmp_path / "state" / "spool.sqlite"
    for uri in (str(tmp_path / "in"), str(tmp_path / "in" / "*.jpg")):
        digest = hashlib.sha256(uri.encode()).hexdigest()[:16]
        assert watch_record_path(spool, uri).name == f"spool.watched-{digest}.jsonl"
    monkeypatch.chdir(tmp_path)
    (tmp_path / "in").mkdir()
    _png(tmp_path / "in" / "a.png", 9)
    st = os.stat(tmp_path / "in" / "a.png")
    record = watch_record_path(spool, "in/*.png")
    record.parent.mkdir()
    record.write_text(json.dumps({"drywallqa-watched": 1, "uri": "in/*.png"}) + "\n"
                      + json.dumps(["in/a.png", st.st_size, st.st_mtime_ns]) + "\n")
    assert _process_all(WatchedFolderSource("in/*.png", record_path=record)) == 0


def test_a_record_named_after_a_leading_double_slash_is_adopted(tmp_path):
    """Review: the one spelling whose record name changed with normal_path is a leading '//' (os.path.abspath kept
    it): a device configured as '//srv/photos' would have processed every photo again after the upgrade."""
    (tmp_path / "in").mkdir()
    for i in range(2):
        _png(tmp_path / "in" / f"{i}.png", 60 * i)
    uri = "/" + str(tmp_path / "in")  # '//tmp/.../in'
    spool = tmp_path / "state" / "spool.sqlite"
    older = spool.with_name(f"spool.watched-{hashlib.sha256(os.path.abspath(uri).encode()).hexdigest()[:16]}.jsonl")
    assert older != watch_record_path(spool, uri)
    assert _process_all(WatchedFolderSource(uri, record_path=older)) == 2  # the record as the older version named it
    assert _process_all(WatchedFolderSource(uri, record_path=watch_record_path(spool, uri))) == 0
    assert watch_record_path(spool, uri).is_file() and not older.exists()


# -- float TIFFs ------------------------------------------------------------------------------------------------


def _float_tiff(path: Path, rgb: np.ndarray) -> Path:
    assert cv2.imwrite(str(path), np.ascontiguousarray(rgb[..., ::-1]))  # OpenCV writes BGR
    return path


@pytest.mark.parametrize("scale, expected", [(1.0, [255, 128, 0]), (255.0, [255, 128, 0]),
                                             (65535.0, [255, 128, 0])])
def test_a_three_channel_float_tiff_is_read_as_rgb_uint8(tmp_path, scale, expected):
    """Before: 'cannot identify image file' (PIL opens no multi-channel float TIFF). Values 0..1 are scaled by 255,
    0..255 kept, 0..65535 divided by 257, as 16-bit images are."""
    rgb = np.zeros((6, 9, 3), np.float32)
    rgb[0, 0] = np.array([1.0, 128 / 255, 0.0]) * scale
    rgb[1, 1] = np.array([0.2, 0.4, 0.6]) * scale
    image = read_image_rgb(_float_tiff(tmp_path / "thermal.tif", rgb))
    assert image.dtype == np.uint8 and image.shape == (6, 9, 3)
    assert image[0, 0].tolist() == expected and image[1, 1].tolist() == [51, 102, 153]
    assert image[2, 2].tolist() == [0, 0, 0]


def test_a_one_channel_float_tiff_in_the_16_bit_range_is_scaled_not_saturated(tmp_path):
    """Before: a one-channel float TIFF with values up to 65535 came out white wherever a value passed 255."""
    path = tmp_path / "depth.tif"
    assert cv2.imwrite(str(path), np.array([[0, 257 * 100], [65535, 257 * 10]], np.float32))
    assert read_image_rgb(path)[..., 0].tolist() == [[0, 100], [255, 10]]


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_a_float_tiff_with_nan_or_inf_is_a_clear_error(tmp_path, bad):
    rgb = np.full((4, 4, 3), 0.5, np.float32)
    rgb[1, 2, 0] = bad
    path = _float_tiff(tmp_path / "hdr.tif", rgb)
    with pytest.raises(ImageReadError, match=r"hdr\.tif: the float image holds NaN or infinite values"):
        read_image_rgb(path)
    gray = tmp_path / "gray.tif"
    assert cv2.imwrite(str(gray), rgb[..., 0])  # one channel: PIL reads it, the same check applies
    with pytest.raises(ImageReadError, match="NaN or infinite"):
        read_image_rgb(gray)


def test_an_unreadable_tiff_keeps_its_error(tmp_path):
    path = tmp_path / "broken.tif"
    path.write_bytes(b"II*\x00\x08\x00\x00\x00" + b"\x00" * 40)  # a header, then no image
    with pytest.raises(ImageReadError, match=r"cannot read image .*broken\.tif: cannot identify image file"):
        read_image_rgb(path)


def test_a_signed_integer_tiff_is_read_with_negatives_black_not_wrapped(tmp_path):
    """Review: the OpenCV fallback decodes 3-channel int16 TIFFs that PIL cannot open, and a cast to uint8 made -5
    into 251 (a bright pixel that is not there)."""
    bgr = np.zeros((4, 6, 3), np.int16)
    bgr[..., 0], bgr[..., 1], bgr[..., 2] = -5, 100, 200
    assert cv2.imwrite(str(tmp_path / "signed.tif"), bgr)
    assert read_image_rgb(tmp_path / "signed.tif")[0, 0].tolist() == [200, 100, 0]
