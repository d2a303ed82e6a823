"""Benchmark of `edgetl serve` (issue: the model as an HTTP service on the edge box).

    python scripts/bench_serve.py MODEL PHOTOS [--rounds 7] [--requests 300] [--load 5000]

MODEL: a fused model.onnx (e.g. `edgetl train-head PHOTOS -o OUT` → OUT/model.onnx); PHOTOS: a folder
of JPEGs (every *.jpg below it is sent). Prints, in one run:
 1. throughput at concurrency 16, rounds interleaved, medians and ratios, of
    serve  `edgetl serve MODEL` (defaults), in its own process;
    bound  (a) the in-process bound: the same photos decoded on a thread pool and inferred in batches
           by the same sessions (deploy.batcher.load_served), no HTTP;
    naive  (b) the server a user would write by hand: one Starlette endpoint on uvicorn that decodes
           each request (the same load_image) and runs one default onnxruntime session on it alone,
           once as an `async def` endpoint (blocks the loop) and once as a `def` one (Starlette's thread
           pool; concurrent runs of one session); (b) is the faster of the two;
 2. latency at concurrency 1: p50 against decode + batch-1 inference + 2 ms (medians measured here
    on the lane session the server runs), and p99 at concurrency 16;
 3. the CPU the load client itself took (the client is a thread pool of http.client keep-alive
    connections; this process runs nothing else while it measures);
 4. with --load N: N requests at concurrency 64 with 10 % bad inputs, RSS of the server before and
    after (the same mix as tests/test_serve.py, at full scale).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import http.client
import os
import queue
import random
import re
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

NAIVE = r'''
import sys, json
import numpy as np, onnxruntime as ort, uvicorn
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route
from edgetl.data.preprocess import load_image
from edgetl.spec import Spec

model, port, style = sys.argv[1], int(sys.argv[2]), sys.argv[3]
sess = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
meta = sess.get_modelmeta().custom_metadata_map
spec, classes = Spec.from_json(meta["edgetl.preprocess"]), json.loads(meta["edgetl.classes"])

def answer(data):
    probs = sess.run(None, {"image": load_image(data, spec)[None]})[0][0]
    i = int(probs.argmax())
    return {"class": classes[i], "probability": float(probs[i])}

async def predict_async(request):
    return JSONResponse(answer(await request.body()))

def predict_sync(request):  # Starlette runs a plain function in its thread pool; the body is read for it
    return JSONResponse(answer(request.state.body))

async def read_then_sync(request):
    from starlette.concurrency import run_in_threadpool
    request.state.body = await request.body()
    return await run_in_threadpool(predict_sync, request)

app = Starlette(routes=[Route("/v1/predict", predict_async if style == "async" else read_then_sync, methods=["POST"])])
print("ready", flush=True)
uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")
'''


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Proc:
    """A server process; its CPU time read from /proc."""

    def __init__(self, cmd, ready, log):
        self.log = open(log, "w")
        self.p = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            m = re.search(ready, Path(log).read_text())
            if m:
                self.port = int(m.group(1)) if m.groups() else None
                return
            if self.p.poll() is not None:
                raise SystemExit(f"server did not start: {Path(log).read_text()[-2000:]}")
            time.sleep(0.1)
        raise SystemExit("server did not start in 120 s")

    def cpu(self) -> float:
        fields = Path(f"/proc/{self.p.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def rss(self) -> int:
        return int(re.search(r"VmRSS:\s+(\d+)", Path(f"/proc/{self.p.pid}/status").read_text()).group(1)) * 1024

    def stop(self) -> int:
        self.p.send_signal(signal.SIGTERM)
        try:
            return self.p.wait(30)
        except subprocess.TimeoutExpired:
            self.p.kill()
            return self.p.wait()


def load(port: int, bodies: list[bytes], n: int, conc: int):
    """n POSTs of the bodies (in turn) at concurrency `conc` on keep-alive connections.
    Returns (seconds, latencies in s, statuses, client CPU s)."""
    counter = iter(range(n))
    lock = threading.Lock()
    lat, statuses = [], []

    def worker():
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        mine, st = [], []
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                break
            t0 = time.perf_counter()
            c.request("POST", "/v1/predict", body=bodies[i % len(bodies)], headers={"Content-Type": "image/jpeg"})
            r = c.getresponse()
            r.read()
            mine.append(time.perf_counter() - t0)
            st.append(r.status)
            if r.getheader("connection") == "close":
                c.close()
                c = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        c.close()
        with lock:
            lat.extend(mine)
            statuses.extend(st)

    cpu0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(conc)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds, cpu1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
    return seconds, lat, statuses, (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)


def bound(served, bodies: list[bytes], n: int, max_batch: int, decode_threads: int) -> float:
    """(a) The in-process bound: n photos decoded on a thread pool and inferred in batches of up to
    max_batch by the served model's lane sessions side by side. Returns seconds."""
    from edgetl.data.preprocess import load_image

    spec = served.model.spec
    ready: queue.Queue = queue.Queue()
    done = threading.Event()
    left = [n]
    lock = threading.Lock()

    def lane(run):
        while not done.is_set():
            try:
                batch = [ready.get(timeout=0.05)]
            except queue.Empty:
                continue
            while len(batch) < max_batch:
                try:
                    batch.append(ready.get_nowait())
                except queue.Empty:
                    break
            run(np.stack(batch))
            with lock:
                left[0] -= len(batch)
                if left[0] <= 0:
                    done.set()

    t0 = time.perf_counter()
    lanes = [threading.Thread(target=lane, args=(r,)) for r in served.runners]
    for t in lanes:
        t.start()
    with cf.ThreadPoolExecutor(decode_threads) as pool:
        for img in pool.map(lambda b: load_image(b, spec), (bodies[i % len(bodies)] for i in range(n))):
            ready.put(img)
    done.wait()
    seconds = time.perf_counter() - t0
    for t in lanes:
        t.join()
    return seconds


def pct(xs, p) -> float:
    return float(np.percentile(np.asarray(xs) * 1e3, p))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model", type=Path)
    ap.add_argument("photos", type=Path)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--requests", type=int, default=300, help="requests per measurement at concurrency 16")
    ap.add_argument("--latency-requests", type=int, default=200)
    ap.add_argument("--load", type=int, default=5000, help="requests of the load with faults (0: skip)")
    ap.add_argument("--serve-args", default="", help="extra options for edgetl serve")
    a = ap.parse_args()

    from edgetl.data.preprocess import load_image
    from edgetl.deploy.batcher import load_served
    from edgetl.ort import physical_cores

    files = sorted(a.photos.rglob("*.jpg"))
    bodies = [f.read_bytes() for f in files]
    random.Random(0).shuffle(bodies)
    sizes = [len(b) for b in bodies]
    print(f"{len(bodies)} photos, median {statistics.median(sizes) / 1e3:.0f} kB; {physical_cores()} cores; "
          f"model {a.model.name} ({a.model.stat().st_size / 1e6:.1f} MB)")
    work = Path(tempfile.mkdtemp(prefix="edgetl-bench-serve-"))
    (work / "naive.py").write_text(NAIVE)
    py = sys.executable
    edgetl = [py, "-c", "from edgetl.cli import main; main()"]
    served = load_served(a.model, "cpu", warm_batch=8)
    cores = physical_cores()

    serve = Proc([*edgetl, "serve", str(a.model), "--port", "0", "--device", "cpu", *a.serve_args.split()],
                 r"on http://127\.0\.0\.1:(\d+)", work / "serve.log")
    naive = {}
    for style in ("async", "sync"):
        port = free_port()
        naive[style] = Proc([py, str(work / "naive.py"), str(a.model), str(port), style], "ready", work / f"naive-{style}.log")
        naive[style].port = port
    time.sleep(1.0)
    for p in (serve, *naive.values()):  # warm every server (connections, first decodes)
        load(p.port, bodies, 32, 4)

    rates = {k: [] for k in ("serve", "bound", "naive-async", "naive-sync")}
    p99s = {k: [] for k in ("serve", "naive-async", "naive-sync")}
    client_cpu, server_cpu = [], []
    cpu_per_image = {k: [] for k in rates}  # ms of CPU per image: what the machine's other load does not change
    n = a.requests
    for r in range(a.rounds):
        order = ["serve", "bound", "naive-async", "naive-sync"]
        random.Random(r).shuffle(order)
        for k in order:
            if k == "bound":
                c0 = resource.getrusage(resource.RUSAGE_SELF)
                rates[k].append(n / bound(served, bodies, n, 8, cores))
                c1 = resource.getrusage(resource.RUSAGE_SELF)
                cpu_per_image[k].append((c1.ru_utime - c0.ru_utime + c1.ru_stime - c0.ru_stime) / n * 1e3)
                continue
            proc = serve if k == "serve" else naive[k.split("-")[1]]
            c0 = proc.cpu()
            seconds, lat, statuses, ccpu = load(proc.port, bodies, n, 16)
            assert statuses.count(200) == n, statuses
            rates[k].append(n / seconds)
            p99s[k].append(pct(lat, 99))
            cpu_per_image[k].append((proc.cpu() - c0) / n * 1e3)
            if k == "serve":
                client_cpu.append(ccpu / seconds)
                server_cpu.append((proc.cpu() - c0) / seconds)
        print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.1f}/s" for k, v in rates.items()), flush=True)
    med = {k: statistics.median(v) for k, v in rates.items()}
    naive_best = max(med["naive-async"], med["naive-sync"])
    print(f"\nthroughput at concurrency 16 (medians of {a.rounds} interleaved rounds of {n} photos):")
    print(f"  serve {med['serve']:.1f} img/s; (a) in-process bound {med['bound']:.1f}; (b) naive server "
          f"{naive_best:.1f} (async def {med['naive-async']:.1f}, def {med['naive-sync']:.1f})")
    print(f"  serve / (a) = {med['serve'] / med['bound']:.2f} (goal >= 0.85); serve / (b) = "
          f"{med['serve'] / naive_best:.2f} (goal >= 1.5)")

    def ratio(x, y):  # the median of the rounds' own ratios: each round's pair ran under the same machine load
        return statistics.median(p / q for p, q in zip(rates[x], rates[y]))

    print(f"  per-round ratios, medians: serve / (a) {ratio('serve', 'bound'):.2f}; serve / naive async def "
          f"{ratio('serve', 'naive-async'):.2f}; serve / naive def {ratio('serve', 'naive-sync'):.2f}")
    print("  p99 latency at concurrency 16: " + ", ".join(f"{k} {statistics.median(v):.0f} ms" for k, v in p99s.items()))
    print("  CPU per image (ms, the process that serves or, for (a), computes): "
          + ", ".join(f"{k} {statistics.median(v):.1f}" for k, v in cpu_per_image.items()))
    print(f"  load client CPU: {statistics.median(client_cpu):.2f} cores; server process CPU "
          f"{statistics.median(server_cpu):.2f} cores (of {cores})")

    # latency at concurrency 1 against its parts, measured here in turns with the requests (same machine load):
    # decode, batch-1 inference on a session using every core (what a lone request runs on) and on a lane's
    dec, solo, lane, lat = [], [], [], []
    c = http.client.HTTPConnection("127.0.0.1", serve.port, timeout=60)
    for b in bodies[:a.latency_requests]:
        t0 = time.perf_counter()
        x = load_image(b, served.model.spec)[None]
        t1 = time.perf_counter()
        served.solo(x)
        t2 = time.perf_counter()
        served.runners[0](x)
        t3 = time.perf_counter()
        c.request("POST", "/v1/predict", body=b, headers={"Content-Type": "image/jpeg"})
        c.getresponse().read()
        lat.append(time.perf_counter() - t3)
        dec.append(t1 - t0)
        solo.append(t2 - t1)
        lane.append(t3 - t2)
    c.close()
    d, i1, i2 = (statistics.median(v) * 1e3 for v in (dec, solo, lane))
    print(f"\nlatency at concurrency 1: p50 {pct(lat, 50):.1f} ms (p90 {pct(lat, 90):.1f}, p99 {pct(lat, 99):.1f}); "
          f"decode {d:.1f} + batch-1 inference {i1:.1f} (every core; {i2:.1f} on one lane) + 2 = {d + i1 + 2:.1f} ms; "
          f"p50 - (decode + inference) = {pct(lat, 50) - d - i1:+.1f} ms")
    for p in naive.values():
        p.stop()

    if a.load:
        load_with_faults(serve, bodies, a.load)
    code = serve.stop()
    print(f"serve exited {code} on SIGTERM")


def load_with_faults(serve: Proc, bodies: list[bytes], total: int, conc: int = 64) -> None:
    """total requests at concurrency 64, 10 % of them bad (empty, truncated, a header claiming
    65,000 x 65,000, a GIF sent as image/jpeg, not an image, 30 MB announced, hang-ups)."""
    import socket

    good = bodies[0]
    gif = b"GIF89a" + bytes(200)
    bad = [(b"", 400), (good[:len(good) // 3], 400), (gif, 415), (b"<html>" * 50, 415)]
    rng = random.Random(2)
    plan = [rng.randrange(len(bad) + 2) if rng.random() < 0.10 else -1 - rng.randrange(len(bodies)) for _ in range(total)]
    counter, lock = iter(range(total)), threading.Lock()
    out: dict = {}

    def worker():
        c = http.client.HTTPConnection("127.0.0.1", serve.port, timeout=60)
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                break
            k = plan[i]
            if k == len(bad):  # 30 MB announced, 1 MB sent, the answer read
                s = socket.create_connection(("127.0.0.1", serve.port))
                s.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Length: 31457280\r\n\r\n")
                try:
                    s.sendall(b"\0" * 2**20)
                    reply = s.recv(64)
                except OSError:
                    reply = b"reset"
                s.close()
                status = int(reply.split()[1]) if reply.startswith(b"HTTP/1.1") else "reset"
            elif k == len(bad) + 1:  # hang up mid-upload
                s = socket.create_connection(("127.0.0.1", serve.port))
                s.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Length: 90000\r\n\r\n" + good[:3000])
                s.close()
                status = "hung up"
            else:
                body = bad[k][0] if k >= 0 else bodies[-1 - k]
                try:
                    c.request("POST", "/v1/predict", body=body, headers={"Content-Type": "image/jpeg"})
                    r = c.getresponse()
                    r.read()
                    status = r.status
                    if r.getheader("connection") == "close":
                        c.close()
                except (OSError, http.client.HTTPException):
                    c.close()
                    status = "conn error"
            with lock:
                out[i] = status

    rss = []

    def sample():
        while len(out) < total:
            rss.append((len(out), serve.rss()))
            time.sleep(0.5)

    t0 = time.perf_counter()
    threading.Thread(target=sample, daemon=True).start()
    threads = [threading.Thread(target=worker) for _ in range(conc)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - t0
    statuses = list(out.values())
    fives = [s for s in statuses if isinstance(s, int) and s >= 500 and s != 503]
    warm = next((r for n, r in rss if n >= total // 10), rss[0][1])
    print(f"\nload with faults: {total} requests at concurrency {conc} in {seconds:.1f} s; "
          f"{sum(1 for i, s in out.items() if plan[i] < 0 and s == 200)} good answered, "
          f"{statuses.count(503)} x 503, {len(fives)} other 5xx; RSS after 10 %: {warm / 2**20:.0f} MB, "
          f"end {serve.rss() / 2**20:.0f} MB, peak {max(r for _, r in rss) / 2**20:.0f} MB")


if __name__ == "__main__":
    main()
