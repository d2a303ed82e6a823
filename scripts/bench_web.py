"""The browser (onnxruntime-web, wasm, SIMD + threads, headless Chromium) against native onnxruntime (CPU) on
the same machine, in one run: batch-1 latency and cold start, rounds interleaved, medians, ratios.

Cold start: native = session from the file + the first answer; browser = navigation start to
`window.edgetl.ready` (runtime, model, session and the first answer), on a reload: a warm HTTP cache.
The first visit (cold HTTP cache) is printed too.

    python scripts/bench_web.py MODEL [--rounds 5] [--runs 30]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--runs", type=int, default=30, help="timed batch-1 runs per round and side")
    ap.add_argument("--web-threads", type=int, help="also time the page with this many wasm threads (?threads=N)")
    a = ap.parse_args()

    from playwright.sync_api import sync_playwright

    from edgetl.deploy import verify, web
    from edgetl.ort import session

    x = (np.arange(224 * 224 * 3) * 7 % 256).astype(np.uint8)
    with tempfile.TemporaryDirectory() as tmp, sync_playwright() as pw:
        page_dir = web.export_web(a.model, Path(tmp) / "web", log=print)
        with web.Server(page_dir) as srv:
            browser = verify.launch_chromium(pw)
            page = browser.new_page()
            page.goto(srv.url)
            first = page.evaluate("window.edgetl.ready")
            threads = first["threads"]
            spec = page.evaluate("window.edgetl.info.spec.input_size")
            x = x[: spec[0] * spec[1] * 3].reshape(1, spec[0], spec[1], 3)
            print(f"Chromium {browser.version}, onnxruntime-web {first['version']} wasm, {threads} threads "
                  f"(cross-origin isolated: {first['crossOriginIsolated']}); first visit (cold HTTP cache): "
                  f"ready after {first['readyAtMs']:.0f} ms")
            res = {k: [] for k in ("web_ms", "web_cold", "nat_ms", "nat_cold", "natT_ms", "natT_cold", "webN_ms",
                                   "web_min", "natT_min")}

            def native(threads_):
                t = time.perf_counter()
                s = session(a.model, "cpu", threads_)
                s.run(None, {"image": x})
                cold = 1000 * (time.perf_counter() - t)
                times = []
                for _ in range(a.runs):
                    t = time.perf_counter()
                    s.run(None, {"image": x})
                    times.append(1000 * (time.perf_counter() - t))
                return statistics.median(times), cold, min(times)

            for r in range(a.rounds):
                page.reload()
                rt = page.evaluate("window.edgetl.ready")
                res["web_cold"].append(rt["readyAtMs"])
                b = page.evaluate(f"window.edgetl.bench({a.runs})")
                res["web_ms"].append(b["median_ms"])
                res["web_min"].append(b["min_ms"])
                if a.web_threads:
                    page.goto(srv.url + f"?threads={a.web_threads}")
                    page.evaluate("window.edgetl.ready")
                    res["webN_ms"].append(page.evaluate(f"window.edgetl.bench({a.runs})")["median_ms"])
                    page.goto(srv.url)
                ms, cold, _ = native(None)
                res["nat_ms"].append(ms)
                res["nat_cold"].append(cold)
                ms, cold, best = native(threads)
                res["natT_ms"].append(ms)
                res["natT_cold"].append(cold)
                res["natT_min"].append(best)
                print(f"round {r + 1}: browser {res['web_ms'][-1]:.1f} ms (ready {res['web_cold'][-1]:.0f} ms), "
                      f"native {res['nat_ms'][-1]:.1f} ms (cold {res['nat_cold'][-1]:.0f} ms), native "
                      f"{threads} threads {res['natT_ms'][-1]:.1f} ms", flush=True)
            browser.close()
    med = {k: statistics.median(v) for k, v in res.items() if v}
    print(f"\nmedians of {a.rounds} rounds ({a.runs} batch-1 runs each):")
    print(f"{'':<34}{'batch-1 ms':>11}{'cold start ms':>15}")
    print(f"{'browser (wasm, %d threads)' % threads:<34}{med['web_ms']:>11.1f}{med['web_cold']:>15.0f}")
    if a.web_threads:
        print(f"{'browser (wasm, %d threads)' % a.web_threads:<34}{med['webN_ms']:>11.1f}{'':>15}")
    print(f"{'native onnxruntime CPU (default)':<34}{med['nat_ms']:>11.1f}{med['nat_cold']:>15.0f}")
    print(f"{'native onnxruntime CPU, %d threads' % threads:<34}{med['natT_ms']:>11.1f}{med['natT_cold']:>15.0f}")
    print(f"browser / native: latency {med['web_ms'] / med['nat_ms']:.2f}x (same threads: "
          f"{med['web_ms'] / med['natT_ms']:.2f}x), cold start {med['web_cold'] / med['nat_cold']:.2f}x")
    web_min, nat_min = min(res["web_min"]), min(res["natT_min"])
    print(f"fastest single run, same threads: browser {web_min:.1f} ms, native {nat_min:.1f} ms "
          f"({web_min / nat_min:.2f}x): the least disturbed figure on a busy machine")
    return 0


if __name__ == "__main__":
    sys.exit(main())
