"""`edgetl export-web`: the page in headless Chromium (Debian's chromium driven by Playwright), served by
edgetl's own server on 127.0.0.1, against onnxruntime on the same photos."""

from __future__ import annotations

import base64
import http.server
import shutil
import threading
import urllib.request

import cv2
import numpy as np
import pytest
from click.testing import CliRunner
from conftest import photo, train_tiny

from edgetl.cli import main
from edgetl.data.preprocess import frame_to_input, load_image
from edgetl.deploy import runtime, verify, web

sync_api = pytest.importorskip("playwright.sync_api", reason="needs the playwright package (pip install 'edgetl[web]')")

CLASSIFY = """async (b64) => {
  const s = atob(b64); const u = new Uint8Array(s.length);
  for (let i = 0; i < s.length; i++) u[i] = s.charCodeAt(i);
  const blob = new Blob([u]);
  const r = await window.edgetl.classify(blob);
  return {class: r.class, probability: r.probability, probabilities: r.probabilities,
          pixels: btoaBytes(await window.edgetl.pixels(blob))};
  function btoaBytes(a) { let s = ""; for (let i = 0; i < a.length; i++) s += String.fromCharCode(a[i]); return btoa(s); }
}"""


@pytest.fixture(scope="module")
def ort_web():
    """The onnxruntime-web files, through the same code path as export-web (downloaded once into the cache)."""
    try:
        return web.fetch_runtime()
    except web.WebError as e:
        if "cannot be reached" in str(e):
            pytest.skip(f"the npm registry cannot be reached and onnxruntime-web is not cached: {e}")
        raise


@pytest.fixture(scope="module")
def pw():
    if verify.chromium_path() is None:
        pytest.skip("no Chromium (Debian: apt-get install chromium)")
    with sync_api.sync_playwright() as p:
        yield p


@pytest.fixture(scope="module")
def browser(pw):
    b = verify.launch_chromium(pw)
    yield b
    b.close()


@pytest.fixture(scope="module")
def model_path(tmp_path_factory, tiny_onnx, hymenoptera):
    return train_tiny(tmp_path_factory.mktemp("webmodel"), tiny_onnx, hymenoptera / "train", 8)[0]


@pytest.fixture(scope="module")
def page_dir(model_path, ort_web, tmp_path_factory):
    out = tmp_path_factory.mktemp("page") / "web"
    r = CliRunner().invoke(main, ["export-web", str(model_path), "-o", str(out), "--threshold", "0.3"])
    assert r.exit_code == 0, r.output
    assert "next: edgetl export-web" in r.output
    return out


@pytest.fixture(scope="module")
def served(page_dir):
    with web.Server(page_dir) as srv:
        yield srv


def test_export_writes_a_complete_folder(page_dir, model_path):
    import json

    names = {p.relative_to(page_dir).as_posix() for p in page_dir.rglob("*") if p.is_file()}
    assert {"index.html", "edgetl.mjs", "preprocess.mjs", "model.onnx", "model.json", "ort/ort.wasm.min.mjs",
            "ort/ort-wasm-simd-threaded.mjs", "ort/ort-wasm-simd-threaded.wasm"} <= names
    info = json.loads((page_dir / "model.json").read_text())
    m = runtime.load_model(model_path, "cpu")
    assert info["classes"] == m.classes and info["spec"]["input_size"] == list(m.spec.input_size)
    assert info["threshold"] == 0.3 and info["runtime"]["version"] == web.ORT_WEB_VERSION
    assert (page_dir / "model.onnx").read_bytes() == model_path.read_bytes()


def test_server_headers_and_types(served):
    def head(path):
        with urllib.request.urlopen(served.url + path) as r:
            return r.headers

    h = head("ort/ort-wasm-simd-threaded.wasm")
    assert h["Content-Type"] == "application/wasm"
    assert h["Cross-Origin-Opener-Policy"] == "same-origin" and h["Cross-Origin-Embedder-Policy"] == "require-corp"
    assert head("edgetl.mjs")["Content-Type"] == "text/javascript"
    assert head("index.html")["Content-Type"].startswith("text/html")


def test_page_answers_equal_onnxruntime(browser, served, model_path, hymenoptera, tmp_path):
    """Validation photos through the page's classify(), against onnxruntime CPU on edgetl's own preprocessing:
    as JPEGs (edgetl decodes large ones at reduced scale, which the page approximates), as PNGs (no reduced
    decoding: the page's area/linear resize must give OpenCV's pixels bit for bit) and small photos (enlarged:
    OpenCV 5's cubic rounding, within 1)."""
    m = runtime.load_model(model_path, "cpu")
    files = [p for cls in ("ants", "bees") for p in sorted((hymenoptera / "val" / cls).glob("*.jpg"))[:5]]
    for f in files[:3] + files[-3:]:
        cv2.imwrite(str(tmp_path / f"{f.stem}.png"), cv2.imread(str(f)))
        files.append(tmp_path / f"{f.stem}.png")
    for i in range(3):  # 160x120: enlarged to the shorter side the model wants
        photo(i, size=(160, 120)).resize((40, 30)).save(tmp_path / f"small{i}.jpg", quality=92)
        files.append(tmp_path / f"small{i}.jpg")
    page = browser.new_page()
    page.goto(served.url)
    rt = page.evaluate("window.edgetl.ready")
    assert page.evaluate("window.edgetl.classes") == m.classes
    worst, px_diff = 0.0, {}
    for f in files:
        got = page.evaluate(CLASSIFY, base64.b64encode(f.read_bytes()).decode())
        x = load_image(f, m.spec)
        ref = m.probabilities(x[None])[0]
        assert got["class"] == m.classes[int(ref.argmax())], f.name
        assert got["probability"] == pytest.approx(float(ref.max()), abs=1e-2), f.name
        worst = max(worst, float(np.abs(np.array(got["probabilities"]) - ref).max()))
        px = np.frombuffer(base64.b64decode(got["pixels"]), np.uint8).reshape(x.shape).astype(int)
        px_diff[f.name] = (int(np.abs(px - x).max()), float(np.abs(px - x).mean()))
    assert all(d == (0, 0.0) for k, d in px_diff.items() if k.endswith(".png")), px_diff
    assert all(d[0] <= 1 for k, d in px_diff.items() if k.startswith("small")), px_diff
    assert all(d[0] <= 12 and d[1] < 1.0 for d in px_diff.values()), px_diff
    # what is left is wasm's float kernels vs the native CPU ones (and the reduced-scale JPEG decoding): up
    # to a few 1e-3 on the tiny test backbone; on EfficientNet-Lite0 see docs/web.md
    assert worst < 1e-2, f"max probability difference {worst}"
    assert rt["loadMs"] > 0
    page.close()


def test_threads_on_and_the_page_says_so(browser, served):
    page = browser.new_page()
    page.goto(served.url)
    rt = page.evaluate("window.edgetl.ready")
    assert page.evaluate("self.crossOriginIsolated") is True and rt["crossOriginIsolated"] is True
    cores = page.evaluate("navigator.hardwareConcurrency")
    assert rt["threads"] == min(4, -(-cores // 2))  # onnxruntime-web's default
    assert "cross-origin isolated: threads on" in page.inner_text("#runtime")
    page.goto(served.url + "?threads=3")
    assert page.evaluate("window.edgetl.ready")["threads"] == 3 and "3 threads" in page.inner_text("#runtime")
    page.close()


def _y4m(path, frames: list[np.ndarray], fps: int = 10) -> None:
    """A YUV4MPEG2 (4:2:0) video of BGR frames: what Chromium's fake camera reads."""
    h, w = frames[0].shape[:2]
    with open(path, "wb") as f:
        f.write(f"YUV4MPEG2 W{w} H{h} F{fps}:1 Ip A1:1 C420jpeg\n".encode())
        for fr in frames:
            f.write(b"FRAME\n" + cv2.cvtColor(fr, cv2.COLOR_BGR2YUV_I420).tobytes())


def test_fake_camera_shows_the_right_class(pw, served, model_path, hymenoptera, tmp_path):
    m = runtime.load_model(model_path, "cpu")
    best = None  # the validation photo the model is surest of, as the camera sees it (after 4:2:0)
    for f in sorted((hymenoptera / "val" / "bees").glob("*.jpg"))[:8] + sorted((hymenoptera / "val" / "ants").glob("*.jpg"))[:8]:
        frame = cv2.resize(cv2.imread(str(f)), (640, 480), interpolation=cv2.INTER_AREA)
        seen = cv2.cvtColor(cv2.cvtColor(frame, cv2.COLOR_BGR2YUV_I420), cv2.COLOR_YUV2BGR_I420)
        p = m.probabilities(frame_to_input(seen, m.spec)[None])[0]
        margin = float(np.sort(p)[-1] - np.sort(p)[-2])
        if best is None or margin > best[0]:
            best = (margin, frame, m.classes[int(p.argmax())])
    assert best[0] > 0.05, "no photo the tiny model is sure of"
    video = tmp_path / "camera.y4m"
    _y4m(video, [best[1]] * 5)
    b = verify.launch_chromium(pw, ["--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream",
                                    f"--use-file-for-fake-video-capture={video}"])
    try:
        page = b.new_page()
        page.goto(served.url + "?smooth=3")
        page.evaluate("window.edgetl.ready")
        page.click("#camera")
        page.wait_for_function("window.edgetl.frames >= 4", timeout=30_000)
        last = page.evaluate("window.edgetl.last")
        assert last["class"] == best[2]
        assert page.inner_text("#label").startswith(last["label"])
        assert "FPS" in page.inner_text("#fps")
    finally:
        b.close()


def test_file_url_gives_a_clear_message(browser, page_dir):
    page = browser.new_page()
    page.goto((page_dir / "index.html").as_uri())
    text = page.inner_text("#error")
    assert "must be opened from a web server" in text and "--serve" in text
    assert page.is_visible("#error")
    with pytest.raises(sync_api.Error, match="web server"):
        page.evaluate("window.edgetl.ready")
    page.close()


@pytest.mark.parametrize("broken, says", [
    ("no-wasm", "ort/ort-wasm-simd-threaded.wasm answered HTTP 404"),
    ("not-wasm", "is not WebAssembly"),
    ("no-model", "the model is missing: model.onnx answered HTTP 404"),
])
def test_a_missing_runtime_or_model_is_one_readable_error(browser, page_dir, tmp_path, broken, says):
    bad = tmp_path / "web"
    shutil.copytree(page_dir, bad)
    wasm = bad / "ort" / "ort-wasm-simd-threaded.wasm"
    if broken == "no-wasm":
        wasm.unlink()
    elif broken == "not-wasm":
        wasm.write_text("<!doctype html><p>a server that answers every path with a page</p>")
    else:
        (bad / "model.onnx").unlink()
    with web.Server(bad) as srv:
        page = browser.new_page()
        page.goto(srv.url)
        page.wait_for_selector("#error", state="visible", timeout=20_000)
        text = page.inner_text("#error")
        assert says in text and "\n" not in text.strip()
        assert page.inner_text("#meta") == "not loaded"
        page.close()


def test_offline_without_cache_says_what_to_do(tmp_path, monkeypatch, model_path):
    monkeypatch.setenv("EDGETL_CACHE", str(tmp_path / "cache"))
    with pytest.raises(web.WebError, match="--ort-web DIR"):
        web.fetch_runtime(url="http://127.0.0.1:9/onnxruntime-web.tgz")
    r = CliRunner().invoke(main, ["export-web", str(model_path), "-o", str(tmp_path / "w"), "--ort-web", str(tmp_path)])
    assert r.exit_code == 1 and "ort-wasm-simd-threaded.wasm" in r.output and not (tmp_path / "w").exists()


def test_a_download_that_does_not_match_its_checksum_is_not_kept(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGETL_CACHE", str(tmp_path / "cache"))
    (tmp_path / "srv").mkdir()
    (tmp_path / "srv" / "ort.tgz").write_bytes(b"not the package")
    handler = lambda *a: http.server.SimpleHTTPRequestHandler(*a, directory=str(tmp_path / "srv"))  # noqa: E731
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        with pytest.raises(web.WebError, match="does not match its registry checksum"):
            web.fetch_runtime(url=f"http://127.0.0.1:{httpd.server_address[1]}/ort.tgz")
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert not web.runtime_dir().exists()


def test_export_web_serve_hosts_the_folder(model_path, ort_web, tmp_path):
    import os
    import subprocess
    import sys

    out = tmp_path / "served"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "edgetl.cli", "export-web", str(model_path), "-o", str(out), "--serve",
                             "--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        lines = [proc.stdout.readline(), proc.stdout.readline()]
        assert lines[0].startswith("wrote "), lines
        url = lines[1].split(" at ", 1)[1].split()[0]
        assert url.startswith("http://127.0.0.1:")
        with urllib.request.urlopen(url + "model.json", timeout=10) as r:
            assert r.headers["Cross-Origin-Embedder-Policy"] == "require-corp"
            assert b'"classes"' in r.read()
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_the_page_loads_again_without_the_server(browser, page_dir, tmp_path):
    copy = tmp_path / "web"
    shutil.copytree(page_dir, copy)
    srv = web.Server(copy).start()
    url = srv.url
    context = browser.new_context()
    try:
        page = context.new_page()
        page.goto(url)
        page.evaluate("window.edgetl.ready")
        assert page.evaluate("window.edgetl.offline") is True
        srv.close()  # the server is gone: the service worker answers from its cache
        with pytest.raises(OSError):
            urllib.request.urlopen(url, timeout=5)
        page.reload()
        rt = page.evaluate("window.edgetl.ready")
        assert rt["crossOriginIsolated"] is True  # the cached answers keep their COOP/COEP headers
        assert page.inner_text("#meta").startswith("2 classes")
    finally:
        context.close()
        srv.close()
