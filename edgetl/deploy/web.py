"""A static web page that runs a model in the browser (onnxruntime-web, wasm), and a server for it.

`export_web` writes a folder any static web server can host: index.html, edgetl.mjs and
preprocess.mjs (the page and edgetl's crop/resize in JavaScript), model.onnx, model.json (class
names, preprocessing spec and tensor names, read here so that the page parses no protobuf) and
ort/ (the onnxruntime-web runtime files of the pinned version).

onnxruntime-web comes from its npm package: the pinned tarball is downloaded once from the npm
registry (Python's urllib, HTTPS), checked against the registry's sha512 integrity string, and the
three files of the wasm backend are kept in a cache (`runtime_dir`). No Node is needed.

`serve` hosts a folder on 127.0.0.1 with the cross-origin isolation headers that wasm threads need
(COOP/COEP) and the right MIME types (.mjs as JavaScript, .wasm as application/wasm).
"""

from __future__ import annotations

import base64
import contextlib
import functools
import hashlib
import http.server
import io
import json
import os
import shutil
import tarfile
import threading
import urllib.error
import urllib.request
from importlib import resources
from pathlib import Path

from edgetl import contract as C
from edgetl.deploy.runtime import load_model
from edgetl.errors import EdgetlError
from edgetl.files import output_set, write_bytes, write_text

ORT_WEB_VERSION = "1.30.0"
ORT_WEB_TARBALL = f"https://registry.npmjs.org/onnxruntime-web/-/onnxruntime-web-{ORT_WEB_VERSION}.tgz"
ORT_WEB_INTEGRITY = ("sha512-q0y+JrrtukXSzsBWEMccVfqX25LRmosXHF+CaRJmg8pZClzcV7svNc4rKY3jL02Vb7QmRMDs1SigqR4CXAfKYQ==")
# The wasm backend (SIMD, threads): the API module, the Emscripten glue and the binary it loads.
ORT_MODULE, ORT_GLUE, ORT_WASM = "ort.wasm.min.mjs", "ort-wasm-simd-threaded.mjs", "ort-wasm-simd-threaded.wasm"
ORT_FILES = (ORT_MODULE, ORT_GLUE, ORT_WASM)
PAGE_FILES = ("index.html", "edgetl.mjs", "preprocess.mjs", "sw.js")
DOWNLOAD_TIMEOUT_S = 60
MAX_TARBALL_BYTES = 200_000_000


class WebError(EdgetlError):
    """The page cannot be exported or served (runtime files missing, registry unreachable, port taken)."""


def cache_root() -> Path:
    """$EDGETL_CACHE, else $XDG_CACHE_HOME/edgetl, else ~/.cache/edgetl."""
    if os.environ.get("EDGETL_CACHE"):
        return Path(os.environ["EDGETL_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "edgetl"


def runtime_dir(version: str = ORT_WEB_VERSION) -> Path:
    return cache_root() / "onnxruntime-web" / version


def _complete(folder: Path) -> bool:
    return all((folder / name).is_file() and (folder / name).stat().st_size > 0 for name in ORT_FILES)


def check_integrity(data: bytes, integrity: str = ORT_WEB_INTEGRITY) -> None:
    algo, _, expected = integrity.partition("-")
    got = base64.b64encode(hashlib.new(algo, data).digest()).decode()
    if got != expected:
        raise WebError(f"the onnxruntime-web {ORT_WEB_VERSION} download does not match its registry checksum "
                       f"({algo} {got[:16]}… instead of {expected[:16]}…); nothing was kept")


def fetch_runtime(log=None, url: str = ORT_WEB_TARBALL, integrity: str = ORT_WEB_INTEGRITY) -> Path:
    """The cached onnxruntime-web runtime folder, downloaded from the npm registry on first use.

    WebError (one line, saying what to do) when it is not cached and cannot be downloaded."""
    folder = runtime_dir()
    if _complete(folder):
        return folder
    if log:
        log(f"downloading onnxruntime-web {ORT_WEB_VERSION} from the npm registry (once; cached in {folder})")
    try:
        with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as r:
            data = r.read(MAX_TARBALL_BYTES + 1)
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", None) or e
        raise WebError(f"onnxruntime-web {ORT_WEB_VERSION} is not cached and the npm registry cannot be reached "
                       f"({reason}); connect once, or give a folder with {', '.join(ORT_FILES)} as --ort-web DIR "
                       f"(from the npm package onnxruntime-web@{ORT_WEB_VERSION}, its dist/ folder)") from None
    if len(data) > MAX_TARBALL_BYTES:
        raise WebError(f"{url}: the download is larger than {MAX_TARBALL_BYTES:,} bytes; not used")
    check_integrity(data, integrity)
    files = {}
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        for name in ORT_FILES:
            try:
                member = tar.getmember(f"package/dist/{name}")
            except KeyError:
                raise WebError(f"the onnxruntime-web {ORT_WEB_VERSION} package has no dist/{name}") from None
            files[name] = tar.extractfile(member).read()
    with output_set(folder) as tmp:
        for name, blob in files.items():
            (tmp / name).write_bytes(blob)
    return folder


def runtime_files(ort_web: str | os.PathLike | None = None, log=None) -> Path:
    """The folder to copy the runtime from: `ort_web` when given (checked), else the cache (downloaded once)."""
    if ort_web is None:
        return fetch_runtime(log)
    folder = Path(ort_web)
    if (folder / "dist").is_dir() and not (folder / ORT_WASM).exists():
        folder = folder / "dist"  # the npm package's own folder
    missing = [n for n in ORT_FILES if not (folder / n).is_file()]
    if missing:
        raise WebError(f"--ort-web {ort_web}: {', '.join(missing)} not found there (the dist/ files of the npm "
                       f"package onnxruntime-web@{ORT_WEB_VERSION})")
    with open(folder / ORT_WASM, "rb") as f:
        if f.read(4) != b"\0asm":
            raise WebError(f"--ort-web {ort_web}: {ORT_WASM} is not WebAssembly")
    return folder


def page_asset(name: str) -> bytes:
    return resources.files("edgetl.deploy").joinpath("web", name).read_bytes()


def model_info(model, name: str | None = None, threshold: float = 0.0, smooth: int = 1) -> dict:
    """What the page needs to know of a loaded model (runtime.Model), as model.json holds it."""
    spec = json.loads(model.spec.to_json())
    return {"name": name or Path(model.path).resolve().parent.name or "model", "classes": model.classes,
            "spec": spec, "input": C.IMAGE, "output": C.PROBABILITIES, "batch_axis": C.BATCH_AXIS,
            "model": "model.onnx",
            "precision": model.metadata.get(C.KEY_PRECISION), "threshold": threshold, "smooth": smooth,
            "edgetl_version": model.metadata.get(C.KEY_VERSION),
            "runtime": {"package": "onnxruntime-web", "version": ORT_WEB_VERSION, "module": ORT_MODULE,
                        "glue": ORT_GLUE, "wasm": ORT_WASM}}


def export_web(model_path, out, ort_web=None, name: str | None = None, threshold: float = 0.0, smooth: int = 1,
               log=None) -> Path:
    """Write the page folder `out` for `model_path` (checked by loading it); replaces `out` as a whole.

    Returns `out`. ModelError for a model that does not load; WebError when the runtime files cannot be had."""
    model = load_model(model_path, "cpu")  # checks it: an edgetl model whose metadata matches its graph
    src = runtime_files(ort_web, log)
    data = Path(model_path).read_bytes()
    info = model_info(model, name, threshold, smooth)
    info["sha256"] = hashlib.sha256(data).hexdigest()
    info["bytes"] = len(data)
    with output_set(out) as tmp:
        for page in PAGE_FILES:
            (tmp / page).write_bytes(page_asset(page))
        (tmp / "ort").mkdir()
        for f in ORT_FILES:
            shutil.copyfile(src / f, tmp / "ort" / f)
        write_bytes(tmp / "model.onnx", data)
        write_text(tmp / "model.json", json.dumps(info, indent=1) + "\n")
    return Path(out)


# --- serving ---------------------------------------------------------------------------------------

MIME = {".html": "text/html; charset=utf-8", ".mjs": "text/javascript", ".js": "text/javascript",
        ".wasm": "application/wasm", ".onnx": "application/octet-stream", ".json": "application/json",
        ".y4m": "video/x-yuv4mpeg", ".jpg": "image/jpeg", ".png": "image/png"}


class PageHandler(http.server.SimpleHTTPRequestHandler):
    """Static files with COOP/COEP (cross-origin isolation: wasm threads) and revalidated caching."""

    extensions_map = {**http.server.SimpleHTTPRequestHandler.extensions_map, **MIME}

    def end_headers(self):
        self.send_header("Cross-Origin-Opener-Policy", "same-origin")
        self.send_header("Cross-Origin-Embedder-Policy", "require-corp")
        self.send_header("Cross-Origin-Resource-Policy", "same-origin")
        self.send_header("Cache-Control", "no-cache")  # revalidate: a re-export is seen at once, else 304
        super().end_headers()

    def log_message(self, format, *args):  # noqa: A002 - the base class's name
        pass

    def handle(self):
        with contextlib.suppress(ConnectionError, TimeoutError):
            super().handle()


class Server:
    """A page folder served on host:port in a background thread (port 0: a free one). Use as a context."""

    def __init__(self, folder, host: str = "127.0.0.1", port: int = 0):
        folder = Path(folder)
        if not (folder / "index.html").is_file():
            raise WebError(f"{folder} has no index.html; make it with `edgetl export-web MODEL -o {folder}`")
        handler = functools.partial(PageHandler, directory=str(folder))
        try:
            self.httpd = http.server.ThreadingHTTPServer((host, port), handler)
        except OSError as e:
            raise WebError(f"cannot serve on {host}:{port}: {e.strerror}") from None
        self.httpd.daemon_threads = True
        self.host, self.port = host, self.httpd.server_address[1]
        self._thread = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"

    def start(self) -> "Server":
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="edgetl-web", daemon=True)
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        self.httpd.serve_forever()

    def close(self) -> None:
        if self._thread is not None:
            self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.close()
