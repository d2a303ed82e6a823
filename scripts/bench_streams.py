"""Several streams on one box: `edgetl run`'s multi-stream path against the bound of bare batched
inference of the same model, in the same run (interleaved rounds, medians).

    python scripts/bench_streams.py MODEL.onnx [--streams 8] [--fps 15] [--rtsp 2] [--seconds 20] [--rounds 3]

Each stream is 640x480 H.264 (a keyframe a second, made by ffmpeg from the bundled photos): --rtsp of
them come through RTSP (ffmpeg publishing at real time into tests/stream_servers.py's relay), the
others are files played at their frame rate. A round runs all streams for --seconds (the first 3 s
not counted), then the bound: the same side-by-side single-thread sessions on already-preprocessed
batches of the same size, with nothing else running (and one session with all the cores, batch 8; the
better of the two is the bound). The RTSP publishers run during both (they are the cameras).

Printed: aggregate inferred FPS and its ratio to the bound, each stream's rate against the mean,
capture→result p50/p99, and drops by reason (superseded: a newer frame came before the stream's turn;
stale: older than --max-age when its turn came).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")  # FFmpeg's decoder notes (edgetl run sets the same)
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from edgetl.data.preprocess import frame_to_input, opencv  # noqa: E402
from edgetl.deploy import runtime, streams  # noqa: E402
from edgetl.ort import cpu_sessions, model_bytes, session  # noqa: E402


def make_clip(out: Path, fps: int, seconds: float) -> Path:
    cv2 = opencv()
    tmp = out.parent / "frames"
    tmp.mkdir(exist_ok=True)
    photos = sorted((ROOT / "samples" / "pets").rglob("*.jpg"))[::3][:24]
    for i, p in enumerate(photos):
        cv2.imwrite(str(tmp / f"{i:03d}.jpg"), cv2.resize(cv2.imread(str(p)), (640, 480)))
    n = len(photos)
    subprocess.run(["ffmpeg", "-nostdin", "-loglevel", "error", "-y", "-stream_loop", "-1", "-framerate", "1",
                    "-i", str(tmp / "%03d.jpg"), "-t", str(seconds), "-vf", f"fps={fps},format=yuv420p",
                    "-c:v", "libx264", "-preset", "veryfast", "-g", str(fps), str(out)], check=True)
    assert n
    return out


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_rtsp(clip: Path) -> tuple[subprocess.Popen, int]:
    port = free_port()
    p = subprocess.Popen([sys.executable, str(ROOT / "tests" / "stream_servers.py"), "rtsp", str(port), str(clip)],
                         start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return p, port


def run_streams(model, sources, seconds: float, warmup: float = 3.0) -> dict:
    hub = streams.Streams(model, sources, max_age=0.5, backoff_max=1.0)
    rows: list[tuple[float, str]] = []
    lat: dict[str, list[float]] = {s.name: [] for s in sources}

    def consume():
        for r in hub.results():
            if r is not None:
                rows.append((time.monotonic(), r["stream"]))
                lat[r["stream"]].append(r["latency_ms"])

    hub.start()
    t = threading.Thread(target=consume, daemon=True)
    t.start()
    time.sleep(warmup)
    s0, n0, l0 = hub.stats(), len(rows), {k: len(v) for k, v in lat.items()}
    t0, c0 = time.monotonic(), time.process_time()
    time.sleep(seconds)
    t1, c1 = time.monotonic(), time.process_time()
    s1, n1 = hub.stats(), len(rows)
    hub.stop()
    per = {k: (s1[k]["inferred"] - s0[k]["inferred"]) / (t1 - t0) for k in s1}
    fin = {k: (s1[k]["frames_in"] - s0[k]["frames_in"]) / (t1 - t0) for k in s1}
    drops = {r: sum(s1[k]["dropped"][r] - s0[k]["dropped"][r] for k in s1) for r in streams.DROP_REASONS}
    window = [x for k, v in lat.items() for x in v[l0[k]:]]
    half = {k: v[l0[k]:] for k, v in lat.items()}
    first = [x for v in half.values() for x in v[:len(v) // 2]]
    second = [x for v in half.values() for x in v[len(v) // 2:]]
    return {"fps": (n1 - n0) / (t1 - t0), "per_cpu_s": (n1 - n0) / (c1 - c0), "per": per, "in": fin, "drops": drops,
            "p50": float(np.percentile(window, 50)), "p99": float(np.percentile(window, 99)),
            "p99_first": float(np.percentile(first, 99)), "p99_second": float(np.percentile(second, 99)),
            "reconnects": sum(s1[k]["reconnects"] for k in s1)}


def bare_bound(model, frame: np.ndarray, n_streams: int, seconds: float = 5.0) -> dict:
    """Images per second of the bare model: (a) the side-by-side single-thread sessions `Streams` uses,
    each on preprocessed batches of its batch size; (b) one session with every core, batch 8."""
    x = frame_to_input(frame, model.spec)
    n, threads = cpu_sessions()
    per = max(1, -(-n_streams // n))
    blob = model_bytes(model.path)

    def lanes(k, batch, thr):
        sessions = [session(blob, "cpu", thr, spin=False) for _ in range(k)]
        xb = np.stack([x] * batch)
        counts = [0] * k
        stop = threading.Event()

        def loop(i):
            s = sessions[i]
            s.run(None, {"image": xb})
            while not stop.is_set():
                s.run(None, {"image": xb})
                counts[i] += batch

        ts = [threading.Thread(target=loop, args=(i,)) for i in range(k)]
        for t in ts:
            t.start()
        time.sleep(0.5)
        c0, t0, p0 = sum(counts), time.monotonic(), time.process_time()
        time.sleep(seconds)
        c1, t1, p1 = sum(counts), time.monotonic(), time.process_time()
        stop.set()
        for t in ts:
            t.join()
        return (c1 - c0) / (t1 - t0), (c1 - c0) / (p1 - p0)

    side, side_cpu = lanes(n, per, threads) if n >= 2 else (0.0, 0.0)
    one, one_cpu = lanes(1, 8, n * threads)
    return {"side_by_side": side, "one_session": one, "bound": max(side, one), "bound_cpu": max(side_cpu, one_cpu),
            "batch": per, "sessions": n}


def scenario(model, clip: Path, n: int, n_rtsp: int, fps: int, seconds: float, rounds: int) -> None:
    cv2 = opencv()
    ok, frame = cv2.VideoCapture(str(clip)).read()
    assert ok
    servers = [start_rtsp(clip) for _ in range(n_rtsp)]
    time.sleep(2.5)  # the publishers announce
    try:
        results, bounds = [], []
        for r in range(rounds):
            srcs = [f"rtsp{i}=rtsp://127.0.0.1:{port}/live" for i, (_, port) in enumerate(servers)]
            srcs += [f"file{i}={clip}" for i in range(n - n_rtsp)]
            before = bare_bound(model, frame, n)  # the bound on both sides of the streams: the mean of the two
            res = run_streams(model, streams.parse_sources(srcs), seconds)
            after = bare_bound(model, frame, n)
            b = {k: (before[k] + after[k]) / 2 if isinstance(before[k], float) else before[k] for k in before}
            results.append(res)
            bounds.append(b)
            mean = statistics.mean(res["per"].values())
            print(f"  round {r + 1}: {res['fps']:.1f} inferred FPS, bound {b['bound']:.1f} "
                  f"(side by side {b['side_by_side']:.1f}, one session {b['one_session']:.1f}) → "
                  f"{res['fps'] / b['bound']:.2f}x (per CPU-second {res['per_cpu_s'] / b['bound_cpu']:.2f}x); "
                  f"slowest stream {min(res['per'].values()) / mean:.2f}x the mean; "
                  f"p50 {res['p50']:.0f} ms p99 {res['p99']:.0f} ms; drops {res['drops']}", flush=True)
        med = lambda xs: statistics.median(xs)  # noqa: E731
        got, bound = med([x["fps"] for x in results]), med([b["bound"] for b in bounds])
        ratios = [x["fps"] / b["bound"] for x, b in zip(results, bounds)]
        cpu_ratios = [x["per_cpu_s"] / b["bound_cpu"] for x, b in zip(results, bounds)]
        fair = [min(x["per"].values()) / statistics.mean(x["per"].values()) for x in results]
        offered = n * fps_of(clip)
        print(f"{n} streams x {fps} fps ({n_rtsp} over RTSP), {bounds[0]['sessions']} single-thread sessions, "
              f"batch up to {bounds[0]['batch']}; medians of {rounds} rounds:")
        print(f"  offered {offered:.0f} fps; inferred {got:.1f} fps; bare batched bound {bound:.1f} img/s; "
              f"ratio {med(ratios):.2f} (rounds {', '.join(f'{x:.2f}' for x in ratios)})")
        print(f"  per CPU-second of this process (capture, decoding and scheduling included): "
              f"{med([x['per_cpu_s'] for x in results]):.1f} frames vs the bare {med([b['bound_cpu'] for b in bounds]):.1f}; "
              f"ratio {med(cpu_ratios):.2f} (rounds {', '.join(f'{x:.2f}' for x in cpu_ratios)})")
        print(f"  slowest stream / mean: {med(fair):.2f} (rounds {', '.join(f'{x:.2f}' for x in fair)})")
        print(f"  capture→result p50 {med([x['p50'] for x in results]):.0f} ms, p99 {med([x['p99'] for x in results]):.0f} "
              f"ms (first half {med([x['p99_first'] for x in results]):.0f} ms, second half "
              f"{med([x['p99_second'] for x in results]):.0f} ms)")
        d = {k: med([x["drops"][k] for x in results]) / seconds for k in streams.DROP_REASONS}
        print(f"  drops per second: superseded {d['superseded']:.1f}, stale {d['stale']:.1f}; "
              f"frames in {med([sum(x['in'].values()) for x in results]):.1f} fps; reconnects "
              f"{sum(x['reconnects'] for x in results)}")
    finally:
        for p, _ in servers:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()


def fps_of(clip: Path) -> float:
    cv2 = opencv()
    return float(cv2.VideoCapture(str(clip)).get(cv2.CAP_PROP_FPS))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--streams", type=int, default=8)
    ap.add_argument("--fps", type=int, default=15)
    ap.add_argument("--rtsp", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    if not shutil.which("ffmpeg"):
        raise SystemExit("needs ffmpeg (apt-get install ffmpeg)")
    model = runtime.load_model(a.model, "cpu", spin=False)
    with tempfile.TemporaryDirectory() as tmp:
        clip = make_clip(Path(tmp) / "clip.mp4", a.fps, a.seconds * a.rounds + 30)
        print(f"model {a.model} ({len(model.classes)} classes), {os.cpu_count()} CPUs; {a.streams} streams of "
              f"640x480 at {a.fps} fps", flush=True)
        scenario(model, clip, a.streams, a.rtsp, a.fps, a.seconds, a.rounds)


if __name__ == "__main__":
    main()
