"""`edgetl verify`: the model's validation photos through every target it may be deployed on, each
compared with the reference (onnxruntime, CPU, float32): top-1 agreement, largest probability
difference, accuracy, balanced accuracy, batch-1 latency and cold start.

Targets: cpu (the reference), int8 and fp16 (model.int8.onnx / model.fp16.onnx beside the model),
cuda, openvino, opencv (cv2.dnn), browser (the `export-web` page in headless Chromium, wasm).
A target that cannot run here is reported as not available, with the reason; optional packages
(openvino, playwright) are imported inside the functions that use them.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import math
import os
import re
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from edgetl import contract as C
from edgetl.data.preprocess import load_image, opencv
from edgetl.data.sources import read_regular
from edgetl.deploy import web
from edgetl.deploy.bench import OpenVINOSession
from edgetl.deploy.runtime import load_model, select_split
from edgetl.errors import EdgetlError, ImageError
from edgetl.ort import cuda_usable, session
from edgetl.quality.html import esc, page
from edgetl.quality.metrics import metrics, safe

TARGETS = ("cpu", "int8", "fp16", "cuda", "openvino", "opencv", "browser")
LATENCY_RUNS = 20
REDUCED = re.compile(r"\b(bf16|f16|fp16|i8|int8)\b")  # a runtime that computes in reduced precision by itself
DEFAULT_GATE_DROP = 0.01  # `edgetl quantize --max-drop` default: the bound when a copy does not record its own
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
CHROMIUM_PATHS = ("/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome")


class Unavailable(Exception):
    """A target that cannot run here; the message says why."""


class VerifyFailed(EdgetlError):
    """A target disagrees with the reference beyond its bound (or an asked-for target cannot run)."""


@dataclasses.dataclass
class Photos:
    paths: list[str]
    labels: list[int]
    inputs: np.ndarray  # uint8 [N, H, W, 3]: edgetl's own preprocessing (what every host-side target gets)
    note: str
    skipped: list[tuple[str, str]]


@dataclasses.dataclass
class Run:
    """What one target produced: probabilities for every photo, latency and cold start."""

    probs: np.ndarray
    latency_ms: float | None
    cold_ms: float | None
    detail: str


@dataclasses.dataclass
class Target:
    name: str
    bound: int | None = None  # disagreements allowed
    run: Run | None = None
    reason: str | None = None  # why not available
    figures: dict = dataclasses.field(default_factory=dict)

    @property
    def available(self) -> bool:
        return self.run is not None


def _median_ms(fn, x, runs: int = LATENCY_RUNS) -> float:
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times)


def _each(fn, inputs: np.ndarray) -> np.ndarray:
    """Batch-1 probabilities of every input (the size a device sees; no batch-size effects between targets)."""
    return np.stack([np.asarray(fn(inputs[i:i + 1]), np.float32).reshape(-1) for i in range(len(inputs))])


def _ort_run(path, device: str, expect: str, inputs: np.ndarray) -> Run:
    t = time.perf_counter()
    sess = session(path, device)
    fn = lambda x: sess.run([C.PROBABILITIES], {C.IMAGE: x})[0]  # noqa: E731
    fn(inputs[:1])
    cold = 1000 * (time.perf_counter() - t)
    got = sess.get_providers()[0]
    if got != expect:
        raise Unavailable(f"onnxruntime ran it on {got}, not {expect}")
    return Run(_each(fn, inputs), _median_ms(fn, inputs[:1]), cold, f"onnxruntime {expect.replace('ExecutionProvider', '')}")


def run_cpu(model_path, photos: Photos, **_) -> Run:
    return _ort_run(model_path, "cpu", "CPUExecutionProvider", photos.inputs)


def run_cuda(model_path, photos: Photos, **_) -> Run:
    if not cuda_usable():
        raise Unavailable("onnxruntime's CUDA provider cannot load here (needs onnxruntime-gpu and an NVIDIA GPU)")
    return _ort_run(model_path, "cuda", "CUDAExecutionProvider", photos.inputs)


def copy_path(model_path, precision: str) -> Path:
    p = Path(model_path)
    return p.with_name(f"{p.stem}.{precision}{p.suffix}")


def _copy(model_path, precision: str, photos: Photos, device: str) -> Run:
    path = copy_path(model_path, precision)
    if not path.is_file():
        raise Unavailable(f"no {path.name} beside the model (make one with `edgetl quantize --precision {precision}`)")
    m = load_model(path, "cpu")  # checks it is an edgetl model of the same classes and input
    ref = load_model(model_path, "cpu")
    if m.classes != ref.classes or m.spec != ref.spec:
        raise Unavailable(f"{path.name} is not a copy of this model (other classes or input)")
    r = _ort_run(path, device, "CUDAExecutionProvider" if device == "cuda" else "CPUExecutionProvider", photos.inputs)
    r.detail += f", {path.name}"
    return r


def run_int8(model_path, photos: Photos, **_) -> Run:
    return _copy(model_path, "int8", photos, "cpu")


def run_fp16(model_path, photos: Photos, **_) -> Run:
    return _copy(model_path, "fp16", photos, "cuda" if cuda_usable() else "cpu")


def run_openvino(model_path, photos: Photos, **_) -> Run:
    try:
        import openvino  # noqa: F401 - only to say whether it is installed
    except ImportError:
        raise Unavailable("the openvino package is not installed (pip install 'edgetl[openvino]')") from None
    t = time.perf_counter()
    sess = OpenVINOSession(model_path, None)
    fn = lambda x: sess.run(None, {C.IMAGE: x})[0]  # noqa: E731
    fn(photos.inputs[:1])
    cold = 1000 * (time.perf_counter() - t)
    return Run(_each(fn, photos.inputs), _median_ms(fn, photos.inputs[:1]), cold, sess.get_providers()[0])


def run_opencv(model_path, photos: Photos, **_) -> Run:
    cv2 = opencv()
    t = time.perf_counter()
    try:
        net = cv2.dnn.readNetFromONNX(str(model_path))

        def fn(x):
            net.setInput(x)
            return net.forward()

        fn(photos.inputs[:1])
    except cv2.error as e:
        lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
        raise Unavailable(f"OpenCV {cv2.__version__} DNN cannot run it: {lines[-1][:200] if lines else e}") from None
    cold = 1000 * (time.perf_counter() - t)
    return Run(_each(fn, photos.inputs), _median_ms(fn, photos.inputs[:1]), cold, f"OpenCV {cv2.__version__} DNN")


def chromium_path() -> str | None:
    """$EDGETL_CHROMIUM, else the system's Chromium; None when there is none (Playwright's own is used)."""
    env = os.environ.get("EDGETL_CHROMIUM")
    if env:
        return env
    return next((p for p in CHROMIUM_PATHS if os.path.exists(p)), shutil.which("chromium"))


def launch_chromium(playwright, extra_args=()):
    try:
        return playwright.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS + list(extra_args))
    except Exception as e:  # noqa: BLE001 - Playwright's errors are many and long
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise Unavailable(f"Chromium does not start ({first[:160]}); install it (Debian: apt-get install chromium) "
                          "or set EDGETL_CHROMIUM") from None


CLASSIFY_JS = """async (b64) => {
  const s = atob(b64); const u = new Uint8Array(s.length);
  for (let i = 0; i < s.length; i++) u[i] = s.charCodeAt(i);
  return (await window.edgetl.classify(new Blob([u]))).probabilities;
}"""


def run_browser(model_path, photos: Photos, ort_web=None, **_) -> Run:
    try:
        from playwright.sync_api import Error as PlaywrightError
        from playwright.sync_api import sync_playwright
    except ImportError:
        raise Unavailable("the playwright package is not installed (pip install 'edgetl[web]')") from None
    try:
        runtime = web.runtime_files(ort_web)
    except EdgetlError as e:
        raise Unavailable(str(e)) from None
    with tempfile.TemporaryDirectory(prefix="edgetl-verify-") as tmp:
        page_dir = web.export_web(model_path, Path(tmp) / "page", ort_web=runtime)
        with web.Server(page_dir) as srv, sync_playwright() as pw:
            browser = launch_chromium(pw)
            try:
                page = browser.new_page()
                page.goto(srv.url)
                try:
                    rt = page.evaluate("window.edgetl.ready")
                except PlaywrightError as e:
                    raise Unavailable(f"the page did not load the model: {str(e).splitlines()[0][:200]}") from None
                page.reload()  # cold start from a warm HTTP cache: what a returning visitor waits
                rt = page.evaluate("window.edgetl.ready")
                probs = []
                for path in photos.paths:
                    data = base64.b64encode(read_regular(path)).decode("ascii")
                    probs.append(page.evaluate(CLASSIFY_JS, data))
                lat = page.evaluate(f"window.edgetl.bench({LATENCY_RUNS})")["median_ms"]
                version = browser.version
            finally:
                browser.close()
    threads = f"{rt['threads']} thread{'s' if rt['threads'] > 1 else ''}"
    return Run(np.asarray(probs, np.float32), lat, rt["readyAtMs"],
               f"Chromium {version}, onnxruntime-web {rt['version']} wasm, {threads}")


RUNNERS = {"cpu": run_cpu, "int8": run_int8, "fp16": run_fp16, "cuda": run_cuda, "openvino": run_openvino,
           "opencv": run_opencv, "browser": run_browser}


def parse_targets(text: str | None) -> tuple[list[str], bool]:
    """(targets, asked): every target when `text` is empty or "all", else the comma list (checked)."""
    if not text or text.strip() == "all":
        return list(TARGETS), False
    names = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in names if t not in TARGETS]
    if bad:
        raise EdgetlError(f"unknown target {bad[0]!r}; targets: {', '.join(TARGETS)}")
    return ["cpu"] + [t for t in dict.fromkeys(names) if t != "cpu"], True


def load_photos(model, data, split: str = "auto", limit: int | None = None) -> Photos:
    sel = select_split(model, data, split)
    items = sel.items[:limit] if limit else sel.items
    paths, labels, inputs, skipped = [], [], [], []
    for it in items:
        try:
            inputs.append(load_image(it.path, model.spec))
        except ImageError as e:
            skipped.append((str(it.path), str(e)))
            continue
        paths.append(str(it.path))
        labels.append(model.classes.index(it.label))
    if not paths:
        raise EdgetlError(f"no readable photos to verify on ({sel.note})")
    return Photos(paths, labels, np.stack(inputs), sel.note, skipped)


def gate_bound(model_path, precision: str, n: int) -> int:
    """Disagreements allowed to an int8/fp16 copy on n photos: what its gate accepted, as photos -- the
    larger of its accuracy bound (its recorded --max-drop, else the default) and the share of photos on
    which the gate itself measured it answering differently (its recorded agreement)."""
    drop, agreement = DEFAULT_GATE_DROP, 1.0
    try:
        gate = json.loads(load_model(copy_path(model_path, precision), "cpu").metadata.get(C.KEY_GATE, "{}"))
        drop = float(gate.get("max_drop", drop))
        agreement = float(gate.get("agreement", agreement))
    except (EdgetlError, ValueError, TypeError, AttributeError):
        pass
    return max(int(math.floor(drop * n + 1e-9)), int(round((1 - agreement) * n)))


def verify(model_path, data, targets=None, max_disagree: int = 0, split: str = "auto", limit: int | None = None,
           ort_web=None, log=None) -> dict:
    """Run the targets; a JSON-ready report. `failed` lists targets beyond their bound (and asked-for
    targets that could not run)."""
    names, asked = parse_targets(targets)
    model = load_model(model_path, "cpu")
    photos = load_photos(model, data, split, limit)
    n = len(photos.paths)
    out = []
    for name in names:
        t = Target(name, max_disagree)
        if log:
            log(f"verify: {name} on {n} photos")
        try:
            t.run = RUNNERS[name](model_path, photos, ort_web=ort_web)
        except Unavailable as e:
            t.reason = str(e)
        except EdgetlError as e:
            t.reason = str(e)
        if name in ("int8", "fp16"):
            t.bound = max(max_disagree, gate_bound(model_path, name, n))
        elif t.run is not None and REDUCED.search(t.run.detail):  # e.g. OpenVINO's default on CPUs with bf16
            t.bound = max(max_disagree, int(math.floor(DEFAULT_GATE_DROP * n + 1e-9)))
        out.append(t)
    ref = out[0].run
    if ref is None:
        raise EdgetlError(f"the reference (onnxruntime CPU) cannot run the model: {out[0].reason}")
    ref_top = ref.probs.argmax(1)
    for t in out:
        if not t.available:
            continue
        top = t.run.probs.argmax(1)
        wrong = [photos.paths[i] for i in np.nonzero(top != ref_top)[0]]
        m = metrics(photos.labels, top.tolist(), model.classes)
        t.figures = {"agreement": float(np.mean(top == ref_top)), "disagree": len(wrong), "disagreeing": wrong,
                     "max_prob_diff": float(np.abs(t.run.probs - ref.probs).max()),
                     "accuracy": m["accuracy"], "balanced_accuracy": m["balanced_accuracy"],
                     "latency_ms": t.run.latency_ms, "cold_start_ms": t.run.cold_ms}
    failed = [t.name for t in out if t.available and t.figures["disagree"] > t.bound]
    failed += [t.name for t in out if asked and not t.available]
    return {"model": str(model_path), "data": str(data), "scored": photos.note, "photos": n,
            "skipped": [{"path": p, "error": e} for p, e in photos.skipped], "classes": model.classes,
            "failed": failed,
            "targets": [{"target": t.name, "available": t.available, "reason": t.reason, "bound": t.bound,
                         "runs_on": t.run.detail if t.run else None, **t.figures} for t in out]}


def _f(v, fmt: str) -> str:
    return "–" if v is None else format(v, fmt)


def table(r: dict) -> str:
    """The report as one table for people, then a line per unavailable target and per failure."""
    head = f"{'target':<9} {'agree':>13} {'allowed':>7} {'max |Δp|':>9} {'accuracy':>9} {'balanced':>9} {'batch-1 ms':>10} " \
           f"{'cold ms':>8}  runs on"
    lines = [f"verify {safe(r['model'])}: {r['photos']} photos ({safe(r['scored'])})", head]
    for t in r["targets"]:
        if not t["available"]:
            continue
        agree = f"{r['photos'] - t['disagree']}/{r['photos']}"
        lines.append(f"{t['target']:<9} {agree:>13} {t['bound']:>7} {t['max_prob_diff']:>9.2e} {_f(t['accuracy'], '.4f'):>9} "
                     f"{_f(t['balanced_accuracy'], '.4f'):>9} {_f(t['latency_ms'], '.1f'):>10} "
                     f"{_f(t['cold_start_ms'], '.0f'):>8}  {safe(t['runs_on'])}")
    for t in r["targets"]:
        if not t["available"]:
            lines.append(f"{t['target']}: not available: {safe(t['reason'])}")
    return "\n".join(lines)


def failures(r: dict) -> list[str]:
    """One line per failed target, naming the photos it disagrees on (at most 10)."""
    out = []
    for t in r["targets"]:
        if t["target"] not in r["failed"]:
            continue
        if not t["available"]:
            out.append(f"{t['target']}: asked for but not available")
            continue
        named = ", ".join(safe(p) for p in t["disagreeing"][:10]) + (" …" if t["disagree"] > 10 else "")
        out.append(f"{t['target']} disagrees with the reference on {t['disagree']} of {r['photos']} photos "
                   f"(allowed {t['bound']}): {named}")
    return out


def html_page(r: dict) -> str:
    rows = []
    for t in r["targets"]:
        if t["available"]:
            cls = "bad" if t["target"] in r["failed"] else "ok"
            rows.append(f'<tr><td class="l {cls}">{esc(t["target"])}</td><td>{r["photos"] - t["disagree"]}/{r["photos"]}'
                        f'</td><td>{t["bound"]}</td><td>{t["max_prob_diff"]:.2e}</td><td>{_f(t["accuracy"], ".4f")}</td>'
                        f'<td>{_f(t["balanced_accuracy"], ".4f")}</td><td>{_f(t["latency_ms"], ".1f")}</td>'
                        f'<td>{_f(t["cold_start_ms"], ".0f")}</td><td class="l">{esc(t["runs_on"])}</td></tr>')
        else:
            rows.append(f'<tr><td class="l">{esc(t["target"])}</td><td class="l sub" colspan="8">not available: '
                        f'{esc(t["reason"])}</td></tr>')
    fails = "".join(f'<p class="bad">{esc(line)}</p>' for line in failures(r)) or '<p class="ok">every available ' \
        'target agrees with the reference within its bound</p>'
    body = (f'<h1>verify {esc(Path(r["model"]).name)}</h1><p class="sub">{r["photos"]} photos: {esc(r["scored"])}</p>'
            f'{fails}<table><tr><th class="l">target</th><th>top-1 agreement</th><th>disagreements allowed</th>'
            f'<th>max |Δp|</th><th>accuracy</th>'
            f'<th>balanced accuracy</th><th>batch-1 ms</th><th>cold start ms</th><th class="l">runs on</th></tr>'
            f'{"".join(rows)}</table>')
    return page(f"verify {Path(r['model']).name}", body)
