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

import dataclasses
import hashlib
import json
import math
import os
import queue
import signal
import sys
import threading
import time

import numpy as np

from edgetl.data.preprocess import frame_to_input, opencv
from edgetl.deploy import events as ev
from edgetl.deploy.live import Smoother, SourceError, decide
from edgetl.deploy.stream_capture import DROP_REASONS, Item, Result, Stream
from edgetl.deploy.stream_sources import Source, load_streams_file, make_source, parse_sources
from edgetl.errors import EdgetlError
from edgetl.ort import cpu_sessions, model_bytes, read_metadata, session

# The API of a multi-stream run, in one place (sources and capture live in stream_sources and stream_capture).
__all__ = ["DROP_REASONS", "Source", "SourceError", "Stream", "Streams", "load_streams_file", "make_source",
           "parse_sources", "run", "stats_lines"]


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
        n = len(self.streams)
        out.append(f"{self.frames} frames from {n} stream{'s' * (n != 1)} in {self.seconds:.1f} s ({fps:.1f} FPS); "
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
        f"{len(hub.streams)} stream{'s' * (len(hub.streams) != 1)}: {names}")
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
