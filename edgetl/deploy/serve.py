"""`edgetl serve`: the model as an HTTP service on the edge box. Torch-free (the `serve` extra:
Starlette on uvicorn, the Prometheus client, python-multipart).

    POST /v1/predict   an image as the body, or several as multipart files → class, top-k, model, timings
    GET  /v1/model     classes, input size, hashes, training summary
    GET  /healthz      alive (never needs the token)     GET /readyz   loaded, warmed, not stopping
    GET  /metrics      Prometheus text                   GET /docs, /openapi.json

A request is admitted against a bounded queue (else 503 + Retry-After), its body read with a size
limit (413, from Content-Length before anything is read, else while it streams), its images decoded
on a thread pool by the `load_image` of every other path, then batched across requests on the lanes
of the model (deploy.batcher). SIGHUP (or a changed file with --watch) loads the model file again
beside the running one and swaps it in; SIGTERM or Ctrl-C stops accepting, finishes what is in
flight (bounded) and exits 0.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import contextlib
import dataclasses
import json
import os
import signal
import socket
import sys
import threading
import time

import numpy as np
import uvicorn
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from edgetl import contract as C
from edgetl.data.preprocess import opencv
from edgetl.deploy.batcher import Batcher, Job, Served, load_served
from edgetl.deploy.serve_docs import openapi, page
from edgetl.deploy.serve_front import Front, Metrics, error, safe
from edgetl.deploy.streams import SourceError, Streams, parse_sources
from edgetl.deploy.uploads import BadInput, decode_upload, media_type, multipart_files
from edgetl.errors import EdgetlError
from edgetl.ort import physical_cores

BODY_BUDGET_BODIES = 8  # bodies of the largest allowed size held at once, over all requests


@dataclasses.dataclass
class Options:
    """What `edgetl serve` takes (its CLI options, same names)."""

    model: str
    host: str = "127.0.0.1"
    port: int = 8080
    device: str = "auto"
    max_batch: int = 8
    max_wait_ms: float = 5.0
    max_queue: int = 64  # images admitted and not yet answered
    max_body_mb: float = 16.0
    decode_threads: int = 0  # 0: the physical cores
    top_k: int = 3
    token: str | None = None
    watch: bool = False
    watch_every_s: float = 1.0
    drain_s: float = 10.0
    read_timeout_s: float = 30.0
    log_json: bool = False
    quiet: bool = False  # no line per request
    name: str | None = None
    sources: tuple = ()  # streams watched beside the HTTP API (`--source`, `--camera`, `--streams`)
    cameras: tuple = ()
    streams_file: str | None = None


class Service:
    """The app's state: the batcher, the limits, the metrics, the reloads."""

    def __init__(self, opts: Options, served: Served, log):
        self.opts, self.log = opts, log
        self.metrics = m = Metrics()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.decode_threads = opts.decode_threads or physical_cores()
        self.pool = cf.ThreadPoolExecutor(self.decode_threads, thread_name_prefix="edgetl-decode")
        self.batcher = Batcher(served, self._deliver, opts.max_batch, opts.max_wait_ms,
                               on_batch=lambda n, s: (m.batch.observe(n), m.inference.observe(s)))
        self.pending = 0  # images admitted, not yet answered
        self.body_bytes, self.body_limit = 0, int(opts.max_body_mb * 2**20)
        self.body_budget = BODY_BUDGET_BODIES * self.body_limit
        self.stopping = False
        self.answered = 0
        self._reloading, self._again, self._reload_task = False, False, None
        self.hub = None  # streams.Streams when the server also watches sources
        m.queue_limit.set(opts.max_queue)
        m.set_model(served)
        # Warm the decode threads too (OpenCV's first decode on a thread is slow): /readyz means warmed.
        sample = opencv().imencode(".jpg", np.full((64, 64, 3), 128, np.uint8))[1].tobytes()
        list(self.pool.map(lambda _: decode_upload(sample, served.model.spec, "warm-up"), range(self.decode_threads)))

    # --- the lanes hand results back to the event loop ------------------------------------------
    def _deliver(self, tokens, dones) -> None:
        self.loop.call_soon_threadsafe(self._resolve, tokens, dones)

    @staticmethod
    def _resolve(tokens, dones) -> None:
        for fut, done in zip(tokens, dones):
            if not fut.done():
                fut.set_result(done)

    def _decode_and_queue(self, served: Served, data: bytes, name: str, ctype: str | None, fut, timing: dict) -> None:
        """On a decode thread: bytes → model input → the batcher (or the error → the future)."""
        t0 = time.perf_counter()
        timing["queue"] = t0 - timing["admitted"]
        failed = None
        try:
            img = decode_upload(data, served.model.spec, name, ctype)
            timing["decode"] = time.perf_counter() - t0
            self.metrics.decoded.inc()
            self.batcher.submit(Job(served, img, fut))
        except BadInput as e:
            failed = e
        except Exception as e:  # noqa: BLE001 - a bug must fail this image only, never hang its request
            failed = BadInput(500, "internal", f"{name}: {type(e).__name__}: {' '.join(str(e).split())[:200]}")
        finally:
            self.batcher.decoding(-1)  # after the job is queued: a lane waiting for company sees one or the other
        if failed is not None:
            timing["decode"] = time.perf_counter() - t0
            self.loop.call_soon_threadsafe(self._resolve, [fut], [failed])

    async def _one(self, served: Served, name: str, ctype: str | None, data: bytes, k: int) -> dict:
        fut = self.loop.create_future()
        timing = {"admitted": time.perf_counter()}
        self.batcher.decoding(+1)
        self.pool.submit(self._decode_and_queue, served, data, name, ctype, fut, timing)
        done = await fut
        if isinstance(done, BadInput):
            self.metrics.errors.labels(done.kind).inc()
            return {"error": str(done), "kind": done.kind, "status": done.status}
        if done.error is not None:
            self.metrics.errors.labels("inference").inc()
            return {"error": f"{name}: inference failed: {done.error}", "kind": "inference", "status": 500}
        order = np.argsort(-done.probs, kind="stable")[:k]  # as `edgetl predict` ranks and rounds
        top = [{"class": served.classes[j], "probability": round(float(done.probs[j]), 6)} for j in order]
        return {"class": top[0]["class"], "probability": top[0]["probability"], "top": top,
                "timings_ms": {"queue": round((timing["queue"] + done.wait_ms / 1e3) * 1e3, 3),
                               "decode": round(timing["decode"] * 1e3, 3), "inference": round(done.inference_ms, 3)},
                "batch": done.batch}

    # --- endpoints -----------------------------------------------------------------------------
    async def predict(self, request: Request) -> Response:
        info = request.scope.setdefault("edgetl", {})
        try:
            return await self._predict(request, info)
        except BadInput as e:
            self.metrics.errors.labels(e.kind).inc()
            info["error"] = e.kind
            retry = {"Retry-After": "1"} if e.status == 503 else {}
            close = {"Connection": "close"} if e.status in (408, 413, 503) else {}  # the body may be unread
            return error(e.status, e.kind, str(e), {**retry, **close})
        except ClientDisconnect:
            self.metrics.errors.labels("disconnected").inc()
            info["error"] = "disconnected"
            return Response(status_code=499)  # nobody reads it: the client left mid-upload
        finally:
            self.body_bytes -= info.pop("reserved", 0)

    async def _predict(self, request: Request, info: dict) -> Response:
        served = self.batcher.served  # the model this request stays on, whatever is swapped in meanwhile
        info["model"] = served
        k = _top_k(request.query_params.get("top_k"), self.opts.top_k, len(served.classes))
        if self.stopping:
            raise BadInput(503, "stopping", "the server is stopping")
        if self.pending >= self.opts.max_queue:
            raise BadInput(503, "queue_full", "busy: the queue is full, retry shortly")
        body = await self._body(request)
        ctype = request.headers.get("content-type")
        multi = media_type(ctype) == "multipart/form-data"
        if multi:
            files = multipart_files(body, ctype, self.opts.max_queue)
        else:
            files = [(request.query_params.get("name", "image")[:200], ctype, body)]
        del body
        n = len(files)
        if self.pending + n > self.opts.max_queue:
            raise BadInput(503, "queue_full", "busy: the queue is full, retry shortly")
        self.pending += n
        self.metrics.queue.set(self.pending)
        info["images"] = n
        try:
            results = await asyncio.gather(*(self._one(served, name, t, data, k) for name, t, data in files))
        finally:
            self.pending -= n
            self.metrics.queue.set(self.pending)
        self.answered += sum("error" not in r for r in results)
        failed = [r for r in results if "error" in r]
        if failed:
            info["error"] = failed[0]["kind"]
        if not multi:
            r = results[0]
            status = r.pop("status", 200)
            return JSONResponse({**r, "model": served.ref()}, status)
        for (name, _, _), r in zip(files, results):
            r["file"] = name
        if len(failed) == n:  # nothing answered: the request fails as its first image did
            status = failed[0].get("status", 400)
            return JSONResponse({"error": failed[0]["error"], "kind": failed[0]["kind"], "model": served.ref(),
                                 "results": results}, status)
        return JSONResponse({"model": served.ref(), "results": results})

    async def _body(self, request: Request) -> bytes:
        """The whole body, refused (413) as soon as it is known to be too large: by its Content-Length
        before reading, else while it streams. Bodies held at once share a budget (503 past it)."""
        info, limit = request.scope["edgetl"], self.body_limit
        length = request.headers.get("content-length")
        if length is not None:
            if not length.isdigit():
                raise BadInput(400, "bad_request", "Content-Length is not a number")
            if int(length) > limit:
                raise BadInput(413, "body_too_large", f"the body is {int(length):,} bytes; the limit is {limit:,} "
                                                      f"(--max-body-mb {self.opts.max_body_mb:g})")
        chunks, size = [], 0

        async def read():
            nonlocal size
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise BadInput(413, "body_too_large", f"the body is over the limit of {limit:,} bytes "
                                                          f"(--max-body-mb {self.opts.max_body_mb:g})")
                want = max(size, int(length or 0)) - info.get("reserved", 0)
                if want > 0:
                    if self.body_bytes + want > self.body_budget:
                        raise _Busy()
                    self.body_bytes += want
                    info["reserved"] = info.get("reserved", 0) + want
                chunks.append(chunk)

        try:
            await asyncio.wait_for(read(), self.opts.read_timeout_s)
        except asyncio.TimeoutError:
            raise BadInput(408, "read_timeout", f"the body did not arrive within {self.opts.read_timeout_s:g} s") from None
        except _Busy:
            raise BadInput(503, "upload_memory_full", "busy: too many uploads at once, retry shortly") from None
        return b"".join(chunks)

    async def model_info(self, request: Request) -> Response:
        s = self.batcher.served
        meta = s.model.metadata

        def parsed(key):
            try:
                return json.loads(meta[key])
            except (KeyError, ValueError):
                return meta.get(key)

        spec = s.model.spec
        return JSONResponse({
            "name": s.name, "sha256": s.sha256, "classes": s.classes, "input_size": list(spec.input_size),
            "resize_size": spec.resize_size, "preprocess": spec.policy, "provider": s.model.provider,
            "lanes": self.batcher.lanes, "max_batch": self.opts.max_batch, "edgetl_version": meta.get(C.KEY_VERSION),
            "backbone": meta.get(C.KEY_BACKBONE), "backbone_sha256": meta.get(C.KEY_BACKBONE_SHA256),
            "head_sha256": meta.get(C.KEY_HEAD_SHA256), "precision": meta.get(C.KEY_PRECISION, "float32"),
            "head": parsed(C.KEY_HEAD), "training": parsed(C.KEY_TRAINING),
            "loaded_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(s.loaded_at))})

    async def healthz(self, request: Request) -> Response:
        return JSONResponse({"alive": True})

    async def readyz(self, request: Request) -> Response:
        if self.stopping:
            return JSONResponse({"ready": False, "reason": "stopping"}, 503)
        return JSONResponse({"ready": True, "model": self.batcher.served.ref()})

    async def metrics_text(self, request: Request) -> Response:
        text = generate_latest(self.metrics.registry)
        if self.hub is not None:  # the watched streams, labelled by stream
            text += self.hub.prometheus().encode()
        return Response(text, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def streams(self, request: Request) -> Response:
        if self.hub is None:
            return error(404, "not_found", "this server watches no streams (start it with --source)")
        return JSONResponse(self.hub.stats())

    async def snapshot(self, request: Request) -> Response:
        if self.hub is None:
            return error(404, "not_found", "this server watches no streams (start it with --source)")
        try:  # the name is only looked up among the streams: it never becomes a path
            jpeg = self.hub.snapshot(request.path_params["name"])
        except SourceError as e:
            return error(404, "not_found", str(e))
        return Response(jpeg, media_type="image/jpeg", headers={"Cache-Control": "no-store"})

    async def openapi(self, request: Request) -> Response:
        return JSONResponse(openapi(self.batcher.served))

    async def docs(self, request: Request) -> Response:
        return HTMLResponse(page(self.batcher.served))

    # --- model reloads -------------------------------------------------------------------------
    def reload(self, why: str) -> None:
        """Load the model file again beside the running one and swap it in when it loads and checks."""
        if self._reloading:
            self._again = True
            return
        self._reloading = True
        self._reload_task = self.loop.create_task(self._reload(why))  # held: the loop keeps only weak references

    async def _reload(self, why: str) -> None:
        try:
            while True:
                self._again = False
                old = self.batcher.served
                try:
                    new = await self.loop.run_in_executor(None, lambda: load_served(
                        self.opts.model, self.opts.device, self.opts.name, self.opts.max_batch))
                    if new.sha256 != old.sha256:
                        self.batcher.swap(new)
                except EdgetlError as e:
                    self.metrics.swaps.labels("refused").inc()
                    self.log(f"{why}: new model refused, still serving {old.name} {old.sha256[:12]}: {safe(e)}")
                else:
                    if new.sha256 == old.sha256:
                        self.log(f"{why}: {old.name} {old.sha256[:12]} is unchanged")
                    else:
                        self.metrics.swaps.labels("swapped").inc()
                        self.metrics.set_model(new)
                        self.log(f"{why}: now serving {new.name} {new.sha256[:12]} (was {old.sha256[:12]}); "
                                 "requests already admitted finish on the old one")
                if not self._again:
                    return
        finally:
            self._reloading = False

    async def watch(self) -> None:
        """--watch: reload when the file changes on disk (checked every watch_every_s, once it is still)."""
        def stamp():
            try:
                st = os.stat(self.opts.model)
                return st.st_ino, st.st_size, st.st_mtime_ns
            except OSError:
                return None

        seen = stamp()
        while True:
            await asyncio.sleep(self.opts.watch_every_s)
            now = stamp()
            if now is None or now == seen:
                continue
            await asyncio.sleep(self.opts.watch_every_s / 2)
            if stamp() == now:  # no longer being written
                seen = now
                self.reload("the model file changed")


class _Busy(Exception):
    pass


def _top_k(raw: str | None, default: int, n: int) -> int:
    if raw is None:
        return min(default, n)
    if not raw.isdigit() or int(raw) < 1:
        raise BadInput(400, "bad_request", f"top_k must be a whole number from 1, got {raw[:20]!r}")
    return min(int(raw), n)


def app(service: Service) -> Starlette:
    routes = [Route("/v1/predict", service.predict, methods=["POST"]), Route("/v1/model", service.model_info),
              Route("/healthz", service.healthz), Route("/readyz", service.readyz),
              Route("/metrics", service.metrics_text), Route("/openapi.json", service.openapi),
              Route("/docs", service.docs), Route("/v1/streams", service.streams),
              Route("/v1/streams/{name}/snapshot.jpg", service.snapshot)]
    o = service.opts
    return Front(Starlette(routes=routes, exception_handlers={404: _not_found, 405: _not_found}), service.metrics,
                 o.token, service.log, o.log_json, o.quiet)


async def _not_found(request: Request, exc) -> Response:
    status = getattr(exc, "status_code", 404)
    what = "no such path" if status == 404 else f"{request.method} is not allowed here"
    return error(status, "not_found" if status == 404 else "method_not_allowed", f"{what}: {safe(request.url.path)[:200]}")


class _Server(uvicorn.Server):
    """uvicorn's server with our signals: SIGTERM/SIGINT drain and exit 0 (uvicorn re-raises the signal
    after draining, which would end the process by it), SIGHUP reloads the model."""

    def __init__(self, config, service: Service):
        super().__init__(config)
        self.svc = service

    @contextlib.contextmanager
    def capture_signals(self):
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        loop = self.svc.loop = asyncio.get_running_loop()
        watcher = loop.create_task(self.svc.watch()) if self.svc.opts.watch else None
        hup = getattr(signal, "SIGHUP", None)
        old = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        if hup is not None:
            old[hup] = signal.signal(hup, lambda s, f: loop.call_soon_threadsafe(self.svc.reload, "SIGHUP"))
        try:
            yield
        finally:
            for sig, handler in old.items():
                signal.signal(sig, handler)
            if watcher is not None:
                watcher.cancel()

    def handle_exit(self, sig, frame):
        if not self.svc.stopping:
            self.svc.stopping = True
            self.svc.log(f"{signal.Signals(sig).name}: stopping; finishing {self.svc.pending} images in flight "
                         f"(at most {self.svc.opts.drain_s:g} s)")
        super().handle_exit(sig, frame)


def listen(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (port 0: any free one); EdgetlError when it cannot be had."""
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                          flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(2048)
        sock.setblocking(False)
        return sock
    except (OSError, IndexError) as e:
        raise EdgetlError(f"cannot listen on {host}:{port}: {getattr(e, 'strerror', None) or e}") from None


def serve(opts: Options, log=lambda line: print(line, file=sys.stderr, flush=True)) -> int:
    """Load the model, listen, answer until SIGTERM/SIGINT; returns the number of images answered."""
    served = load_served(opts.model, opts.device, opts.name, opts.max_batch)
    sock = listen(opts.host, opts.port)
    svc = Service(opts, served, log)
    if opts.sources or opts.cameras or opts.streams_file:  # sources watched beside the API (the served model)
        svc.hub = Streams(served.model, parse_sources(opts.sources, opts.cameras, opts.streams_file), log=log)
        svc.hub.start().consume_in_background()
        log(f"watching {len(svc.hub.names)} stream{'s' if len(svc.hub.names) > 1 else ''}: "
            f"{', '.join(svc.hub.names)} (GET /v1/streams)")
    config = uvicorn.Config(app(svc), log_config=None, access_log=False, lifespan="off", server_header=False,
                            timeout_graceful_shutdown=max(1, round(opts.drain_s)), timeout_keep_alive=5)
    server = _Server(config, svc)
    host, port = sock.getsockname()[:2]
    url = f"http://{'[' + host + ']' if ':' in host else host}:{port}"
    provider = served.model.provider.replace("ExecutionProvider", "")
    log(f"serving {served.name} {served.sha256[:12]} ({len(served.classes)} classes; {provider}, "
        f"{svc.batcher.lanes} lane{'s' if svc.batcher.lanes > 1 else ''}, batches of up to {opts.max_batch}) on {url}")
    if not opts.token and host not in ("127.0.0.1", "::1", "localhost"):
        log(f"warning: listening on {host} without --token: anyone who can reach this port can use the model")

    try:
        server.run(sockets=[sock])
    finally:
        if svc.hub is not None:
            svc.hub.stop()
        svc.batcher.stop(opts.drain_s)
        svc.pool.shutdown(wait=False, cancel_futures=True)
        sock.close()
    return svc.answered
