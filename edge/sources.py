"""Frame sources: camera (index or /dev/videoN), RTSP/HTTP stream, video file, folder or glob (read once or
watched for new images), synthetic demo.

Every source yields RGB uint8 H x W x 3 frames and signals trouble with exceptions the capture thread acts on:
CorruptFrame (skip, count), EndOfSource (finished or loop), SourceError (reopen with backoff), UnreadableSource
(a SourceError no retry can cure: the source ends) and NoNewFrame (a watched folder has nothing new: wait).
"""

from __future__ import annotations

import bisect
import glob
import os
import re
import time
from abc import ABC, abstractmethod
from pathlib import Path

import cv2
import numpy as np

from drywallqa.imageio import IMAGE_SUFFIXES, ImageReadError, read_image_rgb

IMAGE_EXTENSIONS = frozenset(IMAGE_SUFFIXES) - {".gif"}  # a .gif given alone plays as a video (animated GIFs)
STREAM_SCHEMES = ("rtsp://", "rtsps://", "rtmp://", "http://", "https://", "udp://", "tcp://")
# A failed VideoCapture.grab() is also what one undecodable frame gives (FFmpeg's MJPEG decoder, mid-file or
# mid-stream): the source goes on after it. Before a failed grab is taken for the end of a video file (or a lost
# stream), up to this many more grabs look for a next frame; a live source only retries failures that came at once
# (within LIVE_LOOKAHEAD_MAX_S), never a read that timed out (a stall).
FILE_LOOKAHEAD = 25
LIVE_LOOKAHEAD = 2
LIVE_LOOKAHEAD_MAX_S = 0.5
# A video file that cannot be opened ends the source, unless it changed this recently: then it may still be being
# copied in (a file replaced while a looping source plays it), and the open is retried with backoff.
FILE_SETTLE_S = 10.0
WATCH_POLL_S = 0.5  # a watched folder with nothing new is listed again after this long
WATCH_SETTLE_S = 2.0  # a new image is read once it has not changed for this long (a copy or sync may be writing it)


class SourceError(RuntimeError):
    """The source failed (camera gone, stream broken, file missing); the capture thread reopens it."""


class UnreadableSource(SourceError):
    """The source is there but can never be read (a video file that no decoder opens): it ends, it is not retried."""


class NoNewFrame(Exception):
    """A watched folder has no new image ready: the capture thread waits `retry_after_s`, then asks again."""

    def __init__(self, uri: str, retry_after_s: float) -> None:
        super().__init__(uri)
        self.retry_after_s = retry_after_s


class CorruptFrame(ValueError):
    """One frame could not be decoded; it is counted and skipped."""


class EndOfSource(Exception):
    """A finite source (file, folder) has no more frames; `problem` says why when it ended early (a cut-short file)."""

    def __init__(self, uri: str, problem: str = "") -> None:
        super().__init__(uri)
        self.problem = problem


class FrameSource(ABC):
    kind: str = "source"
    live: bool = False  # cameras, streams, demo: newest-frame-only by default

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self._grabbed: np.ndarray | None = None  # the default grab() decodes at once and keeps it here

    @abstractmethod
    def open(self) -> None: ...

    @abstractmethod
    def read(self) -> np.ndarray: ...

    def close(self) -> None:  # noqa: B027 - optional hook
        pass

    def grab(self) -> None:
        """Advance to the next frame; `retrieve` then decodes it. Sources that can take a frame without
        decoding it (V4L2 cameras, MJPEG) override both, so frames a busy consumer will never see cost no
        decoding. Raises like `read`."""
        self._grabbed = self.read()

    def retrieve(self) -> np.ndarray:
        """The grabbed frame, decoded (RGB uint8); CorruptFrame when it cannot be."""
        frame, self._grabbed = self._grabbed, None
        if frame is None:
            raise CorruptFrame("retrieve() without a grabbed frame")
        return frame

    @property
    def native_fps(self) -> float | None:
        return None

    def describe(self) -> str:
        return f"{self.kind}:{self.uri}"


def check_frame(frame: object) -> np.ndarray:
    """A decoded frame must be a non-empty H x W x 3 uint8 array."""
    if not isinstance(frame, np.ndarray) or frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3 \
            or frame.shape[0] < 2 or frame.shape[1] < 2:
        shape = getattr(frame, "shape", None)
        raise CorruptFrame(f"bad frame: expected H x W x 3 uint8, got {type(frame).__name__} {shape}")
    return frame


class CvCaptureSource(FrameSource):
    """OpenCV VideoCapture: V4L2 cameras, network streams (FFmpeg, with open/read timeouts) and video files."""

    def __init__(self, uri: str, kind: str, *, width: int | None = None, height: int | None = None,
                 timeout_s: float = 5.0) -> None:
        super().__init__(uri)
        self.kind = kind
        self.live = kind in ("camera", "stream")
        self.width, self.height = width, height
        self.timeout_ms = int(timeout_s * 1000)
        self._cap: cv2.VideoCapture | None = None
        self._fps: float | None = None
        self._position = 0  # frames of a video file already grabbed
        self._frame_count = 0  # what a video file's header announces (0: unknown)
        self._undecodable = 0  # frames the look-ahead in grab() skipped, each still to be reported (CorruptFrame)
        self._grabbed_ahead = False  # the look-ahead's frame, grabbed and not yet handed out

    def open(self) -> None:
        self.close()
        if self.kind == "file" and not Path(self.uri).is_file():
            raise SourceError(f"video file not found: {self.uri}")
        if self.kind == "camera":
            target: int | str = int(self.uri) if self.uri.isdigit() else self.uri
            cap = cv2.VideoCapture(target, cv2.CAP_V4L2)
            if not cap.isOpened():
                cap = cv2.VideoCapture(target)
        elif self.kind == "stream":
            params = [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, self.timeout_ms, cv2.CAP_PROP_READ_TIMEOUT_MSEC, self.timeout_ms]
            cap = cv2.VideoCapture(self.uri, cv2.CAP_FFMPEG, params)
        else:
            cap = cv2.VideoCapture(self.uri)
        if not cap.isOpened():
            cap.release()
            if self.kind == "file":
                raise unopenable_file_error(self.uri)
            raise SourceError(f"cannot open {self.kind} {self.uri!r}")
        if self.kind == "camera":
            if self.width:
                cap.set(cv2.CAP_PROP_FRAME_WIDTH, self.width)
            if self.height:
                cap.set(cv2.CAP_PROP_FRAME_HEIGHT, self.height)
            cap.set(cv2.CAP_PROP_BUFFERSIZE, 1)
        fps = cap.get(cv2.CAP_PROP_FPS)
        self._fps = float(fps) if fps and 0 < fps < 1000 else None
        count = cap.get(cv2.CAP_PROP_FRAME_COUNT) if self.kind == "file" else 0
        self._frame_count = int(count) if count and 0 < count < 1e9 else 0
        if self.kind == "file" and self._position:
            cap.set(cv2.CAP_PROP_POS_FRAMES, self._position)  # reopened after an error: go on, don't replay
        self._cap = cap

    def read(self) -> np.ndarray:
        self.grab()
        return self.retrieve()

    def grab(self) -> None:
        if self._cap is None:
            raise SourceError("not open")
        if self._undecodable:
            self._undecodable -= 1
            raise CorruptFrame(f"{self.kind} {self.uri!r}: a frame could not be decoded, skipped")
        if self._grabbed_ahead:
            self._grabbed_ahead = False
            return
        started = time.monotonic()
        if self._cap.grab():
            self._position += 1
            return
        live = self.kind != "file"
        for skipped in range(1, (LIVE_LOOKAHEAD if live else FILE_LOOKAHEAD) + 1):
            if live and time.monotonic() - started > LIVE_LOOKAHEAD_MAX_S:
                break  # the read waited and failed: a stall or a lost stream, not one bad frame
            started = time.monotonic()
            if self._cap.grab():  # the failed grabs were undecodable frames: one CorruptFrame each, then this one
                self._position += skipped + 1
                self._undecodable = skipped - 1
                self._grabbed_ahead = True
                raise CorruptFrame(f"{self.kind} {self.uri!r}: a frame could not be decoded, skipped")
        self._no_frame()

    def retrieve(self) -> np.ndarray:
        if self._cap is None:
            raise SourceError("not open")
        ok, frame = self._cap.retrieve()
        if not ok or frame is None:
            raise CorruptFrame(f"{self.kind} {self.uri!r}: a frame arrived but could not be decoded")
        return cv2.cvtColor(check_frame(frame), cv2.COLOR_BGR2RGB)

    def _no_frame(self) -> None:
        if self.kind == "file":
            # The end of the file that is open (renaming or deleting it does not cut an open file short).
            read, announced = self._position, self._frame_count
            self._position = 0  # a reopen after the end (loop) starts again
            problem = ""
            if announced and read < announced - max(2, announced // 50):  # headers may be off by a frame or two
                problem = (f"video file {self.uri!r} ended after {read} of the {announced} frames its header "
                           f"announces: the file is cut short (damaged, or still being copied)")
            raise EndOfSource(self.uri, problem)
        raise SourceError(f"{self.kind} {self.uri!r} returned no frame (disconnected or stalled)")

    def close(self) -> None:
        if self._grabbed_ahead:
            self._position -= 1  # not handed out: a reopen seeks back to it
        self._undecodable, self._grabbed_ahead = 0, False
        if self._cap is not None:
            self._cap.release()
            self._cap = None

    @property
    def native_fps(self) -> float | None:
        return self._fps


def unopenable_file_error(path: str) -> SourceError:
    """The error for a video file that is there but that OpenCV cannot open: UnreadableSource (the source ends), or
    a SourceError (retried) while the file changed in the last FILE_SETTLE_S seconds or has just gone."""
    try:
        age = time.time() - os.stat(path).st_mtime
    except FileNotFoundError:
        return SourceError(f"video file not found: {path}")
    except OSError:
        age = FILE_SETTLE_S
    message = f"cannot read video file {path!r}: {_video_file_problem(path)}"
    if abs(age) < FILE_SETTLE_S:  # abs: a time far ahead (a clock off) must not mean "new" for ever
        return SourceError(f"{message} (changed {max(age, 0):.0f} s ago: retried while it may still be being written)")
    return UnreadableSource(message)


def _video_file_problem(path: str) -> str:
    """A best guess at why OpenCV cannot open an existing video file (it gives no reason itself)."""
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError as exc:
        return exc.strerror or type(exc).__name__
    if not head:
        return "the file is empty"
    return "no video decoder recognises it (not a video, an unsupported format or a damaged header)"


def list_images(uri: str) -> list[str]:
    """The image files that a folder or glob names, unsorted."""
    p = Path(uri)
    if p.is_dir():
        return [str(f) for f in p.iterdir() if f.suffix.lower() in IMAGE_EXTENSIONS]
    return [f for f in glob.glob(uri) if Path(f).suffix.lower() in IMAGE_EXTENSIONS]


def read_image_frame(path: str) -> np.ndarray:
    """One image of a folder as a frame; CorruptFrame when it has gone or cannot be decoded."""
    if not os.path.exists(path):
        raise CorruptFrame(f"image disappeared before it was read, skipped: {path}")
    try:
        return check_frame(read_image_rgb(path))
    except ImageReadError as exc:
        raise CorruptFrame(str(exc)) from exc


class ImageListSource(FrameSource):
    """A folder or glob of images read once: the images there when it opens, in name order, then EndOfSource.
    Re-listed at every open (so a loop sees new files)."""

    kind = "images"

    def __init__(self, uri: str) -> None:
        super().__init__(uri)
        self._files: list[str] = []
        self._index = 0
        self._last: str | None = None  # the last file handed out; a reopen goes on after it

    def open(self) -> None:
        self._files = sorted(list_images(self.uri))
        self._index = bisect.bisect_right(self._files, self._last) if self._last is not None else 0
        if not self._files:
            raise SourceError(f"no images found in {self.uri!r}")

    def read(self) -> np.ndarray:
        if self._index >= len(self._files):
            self._last = None  # a reopen after the end (loop) starts again from the first image
            raise EndOfSource(self.uri)
        path = self._files[self._index]
        self._index += 1
        self._last = path
        return read_image_frame(path)


class WatchedFolderSource(FrameSource):
    """A folder or glob watched for new images (source.watch); it never ends. Each image is handed out once, by
    modification time then name, when it has stopped changing for `settle_s` (a copy or sync may still be writing
    it). Hidden files (a sync tool's partial downloads, macOS's ._ files) are left alone. With nothing new it
    raises NoNewFrame: the capture thread sleeps `poll_s`, then the folder is listed again."""

    kind = "images"

    def __init__(self, uri: str, *, poll_s: float = WATCH_POLL_S, settle_s: float = WATCH_SETTLE_S) -> None:
        super().__init__(uri)
        self.poll_s, self.settle_s = poll_s, settle_s
        self._queue: list[str] = []  # ready, in order, not yet handed out
        self._done: set[str] = set()  # handed out; kept across a reopen, so nothing is processed twice
        self._changing: dict[str, tuple[tuple[int, int], float]] = {}  # path -> (size, mtime_ns), first seen so

    def describe(self) -> str:
        return f"{self.kind}:{self.uri} (watched)"

    def open(self) -> None:
        if not any(ch in self.uri for ch in "*?[") and not Path(self.uri).exists():
            raise SourceError(f"folder not found: {self.uri!r}")
        self._queue = []

    def read(self) -> np.ndarray:
        if not self._queue:
            self._queue = self._new_images()
        if not self._queue:
            raise NoNewFrame(self.uri, self.poll_s)
        path = self._queue.pop(0)
        self._done.add(path)
        return read_image_frame(path)

    def _new_images(self) -> list[str]:
        """The images not handed out yet that have stopped changing, oldest first."""
        try:
            names = list_images(self.uri)
        except OSError as exc:
            raise SourceError(f"cannot list {self.uri!r}: {exc.strerror or exc}") from exc
        present = set(names)
        self._done &= present  # images moved away are forgotten: the set stays as small as the folder
        self._changing = {p: seen for p, seen in self._changing.items() if p in present}
        ready = []
        for path in names:
            if path in self._done or os.path.basename(path).startswith("."):
                continue
            try:
                st = os.stat(path)
            except OSError:
                continue
            if self._settled(path, st):
                ready.append((st.st_mtime_ns, path))
        return [path for _, path in sorted(ready)]

    def _settled(self, path: str, st: os.stat_result) -> bool:
        """Not empty, and unchanged for settle_s: by its own modification time or, for a file dated ahead of this
        clock (a tablet's clock, a preserved time), by how long this source has seen it unchanged."""
        if st.st_size == 0:
            return False
        if time.time() - st.st_mtime >= self.settle_s:
            self._changing.pop(path, None)
            return True
        signature, now = (st.st_size, st.st_mtime_ns), time.monotonic()
        seen = self._changing.get(path)
        if seen is None or seen[0] != signature:
            self._changing[path] = (signature, now)
            return False
        return now - seen[1] >= self.settle_s


class DemoSource(FrameSource):
    """Synthetic drywall frames: textured wall, a wandering dark crack and a lighter taped seam, drifting."""

    kind = "demo"
    live = True

    def __init__(self, size: tuple[int, int] = (480, 640), seed: int = 0) -> None:
        super().__init__("demo")
        self.size = size
        self.seed = seed
        self._t = 0
        self._wall: np.ndarray | None = None
        self._crack: np.ndarray | None = None

    def open(self) -> None:
        h, w = self.size
        rng = np.random.default_rng(self.seed)
        noise = cv2.GaussianBlur(rng.normal(0, 1, (h, w)).astype(np.float32), (0, 0), 3)
        base = np.array([214, 208, 196], np.float32)
        self._wall = np.clip(base + noise[..., None] * 12, 0, 255).astype(np.uint8)
        pts = [(int(w * 0.15), int(h * 0.1))]
        for _ in range(40):
            x, y = pts[-1]
            pts.append((int(np.clip(x + rng.integers(-6, 14), 0, w - 1)), int(np.clip(y + rng.integers(4, 14), 0, h - 1))))
        self._crack = np.array(pts, np.int32)
        self._t = 0

    def read(self) -> np.ndarray:
        assert self._wall is not None and self._crack is not None
        h, w = self.size
        frame = self._wall.copy()
        seam_x = int((0.6 + 0.1 * np.sin(self._t / 15)) * w)
        cv2.rectangle(frame, (seam_x - 18, 0), (seam_x + 18, h), (232, 229, 222), -1)
        shift = np.array([round(8 * np.sin(self._t / 5)), 0], np.int32)
        cv2.polylines(frame, [self._crack + shift], False, (70, 64, 58), 2, cv2.LINE_AA)
        self._t += 1
        return frame

    @property
    def native_fps(self) -> float | None:
        return 10.0


_DEV_VIDEO = re.compile(r"^/dev/video\d+$")


def classify_uri(uri: str) -> str:
    """demo | camera | stream | file | images."""
    if uri == "demo":
        return "demo"
    if uri.isdigit() or _DEV_VIDEO.match(uri) or uri.startswith("/dev/v4l/"):  # by-id/by-path: stable names
        return "camera"
    if uri.lower().startswith(STREAM_SCHEMES):
        return "stream"
    p = Path(uri)
    if p.is_dir() or any(ch in uri for ch in "*?["):
        return "images"
    if p.suffix.lower() in IMAGE_EXTENSIONS:
        return "images"
    return "file"


def check_source_exists(uri: str) -> None:
    """At start-up a video file must be there and open: a typo (or '/dev/vide0') or a file that is not a video should
    stop the service with a clear error, not retry forever. Cameras, streams and folders may come later, so they are
    retried."""
    if classify_uri(uri) != "file":
        return
    if not Path(uri).expanduser().is_file():
        raise SourceError(f"source.uri: video file not found: {uri!r} (or a camera index, /dev/videoN, a URL, "
                          f"a folder, a glob or 'demo')")
    probe = CvCaptureSource(uri, "file")
    try:
        probe.open()
    except UnreadableSource as exc:
        raise UnreadableSource(f"source.uri: {exc}") from exc
    except SourceError:
        pass  # still being written: the capture thread retries it
    finally:
        probe.close()


def make_source(uri: str, *, width: int | None = None, height: int | None = None, timeout_s: float = 5.0,
                demo_size: tuple[int, int] = (480, 640), watch: bool = False) -> FrameSource:
    """The source for `uri`; `watch` makes a folder or glob a WatchedFolderSource (other kinds ignore it)."""
    kind = classify_uri(uri)
    if kind == "demo":
        return DemoSource(demo_size)
    if kind == "images":
        return WatchedFolderSource(uri) if watch else ImageListSource(uri)
    return CvCaptureSource(uri, kind, width=width, height=height, timeout_s=timeout_s)
