"""The light install: `pip install .` in a fresh virtual environment is the device runtime (no torch)."""

import os
import subprocess
import sys
from pathlib import Path

import cv2
import pytest
from click.testing import CliRunner

from edgetl.cli import main

ROOT = Path(__file__).resolve().parents[1]


def du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


@pytest.mark.slow
def test_runtime_only_install_runs_predict_and_run_without_torch(tmp_path, make_dataset, tiny_onnx):
    data = make_dataset({"cat": 6, "dog": 6})
    r = CliRunner().invoke(main, ["train-head", str(data), "--backbone", str(tiny_onnx), "--cache",
                                  str(tmp_path / "c"), "-o", str(tmp_path / "m")])
    assert r.exit_code == 0, r.output
    model = tmp_path / "m" / "model.onnx"
    video = tmp_path / "clip.avi"
    w = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 10, (320, 240))
    for f in sorted(data.rglob("*.jpg"))[:5]:
        w.write(cv2.resize(cv2.imread(str(f)), (320, 240)))
    w.release()

    venv = tmp_path / "runtime-venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = venv / "bin" / "python"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    inst = subprocess.run([str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check", str(ROOT)],
                          capture_output=True, text=True, env=env, timeout=900)
    assert inst.returncode == 0, inst.stderr[-2000:]
    probe = subprocess.run([str(py), "-c", "import importlib.util as u; print([m for m in ('torch', 'torchvision', "
                            "'timm', 'onnx', 'matplotlib') if u.find_spec(m)])"], capture_output=True, text=True, env=env)
    assert probe.stdout.strip() == "[]", probe.stdout  # none of the training stack came along
    edgetl = str(venv / "bin" / "edgetl")
    pred = subprocess.run([edgetl, "predict", str(model), str(data / "cat"), "--format", "json"], capture_output=True,
                          text=True, env=env, cwd=tmp_path, timeout=300)
    assert pred.returncode == 0 and len(pred.stdout.splitlines()) == 6, pred.stderr
    run = subprocess.run([edgetl, "run", "--model", str(model), "--source", str(video), "--headless"],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert run.returncode == 0 and len(run.stdout.splitlines()) == 5, run.stderr
    ev = subprocess.run([edgetl, "evaluate", str(model), str(data)], capture_output=True, text=True, env=env,
                        cwd=tmp_path, timeout=300)
    assert ev.returncode == 0 and ev.stdout.startswith("accuracy "), ev.stderr
    train = subprocess.run([edgetl, "train-head", str(data)], capture_output=True, text=True, env=env, cwd=tmp_path,
                           timeout=300)
    assert train.returncode == 1 and "needs the training extra" in train.stderr and "pip install 'edgetl[train]'" in \
        train.stderr, train.stderr
    site = next((venv / "lib").glob("python3*/site-packages"))
    # The headless OpenCV alone (the GUI build needs the desktop's libxcb and libGL: a slim device lacks them)
    pkgs = subprocess.run([str(py), "-m", "pip", "list", "--format", "freeze"], capture_output=True, text=True, env=env)
    names = {line.split("==")[0].lower() for line in pkgs.stdout.splitlines()}
    assert "opencv-python-headless" in names and "opencv-python" not in names, pkgs.stdout
    so = next((site / "cv2").rglob("cv2*.so"))
    needed = subprocess.run(["ldd", str(so)], capture_output=True, text=True).stdout
    assert "libxcb" not in needed and "libGL" not in needed, needed
    # A window asked of the headless build: one line saying how to get the GUI build
    win = subprocess.run([edgetl, "run", "--model", str(model), "--source", str(video)], capture_output=True,
                         text=True, env={**env, "DISPLAY": ":99"}, cwd=tmp_path, timeout=300)
    assert win.returncode == 1 and "pip install opencv-python" in win.stderr, win.stderr
    assert len(win.stderr.strip().splitlines()) == 1, win.stderr
    size = du(site)
    (tmp_path / "size.txt").write_text(f"{size / 1e6:.0f} MB\n")
    assert size < 600e6  # the CPU build of torch alone is larger, f"runtime install is {size / 1e6:.0f} MB"
