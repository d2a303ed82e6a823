"""Benchmarks of `edgetl embed` (issue: fast, incremental, crash-safe embedding cache).

    python scripts/bench_embed.py DATA [--big 10000] [--rounds 3] [--device cpu|cuda]

(`scripts/bench_gpu.py` runs every GPU benchmark, this one's GPU baselines included, in one call.)

DATA is a labelled photo folder (e.g. hymenoptera_data). Prints, in one run:
 1. first-run throughput of embed_folder (at its own batch size unless --embed-batch) vs (a) the bare
    onnxruntime session (its default options, one session, batch --batch) on already-decoded batches
    (the ceiling) and (b) PyTorch eager (torchvision ImageFolder + DataLoader + the same backbone under
    inference_mode, same threads); rounds interleaved, medians and ratios;
 2. re-run with nothing changed, and after adding 1 % new photos, as a share of the first run;
 3. peak RSS of `edgetl embed` (a subprocess) on 1,000 and on --big images;
 4. crash test: kill -9 at 5 random moments, re-run each time, compare with a clean run;
 5. host work only: the tiny test backbone (64x64, inference cheap) on --scale-photos photos made
    from DATA, with 1, 2, … up to twice the cores of reading/decoding threads (`workers`), rounds
    interleaved, medians and the speed-up over one worker.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_folder import make  # noqa: E402

from edgetl import backbones  # noqa: E402
from edgetl.data.embed import SHARD_ROWS, embed_folder, open_backbone  # noqa: E402
from edgetl.data.preprocess import load_image  # noqa: E402
from edgetl.export import torch_onnx as export  # noqa: E402


def ceiling(onnx_path: Path, arrays: list[np.ndarray], batch: int, device: str = "cpu") -> float:
    sess, _, _ = open_backbone(onnx_path, device)
    t = time.perf_counter()
    for i in range(0, len(arrays), batch):
        sess.run(None, {"image": np.stack(arrays[i:i + batch])})
    return time.perf_counter() - t


def torch_baseline(data: Path, bb, batch: int, threads: int) -> tuple[float, int]:
    import torch
    import torchvision
    from torchvision import transforms as T

    torch.set_num_threads(threads)
    tf = T.Compose([T.Resize(bb.spec.resize_size), T.CenterCrop(bb.spec.input_size), T.ToTensor(),
                    T.Normalize(bb.spec.mean, bb.spec.std)])
    sets = [torchvision.datasets.ImageFolder(str(d), tf) for d in sorted(data.iterdir()) if d.is_dir()] \
        if any(d.name in ("train", "val") for d in data.iterdir()) else [torchvision.datasets.ImageFolder(str(data), tf)]
    ds = torch.utils.data.ConcatDataset(sets)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch, num_workers=threads)
    t = time.perf_counter()
    with torch.inference_mode():
        for x, _ in loader:
            bb.model(x)
    return time.perf_counter() - t, len(ds)


def peak_rss_mb(args: list[str]) -> float:
    """Peak RSS (VmHWM) of `edgetl ARGS` in a fresh interpreter, read by the child itself at exit.

    (wait4's ru_maxrss would include this large parent's memory, inherited through fork and exec.)
    """
    code = ("import atexit, sys; atexit.register(lambda: print('VmHWM', open('/proc/self/status').read()"
            ".split('VmHWM:')[1].split()[0], file=sys.stderr)); from edgetl.cli import main; "
            f"sys.argv = ['edgetl'] + {args!r}; main()")
    r = subprocess.run([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if r.returncode != 0:
        raise SystemExit(f"edgetl {' '.join(args)} failed: {r.stderr[-500:]}")
    return int(r.stderr.split("VmHWM")[-1].split()[0]) / 1024


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("data", type=Path)
    ap.add_argument("--big", type=int, default=10000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch", type=int, default=32, help="the bare session's batch (32: its fastest here)")
    ap.add_argument("--embed-batch", type=int, default=None, help="embed's batch [default: its own]")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--scale-photos", type=int, default=2000)
    ap.add_argument("--skip", default="", help="comma list of parts to skip: throughput,rerun,rss,crash,workers")
    a = ap.parse_args()
    skip = set(a.skip.split(","))
    threads = os.cpu_count() or 1
    work = Path(tempfile.mkdtemp(prefix="edgetl-bench-"))
    bb = backbones.get()
    onnx_path = work / "backbone.onnx"
    export.export_backbone(bb, onnx_path)
    files = sorted(p for p in a.data.rglob("*") if p.is_file() and p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    print(f"{len(files)} photos in {a.data}, {threads} threads, EfficientNet-Lite0, bare session at batch {a.batch}, "
          f"embed at {a.embed_batch or 'its default'}")

    if "throughput" not in skip:
        arrays = [load_image(f, bb.spec) for f in files]
        rows = {"edgetl embed": [], "ceiling": [], "pytorch": []}
        for r in range(a.rounds):
            shutil.rmtree(work / "cache", ignore_errors=True)
            res = embed_folder(a.data, onnx_path, work / "cache", batch_size=a.embed_batch, device=a.device)
            rows["edgetl embed"].append(len(files) / res.seconds)
            rows["ceiling"].append(len(files) / ceiling(onnx_path, arrays, a.batch, a.device))
            sec, n = torch_baseline(a.data, bb, a.batch, threads)
            rows["pytorch"].append(n / sec)
            print(f"  round {r + 1}: " + ", ".join(f"{k} {v[-1]:.1f} img/s" for k, v in rows.items()))
        med = {k: statistics.median(v) for k, v in rows.items()}
        print(f"1. throughput (medians): edgetl {med['edgetl embed']:.1f} img/s, ceiling {med['ceiling']:.1f}, "
              f"pytorch {med['pytorch']:.1f}")
        ratios = [e / c for e, c in zip(rows["edgetl embed"], rows["ceiling"])]
        print(f"   edgetl / ceiling = {statistics.median(ratios):.2f} (per round {', '.join(f'{x:.2f}' for x in ratios)}; "
              f"target >= 0.85)")
        print(f"   edgetl / pytorch = {med['edgetl embed'] / med['pytorch']:.2f} (target >= 3)")

    if "rerun" not in skip:
        shutil.rmtree(work / "cache", ignore_errors=True)
        t_first = embed_folder(a.data, onnx_path, work / "cache").seconds
        reruns = [embed_folder(a.data, onnx_path, work / "cache").seconds for _ in range(3)]
        grown = work / "grown"
        shutil.copytree(a.data, grown)
        n_new = max(1, len(files) // 100)
        extra = make(a.data, work / "extra", len(files) + n_new)
        new_files = sorted(extra.rglob("*_001.jpg"))[:n_new]
        for f in new_files:
            dst = next(grown.rglob(f.parent.name))
            shutil.copy(f, dst / f.name)
        t_add = embed_folder(grown, onnx_path, work / "cache").seconds
        rr = statistics.median(reruns)
        print(f"2. re-run unchanged: {rr:.2f} s = {100 * rr / t_first:.1f} % of the first run ({t_first:.2f} s); "
              f"+{n_new} photos (1 %): {t_add:.2f} s = {100 * t_add / t_first:.1f} % (target <= 5 %)")

    if "rss" not in skip:
        src_big = make(a.data, work / "big", a.big)
        small = work / "small"
        make(a.data, small, 1000)
        out = []
        for folder, n in ((small, 1000), (src_big, a.big)):
            args = ["embed", str(folder), "--backbone", str(onnx_path), "--cache", str(work / f"rss-cache-{n}")]
            t = time.perf_counter()
            out.append((n, peak_rss_mb(args), time.perf_counter() - t))
        print("3. peak RSS of `edgetl embed`: " + "; ".join(f"{n} images {mb:.0f} MB ({s:.0f} s)" for n, mb, s in out)
              + f"; ratio {out[1][1] / out[0][1]:.2f} (target <= 1.5 GB, about flat)")

    if "crash" not in skip:
        ref = embed_folder(a.data, onnx_path, work / "crash-ref")
        cache = work / "crash"
        cmd = [sys.executable, "-m", "edgetl.cli", "embed", str(a.data), "--backbone", str(onnx_path),
               "--cache", str(cache), "--batch-size", "8"]
        rng = random.Random(0)
        moments = []
        total = len(ref.keys)
        for _ in range(5):
            before = set(cache.glob("*/shard-*.npz"))
            done = sum(int(np.load(s)["keys"].shape[0]) for s in before)
            target = rng.randint(1, max(1, (total - done) // SHARD_ROWS - 1))  # a random moment within this run
            proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            while proc.poll() is None and len(set(cache.glob("*/shard-*.npz")) - before) < target:
                time.sleep(0.002)
            time.sleep(rng.uniform(0, 0.05))
            moments.append(f"after {target} shards{'' if proc.poll() is None else ' (had finished)'}")
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        final = embed_folder(a.data, onnx_path, cache)
        ka, ea = ref.namespace.load()
        kb, eb = final.namespace.load(ka)
        same = set(ka) == set(final.namespace.keys())
        diff = float(np.abs(ea - eb).max())
        print(f"4. crash test: kill -9 at {', '.join(moments)}; final run embedded {final.new} more; "
              f"keys equal: {same}; max abs diff {diff:.1e} (target <= 1e-5)")

    if "workers" not in skip:
        tiny = work / "tiny.onnx"
        export.export_backbone(backbones.get("tiny_test"), tiny)
        folder = make(a.data, work / "scale", a.scale_photos)
        counts = sorted({1, *range(2, threads + 1), threads + 1, 2 * threads})
        speed: dict[int, list[float]] = {n: [] for n in counts}
        for _ in range(a.rounds):
            for n in counts:
                shutil.rmtree(work / "tiny-cache", ignore_errors=True)
                res = embed_folder(folder, tiny, work / "tiny-cache", workers=n, device=a.device)
                speed[n].append(a.scale_photos / res.seconds)
        med = {n: statistics.median(v) for n, v in speed.items()}
        print(f"5. host work only (tiny test backbone, {a.scale_photos} photos), img/s by workers: "
              + ", ".join(f"{n}: {med[n]:.0f} ({med[n] / med[1]:.2f}x)" for n in counts)
              + f" ({threads} cores; target: grows up to the cores)")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
