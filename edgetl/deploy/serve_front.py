"""The front of every `edgetl serve` request: the bearer token, the Prometheus metrics by route and
status, and the one log line (text or JSON). Pure ASGI, so it costs a few microseconds a request."""

from __future__ import annotations

import hmac
import json
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector
from starlette.responses import JSONResponse

from edgetl.deploy.batcher import Served

ROUTES = ("/v1/predict", "/v1/model", "/healthz", "/readyz", "/metrics", "/openapi.json", "/docs")


class Metrics:
    """The server's Prometheus metrics, in a registry of their own (with the process's CPU and memory)."""

    def __init__(self):
        self.registry = r = CollectorRegistry()
        ProcessCollector(registry=r)
        self.requests = Counter("edgetl_requests", "HTTP requests by route and status", ["route", "status"], registry=r)
        self.latency = Histogram("edgetl_request_duration_seconds", "Request latency, received to answered", ["route"],
                                 buckets=(.002, .005, .01, .02, .05, .1, .2, .5, 1, 2, 5, 10), registry=r)
        self.batch = Histogram("edgetl_batch_size", "Images per inference batch", buckets=(1, 2, 4, 8, 16, 32, 64, 128),
                               registry=r)
        self.inference = Histogram("edgetl_inference_duration_seconds", "Time of one batch on a lane",
                                   buckets=(.001, .002, .005, .01, .02, .05, .1, .2, .5, 1), registry=r)
        self.queue = Gauge("edgetl_queue_depth", "Images admitted and not yet answered", registry=r)
        self.queue_limit = Gauge("edgetl_queue_limit", "Images that may be admitted at once (--max-queue)", registry=r)
        self.decoded = Counter("edgetl_images_decoded", "Images decoded into model inputs", registry=r)
        self.errors = Counter("edgetl_errors", "Refused or failed requests and images, by kind", ["kind"], registry=r)
        self.model = Gauge("edgetl_model_info", "The model answering new requests (value 1)",
                           ["name", "sha256", "classes", "provider"], registry=r)
        self.swaps = Counter("edgetl_model_swaps", "Model reloads by result", ["result"], registry=r)

    def set_model(self, s: Served) -> None:
        self.model.clear()
        self.model.labels(s.name, s.sha256, str(len(s.classes)), s.model.provider.replace("ExecutionProvider", "")).set(1)


def error(status: int, kind: str, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message, "kind": kind}, status, headers=headers)


def safe(text) -> str:
    return "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in str(text))


class Front:
    """Pure ASGI middleware around every request: the bearer token, the metrics by route and status,
    and the one log line."""

    def __init__(self, app, metrics: Metrics, token: str | None, log, log_json: bool = False, quiet: bool = False):
        self.app, self.metrics, self.log = app, metrics, log
        self.log_json, self.quiet = log_json, quiet
        self.expected = f"Bearer {token}".encode() if token else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        path = scope["path"]
        route = path if path in ROUTES else "other"
        status = [500]

        async def sent(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        info = scope.setdefault("edgetl", {})
        try:
            if self.expected is not None and path != "/healthz" and not self._authorized(scope):
                self.metrics.errors.labels("unauthorized").inc()
                info["error"] = "unauthorized"
                resp = error(401, "unauthorized", "a bearer token is required: Authorization: Bearer TOKEN",
                              {"WWW-Authenticate": "Bearer", "Connection": "close"})
                await resp(scope, receive, sent)
            else:
                await self.app(scope, receive, sent)
        finally:
            seconds = time.perf_counter() - t0
            m = self.metrics
            m.requests.labels(route, str(status[0])).inc()
            m.latency.labels(route).observe(seconds)
            if not self.quiet:
                self._log(scope, status[0], seconds, info)

    def _authorized(self, scope) -> bool:
        got = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
        return hmac.compare_digest(got, self.expected)

    def _log(self, scope, status: int, seconds: float, info: dict) -> None:
        client = (scope.get("client") or ("-", 0))[0]
        served = info.get("model")
        rec = {"t": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "client": client, "method": scope["method"],
               "path": scope["path"], "status": status, "ms": round(seconds * 1e3, 2)}
        if "images" in info:
            rec["images"] = info["images"]
        if served is not None and scope["path"] == "/v1/predict":
            rec["model"] = served.sha256[:12]
        if "error" in info:
            rec["error"] = info["error"]
        if self.log_json:
            self.log(json.dumps(rec, ensure_ascii=True))
        else:
            self.log(" ".join(safe(v) if k in ("path",) else str(v) if k in ("t", "client", "method", "status")
                                  else f"{k}={v}" for k, v in rec.items()))
