"""`edgetl bench`: latency and throughput of models on this machine, and where the time of one photo goes.

Torch-free (onnxruntime, numpy, OpenCV). Every timing here goes through `time_interleaved`, which
runs the candidates in turn, round after round, so that a noisy machine slows them alike; the
quantize gate uses the same function.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import onnxruntime as ort

from edgetl import contract as C
from edgetl.data.pipeline import image_batches
from edgetl.data.preprocess import decode_bgr, frame_to_input
from edgetl.deploy.runtime import expand_paths, load_model
from edgetl.errors import DataError, EdgetlError, ImageError
from edgetl.ort import session

# --device → the onnxruntime provider that must run the model (never a silent fallback).
EXPECTED_PROVIDER = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


def percentiles(samples_s: list[float]) -> dict:
    """p50/p90/p99/mean in milliseconds (nearest-rank percentiles) and the number of runs."""
    xs = sorted(samples_s)
    n = len(xs)

    def rank(q: float) -> float:
        return xs[min(n - 1, max(0, int(np.ceil(q * n)) - 1))] * 1e3

    # The mean may lie below the median: runs often fall into two groups (e.g. when another process takes a
    # core now and then), and a group of fast runs below the median pulls the mean under it. min shows it.
    return {"p50_ms": statistics.median(xs) * 1e3, "p90_ms": rank(0.90), "p99_ms": rank(0.99),
            "mean_ms": statistics.fmean(xs) * 1e3, "min_ms": xs[0] * 1e3, "runs": n}


def time_interleaved(fns: dict[str, Callable[[], object]], rounds: int = 50, warmup: int = 3,
                     budget_s: float | None = None, min_rounds: int = 5) -> dict[str, dict]:
    """Time several callables interleaved: each round calls every one once (the order rotates).

    Stops after `rounds` rounds, or earlier once `budget_s` seconds have passed and `min_rounds`
    are done. Returns {name: percentiles(...)}; each callable's own warm-up calls are not timed.
    """
    names = list(fns)
    for name in names:
        for _ in range(warmup):
            fns[name]()
    samples: dict[str, list[float]] = {n: [] for n in names}
    start = time.perf_counter()
    for r in range(rounds):
        for k in range(len(names)):
            name = names[(r + k) % len(names)]
            t = time.perf_counter()
            fns[name]()
            samples[name].append(time.perf_counter() - t)
        if budget_s is not None and r + 1 >= min_rounds and time.perf_counter() - start > budget_s:
            break
    return {n: percentiles(s) for n, s in samples.items()}


def rss_bytes() -> int | None:
    """Resident memory of this process now (Linux /proc; psutil elsewhere when installed)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, AttributeError):
        pass
    try:
        import psutil

        return psutil.Process().memory_info().rss
    except Exception:
        return None


# What one image of a batch costs in a session, as a multiple of its uint8 input (its float copy and the
# activations alive at once; rounded up from EfficientNet-Lite0 at 224x224).
BYTES_PER_INPUT_BYTE = 64


def batch_bytes(batch: int, size) -> int:
    """About how much memory a batch of `batch` images of `size` (h, w) needs in a session."""
    return batch * int(size[0]) * int(size[1]) * 3 * BYTES_PER_INPUT_BYTE


def available_bytes() -> int | None:
    """The memory available to new work now (Linux MemAvailable; psutil elsewhere when installed)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        import psutil

        return psutil.virtual_memory().available
    except Exception:
        return None


def peak_rss_bytes() -> int | None:
    """Peak resident memory of this process so far."""
    try:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if platform.system() == "Darwin" else peak * 1024
    except (ImportError, OSError):
        return None


def model_memory(path, device: str, threads: int | None, batch: int, size: tuple[int, int]) -> float | None:
    """Peak resident memory (MB) that loading `path` and running one batch of `batch` adds to a
    process that has imported onnxruntime: measured in a child process, so that models measured one
    after the other do not share arenas and one-time costs. None when it cannot be measured."""
    cmd = [sys.executable, "-m", "edgetl.deploy.bench", "--memory", str(path), device, str(threads or 0), str(batch),
           *map(str, size)]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        return json.loads(r.stdout.strip().splitlines()[-1])["memory_mb"] if r.returncode == 0 else None
    except (OSError, ValueError, KeyError, IndexError, subprocess.TimeoutExpired):
        return None


def _memory_child(path: str, device: str, threads: int, batch: int, h: int, w: int) -> None:
    base = rss_bytes()
    open_session(path, device, threads or None).run([C.PROBABILITIES], {C.IMAGE: _batch(None, batch, (h, w))})
    peak = peak_rss_bytes()
    print(json.dumps({"memory_mb": (peak - base) / 1e6 if peak and base else None}))


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


class OpenVINOSession:
    """What bench needs of an onnxruntime session, run by OpenVINO's CPU plugin (`pip install openvino`).

    OpenVINO reads model.onnx unchanged; on CPUs with bf16 support its default precision is bf16,
    which the provider name says (e.g. "OpenVINO CPU bf16")."""

    def __init__(self, path, threads: int | None, spin: bool = True):
        try:
            import openvino as ov
        except ImportError:
            raise EdgetlError("--device openvino needs the openvino package: pip install 'edgetl[openvino]'") from None
        core = ov.Core()
        config = {"PERFORMANCE_HINT": "LATENCY", **({"INFERENCE_NUM_THREADS": threads} if threads else {})}
        compiled = core.compile_model(core.read_model(str(path)), "CPU", config)
        self._request = compiled.create_infer_request()
        self._provider = f"OpenVINO CPU {compiled.get_property('INFERENCE_PRECISION_HINT').get_type_name()}"

    def get_providers(self) -> list[str]:
        return [self._provider]

    def run(self, names, feeds: dict) -> list[np.ndarray]:
        self._request.infer({0: feeds[C.IMAGE]})
        return [self._request.get_output_tensor(0).data.copy()]


def open_session(path, device: str, threads: int | None, spin: bool = True):
    """A session on `device` (cpu, cuda: onnxruntime; openvino) whose first provider is the one asked
    for; EdgetlError otherwise. spin=False: idle onnxruntime threads do not busy-wait."""
    if device == "openvino":
        return OpenVINOSession(path, threads)
    sess = session(path, device, threads, spin)
    ran = sess.get_providers()[0]
    if device in EXPECTED_PROVIDER and ran != EXPECTED_PROVIDER[device]:
        raise EdgetlError(f"{path}: --device {device} asked for {EXPECTED_PROVIDER[device]} but onnxruntime "
                          f"runs it on {ran}")
    return sess


def _batch(images: list[np.ndarray] | None, n: int, size: tuple[int, int]) -> np.ndarray:
    """n input images: the photos given (repeated as needed), else fixed noise."""
    if images:
        return np.stack([images[i % len(images)] for i in range(n)])
    h, w = size
    return np.random.default_rng(0).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


def image_split(paths: list[Path], spec, runs: dict[str, Callable[[np.ndarray], object]]) -> dict:
    """Per-image time of read, decode, resize (+crop, RGB) and each model's batch-1 inference, in ms (medians).

    The steps are those of `load_image`, the one host-side preprocessing, timed one by one.
    """
    read, decode, resize, infer = [], [], [], {n: [] for n in runs}
    inputs, skipped = [], 0
    for p in paths:
        t0 = time.perf_counter()
        data = Path(p).read_bytes()
        t1 = time.perf_counter()
        try:
            bgr = decode_bgr(data, min_side=spec.resize_size, name=str(p))
        except ImageError:
            skipped += 1
            continue
        t2 = time.perf_counter()
        x = frame_to_input(bgr, spec)
        t3 = time.perf_counter()
        read.append(t1 - t0)
        decode.append(t2 - t1)
        resize.append(t3 - t2)
        inputs.append(x)
    if not inputs:
        raise DataError("--images: none of the images could be read")
    for x in inputs:  # inference after preprocessing, models interleaved per image
        for name, run in runs.items():
            t = time.perf_counter()
            run(x[None])
            infer[name].append(time.perf_counter() - t)
    pre = {"read_ms": statistics.median(read) * 1e3, "decode_ms": statistics.median(decode) * 1e3,
           "resize_ms": statistics.median(resize) * 1e3}
    host = sum(pre.values())
    models = {}
    for name, xs in infer.items():
        inf = statistics.median(xs) * 1e3
        models[name] = {"inference_ms": inf, "total_ms": host + inf, "inference_share": inf / (host + inf)}
    return {"n": len(inputs), "skipped": skipped, **pre, "models": models}


def bench(models: list[str], device: str = "cpu", batches=(1,), threads=(None,), images: str | None = None,
          rounds: int = 50, budget_s: float = 10.0, max_images: int = 50, memory_check: bool = True,
          spin: bool = True, max_memory_mb: float | None = None) -> dict:
    """Benchmark edgetl models: latency p50/p90/p99 and throughput per model × batch × threads.

    Models are timed interleaved in this process on `device` (cpu, cuda or openvino; the provider
    that ran is named; EdgetlError when it is not the one asked for). spin=False stops idle
    onnxruntime threads from busy-waiting (they otherwise slow the next model on a small CPU).
    With `images` (a folder, file or glob), the per-image split of time into read, decode, resize
    and inference. Memory is measured in a child process per model (`model_memory`). Returns a
    JSON-ready dict. Refused before anything runs: more threads than this machine has cores, and
    batches whose tensors would not fit `max_memory_mb` (default: half of the memory available now).
    """
    if not models:
        raise EdgetlError("no models to benchmark")
    threads = list(threads) or [None]
    cores = os.cpu_count() or 1
    if max(t or 0 for t in threads) > cores:
        raise EdgetlError(f"--threads {max(t or 0 for t in threads)}: this machine has {cores} cores "
                          f"(more threads than cores only wait for each other); use at most {cores}")
    budget = max_memory_mb or (available_bytes() or 8e9) / 2 / 1e6
    loaded, info = {}, []
    for path in models:
        m = load_model(path, "cpu")  # validates it is an edgetl model
        need = batch_bytes(max(batches), m.spec.input_size) / 1e6
        if need > budget:
            fits = max(1, int(budget * 1e6 // batch_bytes(1, m.spec.input_size)))
            raise EdgetlError(f"--batch {max(batches)}: about {need:,.0f} MB of tensors at "
                              f"{m.spec.input_size[0]}x{m.spec.input_size[1]}, over the memory budget of "
                              f"{budget:,.0f} MB (--max-memory); batches up to {fits} fit")
        sessions = {t: open_session(path, device, t, spin) for t in threads}
        memory = model_memory(path, device, threads[0], max(batches), m.spec.input_size) if memory_check else None
        loaded[path] = (m, sessions)
        info.append({"path": str(path), "precision": m.metadata.get(C.KEY_PRECISION, "float32"),
                     "size_mb": Path(path).stat().st_size / 1e6, "provider": sessions[threads[0]].get_providers()[0],
                     "memory_mb": memory, "input_size": list(m.spec.input_size)})
    specs = {m.spec for m, _ in loaded.values()}
    photos = None
    paths = []
    if images:
        paths = expand_paths([images])[:max_images]
        if not paths:
            raise DataError(f"--images {images}: no images found")
        if len(specs) == 1:
            photos = [a for _, batch, _ in image_batches(paths, next(iter(specs)), 32) if batch is not None
                      for a in batch]
    results = []
    for t in threads:
        for b in batches:
            inputs = {p: _batch(photos, b, m.spec.input_size) for p, (m, _) in loaded.items()}
            fns = {p: (lambda s=s, x=inputs[p]: s.run([C.PROBABILITIES], {C.IMAGE: x}))
                   for p, (_, sessions) in loaded.items() for s in [sessions[t]]}
            stats = time_interleaved(fns, rounds=rounds, budget_s=budget_s)
            for row in info:
                st = stats[row["path"]]
                results.append({"model": row["path"], "precision": row["precision"], "provider": row["provider"],
                                "batch": b, "threads": t or 0, **st, "throughput_ips": b / (st["p50_ms"] / 1e3)})

    out = {"machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "onnxruntime": ort.__version__, "device": device,
                       "spin": spin},
           "models": info, "results": results, "images": None}
    if paths:
        spec = next(iter(specs))
        if len(specs) > 1:
            raise DataError("--images: the models take different input sizes; bench them separately")
        runs = {p: (lambda x, s=sessions[threads[0]]: s.run([C.PROBABILITIES], {C.IMAGE: x}))
                for p, (_, sessions) in loaded.items()}
        out["images"] = image_split(paths, spec, runs)
    peak = peak_rss_bytes()
    out["machine"]["peak_rss_mb"] = peak / 1e6 if peak else None
    return out


def table(r: dict) -> str:
    """The human table of a `bench` result."""
    m = r["machine"]
    peak = f"; peak RSS {m['peak_rss_mb']:.0f} MB" if m.get("peak_rss_mb") else ""
    lines = [f"{m['cpu']}, {m['cores']} cores, onnxruntime {m['onnxruntime']}, device {m['device']}"
             f"{'' if m['spin'] else ', no spinning'}{peak}", ""]
    name = {x["path"]: (Path(x["path"]).name if _unique_names(r) else x["path"]) for x in r["models"]}
    w = max(5, *(len(n) for n in name.values()))
    lines.append(f"{'model':<{w}}  precision  {'size':>8}  {'memory':>8}  provider")
    for x in r["models"]:
        mem = f"{x['memory_mb']:.0f} MB" if x["memory_mb"] is not None else "n/a"
        lines.append(f"{name[x['path']]:<{w}}  {x['precision']:<9}  {x['size_mb']:>5.1f} MB  {mem:>8}  {x['provider']}")
    lines += ["", f"{'model':<{w}}  batch  threads  {'p50 ms':>8}  {'p90 ms':>8}  {'p99 ms':>8}  {'images/s':>9}"]
    for x in r["results"]:
        lines.append(f"{name[x['model']]:<{w}}  {x['batch']:>5}  {x['threads'] or 'auto':>7}  {x['p50_ms']:>8.2f}  "
                     f"{x['p90_ms']:>8.2f}  {x['p99_ms']:>8.2f}  {x['throughput_ips']:>9.1f}")
    im = r.get("images")
    if im:
        lines += ["", f"one photo at a time ({im['n']} photos, medians): read {im['read_ms']:.2f} ms, "
                      f"decode {im['decode_ms']:.2f} ms, resize {im['resize_ms']:.2f} ms, then"]
        for p, v in im["models"].items():
            lines.append(f"  {name[p]:<{w}}  inference {v['inference_ms']:.2f} ms = {100 * v['inference_share']:.0f} % "
                         f"of {v['total_ms']:.2f} ms")
    return "\n".join(lines)


def _unique_names(r: dict) -> bool:
    names = [Path(x["path"]).name for x in r["models"]]
    return len(set(names)) == len(names)


if __name__ == "__main__":
    if len(sys.argv) == 8 and sys.argv[1] == "--memory":
        _memory_child(sys.argv[2], sys.argv[3], *map(int, sys.argv[4:]))
