"""Several sources at once (`edgetl run --source A --source B --camera 0`, or `--streams FILE.toml`).
Torch-free.

One capture thread per source keeps only its newest frame (a file stands in for a camera: it is played
at its own frame rate). Inference workers take the fresh frames of all sources in turn (round robin,
at most one frame of a stream in flight, so each stream's results stay in order and no stream gets
more than its share): on a CPU, single-thread sessions side by side, each on up to ⌈streams/sessions⌉
frames per call; on a GPU, one session on every fresh frame at once. A frame replaced by a newer one
before its turn is dropped as `superseded`; one older than `max_age` when its turn comes as `stale`.
A network stream or camera that fails or goes silent is reopened with exponential backoff and jitter,
forever unless `retries` says otherwise; a file ends normally. Each loss and recovery is one line.

The `Streams` object is the API (`edgetl run` uses it; `edgetl serve --source` can too):
`start()`, `results()` or `consume_in_background()`, `stats()`, `snapshot(name)`,
`prometheus()`, `stop()`.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import math
import os
import queue
import re
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np

from edgetl.data.preprocess import decode_bgr, frame_to_input, opencv
from edgetl.data.sources import read_regular
from edgetl.deploy import events as ev
from edgetl.deploy.live import Smoother, SourceError, decide, resolve_source
from edgetl.errors import EdgetlError
from edgetl.ort import cpu_sessions, model_bytes, read_metadata, session

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = None

NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
DROP_REASONS = ("superseded", "stale")
STREAM_KEYS = {"name", "source", "camera", "retries", "realtime"}


@dataclasses.dataclass
class Source:
    """One stream: `kind` camera | stream | file | files (a folder or glob of images)."""

    name: str
    uri: str  # as the user gave it (shown with its password redacted)
    kind: str
    target: object  # camera index, URL, Path, or a list of Paths
    retries: int | None = None  # failed reopenings in a row before giving up; None: forever
    realtime: bool = True  # a video file played at its frame rate (False: every frame, in order)
    named: bool = False  # the name was given (not made from the source)

    @property
    def live(self) -> bool:
        """Newest frame only (drops counted); False: every frame in order, never dropped."""
        return self.kind in ("camera", "stream") or (self.kind == "file" and self.realtime)


def _default_name(uri: str, camera: int | None) -> str:
    if camera is not None:
        return f"camera{camera}"
    tail = uri.split("?")[0].rstrip("/").rsplit("/", 1)[-1]
    stem = Path(tail).stem if "://" not in uri or "/" in uri.split("://", 1)[1] else ""
    stem = re.sub(r"[^A-Za-z0-9_-]+", "-", stem or uri.split("://", 1)[-1].split("/")[0]).strip("-")
    return (stem or "stream")[:64]


def _split_name(text: str) -> tuple[str | None, str]:
    """'door=rtsp://…' → ('door', 'rtsp://…'); a plain source (or a path that exists) → (None, text)."""
    if "=" in text and not os.path.exists(text):
        name, rest = text.split("=", 1)
        if rest and NAME.match(name):
            return name, rest
        if rest and ":" not in name and "/" not in name:
            raise SourceError(f"--source {text!r}: a stream name is letters, digits, - and _ (at most 64)")
    return None, text


def make_source(name: str | None, uri: str | None, camera: int | None = None, retries: int | None = None,
                realtime: bool = True) -> Source:
    """A checked Source. A missing file or an empty folder is an error now; a network stream or a camera
    that cannot open is retried when the run starts."""
    if camera is not None:
        kind, target = "camera", camera
    else:
        kind, target, _ = resolve_source(None, uri)
    given = uri if camera is None else f"camera {camera}"
    named = bool(name)
    name = name or _default_name(uri or "", camera)
    if not NAME.match(name):
        raise SourceError(f"stream name {name!r}: use letters, digits, - and _ (at most 64)")
    return Source(name, given, kind, target, retries, realtime, named)


def parse_sources(sources=(), cameras=(), streams_file: str | None = None, retries: int | None = None) -> list[Source]:
    """--source (each NAME=URI or URI), --camera and --streams FILE.toml → checked Sources with
    unique names (an unnamed duplicate gets -2, -3…; a repeated given name is an error)."""
    out: list[Source] = []
    for text in sources:
        name, uri = _split_name(text)
        out.append(make_source(name, uri, retries=retries))
    for cam in cameras:
        out.append(make_source(None, None, camera=cam, retries=retries))
    if streams_file:
        out += load_streams_file(streams_file, retries)
    if not out:
        raise SourceError("no source: give --source (repeatable, NAME=URI), --camera or --streams FILE.toml")
    named = [s.name for s in out if s.named]
    twice = sorted({n for n in named if named.count(n) > 1})
    if twice:
        raise SourceError(f"two streams are named {twice[0]!r}; give each its own name")
    seen: dict[str, int] = {n: 1 for n in named}
    for s in (s for s in out if not s.named):
        if s.name in seen:
            seen[s.name] += 1
            s.name = f"{s.name}-{seen[s.name]}"
            if s.name in seen:
                raise SourceError(f"two streams are named {s.name!r}; name them (NAME=URI)")
        seen.setdefault(s.name, 1)
    return out


def load_streams_file(path: str, retries: int | None = None) -> list[Source]:
    """A TOML file of [[stream]] tables: name, source (file, folder or URL) or camera (index), and
    optionally retries and realtime. SourceError (one line) for anything else."""
    if tomllib is None:
        raise SourceError("--streams needs Python 3.11 or later (tomllib)")
    try:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    except OSError as e:
        raise SourceError(f"--streams {path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise SourceError(f"--streams {path}: not valid TOML ({e})") from None
    extra = sorted(set(doc) - {"stream"})
    tables = doc.get("stream")
    if extra or not isinstance(tables, list) or not tables:
        what = f"unknown table {extra[0]!r}" if extra else "no [[stream]] tables"
        raise SourceError(f"--streams {path}: {what}; each stream is a [[stream]] table with name and source or camera")
    out = []
    for i, t in enumerate(tables, 1):
        where = f"--streams {path}: stream {i}"
        if not isinstance(t, dict):
            raise SourceError(f"{where}: not a table")
        unknown = sorted(set(t) - STREAM_KEYS)
        if unknown:
            raise SourceError(f"{where}: unknown key {unknown[0]!r} (known: {', '.join(sorted(STREAM_KEYS))})")
        if ("source" in t) == ("camera" in t):
            raise SourceError(f"{where}: give exactly one of source = \"FILE|URL|FOLDER\" or camera = INDEX")
        cam = t.get("camera")
        if cam is not None and (not isinstance(cam, int) or isinstance(cam, bool) or cam < 0):
            raise SourceError(f"{where}: camera is a camera index (0, 1, …)")
        src = t.get("source")
        if src is not None and not (isinstance(src, str) and src):
            raise SourceError(f"{where}: source is a file, folder or URL (a string)")
        r = t.get("retries", retries)
        if r is not None and (not isinstance(r, int) or isinstance(r, bool) or r < 0):
            raise SourceError(f"{where}: retries is a whole number (0: never reconnect)")
        rt = t.get("realtime", True)
        if not isinstance(rt, bool):
            raise SourceError(f"{where}: realtime is true or false")
        name = t.get("name")
        if name is not None and not isinstance(name, str):
            raise SourceError(f"{where}: name is a string")
        out.append(make_source(name, src, cam, r, rt))
    return out


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

    def __init__(self, hub: "Streams", src: Source):
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
        else:
            cap = cv2.VideoCapture(str(s.target))
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


@dataclasses.dataclass
class Summary:
    frames: int
    seconds: float
    ended: str
    exit_code: int
    streams: dict  # name → stats()
    events: dict  # sink → stats()

    def lines(self) -> list[str]:
        out = []
        for name, s in self.streams.items():
            d = s["dropped"]
            drops = ", ".join(f"{k} {v}" for k, v in d.items() if v) or "none"
            lat = s["latency_ms"]
            out.append(f"stream {name}: {s['inferred']} of {s['frames_in']} frames inferred, dropped {drops}, "
                       f"{s['reconnects']} reconnects, capture→result p50 {_ms(lat['p50'])} p99 {_ms(lat['p99'])}; "
                       f"{s['state']}" + (f" ({s['error']})" if s["error"] else ""))
        for name, e in self.events.items():
            out.append(f"{name}: {e['delivered']} events delivered, {e['waiting']} undelivered, {e['dropped']} dropped"
                       + (f", {e['rejected']} refused" if e["rejected"] else ""))
        fps = self.frames / self.seconds if self.seconds > 0 else 0.0
        out.append(f"{self.frames} frames from {len(self.streams)} streams in {self.seconds:.1f} s ({fps:.1f} FPS); "
                   f"{self.ended}")
        return out


class Streams:
    """Several sources inferred together. See the module docstring.

    max_age: a frame older than this (seconds) when its turn comes is dropped (stale).
    silence: a stream with no frame for this long is reopened; open_timeout: the longest open.
    backoff_base/backoff_max: reconnection delays, base × 2^attempt with jitter, at most backoff_max.
    hold, hysteresis, threshold, smooth: the per-stream class and its events (events.Debouncer).
    sinks: events.Sink objects that receive every event; snapshots: put a JPEG in each event.
    """

    def __init__(self, model, sources: list[Source], *, max_age: float = 0.5, silence: float = 10.0,
                 open_timeout: float = 5.0, backoff_base: float = 0.5, backoff_max: float = 30.0,
                 smooth: int = 1, threshold: float = 0.0, top_k: int = 3, hold: ev.Hold = ev.Hold(seconds=1.0),
                 hysteresis: float = 0.05, sinks: list | None = None, snapshots: bool = False,
                 log=lambda line: None, lanes: list | None = None):
        if not sources:
            raise SourceError("no source")
        # FFmpeg (inside OpenCV): quiet (we report each stream's state ourselves), and no global lock around
        # opening, so that a stream that takes its open timeout does not hold back another's reconnection.
        os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")
        os.environ.setdefault("OPENCV_FFMPEG_IS_THREAD_SAFE", "1")
        self.model, self.log = model, log
        self.max_age, self.silence, self.open_timeout = max_age, silence, open_timeout
        self.backoff_base, self.backoff_max = backoff_base, backoff_max
        self.threshold, self.top_k, self.snapshots = threshold, max(1, min(top_k, len(model.classes))), snapshots
        self.sinks = list(sinks or [])
        self.cond = threading.Condition()
        self.stopping = threading.Event()
        self.streams = [Stream(self, s) for s in sources]
        self.by_name = {s.name: s for s in self.streams}
        self._smooth = {s.name: Smoother(smooth) for s in self.streams}
        self._debounce = {s.name: ev.Debouncer(model.classes, threshold, hysteresis, hold) for s in self.streams}
        self.results_q: queue.Queue = queue.Queue(maxsize=4 * len(sources) + 16)
        self._rr = 0
        self._workers: list[threading.Thread] = []
        self._lanes = lanes
        self.error: str | None = None
        self.t0 = time.monotonic()
        self.events_sent = 0
        self.model_sha256 = hashlib.sha256(model_bytes(model.path)).hexdigest()
        self._consumer: threading.Thread | None = None

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.streams]

    # --- inference ----------------------------------------------------------------------------------
    def _make_lanes(self) -> list[tuple[object, int]]:
        """(model, largest batch) per worker: on a GPU one session on every stream's frame at once; on
        a CPU with cores to spare, single-thread sessions side by side (as `run` does for files)."""
        m, n_streams = self.model, len(self.streams)
        n, threads = cpu_sessions()
        if m.provider != "CPUExecutionProvider" or n < 2:
            return [(m, n_streams)]
        blob = model_bytes(m.path)
        sessions = [session(blob, "cpu", threads, spin=False) for _ in range(n)]
        if read_metadata(sessions[0]) != m.metadata:
            raise EdgetlError(f"{m.path} changed while it was being loaded; run again")
        per = max(1, math.ceil(n_streams / n))
        return [(dataclasses.replace(m, session=s), per) for s in sessions]

    def _take(self, most: int) -> list[tuple[Stream, Item]] | None:
        """Up to `most` fresh frames, streams in turn; waits for one; None when every stream has ended."""
        with self.cond:
            while not self.stopping.is_set():
                picked, n, now = [], len(self.streams), time.monotonic()
                last = None
                for k in range(n):
                    i = (self._rr + k) % n
                    s = self.streams[i]
                    if s.busy or s.slot is None:
                        continue
                    item, s.slot = s.slot, None
                    if s.src.live and now - item.t > self.max_age:
                        s.dropped["stale"] += 1
                        continue
                    s.busy = True
                    picked.append((s, item))
                    last = i
                    if len(picked) >= most:
                        break
                if picked:
                    self._rr = (last + 1) % n
                    self.cond.notify_all()  # captures that wait for their slot to empty
                    return picked
                if all(s.finished and s.slot is None for s in self.streams):
                    return None
                self.cond.wait(0.25)
        return None

    def _work(self, lane_model, most: int) -> None:
        spec = lane_model.spec
        try:
            while True:
                got = self._take(most)
                if not got:
                    return
                batch = np.stack([frame_to_input(item.bgr, spec) for _, item in got])
                probs = lane_model.probabilities(batch)
                done = time.monotonic()
                for (s, item), p in zip(got, probs):
                    self._put(Result(s, item, p, done))
                with self.cond:
                    for s, _ in got:
                        s.busy = False
                    self.cond.notify_all()
        except Exception as e:  # noqa: BLE001 - inference failing stops the run with its reason
            self.error = f"inference failed: {type(e).__name__}: {' '.join(str(e).split())[:200]}"
            self.stopping.set()
        finally:
            self._put(None)

    def _put(self, r) -> None:
        while True:
            try:
                self.results_q.put(r, timeout=0.2)
                return
            except queue.Full:
                if self.stopping.is_set():
                    return

    # --- lifecycle ----------------------------------------------------------------------------------
    def start(self) -> "Streams":
        lanes = self._lanes or self._make_lanes()
        for s in self.streams:
            s.thread.start()
        for i, (m, most) in enumerate(lanes):
            t = threading.Thread(target=self._work, args=(m, most), name=f"edgetl-infer-{i}", daemon=True)
            t.start()
            self._workers.append(t)
        for sink in self.sinks:
            sink.start()
        return self

    def results(self, poll: float = 0.2):
        """Handled results as JSON-ready rows, in each stream's frame order, until every stream has
        ended or `stop()`; yields None every `poll` seconds without one (for the caller's own checks)."""
        live_workers = len(self._workers)
        while live_workers:
            try:
                r = self.results_q.get(timeout=poll)
            except queue.Empty:
                if self.stopping.is_set() and not any(t.is_alive() for t in self._workers):
                    return
                yield None
                continue
            if r is None:
                live_workers -= 1
                continue
            if self.stopping.is_set() and r is not None:
                continue
            yield self.handle(r)

    def handle(self, r: Result) -> dict:
        """Smooth, decide and debounce one result; publish an event on a change; the JSON row."""
        s, item = r.stream, r.item
        probs = self._smooth[s.name](r.probs)
        label, prob, top = decide(probs, self.model.classes, self.threshold, self.top_k)
        now = time.monotonic()
        s.inferred += 1
        latency = (now - item.t) * 1e3
        s.latencies.append(latency)
        change = self._debounce[s.name].update(probs, now)
        if change is not None:
            old, new, p = change
            s.label, s.prob = new, p
            self._publish(s, item, old, new, p)
        elif s.label is not None:
            s.prob = self._debounce[s.name].prob
        return {"stream": s.name, "frame": item.seq, "t": round(item.pos, 4), "label": label, "prob": round(prob, 6),
                "top": [[c, round(p, 6)] for c, p in top], "latency_ms": round(latency, 1)}

    def _publish(self, s: Stream, item: Item, old, new, p) -> None:
        self.events_sent += 1
        jpeg = self._jpeg(item.bgr) if self.snapshots else None
        e = ev.event(s.name, old, new, p, item.seq, self.model_sha256, self.events_sent, jpeg)
        for sink in self.sinks:
            sink.put(e)

    def consume_in_background(self) -> "Streams":
        """Handle results on a thread of its own (for a server: stats, snapshots and events, no rows)."""
        def loop():
            for _ in self.results():
                pass

        self._consumer = threading.Thread(target=loop, name="edgetl-streams", daemon=True)
        self._consumer.start()
        return self

    def stop(self, timeout: float = 1.5, flush: float = 2.0) -> list[str]:
        """Stop every thread; returns the names of capture threads still inside a blocking read after
        `timeout` seconds (daemon threads: they end at their read's timeout, or with the process).
        Events still buffered get `flush` seconds to be delivered."""
        self.stopping.set()
        with self.cond:
            self.cond.notify_all()
        deadline = time.monotonic() + timeout
        for t in [s.thread for s in self.streams] + self._workers:
            if t.is_alive():
                t.join(max(0.0, deadline - time.monotonic()))
        deadline = time.monotonic() + flush
        for sink in self.sinks:
            sink.close(timeout=max(0.1, deadline - time.monotonic()))
        return [s.name for s in self.streams if s.thread.is_alive()]

    # --- what a server shows ------------------------------------------------------------------------
    def stats(self) -> dict:
        """{stream name: its numbers} (see Stream.stats)."""
        return {s.name: s.stats() for s in self.streams}

    def snapshot(self, name: str) -> bytes:
        """The newest frame of stream `name` as JPEG bytes; SourceError for an unknown stream or none yet."""
        s = self.by_name.get(name)
        if s is None:
            raise SourceError(f"no stream named {name!r} (streams: {', '.join(self.names)})")
        item = s.last
        if item is None:
            raise SourceError(f"stream {name} has no frame yet")
        return self._jpeg(item.bgr)

    @staticmethod
    def _jpeg(bgr: np.ndarray) -> bytes:
        cv2 = opencv()
        ok, buf = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, 85])
        return buf.tobytes() if ok else b""

    def prometheus(self, prefix: str = "edgetl_stream") -> str:
        """The per-stream numbers as Prometheus text lines, labelled by stream."""
        rows = [f"# TYPE {prefix}_frames_in_total counter", f"# TYPE {prefix}_inferred_total counter",
                f"# TYPE {prefix}_dropped_total counter", f"# TYPE {prefix}_reconnects_total counter",
                f"# TYPE {prefix}_up gauge", f"# TYPE {prefix}_latency_ms gauge"]
        for s in self.streams:
            lab = f'stream="{s.name}"'
            rows += [f"{prefix}_frames_in_total{{{lab}}} {s.frames_in}", f"{prefix}_inferred_total{{{lab}}} {s.inferred}"]
            rows += [f'{prefix}_dropped_total{{{lab},reason="{k}"}} {v}' for k, v in s.dropped.items()]
            rows += [f"{prefix}_reconnects_total{{{lab}}} {s.reconnects}", f"{prefix}_up{{{lab}}} {int(s.state == 'up')}"]
            if s.latencies:
                lat = np.array(list(s.latencies))
                rows += [f'{prefix}_latency_ms{{{lab},quantile="{q}"}} {np.percentile(lat, q * 100):.1f}'
                         for q in (0.5, 0.99)]
        return "\n".join(rows) + "\n"

    def summary(self, frames: int, seconds: float, ended: str, code: int) -> Summary:
        return Summary(frames, seconds, ended, code, self.stats(), {s.what: s.stats() for s in self.sinks})


def _ms(v) -> str:
    return "-" if v is None else f"{v:g} ms"


def stats_lines(streams: Streams, prev: dict, seconds: float) -> list[str]:
    """One line per stream: rates over the last `seconds` (from `prev`, the previous stats()), drops,
    reconnects, latency and class."""
    lines, now = [], streams.stats()
    for name, s in now.items():
        p = prev.get(name, {"frames_in": 0, "inferred": 0})
        fin = (s["frames_in"] - p["frames_in"]) / seconds if seconds > 0 else 0.0
        finf = (s["inferred"] - p["inferred"]) / seconds if seconds > 0 else 0.0
        d, lat = s["dropped"], s["latency_ms"]
        lines.append(f"stats {name}: {s['state']}, in {fin:.1f} fps, inferred {finf:.1f} fps, "
                     f"dropped {sum(d.values())} (superseded {d['superseded']}, stale {d['stale']}), "
                     f"reconnects {s['reconnects']}, latency p50 {_ms(lat['p50'])} p99 {_ms(lat['p99'])}, "
                     f"class {s['class'] or '-'}")
    return lines


def run(model, sources: list[Source], *, headless: bool = True, stats_every: float | None = None,
        max_frames: int | None = None, out=None, log=lambda line: None, **options) -> Summary:
    """`edgetl run` on several sources: JSON lines (with headless) naming their stream, stats lines
    every `stats_every` seconds, events to the sinks in `options`. Ends when every source has ended,
    after `max_frames` results in all, or on Ctrl-C/SIGTERM/SIGHUP (exit code 130/128+N)."""
    out = out or sys.stdout
    hub = Streams(model, sources, log=log, **options)
    names = ", ".join(f"{s.name} ({s.shown()})" for s in hub.streams)
    log(f"model {model.path} ({len(model.classes)} classes; {model.provider.replace('ExecutionProvider', '')}); "
        f"{len(hub.streams)} streams: {names}")
    signalled: list[int] = []
    handlers = {}
    if threading.current_thread() is threading.main_thread():
        for name in ("SIGINT", "SIGTERM", "SIGHUP"):
            sig = getattr(signal, name, None)
            if sig is not None:
                handlers[sig] = signal.signal(sig, lambda signum, frame: signalled.append(signum))
    n, ended, code, t_begin = 0, "every source ended", 0, time.perf_counter()
    next_stats = time.monotonic() + stats_every if stats_every else None
    prev = hub.stats()
    try:
        hub.start()
        for row in hub.results():
            if signalled:
                sig = signalled[0]
                ended = "interrupted" if sig == signal.SIGINT else f"terminated ({signal.Signals(sig).name})"
                code = 130 if sig == signal.SIGINT else 128 + sig
                break
            if row is not None:
                n += 1
                if headless:
                    try:
                        out.write(json.dumps(row, ensure_ascii=False) + "\n")
                        out.flush()
                    except BrokenPipeError:
                        ended = "output closed"
                        break
                if max_frames is not None and n >= max_frames:
                    ended = f"{max_frames} frames"
                    break
            if next_stats is not None and time.monotonic() >= next_stats:
                for line in stats_lines(hub, prev, stats_every):
                    log(line)
                prev, next_stats = hub.stats(), next_stats + stats_every
        else:
            if hub.error:
                ended, code = hub.error, 1
    finally:
        stuck = hub.stop(flush=0.5 if signalled else 2.0)
        for sig, h in handlers.items():
            signal.signal(sig, h)
    if stuck:
        log(f"streams {', '.join(stuck)}: still in a read; left to end with the process")
    return hub.summary(n, time.perf_counter() - t_begin, ended, code)
