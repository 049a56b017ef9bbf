"""Frame sources: camera (index or /dev/videoN), RTSP/HTTP stream, video file, folder or glob (read once or
watched for new images), synthetic demo.

Every source yields RGB uint8 H x W x 3 frames and signals trouble with exceptions the capture thread acts on:
CorruptFrame (skip, count), EndOfSource (finished or loop), SourceError (reopen with backoff), UnreadableSource
(a SourceError no retry can cure: the source ends) and NoNewFrame (a watched folder has nothing new: wait).
"""

from __future__ import annotations

import bisect
import contextlib
import difflib
import glob
import hashlib
import itertools
import json
import logging
import os
import re
import threading
import time
from abc import ABC, abstractmethod
from pathlib import Path
from typing import NoReturn, TextIO

import cv2
import numpy as np

from drywallqa.edge.durable import replace_durably
from drywallqa.edge.settings import ConfigError
from drywallqa.imageio import READ_SUFFIXES, ImageIOError, ImageReadError, read_image_rgb

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset(READ_SUFFIXES) - {".gif"}  # a .gif given alone plays as a video (animated GIFs)
JPEG_SUFFIXES = frozenset({".jpg", ".jpeg", ".jpe", ".jfif"})
# Video containers: with `watch`, a path with one of these that is not there yet is a video file to wait for, not a
# folder to watch.
VIDEO_SUFFIXES = frozenset({".mp4", ".m4v", ".mov", ".avi", ".mkv", ".webm", ".mpg", ".mpeg", ".ts", ".mts",
                            ".m2ts", ".wmv", ".flv", ".3gp", ".mjpg", ".mjpeg", ".h264", ".h265", ".hevc", ".gif"})
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
# A JPEG without its end marker or a PNG without IEND (a copy that stalled) waits this long after its last change for
# the rest (then it is read all the same: some cameras append data after the JPEG's end, e.g. motion photos).
WATCH_INCOMPLETE_S = 30.0
# An image handed out that is missing from the folder's listings this long is forgotten (never for an empty listing).
WATCH_FORGET_S = 600.0
# An image that cannot be read (an I/O error: locked by a syncing PC, EIO/ESTALE on a share, a card pulled mid-read)
# is tried again after WATCH_RETRY_S, doubled at each failure; after WATCH_IO_ATTEMPTS failures of the same file
# (same size and modification time) it is recorded as done (logged as an error), so it cannot block the folder.
WATCH_RETRY_S = 10.0
WATCH_IO_ATTEMPTS = 5
# An image handed out this many times, by runs that all stopped before it was done (a crash, an out-of-memory kill, a
# watchdog restart while it was decoded or analysed), is skipped at the next start: recorded as done, logged as an
# error naming it and reported in last_error, so one photo cannot stop the runtime for ever.
WATCH_MAX_ATTEMPTS = 3
# A watched video file is waited for while missing only where it can still appear: in a folder that exists, or under
# a folder where drives are mounted (udisks: /media, /run/media; by hand or fstab: /mnt, or a mount point /etc/fstab
# lists), which may be absent until the drive is. Elsewhere a missing folder is a typo: a configuration error.
MOUNT_ROOTS = ("/media", "/run/media", "/mnt")
FSTAB = Path("/etc/fstab")
SIMILAR_NAMES_SCANNED = 10_000  # a "did you mean" hint looks at this many names of the folder at most


class SourceError(RuntimeError):
    """The source failed (camera gone, stream broken, file missing); the capture thread reopens it."""


class UnreadableSource(SourceError):
    """The source is there but can never be read (a video file that no decoder opens): it ends, it is not retried."""


class SourceConfigError(SourceError, ConfigError):
    """A source setting that cannot work as written (a watched video file in a folder that does not exist): a
    configuration error (`edge run` and `check-config` exit 78), not a source to wait for."""


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
        self.key: object = None  # what the frame last read is known by, for done() (None: nothing to record)

    @abstractmethod
    def open(self) -> None: ...

    @abstractmethod
    def read(self) -> np.ndarray: ...

    def close(self) -> None:  # noqa: B027 - optional hook
        pass

    def done(self, key: object) -> None:  # noqa: B027 - optional hook
        """The consumer has finished with the frame read under `key` (its results published, or it failed): a
        watched folder records its image as processed. Called from the consumer's thread."""

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

    def start_notice(self) -> str:
        """What went wrong with the source's own state when it was made, for the device's status ('' if nothing):
        e.g. a damaged record moved aside. Reported once; frames flowing do not clear it."""
        return ""

    @property
    def ongoing_error(self) -> str:
        """What is wrong with the source's own bookkeeping now ('' when nothing), reported until it is mended."""
        return ""


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
                 timeout_s: float = 5.0, settle: bool = False) -> None:
        super().__init__(uri)
        self.kind = kind
        # A watched video file (source.watch) may arrive by copy: it is opened only once it has not changed for
        # FILE_SETTLE_S, and an end while it still changes is a pause (resumed where it stopped), not the end.
        self.settle = settle and kind == "file"
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
            raise SourceError(f"video file not found: {self.uri} (waiting for it to appear{_missing_hint(self.uri)})")
        if (age := self._still_changing()) is not None:
            raise SourceError(f"video file {self.uri} changed {age:.0f} s ago: opened once it has not changed for "
                              f"{FILE_SETTLE_S:.0f} s (it may still be being copied)")
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
            if (age := self._still_changing()) is not None:
                raise SourceError(f"video file {self.uri} ended after {read} frames but changed {age:.0f} s ago: "
                                  f"it may still be being copied; going on from frame {read} once it settles")
            self._position = 0  # a reopen after the end (loop) starts again
            problem = ""
            if announced and read < announced - max(2, announced // 50):  # headers may be off by a frame or two
                problem = (f"video file {self.uri!r} ended after {read} of the {announced} frames its header "
                           f"announces: the file is cut short (damaged, or still being copied)")
            raise EndOfSource(self.uri, problem)
        raise SourceError(f"{self.kind} {self.uri!r} returned no frame (disconnected or stalled)")

    def _still_changing(self) -> float | None:
        """Seconds since a watched video file (`settle`) last changed, while under FILE_SETTLE_S; else None."""
        age = _seconds_since_change(self.uri) if self.settle else None
        return age if age is not None and age < FILE_SETTLE_S else None

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


def _seconds_since_change(path: str) -> float | None:
    """Seconds since the file last changed, as a distance (a time far ahead, a clock off, must not mean "new" for
    ever); None when it cannot be told."""
    try:
        return abs(time.time() - os.stat(path).st_mtime)
    except OSError:
        return None


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
            if not _has_wildcard(self.uri) and not os.path.exists(self.uri):
                what = "image" if Path(self.uri).suffix.lower() in IMAGE_EXTENSIONS else "folder"
                raise SourceError(f"{what} not found: {self.uri!r} (waiting for it to appear)")
            raise SourceError(missing_folder_problem(self.uri) or f"no images found in {self.uri!r}")

    def read(self) -> np.ndarray:
        if self._index >= len(self._files):
            self._last = None  # a reopen after the end (loop) starts again from the first image
            raise EndOfSource(self.uri)
        path = self._files[self._index]
        self._index += 1
        self._last = path
        return read_image_frame(path)


class WatchRecord:
    """The images of a watched folder already processed, path -> (size, mtime_ns), kept in a small file so that a
    restart does not process them again (none: in memory only).

    The file is a journal of JSON lines: a header naming the source, then one `[path, size, mtime_ns]` line per image
    done, each appended and fsynced as it is done (a crash or power cut loses no finished image). Before an image is
    handed out, a `[path, size, mtime_ns, "attempt"]` line is appended too (`[..., "released"]` takes one back: the
    attempt ended without a crash and the image was not done): an image with WATCH_MAX_ATTEMPTS attempts and no finish
    stopped every run that tried it, and is skipped at load (recorded as done, named in `given_up`). When it has grown
    to twice the images it remembers, it is rewritten with only those (and the attempts of unfinished images),
    atomically (a temporary file, then a rename). A file that cannot be read or parsed stops nothing: it is moved
    aside (logged, `moved_aside`) and the images still readable in it are kept; a write that fails is logged and
    `error` says why until one succeeds (the record is then kept in memory only, and a restart may process again what
    was done meanwhile)."""

    VERSION = 1

    def __init__(self, path: str | Path | None, uri: str) -> None:
        self.path = Path(path) if path is not None else None
        self.uri = uri
        self.error = ""
        self.moved_aside: Path | None = None
        self.attempts: dict[str, tuple[int, int, int]] = {}  # path -> (size, mtime_ns, attempts): not done yet
        self.given_up: list[str] = []  # images skipped at load: every run that tried them stopped before they were done
        self._lines = -1  # lines in the file (header included); -1: no file of ours yet, write it whole first
        self._fh: TextIO | None = None

    def _adopt_older_name(self) -> None:
        """Until session 24 the file was named after os.path.abspath(uri), which keeps a leading '//': such a
        record (the only spelling whose name changed) is renamed to the name it has now, so its photos stay done."""
        assert self.path is not None
        prefix, sep, _ = self.path.name.rpartition(".watched-")
        older = self.path.with_name(
            f"{prefix}{sep}{hashlib.sha256(os.path.abspath(self.uri).encode()).hexdigest()[:16]}.jsonl")
        if sep and older != self.path and older.is_file() and not self.path.exists():
            with contextlib.suppress(OSError):  # not renamed: a fresh record, as before
                os.replace(older, self.path)
                log.info("watched-folder record %s renamed to %s (the name its source's path gives it now)", older,
                         self.path)

    def load(self) -> dict[str, tuple[int, int]]:
        """The images the file records; a damaged file is moved aside (what could be read is kept) and rewritten."""
        if self.path is None:
            return {}
        self._adopt_older_name()
        try:
            text = self.path.read_bytes().decode("utf-8")
        except FileNotFoundError:
            return {}
        except (OSError, UnicodeDecodeError) as exc:
            return self._damaged({}, f"cannot be read ({exc})")
        lines = text.split("\n")
        torn = lines.pop() if lines else ""  # the text after the last newline: empty, or a line cut by a crash
        entries: dict[str, tuple[int, int]] = {}
        try:
            header = json.loads(lines[0]) if lines else None
        except ValueError:
            header = None
        if not isinstance(header, dict) or header.get("drywallqa-watched") != self.VERSION \
                or not isinstance(header.get("uri"), str) \
                or normal_path(header["uri"]) != normal_path(self.uri):  # the file name hashes normal_path too
            return self._damaged({}, "it is not a watched-folder record of this source")
        bad = 0
        for line in lines[1:]:
            try:
                item = json.loads(line)
                if not isinstance(item, list) or len(item) not in (3, 4):
                    raise ValueError(line)
                path, size, mtime_ns, *what = item
                if not (isinstance(path, str) and isinstance(size, int) and isinstance(mtime_ns, int)) \
                        or what not in ([], ["attempt"], ["released"]):
                    raise ValueError(line)
            except ValueError:
                bad += 1
                continue
            path = normal_path(path)  # as the source lists it; an older record may hold other spellings
            if not what:
                entries[path] = (size, mtime_ns)
                self.attempts.pop(path, None)
            else:
                self._count_attempt(path, size, mtime_ns, 1 if what == ["attempt"] else -1)
        self._give_up(entries)
        if bad:
            return self._damaged(entries, f"{bad} line(s) of it cannot be parsed")
        self._lines = len(lines)
        if torn:  # the last line was being written when the process or the device stopped: that image is not done
            log.warning("watched-folder record %s: its last line was cut short (a crash or power cut while it was "
                        "written); the image it named will be processed again", self.path)
        if torn or self.given_up:
            self.rewrite(entries)
        return entries

    def _count_attempt(self, path: str, size: int, mtime_ns: int, step: int) -> None:
        size0, mtime0, n = self.attempts.get(path, (size, mtime_ns, 0))
        n = n + step if (size0, mtime0) == (size, mtime_ns) else max(step, 0)  # another file: its own count
        if n > 0:
            self.attempts[path] = (size, mtime_ns, n)
        else:
            self.attempts.pop(path, None)

    def _give_up(self, entries: dict[str, tuple[int, int]]) -> None:
        """Record as done the images that every one of WATCH_MAX_ATTEMPTS runs took and none finished."""
        for path, (size, mtime_ns, n) in list(self.attempts.items()):
            if entries.get(path) == (size, mtime_ns):
                del self.attempts[path]
            elif n >= WATCH_MAX_ATTEMPTS:
                del self.attempts[path]
                entries[path] = (size, mtime_ns)
                self.given_up.append(path)
                log.error("watched folder %s: image %s skipped: the runtime stopped (a crash, out of memory, a "
                          "watchdog restart) each of the %d times it was being processed; it is recorded as done "
                          "(change or touch the file to process it again)", self.uri, path, n)

    def _damaged(self, entries: dict[str, tuple[int, int]], why: str) -> dict[str, tuple[int, int]]:
        assert self.path is not None
        aside = self.path.with_name(f"{self.path.name}.corrupt-{time.strftime('%Y%m%dT%H%M%S')}")
        try:
            self.path.rename(aside)
            self.moved_aside = aside
            where = f"moved aside to {aside}"
        except OSError as exc:
            where = f"it cannot be moved aside ({exc.strerror or exc}) and is replaced"
        log.error("watched-folder record %s is damaged: %s; %s. Starting afresh with the %d image(s) that could be "
                  "read from it: images it recorded beyond those are processed again", self.path, why, where,
                  len(entries))
        self.rewrite(entries)
        return entries

    def add(self, path: str, size: int, mtime_ns: int, entries: dict[str, tuple[int, int]]) -> None:
        """Record one image done (`entries`, all the images remembered, already holds it)."""
        self.attempts.pop(path, None)
        self._append([path, size, mtime_ns], entries)

    def attempt(self, path: str, size: int, mtime_ns: int, entries: dict[str, tuple[int, int]]) -> None:
        """Record that an image is about to be handed out (read, then processed)."""
        self._count_attempt(path, size, mtime_ns, 1)
        self._append([path, size, mtime_ns, "attempt"], entries)

    def release(self, path: str, size: int, mtime_ns: int, entries: dict[str, tuple[int, int]]) -> None:
        """Take back an attempt that ended without the image being done, and without a crash (an I/O error, a
        close with the image not yet processed)."""
        if path not in self.attempts:
            return
        self._count_attempt(path, size, mtime_ns, -1)
        self._append([path, size, mtime_ns, "released"], entries)

    def _append(self, item: list, entries: dict[str, tuple[int, int]]) -> None:
        if self.path is None:
            return
        if self._lines < 0 or self._lines >= 2 * (len(entries) + len(self.attempts)) + 64:
            self.rewrite(entries)
            return
        try:
            if self._fh is None:
                self._fh = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - kept open between images
            self._fh.write(json.dumps(item) + "\n")
            self._fh.flush()
            os.fsync(self._fh.fileno())
        except OSError as exc:
            self._failed(exc)
            self.close()
            self._lines = -1  # the file may end in a partial line: write it whole next time
            return
        self._lines += 1
        self._succeeded()

    def rewrite(self, entries: dict[str, tuple[int, int]]) -> None:
        """Write the whole record atomically: a temporary file beside it, fsynced, then renamed over it."""
        if self.path is None:
            return
        self.close()
        lines = [json.dumps({"drywallqa-watched": self.VERSION, "uri": self.uri}) + "\n"]
        lines += [json.dumps([p, s, m]) + "\n" for p, (s, m) in entries.items()]
        lines += [json.dumps([p, s, m, "attempt"]) + "\n" for p, (s, m, n) in self.attempts.items() for _ in range(n)]
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            replace_durably(self.path, "".join(lines).encode("utf-8"))
        except OSError as exc:
            self._failed(exc)
            self._lines = -1
            return
        self._lines = len(entries) + sum(n for _, _, n in self.attempts.values()) + 1
        self._succeeded()

    def _failed(self, exc: OSError) -> None:
        if not self.error:
            log.error("watched-folder record %s cannot be written (%s): the images done are remembered in memory only "
                      "(a restart processes them again) until it can; free disk space or fix spool.path", self.path,
                      exc)
        self.error = f"watched-folder record {self.path} cannot be written ({exc.strerror or exc})"

    def _succeeded(self) -> None:
        if self.error:
            log.warning("watched-folder record %s is writable again", self.path)
            self.error = ""

    def close(self) -> None:
        if self._fh is not None:
            with contextlib.suppress(OSError):
                self._fh.close()
            self._fh = None


def normal_path(path: str) -> str:
    """One spelling of a path or glob, so that a record made under one is found under another: absolute, without
    '.', repeated or trailing separators, '..' folded (os.path.normpath, as os.path.abspath does; glob characters
    kept). Symlinks are not resolved: a record must not change with what a mount point's link points at. A path that
    was already normal is itself (records named after it keep their name)."""
    path = os.path.normpath(os.path.abspath(path))
    return path[1:] if os.sep == "/" and path.startswith("//") else path  # POSIX keeps '//x'; Linux reads it as '/x'


def watch_record_path(state_file: str | Path, uri: str) -> Path:
    """Where a watched folder's record lives: beside `state_file` (the runtime's alert spool, which one runtime
    alone holds), named after it and a hash of the source's normalised uri (normal_path: '/data/in/', '/data/./in'
    and '/data/in' share one record), e.g. spool.watched-1f3a9c0d2b4e6a8f.jsonl."""
    state_file = Path(state_file)
    digest = hashlib.sha256(normal_path(uri).encode()).hexdigest()[:16]
    return state_file.with_name(f"{state_file.stem}.watched-{digest}.jsonl")


def _lacks_end_marker(path: str) -> bool:
    """A JPEG that does not end with its end-of-image marker (FF D9) or a PNG without its IEND chunk: most likely a
    copy still going on (trailing padding is allowed). Other formats are not checked."""
    suffix = os.path.splitext(path)[1].lower()
    if suffix in JPEG_SUFFIXES:
        end = b"\xff\xd9"
    elif suffix == ".png":
        end = b"IEND\xaeB`\x82"
    else:
        return False
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 64))
            tail = f.read()
    except OSError:
        return False  # the read will report it
    return not tail.rstrip(b"\x00\r\n\t ").endswith(end)


def _has_wildcard(text: str) -> bool:
    return any(ch in text for ch in "*?[")


def _glob_root(uri: str) -> str:
    """The folder a glob lists in: its leading path parts without a wildcard ('.' when the first part has one)."""
    fixed: list[str] = []
    for part in Path(uri).parts[:-1]:
        if _has_wildcard(part):
            break
        fixed.append(part)
    return str(Path(*fixed)) if fixed else "."


def _is_glob(uri: str) -> bool:
    """A glob, or one image file (a glob that names it): listed with glob.glob, in the folder that holds it."""
    return _has_wildcard(uri) or (Path(uri).suffix.lower() in IMAGE_EXTENSIONS and not os.path.isdir(uri))


def missing_folder_problem(uri: str) -> str:
    """'folder not found: ...' when the folder that a folder or glob source lists in is not there, else ''."""
    glob_like = _is_glob(uri)
    root = _glob_root(uri) if glob_like else uri
    if os.path.isdir(root):
        return ""
    return f"folder not found: {root!r}" + (f" (of {uri!r})" if glob_like else "")


class WatchedFolderSource(FrameSource):
    """A folder or glob watched for new images (source.watch); it never ends. Each image is handed out once, by
    modification time then name, when it has stopped changing for `settle_s` (a copy or sync may still be writing
    it); a JPEG without its end marker or a PNG without IEND waits up to `incomplete_s` after its last change for the
    rest. Hidden files (a sync tool's partial downloads, macOS's ._ files) are left alone. With nothing new it
    raises NoNewFrame: the capture thread sleeps `poll_s`, then the folder is listed again.

    What was handed out is remembered by path, size and modification time: an image that changes afterwards (a copy
    that stalled longer than `settle_s` and was read half-written, a photo replaced) is handed out again. The
    consumer calls `done(key)` once it has finished with a frame (published, or failed): the image is then written to
    the record (`record_path`, see WatchRecord), so a restart goes on where it stopped, processing again at most the
    images that were in flight; an image that every one of WATCH_MAX_ATTEMPTS runs took and none finished (it
    crashes or hangs the runtime) is skipped at start (`given_up`). An image that cannot be decoded is done at once
    (it is not retried unless it changes); one that cannot be read (an I/O error, or gone) is not: it is handed out
    again after `retry_s`, doubled at each failure, and done only after `io_attempts` failures (CorruptFrame each
    time). A missing or unlistable folder (for a glob: the folder it lists in) is a SourceError, reopened with
    backoff; nothing is forgotten because of it. An image gone from a listing that holds others is forgotten once it
    has been missing for `forget_s` while its own folder is there (the record stays as small as the folder), never
    because a listing is empty (an unmounted share's empty mount point) or its folder is gone (one share of a glob
    over several)."""

    kind = "images"

    def __init__(self, uri: str, *, poll_s: float = WATCH_POLL_S, settle_s: float = WATCH_SETTLE_S,
                 incomplete_s: float = WATCH_INCOMPLETE_S, forget_s: float = WATCH_FORGET_S,
                 retry_s: float = WATCH_RETRY_S, io_attempts: int = WATCH_IO_ATTEMPTS,
                 record_path: str | Path | None = None) -> None:
        super().__init__(uri)
        self.poll_s, self.settle_s, self.incomplete_s, self.forget_s = poll_s, settle_s, incomplete_s, forget_s
        self.retry_s, self.io_attempts = retry_s, io_attempts
        # Listed under one spelling (normal_path), so an image is known by the same path however the uri is written.
        self._where = normal_path(uri)
        self._lock = threading.Lock()  # done() comes from the consumer's thread
        self._record = WatchRecord(record_path, uri)
        self._done = self._record.load()  # path -> (size, mtime_ns): finished with, as the record file holds
        self._taken = dict(self._done)  # path -> (size, mtime_ns): handed out (done or still in flight)
        self._missing_since: dict[str, float] = {}  # remembered paths absent from the last listings, since when
        self._queue: list[tuple[str, tuple[int, int]]] = []  # ready, in order, not yet handed out
        self._changing: dict[str, tuple[tuple[int, int], float]] = {}  # path -> (size, mtime_ns), first seen so
        self._in_flight: dict[str, tuple[int, int]] = {}  # handed out, not done yet
        # path -> ((size, mtime_ns), failed reads, not to be handed out before this monotonic time)
        self._retry: dict[str, tuple[tuple[int, int], int, float]] = {}

    def describe(self) -> str:
        return f"{self.kind}:{self.uri} (watched)"

    @property
    def record_moved_aside(self) -> Path | None:
        """Where a damaged record file was moved at start (None: it was fine)."""
        return self._record.moved_aside

    @property
    def given_up(self) -> list[str]:
        """The images skipped at start: every run that took them stopped before they were done (see WatchRecord)."""
        return list(self._record.given_up)

    @property
    def ongoing_error(self) -> str:
        """Why the record cannot be written now ('' when it can)."""
        return self._record.error

    def start_notice(self) -> str:
        """Photos given up, else a damaged record moved aside (both found when the record was loaded)."""
        if self.given_up:
            return (f"watched folder: skipped {len(self.given_up)} photo(s) that stopped the runtime each time they "
                    f"were processed: {', '.join(self.given_up[:5])}")
        if self.record_moved_aside is not None:
            return f"watched-folder record was damaged: moved aside to {self.record_moved_aside}, started afresh"
        return ""

    def open(self) -> None:
        self._check_folder()
        self._queue = []

    def close(self) -> None:
        with self._lock:
            for path, (size, mtime_ns) in self._in_flight.items():  # not processed, but no crash either
                self._record.release(path, size, mtime_ns, self._done)
            self._in_flight.clear()
            self._record.close()

    def _check_folder(self) -> None:
        problem = missing_folder_problem(self._where)
        if problem:
            raise SourceError(problem)

    def read(self) -> np.ndarray:
        if not self._queue:
            self._queue = self._new_images()
        while True:
            if not self._queue:
                raise NoNewFrame(self.uri, self.poll_s)
            path, signature = self._queue.pop(0)
            try:
                st = os.stat(path)
            except OSError:
                self._check_folder()  # the whole folder gone: reconnect, and the queue is listed afresh then
                raise CorruptFrame(f"image disappeared before it was read, skipped: {path}") from None
            if (st.st_size, st.st_mtime_ns) == signature:
                break  # else it changed since it was listed: a later listing hands it out once it has settled again
        self.key = (path, *signature)
        with self._lock:
            self._taken[path] = signature
            self._in_flight[path] = signature
            self._record.attempt(path, *signature, self._done)  # before the decode: a crash in it is counted
        try:
            return check_frame(read_image_rgb(path))
        except ImageIOError as exc:
            self._read_failed(path, signature, exc)
        except (ImageReadError, CorruptFrame) as exc:
            self.done(self.key)  # undecodable: nothing downstream will finish it, not retried unless it changes
            raise CorruptFrame(str(exc)) from exc

    def _read_failed(self, path: str, signature: tuple[int, int], exc: ImageIOError) -> NoReturn:
        """An image that could not be read (an I/O error, or gone) is not done: a later listing hands it out again
        after a wait, unless this was its io_attempts-th failure. A folder gone meanwhile is a SourceError."""
        key = (path, *signature)
        with self._lock:
            self._in_flight.pop(path, None)
            self._record.release(path, *signature, self._done)
            self._taken.pop(path, None)
        self._check_folder()  # the card pulled, the share gone: reconnect; not the image's failure
        previous = self._retry.get(path)
        failures = previous[1] + 1 if previous is not None and previous[0] == signature else 1
        if failures >= self.io_attempts:
            self._retry.pop(path, None)
            log.error("watched folder %s: image %s could not be read %d times (%s); giving up on it, recorded as "
                      "done (change or touch the file to process it again)", self.uri, path, failures, exc)
            self.done(key)
            raise CorruptFrame(f"{exc} ({failures} failures: given up)") from exc
        wait_s = self.retry_s * 2 ** (failures - 1)
        self._retry[path] = (signature, failures, time.monotonic() + wait_s)
        log.warning("watched folder %s: %s; tried again in %.0f s (failure %d of %d)", self.uri, exc, wait_s,
                    failures, self.io_attempts)
        raise CorruptFrame(f"{exc} (tried again in {wait_s:.0f} s)") from exc

    def done(self, key: object) -> None:
        path, size, mtime_ns = key  # type: ignore[misc]
        with self._lock:
            if self._in_flight.get(path) == (size, mtime_ns):
                del self._in_flight[path]
            if self._done.get(path) == (size, mtime_ns):
                return
            self._done[path] = (size, mtime_ns)
            self._taken.setdefault(path, (size, mtime_ns))
            self._record.add(path, size, mtime_ns, self._done)

    def _list(self) -> list[str]:
        """The image files the folder or glob names now; SourceError when the folder is missing or unreadable."""
        self._check_folder()
        try:
            return list_images(self._where)  # a glob hides errors: the folder was checked above
        except OSError as exc:
            raise SourceError(f"cannot list {self.uri!r}: {exc.strerror or exc}") from exc

    def _new_images(self) -> list[tuple[str, tuple[int, int]]]:
        """The images not handed out yet (or changed since) that have stopped changing, oldest first."""
        names = self._list()
        present = set(names)
        self._forget_missing(present)
        self._changing = {p: seen for p, seen in self._changing.items() if p in present}
        self._retry = {p: retry for p, retry in self._retry.items() if p in present}
        now = time.monotonic()
        ready = []
        for path in names:
            if os.path.basename(path).startswith("."):
                continue
            try:
                st = os.stat(path)
            except OSError:
                continue
            signature = (st.st_size, st.st_mtime_ns)
            with self._lock:
                if self._taken.get(path) == signature:
                    continue
            retry = self._retry.get(path)
            if retry is not None and retry[0] == signature and now < retry[2]:
                continue  # could not be read a moment ago: not yet
            if self._settled(path, st):
                ready.append((st.st_mtime_ns, path, signature))
        return [(path, signature) for _, path, signature in sorted(ready)]

    def _forget_missing(self, present: set[str]) -> None:
        """Forget the images missing from the listings for forget_s, so the record stays as small as the folder.
        An empty listing forgets nothing and restarts the count: the folder may be an empty mount point for now; so
        does an image whose own folder is gone (a glob over several shares, one of them offline)."""
        if not present:
            self._missing_since.clear()
            return
        now = time.monotonic()
        with self._lock:
            missing = [path for path in self._taken if path not in present]
        gone = {folder for folder in {os.path.dirname(p) for p in missing} if not os.path.isdir(folder)}
        with self._lock:
            for path in list(self._taken):
                if path in present or os.path.dirname(path) in gone:  # there, or its folder is offline for now
                    self._missing_since.pop(path, None)
                elif now - self._missing_since.setdefault(path, now) >= self.forget_s:
                    del self._missing_since[path]
                    self._taken.pop(path, None)
                    self._done.pop(path, None)  # the file drops it when it is next rewritten

    def _settled(self, path: str, st: os.stat_result) -> bool:
        """Not empty, unchanged for settle_s, and not a JPEG or PNG lacking its end while it changed less than
        incomplete_s ago. Unchanged by its own modification time or, for a file dated ahead of this clock (a tablet's
        clock, a preserved time), by how long this source has seen it unchanged."""
        if st.st_size == 0:
            return False
        unchanged_for = time.time() - st.st_mtime
        if unchanged_for >= self.settle_s:
            self._changing.pop(path, None)
        else:
            signature, now = (st.st_size, st.st_mtime_ns), time.monotonic()
            seen = self._changing.get(path)
            if seen is None or seen[0] != signature:
                self._changing[path] = (signature, now)
                return False
            unchanged_for = now - seen[1]
            if unchanged_for < self.settle_s:
                return False
        return unchanged_for >= self.incomplete_s or not _lacks_end_marker(path)


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


def classify_uri(uri: str, watch: bool = False) -> str:
    """demo | camera | stream | file | images. With `watch`, a path that does not exist yet is a folder to watch (a
    share or card mounted later), not a missing video file, unless it ends like a video file (`site.mp4`)."""
    if uri == "demo":
        return "demo"
    if uri.isdigit() or _DEV_VIDEO.match(uri) or uri.startswith("/dev/v4l/"):  # by-id/by-path: stable names
        return "camera"
    if uri.lower().startswith(STREAM_SCHEMES):
        return "stream"
    p = Path(uri)
    if p.is_dir() or _has_wildcard(uri) or uri.endswith(("/", os.sep)):  # 'photos/': a folder, there or not yet
        return "images"
    if p.suffix.lower() in IMAGE_EXTENSIONS:
        return "images"
    if watch and not p.exists() and p.suffix.lower() not in VIDEO_SUFFIXES:
        return "images"
    return "file"


def check_source_exists(uri: str, watch: bool = False) -> None:
    """At start-up a video file must be there and open: a typo (or '/dev/vide0') or a file that is not a video should
    stop the service with a clear error, not retry forever. Cameras, streams and folders may come later, so they are
    retried, a folder to watch too (`watch`). With `watch` a video file not there yet is waited for as well (a USB
    drive mounted late at boot): the user asked to wait, and exiting would soon use up the unit's start limit."""
    if classify_uri(uri, watch) != "file":
        return
    if watch and not Path(uri).expanduser().exists():
        if problem := unmountable_video_folder(uri):
            raise SourceConfigError(f"source.uri: {problem}")
        log.warning("source.uri: video file not found: %r; waiting for it to appear (source.watch: true)%s", uri,
                    _missing_hint(uri))
        return
    if not Path(uri).expanduser().is_file():
        what = "video file" if Path(uri).suffix else "video file or folder"
        raise SourceError(f"source.uri: {what} not found: {uri!r}{_missing_hint(uri)} (or a camera index, "
                          f"/dev/videoN, a URL, a folder, a glob or 'demo')")
    probe = CvCaptureSource(uri, "file")
    try:
        probe.open()
    except UnreadableSource as exc:
        raise UnreadableSource(f"source.uri: {exc}") from exc
    except SourceError:
        pass  # still being written: the capture thread retries it
    finally:
        probe.close()


def unmountable_video_folder(uri: str) -> str:
    """Why a watched video file can never appear at `uri` ('' when it can): its folder does not exist, and is not
    where a drive may be mounted later (see _may_be_mounted_later)."""
    folder = Path(uri).expanduser().absolute().parent
    if folder.is_dir() or _may_be_mounted_later(folder):
        return ""
    missing = folder
    while not missing.parent.is_dir() and missing.parent != missing:
        missing = missing.parent  # the first folder of the path that is not there
    close = _similar_names(missing, folders=True)
    hint = f" Did you mean {' or '.join(str(missing.with_name(n)) for n in close)}?" if close else ""
    return (f"the folder of the video file {uri!r} does not exist: {missing}.{hint} Correct the path: a video file "
            f"not there yet is waited for (source.watch) only in a folder that exists, or where a drive is mounted "
            f"later (under {', '.join(MOUNT_ROOTS)} or an /etc/fstab mount point not mounted yet)")


def _may_be_mounted_later(folder: Path, fstab: Path = FSTAB) -> bool:
    """Whether the missing `folder` may be on a drive not mounted yet: it lies under MOUNT_ROOTS or under a mount
    point that `fstab` lists and that is not mounted now, and no drive is mounted there already (the deepest folder
    of its path that exists is no mount point below that root: then the drive is there, and the path is wrong)."""
    existing = folder
    while not existing.is_dir() and existing.parent != existing:
        existing = existing.parent
    try:
        lines = fstab.read_text(errors="replace").splitlines()
    except OSError:
        lines = []
    fields = [line.split() for line in lines if not line.lstrip().startswith("#")]
    points = [Path(f[1].replace("\\040", " ")) for f in fields if len(f) > 1 and f[1].startswith("/")]  # \040: ' '
    roots = [Path(root) for root in MOUNT_ROOTS] + [p for p in points if not os.path.ismount(p)]
    return any((root == folder or root in folder.parents)
               and not (root in existing.parents and os.path.ismount(existing)) for root in roots)


def _missing_hint(path: str) -> str:
    """'; did you mean site_cam.mp4?' naming the files beside a missing one whose names are close (a typo), or ''."""
    close = _similar_names(Path(path).expanduser(), folders=False)
    return f"; did you mean {' or '.join(close)}?" if close else ""


def _similar_names(path: Path, *, folders: bool) -> list[str]:
    """The names of the entries (files, or `folders`) beside `path` that are close to its own, case aside (at most
    three, closest first); [] when none is, or its folder cannot be listed."""
    try:
        with os.scandir(path.parent) as entries:
            names = [e.name for e in itertools.islice(entries, SIMILAR_NAMES_SCANNED)
                     if not e.name.startswith(".") and (e.is_dir() if folders else e.is_file())]
    except OSError:
        return []
    by_lower = {n.lower(): n for n in sorted(names)}
    return [by_lower[c] for c in difflib.get_close_matches(path.name.lower(), list(by_lower), n=3, cutoff=0.6)]


def make_source(uri: str, *, width: int | None = None, height: int | None = None, timeout_s: float = 5.0,
                demo_size: tuple[int, int] = (480, 640), watch: bool = False,
                watch_record: str | Path | None = None) -> FrameSource:
    """The source for `uri`; `watch` makes a folder or glob a WatchedFolderSource that keeps what it processed in the
    file `watch_record` (None: in memory only). A video file is played as without it (reopened with backoff while it
    is not there yet); other kinds ignore it, with a warning."""
    kind = classify_uri(uri, watch)
    if kind == "file":
        uri = os.path.expanduser(uri)  # as check_source_exists reads it
    if watch and kind == "file":
        log.info("source.watch on video file %r: it is waited for while missing, and played once it has not changed "
                 "for %.0f s (it may be being copied in)", uri, FILE_SETTLE_S)
    elif watch and kind != "images":  # not refused: `--source /dev/video0` on a device configured to watch a folder
        log.warning("source.watch applies to folders and globs of photos; %r is a %s source, so it is ignored", uri,
                    kind)
    if kind == "demo":
        return DemoSource(demo_size)
    if kind == "images":
        return WatchedFolderSource(uri, record_path=watch_record) if watch else ImageListSource(uri)
    return CvCaptureSource(uri, kind, width=width, height=height, timeout_s=timeout_s, settle=watch)
