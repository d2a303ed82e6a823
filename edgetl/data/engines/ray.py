"""The Ray engine: `edgetl embed --engine ray`, the standard Ray Data batch-inference pattern.

    driver:  list the photos (data.sources: a folder, or s3://) and leave out those the cache's file
             index knows unchanged → a Ray dataset of (item, path) rows, one batch per block
    workers: map_batches over a fixed pool of `Embedder` actors, each holding one onnxruntime
             session (CPU, or CUDA with gpus_per_worker > 0): read the batch's bytes (S3 requests
             concurrently), then `embed.embed_encoded`, the per-batch function of every engine
             (content keys, `prepare`'s pixels, float32 embeddings; unreadable images as lines)
    driver:  the results stream back (iter_batches) and the driver writes them into the cache,
             shard by shard (about `SHARD_ROWS` rows or `SHARD_SECONDS`), each write atomic.

Why the driver writes the cache rather than the workers: workers then need no access to the cache's
filesystem (KubeRay pods and other nodes do not share the driver's disk), there is one writer per
namespace and run, and the driver drops a key it has already written, so a retried task can never
add a key twice. What flows back is small: an embedding is 5 KB (1280 float32) against a photo's
50–500 KB, so the driver is not the bottleneck before some ten nodes (scripts/bench_ray.py measures
its cost per image).

Kills: Ray restarts a killed worker and retries its task (Ray Data's actor pools retry without
limit); whatever the dead worker computed never reached the driver, so every image is written once.
A killed driver ends the job; the shards already written are whole (temporary file, then rename) and
the file index is saved with every shard, so a re-run reads only photos whose key it does not know
and embeds only keys the cache lacks (each worker holds the set of cached keys).

Paths: a local DATA folder must be visible at the same path on every node (one machine, or a shared
filesystem); s3:// DATA is read by every worker directly from the bucket, with the endpoint and the
AWS_* credentials of the environment edgetl runs in (a worker without them uses its own). The
workers import this very edgetl: when connecting to an existing cluster its package travels with the
job (runtime_env py_modules); the cluster needs edgetl's dependencies (`pip install 'edgetl[ray]'`).
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import logging
import math
import os
import re
import time
from pathlib import Path

import numpy as np

import edgetl
from edgetl.data.encode import embed_encoded
from edgetl.data.sources import EXTRA, LOCAL, from_config, read_regular
from edgetl.errors import EdgetlError, ImageError
from edgetl.ort import output_dim, session

NEW, KNOWN, ERROR = 0, 1, 2  # what a worker did with a row: embedded it; cached or a repeat; could not read it
SHARD_ROWS = 1024  # the driver writes a shard at least this often (rows) …
SHARD_SECONDS = 2.0  # … or this often (seconds), whichever comes first: a killed driver loses little
MAX_BLOCKS = 20_000  # listing rows per block: one batch, unless that would make more blocks than this


def _ray():
    try:
        import ray
        import ray.data  # noqa: F401 - Ray Data is the part needed
    except ImportError:
        raise EdgetlError(f"--engine ray {EXTRA}") from None
    return ray


def check(engine, device: str = "auto") -> None:
    """Refuse, before any work, what cannot run: the extra missing, impossible options. (`device` is
    where this process runs onnxruntime; the workers run on CUDA exactly when gpus_per_worker > 0.)"""
    _ray()
    if engine.workers is not None and engine.workers < 1:
        raise EdgetlError("--workers must be at least 1")
    if engine.gpus_per_worker < 0:
        raise EdgetlError("--gpus-per-worker cannot be negative")


@dataclasses.dataclass
class Run:
    keys: dict[int, bytes]  # item index → content key, for every item read (unreadable ones absent)
    new: int
    reused: int
    skipped: list[tuple[Path | str, str]]
    provider: str
    stages: dict


def run(ds, work, backbone, spec, ns, index, known: set[bytes], view: str, batch_size: int | None, engine,
        bar) -> Run:
    """Embed `work` ((item index, path, stat, index name) of `ds`, not known to the index) on Ray and
    write the results into namespace `ns`. Called by `embed_folder`."""
    ray = _ray()
    if not work:  # everything known already: no cluster needed
        return Run({}, 0, 0, [], "nothing to embed on Ray", {})
    t0 = time.perf_counter()
    started = _connect(ray, engine)
    try:
        return _run(ray, ds, work, backbone, spec, ns, index, known, view, batch_size, engine, bar, t0)
    finally:
        if started:
            ray.shutdown()


def _connect(ray, engine) -> bool:
    """Connect to the cluster (or start a local one); True when this call started the connection."""
    if ray.is_initialized():
        return False
    kw: dict = {"log_to_driver": False, "logging_level": logging.ERROR}
    if engine.address is None:
        kw["include_dashboard"] = False
    else:  # the workers run this edgetl, whatever the cluster has installed

        kw["runtime_env"] = {"py_modules": [str(Path(edgetl.__file__).parent)]}
    try:
        ray.init(address=engine.address, **kw)
    except (ConnectionError, RuntimeError, ValueError) as e:
        where = engine.address or "a local cluster"
        raise EdgetlError(f"cannot connect to Ray at {where}: {' '.join(str(e).split())[:200]}") from None
    return True


def _run(ray, ds, work, backbone, spec, ns, index, known, view, batch_size, engine, bar, t0) -> Run:
    from ray.data import ActorPoolStrategy, DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.CRITICAL)  # its failures reach the caller as one line
    resources = ray.cluster_resources()
    cpus, gpus = resources.get("CPU", 1.0), resources.get("GPU", 0.0)
    gpw = float(engine.gpus_per_worker or 0)
    if gpw and gpus < gpw:
        raise EdgetlError(f"--gpus-per-worker {gpw:g}: the Ray cluster has {gpus:g} GPUs")
    workers = engine.workers or max(1, int(gpus // gpw) if gpw else int(cpus))
    cpus_per_worker = max(1, int(cpus // workers)) if gpw else 1  # a GPU worker decodes with its share of CPUs
    worker_device = "cuda" if gpw else "cpu"
    batch_size = batch_size or (256 if gpw else 32)
    stages: dict = {}
    keys: dict[int, bytes] = {}
    skipped: list[tuple[int, str]] = []
    new = reused = 0
    provider = "CUDAExecutionProvider" if gpw else "CPUExecutionProvider"
    src = ds.source or LOCAL
    per_block = batch_size * max(1, math.ceil(len(work) / batch_size / MAX_BLOCKS))
    n_blocks = math.ceil(len(work) / per_block)
    workers = min(workers, n_blocks)  # a block is one task: no more workers than blocks
    model = ray.put(Path(backbone).read_bytes())
    known_keys = ray.put(np.sort(np.array(list(known), dtype="S32")) if known else np.zeros(0, "S32"))
    # from_items builds its blocks here (from_arrow runs a task per block, which waits for a free CPU)
    rows = ray.data.from_items([{"i": w[0], "path": str(w[1])} for w in work], override_num_blocks=n_blocks)
    out = rows.map_batches(
        Embedder, batch_size=batch_size, batch_format="numpy", zero_copy_batch=True,
        fn_constructor_kwargs={"model": [model], "known": [known_keys], "spec": spec, "view": view,
                               "source": src.config(), "device": worker_device, "threads": cpus_per_worker,
                               "version": edgetl.__version__},
        compute=ActorPoolStrategy(size=workers), num_cpus=cpus_per_worker, num_gpus=gpw or None)
    item = {w[0]: w for w in work}
    writer = _Writer(ns, index, known)
    stages["connect"] = round(time.perf_counter() - t0, 3)  # Ray up, listing packed
    busy, first_rows = 0.0, 0  # the driver's own work on results: what caps the images per second it can take
    try:
        for b in out.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=2):
            t_batch = time.perf_counter()
            if "first result" not in stages:  # cluster, workers up, first batch done
                stages["first result"], first_rows = round(t_batch - t0, 3), len(b["i"])
            provider = str(b["provider"][0]) if len(b["provider"]) else provider
            emb = b["emb"]
            for j, (i, state, key) in enumerate(zip(b["i"].tolist(), b["state"].tolist(), b["key"])):
                if state == ERROR:
                    skipped.append((i, str(b["error"][j])))
                    continue
                keys[i] = key = key.tobytes()
                if state == NEW and writer.add(key, emb[j], item[i]):
                    new += 1
                else:
                    writer.remember(key, item[i])
                    reused += 1
            bar.update(len(b["i"]))
            writer.maybe_flush()
            busy += time.perf_counter() - t_batch
        t_batch = time.perf_counter()
        writer.flush()
        stages["driver"] = round(busy + time.perf_counter() - t_batch, 3)
        if "first result" in stages and len(work) > first_rows:  # images per second once the workers are up
            stages["steady img/s"] = round((len(work) - first_rows) / max(t_batch - t0 - stages["first result"], 1e-9), 1)
    except EdgetlError:
        raise
    except Exception as e:  # noqa: BLE001 - a worker's error arrives wrapped by Ray: one line
        raise _unwrap(e) from None
    finally:
        writer.flush()
    skipped.sort()
    items = ds.items
    return Run(keys, new, reused, [(items[i].path, r) for i, r in skipped],
               f"{provider} on Ray, {workers} worker{'s' if workers != 1 else ''}", stages)


class _Writer:
    """The driver's side: results → shards (each written atomically), each key once; the file index
    saved with every shard, so that a killed driver's re-run reads only what it does not know."""

    def __init__(self, ns, index, known: set[bytes]):
        self.ns, self.index, self.known = ns, index, known  # `known` grows as shards are written (ns.add)
        self.keys: list[bytes] = []
        self.rows: list[np.ndarray] = []
        self.pending: set[bytes] = set()
        self.seen: list[tuple[object, bytes]] = []  # (work entry, key) to remember once written
        self.last = time.monotonic()

    def add(self, key: bytes, emb: np.ndarray, entry) -> bool:
        """Queue a new embedding; False when the key is cached or queued already (a retried task,
        a duplicate photo)."""
        if key in self.known or key in self.pending:
            return False
        self.keys.append(key)
        self.rows.append(emb)
        self.pending.add(key)
        self.seen.append((entry, key))
        return True

    def remember(self, key: bytes, entry) -> None:
        self.seen.append((entry, key))

    def maybe_flush(self) -> None:
        if len(self.keys) >= SHARD_ROWS or time.monotonic() - self.last >= SHARD_SECONDS:
            self.flush()

    def flush(self) -> None:
        if self.keys:
            self.ns.add(self.keys, np.stack(self.rows).reshape(len(self.rows), -1))
        if self.index is not None:
            for (_, _, st, name), key in self.seen:
                if st is not None:
                    self.index.remember(name, st, key)
            self.index.save()
        self.keys, self.rows, self.pending, self.seen = [], [], set(), []
        self.last = time.monotonic()


def _unwrap(e: BaseException) -> EdgetlError:
    """The EdgetlError a worker raised, from inside Ray's wrappers; else Ray's failure in one line."""
    seen = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, EdgetlError):
            return cur
        inner = getattr(cur, "cause", None)
        cur = inner if isinstance(inner, BaseException) else (cur.__cause__ or cur.__context__)
    # an actor that failed to start carries its error only as text (ActorDiedError keeps no cause)
    found = re.findall(r"^edgetl\.errors\.\w+: (.+)$", str(e), re.MULTILINE)
    if found:
        return EdgetlError(found[-1].strip())
    text = " ".join(re.sub(r"\x1b\[[0-9;]*m", "", str(e)).split())
    return EdgetlError(f"the Ray run failed: {type(e).__name__}: {text[:300]}")


class _Known:
    """Membership in a sorted array of 32-byte keys (shared by a node's workers through the object store)."""

    def __init__(self, arr: np.ndarray):
        self.arr = arr

    def __contains__(self, key: bytes) -> bool:
        if not len(self.arr):
            return False
        q = np.array([key], dtype="S32")
        j = int(np.searchsorted(self.arr, q)[0])
        return j < len(self.arr) and self.arr[j] == q[0]


class Embedder:
    """A Ray worker: one onnxruntime session, fed batches of (item, path) rows; returns per row its
    state (NEW, KNOWN, ERROR), content key, float32 embedding (zeros unless NEW) and error line."""

    def __init__(self, model, known, spec, view: str, source: dict, device: str, threads: int, version: str):
        import ray

        if edgetl.__version__ != version:
            raise EdgetlError(f"a Ray worker runs edgetl {edgetl.__version__}, the driver {version}: install the "
                              f"same version on the cluster")
        self.sess = session(ray.get(model[0]), device, threads, spin=False, short_job=True)
        self.provider = self.sess.get_providers()[0]
        if device == "cuda" and self.provider != "CUDAExecutionProvider":
            raise EdgetlError(f"a Ray worker on {os.uname().nodename} has a GPU but onnxruntime cannot use it "
                              "(install onnxruntime-gpu there)")
        self.known = _Known(ray.get(known[0]))
        self.dim = output_dim(self.sess)
        self.spec, self.view = spec, view
        self.source = from_config(source)
        self.pool = cf.ThreadPoolExecutor(max(2, threads), thread_name_prefix="edgetl-decode")

    def __call__(self, batch: dict) -> dict:
        paths = [str(p) for p in batch["path"]]
        if self.source.remote:
            blobs = self.source.read_many(paths)
        else:
            blobs = list(self.pool.map(_read_or_error(read_regular), paths))
        r = embed_encoded(self.sess, self.spec, blobs, paths, self.view, self.known, self.pool)
        n = len(paths)
        state = np.full(n, KNOWN, np.int8)
        state[r.new] = NEW
        emb = np.zeros((n, r.emb.shape[1] if r.new else self.dim), np.float32)
        emb[r.new] = r.emb
        errors = np.array([""] * n, dtype=object)
        for j, reason in r.errors:
            state[j], errors[j] = ERROR, reason
        keys = np.zeros((n, 32), np.uint8)
        for j, k in enumerate(r.keys):
            if k is not None:
                keys[j] = np.frombuffer(k, np.uint8)
        return {"i": np.asarray(batch["i"], np.int64), "state": state, "key": keys, "emb": emb, "error": errors,
                "provider": np.array([self.provider] * n, dtype=object)}


def _read_or_error(read):
    def one(path):
        try:
            return read(path)
        except ImageError as e:
            return e

    return one
