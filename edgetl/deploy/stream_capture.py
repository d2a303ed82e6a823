"""One stream of a multi-stream run: its capture thread (reconnecting with backoff), its newest frame and
its numbers. The scheduler that takes the frames is `deploy/streams.py`."""

from __future__ import annotations

import collections
import dataclasses
import threading
import time
from pathlib import Path

import numpy as np

from edgetl.data.preprocess import decode_bgr, opencv
from edgetl.data.sources import read_regular
from edgetl.deploy import events as ev
from edgetl.deploy.stream_sources import Source
from edgetl.deploy.video import opencv_name, unlink_name
from edgetl.errors import EdgetlError

DROP_REASONS = ("superseded", "stale")


@dataclasses.dataclass
class Item:
    seq: int  # the frame's number in its stream (frames in)
    t: float  # time.monotonic() when it was read
    pos: float  # seconds: position in a file, or since the run began
    bgr: np.ndarray


@dataclasses.dataclass
class Result:
    stream: "Stream"
    item: Item
    probs: np.ndarray
    done: float  # time.monotonic() when inference returned


class Stream:
    """A source's capture thread, its newest frame and its numbers."""

    def __init__(self, hub, src: Source):  # hub: the Streams that schedules it
        self.hub, self.src, self.name = hub, src, src.name
        self.state = "starting"  # starting | up | down | ended | gave up | stopped
        self.frames_in = 0
        self.inferred = 0
        self.dropped = dict.fromkeys(DROP_REASONS, 0)
        self.reconnects = 0  # recoveries after a loss
        self.failed_opens = 0
        self.slot: Item | None = None  # the newest frame not yet taken
        self.busy = False  # a frame of this stream is being inferred
        self.last: Item | None = None  # the newest frame read (snapshots)
        self.latencies: collections.deque = collections.deque(maxlen=2048)  # capture → result, ms
        self.label: str | None = None  # the stream's (debounced) class
        self.prob = 0.0
        self.error: str | None = None
        self.fps = 0.0
        self.thread = threading.Thread(target=self._run, name=f"edgetl-capture-{self.name}", daemon=True)

    # --- capture thread ---------------------------------------------------------------------------
    def _open(self):
        cv2 = opencv()
        s, hub = self.src, self.hub
        if s.kind == "camera":
            cap = cv2.VideoCapture(int(s.target))
        elif s.kind == "stream":
            cap = cv2.VideoCapture(str(s.target), cv2.CAP_FFMPEG,
                                   [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, int(hub.open_timeout * 1000),
                                    cv2.CAP_PROP_READ_TIMEOUT_MSEC, int(hub.silence * 1000),
                                    cv2.CAP_PROP_N_THREADS, 1])
        else:  # a file: one decoding thread per stream (the streams are the parallelism)
            name, link = opencv_name(Path(s.target))  # OpenCV takes UTF-8 names only (others crashed it)
            try:
                cap = cv2.VideoCapture(name, cv2.CAP_ANY, [cv2.CAP_PROP_N_THREADS, 1])
            finally:
                unlink_name(link)
        if not cap.isOpened():
            cap.release()
            return None
        fps = float(cap.get(cv2.CAP_PROP_FPS) or 0.0)
        self.fps = fps if 0 < fps < 1000 else 0.0
        return cap

    def _post(self, bgr: np.ndarray, pos: float) -> bool:
        """Hand a frame over; False when the run is stopping. A live source replaces its untaken frame
        (counted as superseded); the others wait until it is taken."""
        hub = self.hub
        item = Item(self.frames_in, time.monotonic(), pos, bgr)
        with hub.cond:
            if not self.src.live:
                while self.slot is not None and not hub.stopping.is_set():
                    hub.cond.wait(0.2)
            if hub.stopping.is_set():
                return False
            if self.slot is not None:
                self.dropped["superseded"] += 1
            self.slot = item
            self.last = item
            self.frames_in += 1
            hub.cond.notify_all()
        return True

    def _run(self) -> None:
        try:
            if self.src.kind == "files":
                self._run_files()
            else:
                self._run_capture()
        except Exception as e:  # noqa: BLE001 - one stream's failure is its own line, never the others'
            self.error = f"{type(e).__name__}: {e}"
            self.hub.log(f"stream {self.name}: stopped ({self.error})")
            self.state = "gave up"
        finally:
            with self.hub.cond:
                self.hub.cond.notify_all()

    def _run_files(self) -> None:
        self.state = "up"
        for path in self.src.target:
            if self.hub.stopping.is_set():
                break
            try:
                bgr = decode_bgr(read_regular(path), self.hub.model.spec.resize_size, str(path))
            except (OSError, EdgetlError) as e:
                self.hub.log(f"stream {self.name}: skipped {path}: {e}")
                continue
            if not self._post(bgr, 0.0):
                break
        self.state = "stopped" if self.hub.stopping.is_set() else "ended"

    def _run_capture(self) -> None:
        cv2 = opencv()
        hub, src, stop = self.hub, self.src, self.hub.stopping
        attempt, lost_at, reported, was_up = 0, None, False, False
        while not stop.is_set():
            cap = self._open()
            if cap is not None:
                got = 0
                t_start = time.monotonic()
                try:
                    while not stop.is_set():
                        ok, bgr = cap.read()
                        if not ok or bgr is None:
                            break
                        if got == 0:
                            if lost_at is not None:
                                self.reconnects += was_up
                                hub.log(f"stream {self.name}: {'back' if was_up else 'opened'} after "
                                        f"{time.monotonic() - lost_at:.1f} s ({attempt} "
                                        f"{'re' * was_up}connection attempt{'s' * (attempt != 1)})")
                            self.state, was_up = "up", True
                            attempt, lost_at, reported = 0, None, False
                        got += 1
                        if src.kind == "file":
                            pos = cap.get(cv2.CAP_PROP_POS_MSEC) / 1000.0
                            if src.realtime and self.fps:
                                wait = t_start + pos - time.monotonic()
                                if wait > 0 and stop.wait(wait):
                                    break
                        else:
                            pos = time.monotonic() - hub.t0
                        if not self._post(bgr, pos):
                            break
                finally:
                    cap.release()
                if stop.is_set():
                    break
                if src.kind == "file" and got:
                    self.state = "ended"
                    return
                if got:
                    lost_at, reported = time.monotonic(), True
                    self.state = "down"
                    hub.log(f"stream {self.name}: lost (no frame for {hub.silence:g} s, or the source closed); "
                            f"reconnecting with backoff up to {hub.backoff_max:g} s")
            if cap is None or not got:
                self.failed_opens += 1
                if lost_at is None:
                    lost_at = time.monotonic()
                self.state = "down"
                if not reported:
                    reported = True
                    what = "cannot open" if cap is None else "opened but sent no frame"
                    more = ("; retrying with backoff up to " f"{hub.backoff_max:g} s"
                            if src.kind != "file" and src.retries != 0 else "")
                    hub.log(f"stream {self.name}: {what} {self.shown()}{more}")
                if src.kind == "file":  # a file that does not decode does not get better
                    self.state, self.error = "gave up", f"cannot read {src.uri}"
                    return
            if src.retries is not None and attempt >= src.retries:
                self.state = "gave up"
                self.error = f"gave up after {attempt} reconnection attempt{'s' * (attempt != 1)}"
                hub.log(f"stream {self.name}: {self.error}")
                return
            delay = ev.backoff_delay(attempt, hub.backoff_base, hub.backoff_max)
            attempt += 1
            if stop.wait(delay):
                break
        self.state = "stopped"

    # --- numbers --------------------------------------------------------------------------------------
    def shown(self) -> str:
        return ev.redact(self.src.uri)

    def stats(self) -> dict:
        lat = np.array(list(self.latencies)) if self.latencies else None  # a copy: the consumer appends
        return {"source": self.shown(), "kind": self.src.kind, "state": self.state, "frames_in": self.frames_in,
                "inferred": self.inferred, "dropped": dict(self.dropped), "reconnects": self.reconnects,
                "failed_opens": self.failed_opens,
                "latency_ms": {"p50": round(float(np.percentile(lat, 50)), 1) if lat is not None else None,
                               "p99": round(float(np.percentile(lat, 99)), 1) if lat is not None else None},
                "seconds": round(time.monotonic() - self.hub.t0, 3),
                "class": self.label, "prob": round(self.prob, 4), "error": self.error}

    @property
    def finished(self) -> bool:
        return not self.thread.is_alive() and self.state in ("ended", "gave up", "stopped")
