"""Capture thread: reads a FrameSource, hands over only the newest frame, reopens failed sources with backoff.

In realtime mode an unconsumed frame is replaced by the next one (counted in `dropped`), so the
consumer never works on a backlog. A frame is also only decoded when the consumer should be back for a
frame before the next one arrives (judged from how often it has been taking frames): a 30 fps camera
feeding a 10 fps model then decodes about 10 frames a second, not 30. In lossless mode (files,
benchmarks) the reader waits instead. The consumer hands each frame back with `done()` once it has finished with
it; a watched folder records its photo as processed then (at-least-once across restarts).

`stats.last_error` is the source's trouble: set when it is reopened or ends early, cleared when frames flow again
after a reopen. A source that can never be read (UnreadableSource) ends instead of being retried.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from drywallqa.edge.sources import (
    CorruptFrame,
    EndOfSource,
    FrameSource,
    NoNewFrame,
    SourceError,
    UnreadableSource,
)

log = logging.getLogger(__name__)

MAX_CONSECUTIVE_CORRUPT = 100  # then the source is treated as broken and reopened


@dataclass
class Frame:
    frame_id: int
    image: np.ndarray  # RGB uint8 H x W x 3
    t_capture: float  # time.monotonic() when read
    wall_time: float  # time.time() when read
    key: object = None  # the source's name for it (a watched folder's photo), handed back by Capture.done
    alerts_in_memory: bool = False  # an alert of it could not be spooled (kept in memory only): not to be done()


@dataclass
class CaptureStats:
    captured: int = 0
    dropped: int = 0
    corrupt: int = 0
    reopens: int = 0
    state: str = "starting"  # starting | open | waiting | reconnecting | stalled | ended | stopped
    last_error: str = ""


class Capture:
    def __init__(
        self,
        source: FrameSource,
        *,
        realtime: bool,
        loop: bool = False,
        fps: float | None = None,
        stall_timeout_s: float = 5.0,
        reconnect_min_s: float = 0.5,
        reconnect_max_s: float = 10.0,
        on_state: Callable[[str], None] | None = None,
    ) -> None:
        self.source = source
        self.realtime = realtime
        self.loop = loop
        self.fps = fps
        self.stall_timeout_s = stall_timeout_s
        self.reconnect_min_s = reconnect_min_s
        self.reconnect_max_s = reconnect_max_s
        self.on_state = on_state
        self.stats = CaptureStats()
        self._cond = threading.Condition()
        self._slot: Frame | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="capture", daemon=True)
        self._next_id = 0
        self._last_frame_t = time.monotonic()
        self._in_call_since: float | None = None  # monotonic start of the source call in progress
        self._recovering = False  # reopened after an error: the first frame clears stats.last_error
        # consumer pace, for deciding which grabbed frames are worth decoding (realtime mode)
        self._waiting = False
        self._last_take: float | None = None
        self._take_interval: float | None = None  # smoothed seconds between frames taken
        self._grab_interval: float | None = None  # smoothed seconds between frames grabbed

    # -- consumer side -------------------------------------------------------------------------------------
    def start(self) -> Capture:
        self._thread.start()
        return self

    def get(self, timeout: float = 1.0) -> Frame | None:
        """The newest frame, or None after `timeout` (or when the source has ended)."""
        with self._cond:
            if self._slot is None:
                self._waiting = True
                self._cond.wait_for(lambda: self._slot is not None or self.finished, timeout)
                self._waiting = False
            frame, self._slot = self._slot, None
            if frame is not None:
                now = time.monotonic()
                if self._last_take is not None:
                    self._take_interval = _smooth(self._take_interval, now - self._last_take)
                self._last_take = now
            self._cond.notify_all()
        if frame is None:
            self._check_stall()
        return frame

    def done(self, frame: Frame) -> None:
        """The consumer has finished with `frame`: its results are published or spooled, or it failed and will not
        be tried again. A watched folder then records its photo as processed, so a restart does not process it
        again; a frame never handed back (in flight when the process stopped) is processed again by the next run.
        Never raises: a record that cannot be written is the source's to report."""
        if frame.key is None:
            return
        try:
            self.source.done(frame.key)
        except Exception:  # noqa: BLE001 - recording must never stop the loop
            log.exception("source %s: could not record frame %d as done", self.source.describe(), frame.frame_id)

    def _worth_decoding(self) -> bool:
        """Realtime: decode the grabbed frame unless the consumer is busy beyond the next frame's arrival
        (then that next frame is the fresher one to hand over)."""
        with self._cond:
            if self._waiting or self._take_interval is None or self._last_take is None:
                return True
            due = self._last_take + self._take_interval
        return time.monotonic() + (self._grab_interval or 0.0) >= due

    @property
    def finished(self) -> bool:
        return self.stats.state in ("ended", "stopped") and self._slot is None

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)
        if not self._thread.is_alive():
            self.source.close()  # never from here while the reader may still be inside read()
        if self.stats.state != "ended":
            self._set_state("stopped")

    def stuck_for(self) -> float:
        """Seconds the reader has been inside one call of the source (open, grab or decode); 0 between calls. A
        camera read that never returns (past OpenCV's and the driver's own timeouts) cannot be interrupted from
        Python: the runner then stops the systemd watchdog, which restarts the process."""
        since = self._in_call_since
        return 0.0 if since is None else time.monotonic() - since

    @contextlib.contextmanager
    def _source_call(self):
        self._in_call_since = time.monotonic()
        try:
            yield
        finally:
            self._in_call_since = None

    def _check_stall(self) -> None:
        if self.stats.state == "open" and time.monotonic() - self._last_frame_t > self.stall_timeout_s:
            self._set_state("stalled")

    # -- reader side ---------------------------------------------------------------------------------------
    def _set_state(self, state: str, error: str = "") -> None:
        if error:
            self.stats.last_error = error
        if state != self.stats.state:
            self.stats.state = state
            log.info("source %s: %s%s", self.source.describe(), state, f" ({error})" if error else "")
            if self.on_state is not None:
                self.on_state(state)

    def _sleep(self, seconds: float) -> bool:
        """Sleep unless stopped; True when stopped."""
        return self._stop.wait(seconds)

    def _reconnect_later(self, error: str, backoff: float) -> float | None:
        """State `reconnecting` with `error`, then wait `backoff` seconds: the next backoff (doubled, at most
        reconnect_max_s), or None when stopped meanwhile."""
        self._recovering = True
        self._set_state("reconnecting", error)
        if self._sleep(backoff):
            return None
        return min(backoff * 2, self.reconnect_max_s)

    def _recovered(self) -> None:
        """Frames flow again after a reopen: the error behind it is over, so status.last_error stops showing it."""
        self._recovering = False
        if self.stats.last_error:
            log.info("source %s: frames flow again (the error was: %s)", self.source.describe(), self.stats.last_error)
            self.stats.last_error = ""

    def _end_unreadable(self, exc: UnreadableSource) -> None:
        """A source no retry can cure (a video file that is not one): it ends with the reason, as a finished file."""
        log.error("source %s cannot be read, it ends: %s", self.source.describe(), exc)
        self._set_state("ended", str(exc))

    def _pace(self, next_t: float, period: float | None) -> tuple[float, bool]:
        """Sleep until the next frame is due (paced sources); returns the new due time and whether stopped."""
        if period is None:
            return next_t, False
        next_t = max(next_t + period, time.monotonic() - period)
        return next_t, self._sleep(max(0.0, next_t - time.monotonic()))

    def _run(self) -> None:
        backoff = self.reconnect_min_s
        opened = False
        consecutive_corrupt = 0
        frames_this_pass = 0  # frames read since the source was (re)opened
        period = 1.0 / self.fps if self.fps else None
        next_t = time.monotonic()
        while not self._stop.is_set():
            if not opened:
                try:
                    with self._source_call():
                        self.source.open()
                except UnreadableSource as exc:
                    self._end_unreadable(exc)
                    break
                except Exception as exc:  # noqa: BLE001 - any other failure to open means: retry later
                    backoff = self._reconnect_later(str(exc), backoff)
                    if backoff is None:
                        break
                    continue
                opened = True
                frames_this_pass = 0
                if self.stats.state not in ("starting", "open"):
                    self.stats.reopens += 1
                self._set_state("open")
                self._last_frame_t = time.monotonic()
                if period is None and self.realtime and not self.source.live:
                    native = self.source.native_fps
                    period = 1.0 / native if native else None
                if period is None and isinstance(self.source.native_fps, float) and self.source.kind == "demo":
                    period = 1.0 / self.source.native_fps
                next_t = time.monotonic()
            try:
                with self._source_call():
                    self.source.grab()
                grabbed_at, grabbed_wall = time.monotonic(), time.time()
                self._grab_interval = _smooth(self._grab_interval, grabbed_at - self._last_frame_t)
                self._last_frame_t = grabbed_at
                if self.realtime and not self._worth_decoding():
                    frames_this_pass += 1
                    self.stats.captured += 1
                    self.stats.dropped += 1  # never decoded: the consumer will not be back in time for it
                    next_t, stopped = self._pace(next_t, period)
                    if stopped:
                        break
                    continue
                with self._source_call():
                    image = self.source.retrieve()
            except CorruptFrame as exc:
                self.stats.corrupt += 1
                consecutive_corrupt += 1
                log.warning("corrupt frame skipped (%d so far): %s", self.stats.corrupt, exc)
                if consecutive_corrupt >= MAX_CONSECUTIVE_CORRUPT:
                    self.source.close()
                    opened = False
                    consecutive_corrupt = 0
                    backoff = self._reconnect_later("too many corrupt frames in a row", backoff)
                    if backoff is None:
                        break
                continue
            except EndOfSource as exc:
                self.source.close()
                opened = False
                if exc.problem:
                    log.warning("%s", exc.problem)
                    self.stats.last_error = exc.problem
                if self.loop:
                    if frames_this_pass == 0:  # not one frame from start to end: restarting at once would spin
                        backoff = self._reconnect_later(exc.problem or f"{self.source.describe()}: not one frame "
                                                        f"could be read from start to end", backoff)
                        if backoff is None:
                            break
                    continue
                self._set_state("ended")
                break
            except NoNewFrame as exc:  # a watched folder with nothing new: look again later, never spin
                self._set_state("waiting")
                if self._recovering:  # it could be listed again: the error that reopened it is over
                    self._recovered()
                if self._sleep(exc.retry_after_s):
                    break
                continue
            except Exception as exc:  # noqa: BLE001 - SourceError or an unexpected backend failure
                if not isinstance(exc, SourceError):
                    log.exception("unexpected error reading %s", self.source.describe())
                self.source.close()
                opened = False
                backoff = self._reconnect_later(str(exc), backoff)
                if backoff is None:
                    break
                continue
            consecutive_corrupt = 0
            frames_this_pass += 1
            backoff = self.reconnect_min_s
            if self.stats.state in ("stalled", "waiting"):
                self._set_state("open")
            if self._recovering:
                self._recovered()
            frame = Frame(self._next_id, image, grabbed_at, grabbed_wall, self.source.key)  # latency from the grab
            self._next_id += 1
            self.stats.captured += 1
            with self._cond:
                if self._slot is not None:
                    if self.realtime:
                        self.stats.dropped += 1
                    else:
                        self._cond.wait_for(lambda: self._slot is None or self._stop.is_set())
                self._slot = frame
                self._cond.notify_all()
            next_t, stopped = self._pace(next_t, period)
            if stopped:
                break
        with self._cond:
            if self.stats.state != "ended":
                self.stats.state = "stopped"
            self._cond.notify_all()
        self.source.close()


def _smooth(previous: float | None, value: float, weight: float = 0.2) -> float:
    return value if previous is None else (1 - weight) * previous + weight * value
