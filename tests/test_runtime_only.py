"""The device runtime's tests in a process that cannot import torch, torchvision, timm, onnx, PIL or
matplotlib (tests/runtime_only): run, predict, evaluate --html and bench on a real model."""

import os
import re
import subprocess
import sys
from pathlib import Path

import cv2
from click.testing import CliRunner

from edgetl.cli import main

HERE = Path(__file__).resolve().parent


def test_device_commands_run_without_the_training_stack(tmp_path, make_dataset, tiny_onnx):
    data = make_dataset({"cat": 6, "dog": 6})
    r = CliRunner().invoke(main, ["train-head", str(data), "--backbone", str(tiny_onnx), "--cache",
                                  str(tmp_path / "c"), "-o", str(tmp_path / "m")])
    assert r.exit_code == 0, r.output
    video = tmp_path / "clip.avi"
    w = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 10, (320, 240))
    for f in sorted(data.rglob("*.jpg"))[:5]:
        w.write(cv2.resize(cv2.imread(str(f)), (320, 240)))
    w.release()
    env = {**os.environ, "EDGETL_RT_MODEL": str(tmp_path / "m" / "model.onnx"), "EDGETL_RT_DATA": str(data),
           "EDGETL_RT_VIDEO": str(video)}
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", str(HERE / "runtime_only"), "-c",
                          str(HERE / "runtime_only" / "pytest.ini"), "--rootdir", str(HERE / "runtime_only")],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    summary = run.stdout.strip().splitlines()[-1]
    passed = int(re.search(r"(\d+) passed", summary).group(1))
    assert passed == 12 and "skipped" not in summary and "failed" not in summary, summary
