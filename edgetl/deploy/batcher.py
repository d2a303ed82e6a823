"""The inference side of `edgetl serve`: a served model (checked, warmed, named by its bytes' sha256),
and the dynamic batcher that runs decoded images through it. Torch-free; no HTTP here.

On a CPU the model runs on single-thread sessions side by side (`ort.cpu_sessions`, as `run` and
`embed` do), one lane thread each, and an image alone in the server (no other lane busy, nothing else
waiting or being decoded) on a session that uses every core: the lanes' throughput under load, one
request's latency without load. On a GPU, one session. Every lane takes the oldest waiting
image and whatever else waits behind it for the same model (up to `max_batch`); it waits up to
`max_wait` for more only while other images are still being decoded, so a lone request never
waits for company that is not coming.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import threading
import time
from pathlib import Path

import numpy as np

from edgetl import contract as C
from edgetl.deploy.runtime import Model, load_model
from edgetl.errors import ModelError
from edgetl.ort import check_io, cpu_sessions, model_bytes, read_metadata, session


@dataclasses.dataclass(eq=False)
class Served:
    """One loaded model file: what every answer names, and the runners its lanes use."""

    model: Model
    runners: list  # one per lane: uint8 [N,H,W,3] → float32 [N,C]
    sha256: str
    name: str
    loaded_at: float  # time.time()
    solo: object = None  # on a CPU with lanes: a session on every core, for an image that is alone in the server

    @property
    def classes(self) -> list[str]:
        return self.model.classes

    def ref(self) -> dict:
        return {"name": self.name, "sha256": self.sha256}


def model_name(path) -> str:
    """A model's name in answers: the file's stem, or its folder's name for the usual `model.onnx`."""
    p = Path(path)
    return (p.parent.resolve().name or p.stem) if p.stem == "model" else p.stem


def load_served(path, device: str = "auto", name: str | None = None, warm_batch: int = 1) -> Served:
    """Load, check and warm up a model file for serving; ModelError (one line) when it is not usable.

    The file is checked as `load_model` checks it (metadata against graph), then read ONCE: the sessions
    and the sha256 come from the same bytes, and a file replaced in between is refused."""
    model = load_model(path, device)
    blob = model_bytes(path)
    sha = hashlib.sha256(blob).hexdigest()
    n, threads = cpu_sessions()
    solo = None
    if model.provider == "CPUExecutionProvider" and n >= 2:
        sessions = [session(blob, "cpu", threads, spin=False) for _ in range(n)]
        solo = dataclasses.replace(model, session=session(blob, "cpu", n * threads, spin=False)).probabilities
    else:
        sessions = [session(blob, device)]
    meta = read_metadata(sessions[0])
    if meta != model.metadata:
        raise ModelError(f"{path} changed while it was being loaded; try again")
    check_io(sessions[0], meta, path, C.PROBABILITIES)
    runners = [dataclasses.replace(model, session=s).probabilities for s in sessions]
    h, w = model.spec.input_size
    zeros = np.zeros((max(1, warm_batch), h, w, 3), np.uint8)
    for run, x in [(r, zeros) for r in runners] + ([(solo, zeros[:1])] if solo else []):
        out = run(x)  # a session's first run allocates its buffers: not on a request's time (the solo one runs batch 1)
        if out.shape != (len(x), len(model.classes)) or not np.isfinite(out).all():
            raise ModelError(f"{path}: its output on a test batch is not {len(model.classes)} finite probabilities")
    model.session = sessions[0]  # the checking session (default threads) is dropped
    return Served(model, runners, sha, name or model_name(path), time.time(), solo)


@dataclasses.dataclass(eq=False)
class Job:
    """One decoded image waiting for inference."""

    served: Served
    image: np.ndarray  # uint8 [H,W,3]
    token: object  # the caller's handle, given back to `deliver`
    t_queued: float = dataclasses.field(default_factory=time.perf_counter)


@dataclasses.dataclass
class Done:
    """What a lane gives back for one job: probabilities (or the error), and how it was run."""

    probs: np.ndarray | None
    error: str | None
    wait_ms: float  # queued → its batch started
    inference_ms: float
    batch: int


class Batcher:
    """Dynamic batching over the lanes of the served model.

    `deliver(jobs, results)` is called from a lane thread once per batch (results: one `Done` per job,
    in order); it must be quick (hand over to the event loop). A batch holds jobs of one model only, so
    a job always runs on the model it was admitted with, whatever was swapped in meanwhile."""

    def __init__(self, served: Served, deliver, max_batch: int = 8, max_wait_ms: float = 5.0,
                 on_batch=lambda size, seconds: None):
        self.served = served
        self.deliver, self.on_batch = deliver, on_batch
        self.max_batch, self.max_wait = max(1, max_batch), max(0.0, max_wait_ms) / 1e3
        self._items: collections.deque[Job] = collections.deque()
        self._cond = threading.Condition()
        self._decoding = 0  # images admitted and not yet decoded: more work is on its way
        self._busy = 0  # lanes running a batch
        self._stop = False
        self.lanes = len(served.runners)
        self._threads = [threading.Thread(target=self._lane, args=(i,), name=f"edgetl-lane-{i}", daemon=True)
                         for i in range(self.lanes)]
        for t in self._threads:
            t.start()

    def swap(self, served: Served) -> Served:
        """Make `served` the model of new requests (atomic); returns the previous one."""
        if len(served.runners) != self.lanes:
            raise ModelError(f"the new model has {len(served.runners)} lanes, the server runs {self.lanes}")
        old, self.served = self.served, served
        return old

    def decoding(self, delta: int) -> None:
        with self._cond:
            self._decoding += delta
            if delta < 0:
                self._cond.notify_all()

    def submit(self, job: Job) -> None:
        """Queue a decoded image for the lanes; one alone in the server runs at once on the calling (decode)
        thread, on the every-core session: no hand-over to a lane thread on the way (`decoding(-1)` for it
        comes after this returns, hence `<= 1`)."""
        with self._cond:
            alone = (job.served.solo is not None and not self._busy and not self._items and self._decoding <= 1
                     and not self._stop)
            if not alone:
                self._items.append(job)
                self._cond.notify()
                return
            self._busy += 1
        self._run([job], job.served.solo)

    @property
    def waiting(self) -> int:
        return len(self._items)

    def stop(self, timeout: float = 10.0) -> None:
        """Run what is queued, then end the lanes."""
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        for t in self._threads:
            t.join(timeout)

    def _take(self) -> tuple[list[Job], bool] | None:
        """The next batch, and whether it is alone in the server (nothing else running, waiting or decoding)."""
        with self._cond:
            while not self._items:
                if self._stop:
                    return None
                self._cond.wait()
            first = self._items.popleft()
            batch = [first]
            deadline = first.t_queued + self.max_wait
            while len(batch) < self.max_batch:
                if self._items:
                    if self._items[0].served is not first.served:
                        break  # a swap happened: the next model's jobs go in a batch of their own
                    batch.append(self._items.popleft())
                    continue
                left = deadline - time.perf_counter()
                if self._decoding <= 0 or left <= 0 or self._stop:
                    break
                self._cond.wait(left)
            alone = len(batch) == 1 and not self._busy and not self._items and self._decoding <= 0
            self._busy += 1
            return batch, alone

    def _lane(self, i: int) -> None:
        while (taken := self._take()) is not None:
            batch, alone = taken
            served = batch[0].served
            self._run(batch, served.solo if alone and served.solo else served.runners[i % len(served.runners)])

    def _run(self, batch: list[Job], run) -> None:
        """Run one batch (this thread counted in _busy) and deliver its results."""
        t0 = time.perf_counter()
        try:
            probs = run(np.stack([j.image for j in batch]))
            rows: list = list(probs)
            errors: list = [None] * len(batch)
        except Exception as e:  # noqa: BLE001 - never seen on valid input; each job alone, so one cannot fail others
            rows, errors = self._one_by_one(run, batch, e)
        finally:
            with self._cond:
                self._busy -= 1
        t1 = time.perf_counter()
        self.on_batch(len(batch), t1 - t0)
        ms = (t1 - t0) * 1e3
        try:
            self.deliver([j.token for j in batch],
                         [Done(r, err, (t0 - j.t_queued) * 1e3, ms, len(batch)) for j, r, err in zip(batch, rows, errors)])
        except Exception:  # noqa: BLE001 - the event loop is gone (shutting down): nobody to answer
            pass

    @staticmethod
    def _one_by_one(run, batch: list[Job], first_error: Exception):
        rows, errors = [], []
        for j in batch:
            try:
                rows.append(run(j.image[None])[0])
                errors.append(None)
            except Exception as e:  # noqa: BLE001
                rows.append(None)
                errors.append(" ".join(str(e or first_error).split())[:200] or type(e).__name__)
        return rows, errors
