"""Start-up time of `edgetl --help` and of `edgetl run --source VIDEO --headless` (to the end of a short
video), this checkout against another one (e.g. an older release unpacked in a folder), interleaved.

    python scripts/bench_startup.py MODEL VIDEO --baseline DIR [--rounds 15]

Both run with this interpreter; DIR is a folder that holds an `edgetl` package (put first on PYTHONPATH).
Prints the median wall time of each command for both and the ratio this/baseline (below 1: faster).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def timed(cmd: list[str], pythonpath: Path) -> float:
    env = {**os.environ, "PYTHONPATH": str(pythonpath)}
    t = time.perf_counter()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=pythonpath)
    took = time.perf_counter() - t
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed in {pythonpath}: {r.stderr.strip()[-300:]}")
    return took


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("video", type=Path)
    ap.add_argument("--baseline", type=Path, required=True)
    ap.add_argument("--rounds", type=int, default=15)
    a = ap.parse_args()
    launch = [sys.executable, "-c", "import sys; from edgetl.cli import main; sys.argv[0] = 'edgetl'; main()"]
    commands = {"edgetl --help": [*launch, "--help"],
                "edgetl run --headless": [*launch, "run", "--model", str(a.model.resolve()), "--source",
                                          str(a.video.resolve()), "--headless"]}
    trees = {"this": ROOT, "baseline": a.baseline.resolve()}
    times = {(c, t): [] for c in commands for t in trees}
    for cmd in commands.values():  # warm the file cache once
        for tree in trees.values():
            timed(cmd, tree)
    for _ in range(a.rounds):
        for c, cmd in commands.items():
            for t, tree in trees.items():
                times[(c, t)].append(timed(cmd, tree))
    for c in commands:
        this, base = statistics.median(times[(c, "this")]), statistics.median(times[(c, "baseline")])
        print(f"{c:<24} this {this * 1e3:7.0f} ms   baseline {base * 1e3:7.0f} ms   ratio {this / base:.2f}"
              f"   ({a.rounds} interleaved rounds, medians)")


if __name__ == "__main__":
    main()
