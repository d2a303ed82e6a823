"""Embedding image folders with onnxruntime: decoding overlapped with inference, results cached.

One preprocessing and one inference for every engine: `prepare` turns one image's encoded bytes into
the pixels the backbone sees (any view), `infer` runs a batch of them. `embed_encoded` is the plain
per-batch function built from the two ((session, spec, encoded images, names) → keys, float32
embeddings, errors; no global state), which the Ray engine's workers call; the local engine runs the
same two steps as a pipeline (threads read, hash and `prepare` while background threads run
`infer` and write the cache). `embed_batch` embeds paths, bytes or prepared arrays, for tests and
scripts. `embed_folder` is what `edgetl embed` runs, with either engine.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import queue
import shutil
import threading
import time
from pathlib import Path

import numpy as np

from edgetl import contract as C
from edgetl.data import gpu, sources
from edgetl.data.cache import Namespace, image_key, open_for_backbone
from edgetl.data.encode import infer, prepare
from edgetl.data.engines import Engine
from edgetl.data.engines import ray as ray_engine
from edgetl.data.gpu import BoundRunner
from edgetl.data.index import FileIndex
from edgetl.data.pipeline import prefetch_map
from edgetl.data.scan import Dataset
from edgetl.data.sources import read_regular
from edgetl.errors import CacheError, ImageError, ModelError
from edgetl.ort import check_io, cpu_sessions, graph_sha256, model_bytes, read_metadata, session
from edgetl.spec import Spec


def open_backbone(path: str | os.PathLike, device: str = "auto", threads: int | None = None, spin: bool = True):
    """(session, spec, metadata) for an exported backbone.onnx or trunk.onnx; ModelError if it is not one.

    The metadata is checked against the graph (input uint8 [N,H,W,3] at the stated size, output of the
    stated size), and metadata["graph_sha256"] is the hash of the graph itself: the cache is keyed by
    what the file computes, not only by what it claims.
    """
    p = Path(path)
    if not p.is_file():
        raise ModelError(f"backbone not found: {p} (run `edgetl export-backbone` first)")
    sess = session(p, device, threads, spin, short_job=True)
    meta = read_metadata(sess)
    if meta.get(C.KEY_FORMAT) not in (C.FORMAT_BACKBONE, C.FORMAT_TRUNK):
        raise ModelError(f"{p} is not an edgetl backbone (export one with `edgetl export-backbone`)")
    spec = check_io(sess, meta, p, C.ACTIVATION if meta[C.KEY_FORMAT] == C.FORMAT_TRUNK else C.EMBEDDING)
    return sess, spec, {**meta, "graph_sha256": graph_sha256(p)}


@dataclasses.dataclass
class EmbedResult:
    dataset: Dataset
    keys: list[bytes | None]  # per dataset item; None for skipped images
    new: int
    reused: int
    skipped: list[tuple[Path, str]]
    seconds: float
    namespace: Namespace
    provider: str
    stages: dict = dataclasses.field(default_factory=dict)  # seconds: decode (on the GPU), inference, the rest

    def summary(self) -> str:
        s = (f"{self.new} new, {self.reused} reused, {len(self.skipped)} skipped in {self.seconds:.1f} s "
             f"({self.provider.replace('ExecutionProvider', '')}); cache {self.namespace.dir}")
        return s

    def skipped_lines(self, first: int = 5) -> list[str]:
        lines = [f"  {reason}" for _, reason in self.skipped[:first]]
        if len(self.skipped) > first:
            lines.append(f"  … and {len(self.skipped) - first} more")
        return lines


def _read(item: tuple[int, Path, object, bytes], spec: Spec, known: set[bytes], view: str, decode: bool, index,
          read=read_regular):
    """Worker: read, hash, and (only when not cached, and when `decode`) `prepare`. In a thread.

    Returns (key, array or encoded bytes or None, error or None).
    """
    _, path, st, index_name = item
    try:
        data = read(path)
    except ImageError as e:
        return None, None, str(e)
    key = image_key(data)
    if index is not None and st is not None:
        index.remember(index_name, st, key)
    if key in known:
        return key, None, None
    if not decode:
        return key, data, None
    try:
        return key, prepare(data, spec, view, key, str(path)), None
    except ImageError as e:
        return None, None, str(e)


class _Sink:
    """Inference and cache writes on background threads: while they run batches (onnxruntime releases
    the GIL), the caller reads and decodes the next ones, on the CPU or the GPU.

    `run` (batch → embeddings) serves alone while there is one batch. `more` (a callable returning
    another such function, with a session of its own) makes `extra` more threads once a second batch
    comes; the first thread then swaps `run` for one of its own too (each made on its own thread, while
    the caller goes on reading photos)."""

    def __init__(self, run, ns: Namespace, stages: dict, more=None, extra: int = 0):
        self.ns, self.stages, self.error = ns, stages, None
        self.more, self.extra, self.puts = more, extra if more is not None else 0, 0
        self.q: queue.Queue = queue.Queue(maxsize=2 * (1 + self.extra))
        self.busy = [0.0] * (1 + self.extra)
        self.threads: list = []
        self.lock, self.rows, self.n_rows = threading.Lock(), [], 0
        self._start(0, run)

    def _start(self, i: int, run):
        t = threading.Thread(target=self._loop, args=(i, run), name=f"edgetl-infer-{i}", daemon=True)
        self.threads.append(t)
        t.start()

    def _loop(self, i: int, run):
        own = run is None
        while (job := self.q.get()) is not None:
            if self.error is not None:
                continue
            try:
                if run is None or (not own and len(self.threads) > 1):  # side by side: a session of its own
                    run, own = self.more(), True
                keys, batch = job
                t = time.perf_counter()
                emb = run(batch)
                self.busy[i] += time.perf_counter() - t
                self._write(keys, emb.reshape(len(emb), -1))
            except BaseException as e:  # noqa: BLE001 - handed to the caller's thread
                self.error = e

    def _write(self, keys, emb, flush: bool = False):
        """Cache rows in shards of at least SHARD_ROWS (fewer files for later runs to open and check)."""
        with self.lock:
            if keys:
                self.rows.append((keys, emb))
                self.n_rows += len(keys)
            if not self.rows or (self.n_rows < SHARD_ROWS and not flush):
                return
            rows, self.rows, self.n_rows = self.rows, [], 0
        self.ns.add([k for ks, _ in rows for k in ks], np.concatenate([e for _, e in rows]))

    def put(self, keys, batch):
        if self.error is not None:
            raise self.error
        self.puts += 1
        if self.puts == 2:
            for i in range(1, 1 + self.extra):
                self._start(i, None)
        self.q.put((keys, batch))

    def close(self):
        for _ in self.threads:
            self.q.put(None)
        for t in self.threads:
            t.join()
        self.stages["inference"] = max(self.busy)  # the busiest thread's seconds
        if self.error is not None:
            raise self.error
        self._write([], None, flush=True)


SHARD_ROWS = 32  # photos per cache shard at least (the last one of a run may hold fewer)


def default_batch_size(provider: str) -> int:
    return 256 if provider == "CUDAExecutionProvider" else 8


def embed_folder(data: str | os.PathLike | Dataset, backbone: str | os.PathLike, cache_root: str | os.PathLike,
                 device: str = "auto", batch_size: int | None = None, workers: int | None = None,
                 threads: int | None = None, progress: bool | None = None, spin: bool = False,
                 view: str = "center", only=None, check_space: bool = False, decode: str = "auto",
                 engine=None) -> EmbedResult:
    """Bring the cache up to date for every image under `data` (a folder, an s3://bucket/prefix, or a
    Dataset already scanned); return per-item keys and counts.

    `backbone` is a backbone.onnx or a trunk.onnx (activation maps, cached as float16). `view` is
    "center" (the deployment crop) or "aug<i>" (a seeded random augmentation; its own namespace).
    `only` limits the work to a subset of the dataset's item indices. `check_space` refuses (CacheError,
    with the numbers) when the entries could not fit the disk. `decode`: "cpu", "gpu" (nvJPEG, for the
    center view on CUDA) or "auto" (gpu when onnxruntime runs on CUDA and torchvision can decode
    there). `batch_size` None: 256 on CUDA, 8 on the CPU. `threads`: onnxruntime's threads in all.
    Files unchanged since the cache last saw them (path, size, time; an object's ETag, size, time) are
    not read again. Memory stays flat: at most a few batches of decoded images are in flight. `engine`
    (a data.engines.Engine) runs the work on a Ray cluster instead of here (`workers` and `decode` then
    do not apply), and gives the endpoint of an S3-compatible store.
    """
    engine = engine or Engine()
    t0 = time.perf_counter()
    if engine.name == "ray":
        ray_engine.check(engine, device)  # before any work: the extra, the options
    sess, spec, meta = open_backbone(backbone, "cpu" if engine.name == "ray" else device, threads, spin)
    provider = sess.get_providers()[0]
    ds = data if isinstance(data, Dataset) else sources.scan(data, endpoint_url=engine.endpoint_url)
    src = ds.source or sources.LOCAL
    ns = open_for_backbone(cache_root, meta, view, graph_sha256=meta["graph_sha256"])
    index = ns.index = FileIndex(cache_root)
    wanted = range(len(ds.items)) if only is None else sorted(only)
    if check_space:
        need = len(wanted) * ns.dim * ns.dtype.itemsize  # at most: some may be cached already
        free = shutil.disk_usage(ns.dir).free
        if need > free:
            raise CacheError(f"the cache would need {need / 1e9:.2f} GB and {ns.dir} has {free / 1e9:.2f} GB free")
    known = ns.keys()
    keys: list[bytes | None] = [None] * len(ds.items)
    skipped: list[tuple[Path, str]] = []
    new = reused = 0
    bar = _progress(len(wanted), progress)

    # files the index knows unchanged, with a key the cache holds: nothing to read
    work = []
    for i in wanted:
        path = ds.items[i].path
        st = src.stat(path)
        name = src.index_name(path) if st is not None else None
        key = index.key_of(name, st) if index is not None and st is not None else None
        if key is not None and key in known:
            keys[i] = key
            reused += 1
            bar.update(1)
        else:
            work.append((i, path, st, name))
    if engine.name == "ray":
        try:
            run = ray_engine.run(ds, work, backbone, spec, ns, index, known, view, batch_size, engine, bar)
        finally:
            bar.close()
            index.close()
        ns.compact()
        for i, key in run.keys.items():
            keys[i] = key
        seconds = time.perf_counter() - t0
        return EmbedResult(ds, keys, run.new, reused + run.reused, run.skipped, seconds, ns, run.provider,
                           {**run.stages, "wall": round(seconds, 3)})

    batch_size = batch_size or default_batch_size(provider)
    on_gpu = _gpu_decoder(decode, provider, view, spec)
    pending_idx: list[int] = []
    pending_keys: list[bytes] = []
    pending: list = []
    seen: set[bytes] = set()  # keys embedded in this run: a copy in a later batch is not embedded again
    stages = {"gpu decode": 0.0, "inference": 0.0}
    # On the CPU, from a second batch on: single-thread sessions side by side (see runtime.cpu_sessions;
    # measured on 2 cores, photos decoded beside them: 0.93 of the bare 2-thread session's speed, not 0.87)
    n_sessions, session_threads = cpu_sessions(threads) if provider == "CPUExecutionProvider" else (1, threads)
    n_sessions = min(n_sessions, -(-len(work) // batch_size))  # at most one per batch that may need one
    more = None
    if n_sessions > 1:  # the same graph as the one checked, whatever happens to the file meanwhile
        try:
            blob = _read_backbone(backbone, meta["graph_sha256"])
        except ModelError:
            bar.close()
            index.close()
            raise
        more = functools.partial(_cpu_runner, blob, session_threads, spin)
    sink = _Sink(_runner(sess, on_gpu), ns, stages, more, n_sessions - 1)
    del sess  # the first thread holds it while it serves alone

    def flush():
        nonlocal pending_idx, pending_keys, pending, new
        if not pending_keys:
            return
        if on_gpu is not None:  # encoded bytes: decode the batch on the GPU
            t_start = time.perf_counter()
            batch, ok, errors = on_gpu(pending, [str(ds.items[i].path) for i in pending_idx])
            if batch is not None:
                import torch

                torch.cuda.current_stream(batch.device).synchronize()  # decoded before the other thread reads it
            stages["gpu decode"] += time.perf_counter() - t_start
            for j, reason in errors:  # unreadable after all (the CPU path would have said so while reading)
                skipped.append((ds.items[pending_idx[j]].path, reason))
                keys[pending_idx[j]] = None
                new -= 1
            if batch is not None:
                sink.put([pending_keys[j] for j in ok], batch)
        else:
            sink.put(pending_keys, np.stack(pending))
        pending_idx, pending_keys, pending = [], [], []

    read = functools.partial(_read, spec=spec, known=known, view=view, decode=on_gpu is None, index=index,
                             read=src.read if src.remote else read_regular)
    try:
        for (idx, path, _, _), (key, arr, err) in prefetch_map(read, work, workers, window=max(2 * batch_size, 64)):
            if err:
                skipped.append((path, err))
            elif arr is None or key in known or key in seen:  # cached, or a duplicate photo
                keys[idx] = key
                reused += 1
            else:
                keys[idx] = key
                pending_idx.append(idx)
                pending_keys.append(key)
                pending.append(arr)
                seen.add(key)
                new += 1
                if len(pending_keys) >= batch_size:
                    flush()
            bar.update(1)
        flush()
    finally:
        sink.close()
        bar.close()
        if index is not None:
            index.close()
    ns.compact()
    seconds = time.perf_counter() - t0
    stages = {k: round(v, 3) for k, v in stages.items() if v}
    stages["wall"] = round(seconds, 3)  # inference overlaps the rest (another thread)
    return EmbedResult(ds, keys, new, reused, skipped, seconds, ns, provider, stages)


def _gpu_decoder(decode: str, provider: str, view: str, spec: Spec):
    """A data.gpu.Decoder when photos should be decoded on the GPU, else None (decoded in CPU threads)."""
    if decode == "cpu" or view != "center" or provider != "CUDAExecutionProvider":
        if decode == "gpu" and provider != "CUDAExecutionProvider":
            raise ModelError("--decode gpu needs onnxruntime on CUDA (--device cuda)")
        return None

    if not gpu.usable("cuda"):
        if decode == "gpu":
            raise ModelError("--decode gpu: torchvision cannot decode JPEGs on this GPU (needs a CUDA build of "
                             "torch and torchvision)")
        return None
    return gpu.Decoder(spec, "cuda")


def _read_backbone(path, sha: str) -> bytes:
    """The backbone file's bytes, if its graph is still the one whose hash keys the cache."""
    blob = model_bytes(path)
    if graph_sha256(blob) != sha:
        raise ModelError(f"{path} changed while it was being used; run again")
    return blob


def _cpu_runner(backbone: bytes, threads: int, spin: bool):
    """Another CPU session of the same backbone (its graph already checked by `open_backbone`)."""
    return functools.partial(infer, session(backbone, "cpu", threads, spin, short_job=True))


def _runner(sess, on_gpu):
    """batch → float32 embeddings: bound to torch's CUDA tensors when decoding on the GPU."""
    if on_gpu is not None:
        return BoundRunner(sess)
    return functools.partial(infer, sess)


class _NoBar:
    def update(self, n):
        pass

    def close(self):
        pass


def _progress(total: int, enabled: bool | None):
    if enabled is False or total < 200:
        return _NoBar()
    try:
        from tqdm import tqdm
    except ImportError:
        return _NoBar()
    return tqdm(total=total, unit="img", disable=None if enabled is None else not enabled, leave=False,
                smoothing=0.1, dynamic_ncols=True)
