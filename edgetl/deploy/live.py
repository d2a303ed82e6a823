"""`edgetl run`: the live loop on a camera, a video, a stream or a folder. Torch-free.

A capture thread reads and preprocesses frames. From a camera or a stream it keeps only the newest
frame (inference never falls behind, no queue grows); from a file or a folder it hands over every
frame in order, and on a CPU several single-thread sessions run frames side by side (`_lanes`). The
main thread smooths, thresholds, and reports (JSON lines, a window, and/or an annotated video), in
frame order.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import contextlib
import dataclasses
import json
import os
import queue
import signal
import stat
import sys
import threading
import time
from pathlib import Path

import numpy as np

from edgetl.data.preprocess import decode_bgr, frame_to_input, opencv
from edgetl.data.scan import image_by_content
from edgetl.data.sources import read_regular
from edgetl.deploy.runtime import expand_paths
from edgetl.deploy.video import UNKNOWN, Video, draw, has_display, opencv_name, qt_fonts, unlink_name, utf8_name
from edgetl.errors import EdgetlError, ModelError
from edgetl.ort import cpu_sessions, model_bytes, read_metadata, session


@dataclasses.dataclass
class Frame:
    index: int
    t: float  # seconds: position in a file, or since start for live sources
    bgr: np.ndarray
    rgb_input: np.ndarray  # preprocessed model input
    capture_ms: float
    preprocess_ms: float


class SourceError(EdgetlError):
    pass


def open_camera(index: int, timeout_s: float = 5.0):
    """An opened cv2.VideoCapture; SourceError naming the indices that did open otherwise."""
    cv2 = opencv()
    cap = cv2.VideoCapture(index)
    if cap.isOpened():
        ok, _ = cap.read()
        if ok:
            return cap
    cap.release()
    t0, found = time.monotonic(), []
    for i in range(10):
        if i == index or time.monotonic() - t0 > timeout_s:
            continue
        c = cv2.VideoCapture(i)
        if c.isOpened():
            found.append(i)
        c.release()
    hint = f"cameras that opened: {', '.join(map(str, found))}" if found else "no camera could be opened here"
    raise SourceError(f"camera {index} cannot be opened; {hint}")


class Capture:
    """Background reader. `latest_only` keeps the newest frame (cameras, streams); otherwise every
    frame is delivered in order (files, folders)."""

    def __init__(self, kind: str, target, spec, latest_only: bool, retries: int = 3):
        self.kind, self.target, self.spec = kind, target, spec
        self.latest_only, self.retries = latest_only, retries
        self.fps = 0.0
        self.size: tuple[int, int] | None = None
        self.dropped = 0
        self.error: str | None = None
        self._cond = threading.Condition()
        self._slot: collections.deque = collections.deque(maxlen=1 if latest_only else 4)
        self._done = False
        self._stop = threading.Event()
        self._cap = None
        self._files: list[Path] = []
        self._open()
        self._thread = threading.Thread(target=self._run, name="edgetl-capture", daemon=True)

    def _open(self):
        cv2 = opencv()
        if self.kind == "camera":
            self._cap = open_camera(int(self.target))
        elif self.kind == "files":
            self._files = list(self.target)
            return
        else:
            name, link = opencv_name(Path(self.target)) if self.kind == "file" else (str(self.target), None)
            if link is None and not utf8_name(name):
                raise SourceError(f"cannot open {name!r}: OpenCV takes only UTF-8 addresses")
            try:
                self._cap = cv2.VideoCapture(name)
            finally:
                unlink_name(link)
            if not self._cap.isOpened():
                raise SourceError(f"cannot open video source {self.target}")
        self.fps = float(self._cap.get(cv2.CAP_PROP_FPS) or 0.0)
        if not (0 < self.fps < 1000):
            self.fps = 0.0

    def start(self) -> "Capture":
        self._thread.start()
        return self

    def _read(self, index: int):
        """(t, bgr) of the next frame, or None at the end. Retries a dropped stream."""
        if self.kind == "files":
            while index < len(self._files):
                path = self._files[index]
                try:
                    return 0.0, decode_bgr(read_regular(path), self.spec.resize_size, str(path))
                except (OSError, EdgetlError) as e:
                    print(f"skipped {path}: {e}", file=sys.stderr)
                    self._files.pop(index)
            return None
        cv2 = opencv()
        for attempt in range(self.retries + 1):
            ok, frame = self._cap.read()
            if ok and frame is not None:
                t = self._cap.get(cv2.CAP_PROP_POS_MSEC) / 1000.0 if self.kind == "file" else None
                return t, frame
            if self.kind == "file" or self._stop.is_set():
                return None
            if attempt < self.retries:  # a camera or stream that dropped: reopen and retry
                print(f"source dropped; retrying ({attempt + 1}/{self.retries})", file=sys.stderr)
                time.sleep(0.5 * (attempt + 1))
                self._cap.release()
                self._cap = cv2.VideoCapture(int(self.target) if self.kind == "camera" else str(self.target))
        self.error = f"source {self.target} dropped and did not come back after {self.retries} retries"
        return None

    def _run(self):
        t_start, index = time.monotonic(), 0
        try:
            while not self._stop.is_set():
                t0 = time.perf_counter()
                got = self._read(index)
                if got is None:
                    break
                t, bgr = got
                t1 = time.perf_counter()
                rgb = frame_to_input(bgr, self.spec)
                t2 = time.perf_counter()
                if self.size is None:
                    self.size = (bgr.shape[1], bgr.shape[0])
                frame = Frame(index, t if t is not None else time.monotonic() - t_start, bgr, rgb,
                              (t1 - t0) * 1e3, (t2 - t1) * 1e3)
                index += 1
                with self._cond:
                    if self.latest_only:
                        self.dropped += len(self._slot)
                    else:
                        while len(self._slot) >= self._slot.maxlen and not self._stop.is_set():
                            self._cond.wait(0.1)
                    self._slot.append(frame)
                    self._cond.notify_all()
        finally:
            with self._cond:
                self._done = True
                self._cond.notify_all()

    def next(self, timeout: float = 10.0) -> Frame | None:
        """The next frame (the newest, for live sources), or None when the source ended."""
        with self._cond:
            deadline = time.monotonic() + timeout
            while not self._slot and not self._done:
                if not self._cond.wait(max(0.0, deadline - time.monotonic())):
                    if time.monotonic() >= deadline:
                        self.error = self.error or f"no frame from {self.target} for {timeout:.0f} s"
                        return None
            if not self._slot:
                return None
            frame = self._slot.popleft()
            self._cond.notify_all()
            return frame

    def stop(self):
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        if self._cap is not None:
            self._cap.release()


def resolve_source(camera: int | None, source: str | None):
    """(kind, target, latest_only) for --camera/--source. kind: camera | file | stream | files."""
    if camera is not None:
        return "camera", camera, True
    if source is None:
        raise EdgetlError("give --camera INDEX or --source FILE|URL|FOLDER|GLOB")
    if "://" in source:
        return "stream", source, True
    p = Path(source)
    if p.is_dir() or (not p.exists() and any(ch in source for ch in "*?[")):
        files = expand_paths([source])
        if not files:
            raise SourceError(f"no images in {source}")
        return "files", files, False
    if not p.exists():
        raise SourceError(f"no such file: {source}")

    mode = os.stat(p).st_mode
    if stat.S_ISCHR(mode):  # a capture device such as /dev/video0
        return "file", p, False
    if not stat.S_ISREG(mode):
        raise SourceError(f"{source} is not a regular file (a FIFO, socket or device); give a video file, a URL "
                          "or --camera")

    return ("files", [p], False) if image_by_content(p) else ("file", p, False)


class Smoother:
    """Average of the last N probability vectors."""

    def __init__(self, n: int):
        self.buf: collections.deque = collections.deque(maxlen=max(1, n))

    def __call__(self, probs: np.ndarray) -> np.ndarray:
        self.buf.append(probs)
        return np.mean(self.buf, axis=0)


def decide(probs: np.ndarray, classes: list[str], threshold: float, top_k: int):
    """(label, prob, top-k [(class, prob)]); label is 'unknown' when the top prob is below threshold."""
    order = np.argsort(-probs, kind="stable")[:max(1, top_k)]
    top = [(classes[i], float(probs[i])) for i in order]
    label = top[0][0] if top[0][1] >= threshold else UNKNOWN
    return label, top[0][1], top


@dataclasses.dataclass
class RunSummary:
    frames: int
    seconds: float
    dropped: int
    stages_ms: dict[str, float]
    saved: str | None
    ended: str  # "end of source" | "quit" | "interrupted" | "terminated (SIGTERM)" | error text
    exit_code: int = 0  # 130 after Ctrl-C, 128 + signal number after SIGTERM/SIGHUP

    def line(self) -> str:
        fps = self.frames / self.seconds if self.seconds > 0 else 0.0
        st = ", ".join(f"{k} {v:.1f} ms" for k, v in self.stages_ms.items())
        return (f"{self.frames} frames in {self.seconds:.1f} s ({fps:.1f} FPS; {st}); {self.ended}"
                + (f"; {self.dropped} stale frames dropped" if self.dropped else "")
                + (f"; saved {self.saved}" if self.saved else ""))


class _Signalled(BaseException):
    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


@contextlib.contextmanager
def _stop_on_signals():
    """SIGTERM and SIGHUP end the loop like Ctrl-C does (the video is finalised), in the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise _Signalled(signum)

    old = {}
    for name in ("SIGTERM", "SIGHUP"):
        sig = getattr(signal, name, None)
        if sig is not None:
            old[sig] = signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)


def run(model, camera: int | None = None, source: str | None = None, headless: bool = False,
        save: str | None = None, threshold: float = 0.0, smooth: int = 1, top_k: int = 3,
        max_frames: int | None = None, out=None, log=lambda line: None, collect=None) -> RunSummary:
    """The live loop. Returns a summary; Ctrl-C, SIGTERM and SIGHUP end it cleanly (a saved video is
    finalised: written under a temporary name, renamed when the loop ends).

    `collect`: an object whose `offer(frame, probabilities, label)` sees every frame (a
    deploy.collect.Collector keeps the unsure ones); its `start(source, timed)` is called first."""
    cv2 = opencv()
    out = out or sys.stdout
    kind, target, latest_only = resolve_source(camera, source)  # the source first: its errors come first
    cap = Capture(kind, target, model.spec, latest_only)
    window = not headless
    if window and not has_display():
        if not save:
            cap.stop()
            raise EdgetlError("no display to open a window on; use --headless (JSON lines) and/or --save out.mp4")
        window = False
        log(f"no display: no window, saving to {save}")
    if window and "GUI: NONE" in " ".join(cv2.getBuildInformation().split()):  # opencv-python-headless
        gui = ("this OpenCV is the headless build (no windows); for a window: "
               "pip uninstall -y opencv-python-headless && pip install opencv-python")
        if not save:
            cap.stop()
            raise EdgetlError(f"{gui}; or use --headless (JSON lines) and/or --save out.mp4")
        window = False
        log(f"{gui}; saving to {save} without a window")
    if window:
        qt_fonts()
    names = ", ".join(model.classes[:6]) + (", …" if len(model.classes) > 6 else "")
    log(f"model {model.path} ({len(model.classes)} classes: {names}; {model.provider.replace('ExecutionProvider', '')})")
    video = Video(save) if save else None
    smoother = Smoother(smooth)
    stats = collections.defaultdict(float)
    n, ended, code, t_begin = 0, "end of source", 0, time.perf_counter()
    fps_window: collections.deque = collections.deque(maxlen=30)
    try:
        runners = [model.frame_runner()] if latest_only else _lanes(model)
    except BaseException:
        cap.stop()
        raise
    if collect is not None:
        collect.start(f"camera {camera}" if camera is not None else str(source), timed=kind != "files")
    cap.start()
    frames = _inferred(cap, runners, max_frames)
    try:
        with _stop_on_signals():
            try:
                for frame, raw, infer_ms in frames:
                    probs = smoother(raw)
                    label, prob, top = decide(probs, model.classes, threshold, top_k)
                    if collect is not None:
                        collect.offer(frame, probs, label)
                    n += 1
                    fps_window.append(time.perf_counter())
                    fps = (len(fps_window) - 1) / (fps_window[-1] - fps_window[0]) if len(fps_window) > 1 else 0.0
                    stages = {"capture": frame.capture_ms, "preprocess": frame.preprocess_ms, "inference": infer_ms}
                    for k, v in stages.items():
                        stats[k] += v
                    if video or window:  # the video first: a line printed always has its frame saved
                        shown = draw(frame.bgr, label, prob, top, fps, stages)
                        if video:
                            video.write(shown, cap.fps or 30.0)
                        if window:
                            cv2.imshow("edgetl", shown)
                            if cv2.waitKey(1) & 0xFF in (ord("q"), 27):
                                ended = "quit"
                                break
                    if headless:
                        out.write(json.dumps({"frame": frame.index, "t": round(frame.t, 4), "label": label,
                                              "prob": round(prob, 6), "top": [[c, round(p, 6)] for c, p in top]},
                                             ensure_ascii=False) + "\n")
                        out.flush()
                else:
                    ended = cap.error or ended
            except KeyboardInterrupt:
                ended, code = "interrupted", 130
            except _Signalled as s:
                ended, code = f"terminated ({signal.Signals(s.signum).name})", 128 + s.signum
            except BrokenPipeError:  # `edgetl run --headless | head`: the reader left
                ended = "output closed"
                _silence_stdout()
            finally:
                cap.stop()
                frames.close()
                saved = video.close() if video else None
                if window:
                    cv2.destroyAllWindows()
    except (KeyboardInterrupt, _Signalled):  # a second signal while finishing: the video is already closed
        ended, code, saved = "interrupted", 130, (video.final if video and video.final.exists() else None)
    seconds = time.perf_counter() - t_begin
    return RunSummary(n, seconds, cap.dropped, {k: v / max(n, 1) for k, v in stats.items()},
                      str(saved) if saved else None, ended, code)


def _lanes(model) -> list:
    """Frame runners for a file or a folder, where every frame is wanted and throughput counts: on a CPU
    with several cores, single-thread sessions side by side, each on its own frame (runtime.cpu_sessions;
    measured on 2 cores, medians of 7 interleaved rounds: 0.87 of the bare 2-thread session's frames per
    second instead of 0.78, and steady, 167-177 FPS where one session swung between 110 and 161). A
    camera or a stream keeps the one session: its newest frame, soonest."""
    n, threads = cpu_sessions()
    if model.provider != "CPUExecutionProvider" or n < 2:
        return [model.frame_runner()]
    blob = model_bytes(model.path)  # once: every lane runs the same file
    sessions = [session(blob, "cpu", threads, spin=False) for _ in range(n)]
    if read_metadata(sessions[0]) != model.metadata:
        raise ModelError(f"{model.path} changed while it was being loaded; run again")
    return [dataclasses.replace(model, session=s).frame_runner() for s in sessions]


def _inferred(cap: Capture, runners: list, max_frames: int | None):
    """(frame, probabilities, inference ms) for each frame of `cap`, in order; with several runners, as
    many frames in flight, each on a thread of its own runner."""
    if len(runners) == 1:
        n = 0
        while (max_frames is None or n < max_frames) and (frame := cap.next()) is not None:
            t0 = time.perf_counter()
            raw = runners[0](frame.rgb_input)
            n += 1
            yield frame, raw, (time.perf_counter() - t0) * 1e3
        return

    free: queue.Queue = queue.Queue()
    for r in runners:
        free.put(r)

    def one(rgb):
        run = free.get()
        try:
            t0 = time.perf_counter()
            return run(rgb), (time.perf_counter() - t0) * 1e3
        finally:
            free.put(run)

    inflight: collections.deque = collections.deque()
    submitted, more = 0, True
    with cf.ThreadPoolExecutor(len(runners), thread_name_prefix="edgetl-infer") as pool:
        while True:
            while more and len(inflight) < len(runners) and (max_frames is None or submitted < max_frames):
                frame = cap.next()
                if frame is None:
                    more = False
                    break
                inflight.append((frame, pool.submit(one, frame.rgb_input)))
                submitted += 1
            if not inflight:
                return
            frame, fut = inflight.popleft()
            yield (frame, *fut.result())


def _silence_stdout() -> None:
    """After a broken pipe, point stdout at devnull so the interpreter's final flush stays quiet."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


