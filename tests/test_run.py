import json
import os
import shutil
import signal
import subprocess
import sys
import time

import cv2
import numpy as np
import pytest
from click.testing import CliRunner
from conftest import photo

from edgetl.cli import main
from edgetl.deploy import live, runtime


def photos(n, folder):
    """Real photos when the shared dataset is there, synthetic ones otherwise."""
    if folder.exists():
        return [cv2.imread(str(p)) for p in sorted(folder.rglob("*.jpg"))[:n]]
    return [np.asarray(photo(i, size=(500, 375)))[..., ::-1].copy() for i in range(n)]


@pytest.fixture(scope="module")
def model_path(tmp_path_factory, tiny_onnx):
    from conftest import HYMENOPTERA

    tmp = tmp_path_factory.mktemp("runmodel")
    data = tmp / "data"
    for cls, sub in (("ants", "ants"), ("bees", "bees")):
        (data / cls).mkdir(parents=True)
        for i, img in enumerate(photos(6, HYMENOPTERA / "train" / sub)):
            cv2.imwrite(str(data / cls / f"{i}.jpg"), img)
    r = CliRunner().invoke(main, ["train-head", str(data), "--backbone", str(tiny_onnx), "--cache",
                                  str(tmp / "cache"), "-o", str(tmp / "out")])
    assert r.exit_code == 0, r.output
    return tmp / "out" / "model.onnx"


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    """A real 640x480 video written with OpenCV from photos, and its frames decoded back."""
    from conftest import HYMENOPTERA

    tmp = tmp_path_factory.mktemp("video")
    path = tmp / "clip.avi"
    w = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (640, 480))
    for img in photos(12, HYMENOPTERA / "val"):
        w.write(cv2.resize(img, (640, 480)))
    w.release()
    cap, frames = cv2.VideoCapture(str(path)), []
    while True:
        ok, f = cap.read()
        if not ok:
            break
        frames.append(f)
    assert len(frames) == 12
    return path, frames


def run_cli(*args):
    r = CliRunner().invoke(main, ["run", *map(str, args)])
    lines = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    return r, lines


def test_headless_json_matches_predict_on_the_same_frames(model_path, video, tmp_path):
    path, frames = video
    r, rows = run_cli("--model", model_path, "--source", path, "--headless", "--top-k", "2")
    assert r.exit_code == 0, r.output
    assert [row["frame"] for row in rows] == list(range(12))
    assert all(set(row) == {"frame", "t", "label", "prob", "top"} for row in rows)
    pngs = []
    for i, f in enumerate(frames):  # lossless copies of the decoded frames
        pngs.append(tmp_path / f"f{i:02d}.png")
        cv2.imwrite(str(pngs[-1]), f)
    model = runtime.load_model(model_path)
    expected = list(runtime.predict(model, pngs, top_k=2))
    for row, (_, top, _) in zip(rows, expected):
        assert row["label"] == top[0][0]
        assert [c for c, _ in row["top"]] == [c for c, _ in top]
        assert np.allclose([p for _, p in row["top"]], [p for _, p in top], atol=1e-5)
    # a folder source gives the same as well
    r2, rows2 = run_cli("--model", model_path, "--source", tmp_path, "--headless", "--top-k", "2")
    assert [x["top"] for x in rows2] == [x["top"] for x in rows]


def test_threshold_and_smoothing(model_path, video):
    path, _ = video
    _, raw = run_cli("--model", model_path, "--source", path, "--headless", "--top-k", "2")
    mid = float(np.median([row["prob"] for row in raw]))
    _, th = run_cli("--model", model_path, "--source", path, "--headless", "--threshold", mid, "--top-k", "2")
    for a, b in zip(raw, th):
        assert b["label"] == (a["label"] if a["prob"] >= mid else "unknown")
    assert any(b["label"] == "unknown" for b in th) and any(b["label"] != "unknown" for b in th)
    _, sm = run_cli("--model", model_path, "--source", path, "--headless", "--smooth", "3", "--top-k", "2")
    classes = sorted({c for row in raw for c, _ in row["top"]})
    vec = np.array([[dict(row["top"])[c] for c in classes] for row in raw])
    for i, row in enumerate(sm):
        want = vec[max(0, i - 2):i + 1].mean(0)
        assert np.allclose([dict(row["top"])[c] for c in classes], want, atol=2e-6)


def test_save_writes_a_playable_video(model_path, video, tmp_path):
    path, frames = video
    out = tmp_path / "annotated.mp4"
    r, rows = run_cli("--model", model_path, "--source", path, "--headless", "--save", out)
    assert r.exit_code == 0 and "saved" in r.stderr
    cap = cv2.VideoCapture(str(out))
    got = 0
    while cap.read()[0]:
        got += 1
    assert got == len(frames) == len(rows)


def test_camera_that_cannot_open_is_one_line_quickly(model_path):
    t = time.monotonic()
    r, _ = run_cli("--model", model_path, "--camera", "7", "--headless")
    assert r.exit_code == 1 and r.output.startswith("Error: camera 7 cannot be opened;")
    assert len(r.output.strip().splitlines()) == 1 and time.monotonic() - t < 10  # the model line comes later


def test_bad_sources_and_models(model_path, tmp_path, tiny_onnx):
    r, _ = run_cli("--model", model_path, "--source", tmp_path / "missing.mp4", "--headless")
    assert r.exit_code == 1 and "no such file" in r.output
    r, _ = run_cli("--model", tiny_onnx, "--source", tmp_path, "--headless")
    assert r.exit_code == 1 and "not a fused model" in r.output
    r, _ = run_cli("--model", model_path, "--headless")
    assert r.exit_code == 2 and "exactly one of" in r.output



def test_without_a_display_save_works_and_errors_follow_the_request(model_path, video, tmp_path, monkeypatch):
    path, frames = video
    n = len(frames)
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    r, _ = run_cli("--model", model_path, "--source", path)  # neither window nor file: say what to do
    assert r.exit_code == 1 and r.output.strip().splitlines()[-1].endswith("use --headless (JSON lines) and/or --save out.mp4")
    r, _ = run_cli("--model", model_path, "--camera", "7")  # the camera the user asked for is reported first
    assert r.exit_code == 1 and "camera 7 cannot be opened" in r.output and "display" not in r.output
    out = tmp_path / "my video.avi"
    r, _ = run_cli("--model", model_path, "--source", path, "--save", out)
    assert r.exit_code == 0, r.output
    assert f"model {model_path} (2 classes: ants, bees; CPU)" in r.output and "no display" in r.output
    cap = cv2.VideoCapture(str(out))
    got = 0
    while cap.read()[0]:
        got += 1
    assert got == n and not list(tmp_path.glob(".*partial*"))


def test_live_sources_keep_only_the_newest_frame(model_path, video):
    """A slow consumer of a 'live' source sees increasing, gapped frames and never a backlog."""
    path, _ = video
    model = runtime.load_model(model_path)
    cap = live.Capture("file", path, model.spec, latest_only=True).start()
    seen = []
    while True:
        f = cap.next()
        if f is None:
            break
        seen.append(f.index)
        assert len(cap._slot) <= 1
        time.sleep(0.05)
    cap.stop()
    assert seen == sorted(seen) and len(set(seen)) == len(seen)
    assert cap.dropped > 0 and len(seen) + cap.dropped == 12


def test_runtime_does_not_import_torch(model_path, video):
    path, _ = video
    code = ("import sys, io, edgetl.deploy.runtime as rt, edgetl.deploy.live as lv; "
            f"m = rt.load_model({str(model_path)!r}); s = lv.run(m, source={str(path)!r}, headless=True, out=io.StringIO()); "
            "assert s.frames == 12, s; bad = [k for k in sys.modules if k.split('.')[0] in ('torch', 'torchvision', 'timm')]; "
            "assert not bad, bad; print('ok')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


@pytest.fixture(scope="module")
def long_video(tmp_path_factory):
    """3000 small frames: far more than a pipe holds in JSON lines (about 500), so a reader that stops
    reading stalls `run` on its output well before the end, whatever the machine's load."""
    path = tmp_path_factory.mktemp("long") / "long.avi"
    w = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 30, (160, 120))
    for i in range(3000):
        w.write(np.full((120, 160, 3), i % 256, np.uint8))
    w.release()
    return path


@pytest.mark.parametrize("sig,code,ended", [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "SIGTERM"),
                                            (signal.SIGHUP, 129, "SIGHUP")])
def test_stopping_keeps_the_saved_video_playable_and_whole(model_path, long_video, tmp_path, sig, code, ended):
    out = tmp_path / "partial.avi"
    proc = subprocess.Popen([sys.executable, "-m", "edgetl.cli", "run", "--model", str(model_path), "--source",
                             str(long_video), "--headless", "--save", str(out)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=_default_sigint)
    for _ in range(5):  # it is running and saving; then stop reading: it stalls on a full pipe
        assert proc.stdout.readline().startswith("{")
    assert not out.exists()  # the video is written under a temporary name until the end
    proc.send_signal(sig)
    stdout = proc.stdout.read()  # the rest, buffered lines included (until it exits)
    stderr = proc.stderr.read()
    proc.wait(timeout=60)
    assert proc.returncode == code and ended in stderr and "Traceback" not in stderr, stderr
    printed = 5 + len([line for line in stdout.splitlines() if line.startswith("{")])
    cap = cv2.VideoCapture(str(out))
    got = 0
    while cap.read()[0]:
        got += 1
    assert 5 <= printed < 3000 and got in (printed, printed + 1)  # the stop may land between save and print
    assert not list(tmp_path.glob(".*partial*"))


def _default_sigint():
    """The test runner may start with SIGINT ignored (a background job); Ctrl-C must reach the child."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


HEADLESS_OPENCV = "GUI: NONE" in " ".join(cv2.getBuildInformation().split())  # opencv-python-headless


@pytest.mark.skipif(not HEADLESS_OPENCV and shutil.which("Xvfb") is None,
                    reason="Xvfb is not installed (apt-get install xvfb)")
def test_window_mode_on_a_virtual_display(model_path, video, tmp_path):
    """The overlay window path, for real, on Xvfb: opens, draws every frame, ends cleanly and quietly.
    With the headless OpenCV build (the default install): one line saying how to get the GUI build."""
    path, _ = video
    if HEADLESS_OPENCV:
        r = subprocess.run([sys.executable, "-m", "edgetl.cli", "run", "--model", str(model_path), "--source",
                            str(path)], env={**os.environ, "DISPLAY": ":99"}, capture_output=True, text=True, timeout=120)
        assert r.returncode == 1 and r.stdout == "", r.stderr
        assert r.stderr.strip().splitlines() == [
            "Error: this OpenCV is the headless build (no windows); for a window: pip uninstall -y "
            "opencv-python-headless && pip install opencv-python; or use --headless (JSON lines) and/or --save out.mp4"]
        return
    display = f":{90 + os.getpid() % 100}"
    xvfb = subprocess.Popen(["Xvfb", display, "-screen", "0", "800x600x24"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        time.sleep(1.0)
        env = {**os.environ, "DISPLAY": display}
        r = subprocess.run([sys.executable, "-m", "edgetl.cli", "run", "--model", str(model_path), "--source", str(path),
                            "--max-frames", "6"], env=env, capture_output=True, text=True, timeout=120)
    finally:
        xvfb.terminate()
        xvfb.wait(timeout=10)
    assert r.returncode == 0, r.stderr
    lines = r.stderr.splitlines()
    assert r.stdout == "" and len(lines) == 2 and "QFontDatabase" not in r.stderr, r.stderr
    assert lines[0].startswith(f"model {model_path} (2 classes") and lines[1].startswith("6 frames in ")


def test_files_run_on_sessions_side_by_side_in_frame_order(model_path, video, monkeypatch):
    """A video on the CPU: frames on single-thread sessions side by side, reported in frame order and
    exactly as one session reports them; --max-frames still counts."""
    import io

    from edgetl import ort

    path, _ = video
    model = runtime.load_model(model_path, "cpu", spin=False)
    real = ort.session

    def lines(cores, max_frames=None):
        monkeypatch.setattr(ort, "physical_cores", lambda: cores)
        made = []
        monkeypatch.setattr(live, "session", lambda *a, **k: made.append(a) or real(*a, **k))
        out = io.StringIO()
        s = live.run(model, source=str(path), headless=True, out=out, max_frames=max_frames)
        return [json.loads(x) for x in out.getvalue().splitlines()], made, s

    one, made1, s1 = lines(1)
    three, made3, s3 = lines(3)
    assert made1 == [] and len(made3) == 3 and all(a[1:3] == ("cpu", 1) for a in made3)
    assert [r["frame"] for r in three] == list(range(12)) and s3.frames == 12 and s3.ended == "end of source"
    assert [(r["label"], r["top"]) for r in three] == [(r["label"], r["top"]) for r in one]
    first5, _, s5 = lines(3, max_frames=5)
    assert [r["frame"] for r in first5] == list(range(5)) and s5.frames == 5


def test_a_model_replaced_before_the_lanes_load_is_refused(model_path, video, tiny_onnx, tmp_path, monkeypatch):
    import io

    from edgetl import ort
    from edgetl.errors import ModelError

    path, _ = video
    copy = tmp_path / "model.onnx"
    shutil.copy(model_path, copy)
    model = runtime.load_model(copy, "cpu", spin=False)
    shutil.copy(tiny_onnx, copy)  # another file under the same name, after the checks
    monkeypatch.setattr(ort, "physical_cores", lambda: 2)
    with pytest.raises(ModelError, match="changed while it was being loaded"):
        live.run(model, source=str(path), headless=True, out=io.StringIO())
