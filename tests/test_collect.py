"""`edgetl run --collect`: the frames a model is unsure about are kept, rate-limited, once per scene, capped."""

import json
import re
import shutil
import types

import cv2
import numpy as np
import pytest
from click.testing import CliRunner
from conftest import photo

from edgetl.cli import main
from edgetl.deploy import collect, live

PER_PHOTO = 5  # frames per photo in the test video: a still scene


def photos(n, folder):
    if folder.exists():
        return [cv2.imread(str(p)) for p in sorted(folder.rglob("*.jpg"))[:n]]
    return [np.asarray(photo(i, size=(500, 375)))[..., ::-1].copy() for i in range(n)]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_onnx):
    from conftest import HYMENOPTERA

    tmp = tmp_path_factory.mktemp("collect")
    data = tmp / "data"
    for cls in ("ants", "bees"):
        (data / cls).mkdir(parents=True)
        for i, img in enumerate(photos(6, HYMENOPTERA / "train" / cls)):
            cv2.imwrite(str(data / cls / f"{i}.jpg"), img)
    r = CliRunner().invoke(main, ["train-head", str(data), "--backbone", str(tiny_onnx), "--cache", str(tmp / "cache"),
                                  "-o", str(tmp / "out")])
    assert r.exit_code == 0, r.output
    return types.SimpleNamespace(data=data, cache=tmp / "cache", model=tmp / "out" / "model.onnx", backbone=tiny_onnx)


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    """8 different photos, each held still for PER_PHOTO frames, at 10 frames per second."""
    from conftest import HYMENOPTERA

    path = tmp_path_factory.mktemp("cvideo") / "still.avi"
    w = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (640, 480))
    for img in photos(8, HYMENOPTERA / "val"):
        for _ in range(PER_PHOTO):
            w.write(cv2.resize(img, (640, 480)))
    w.release()
    return path


def run(*args):
    r = CliRunner().invoke(main, ["run", *map(str, args)])
    rows = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    return r, rows


def saved(folder):
    return sorted(folder.glob("*/*.jpg"))


def test_unsure_frames_saved_once_per_scene_never_above_the_threshold(trained, video, tmp_path):
    _, rows = run("--model", trained.model, "--source", video, "--headless")
    assert len(rows) == 8 * PER_PHOTO
    scene_prob = [rows[s * PER_PHOTO]["prob"] for s in range(8)]
    cut = float(np.median(scene_prob))  # half of the scenes below, half at or above
    out = tmp_path / "hard"
    r, rows2 = run("--model", trained.model, "--source", video, "--headless", "--collect", out, "--collect-below", cut,
                   "--collect-every", 0)
    assert r.exit_code == 0, r.output
    assert [x["prob"] for x in rows2] == [x["prob"] for x in rows]  # collecting changes nothing else
    files = saved(out)
    below = [x for x in rows if x["prob"] < cut]
    scenes_below = {x["frame"] // PER_PHOTO for x in below}
    assert 0 < len(scenes_below) < 8
    # one photo per still scene below the threshold (the repeated frames are skipped), none above
    sides = [collect.sidecar_of(f) for f in files]
    assert sorted(s["frame"] // PER_PHOTO for s in sides) == sorted(scenes_below)
    for s in sides:
        assert s["probabilities"][s["predicted"]] < cut and s["reason"].startswith("low confidence")
        assert s["frame"] in {x["frame"] for x in below}
    assert f"collected {len(files)} of {len(below)} unsure frames" in r.stderr
    assert "like a frame already saved" in r.stderr


def test_sidecar_names_and_class_folders(trained, video, tmp_path):
    out = tmp_path / "hard"
    r, rows = run("--model", trained.model, "--source", video, "--headless", "--collect", out, "--collect-below", 1.0,
                  "--collect-every", 0)
    assert r.exit_code == 0, r.output
    files = saved(out)
    assert len(files) == 8  # every scene is unsure below 1.0; each saved once
    import hashlib

    model_sha = hashlib.sha256(trained.model.read_bytes()).hexdigest()
    for f in files:
        s = collect.sidecar_of(f)
        assert f.parent.name == s["predicted"] == max(s["probabilities"], key=s["probabilities"].get)
        assert set(s["probabilities"]) == {"ants", "bees"} and abs(sum(s["probabilities"].values()) - 1) < 1e-4
        assert s["model_sha256"] == model_sha and s["source"] == str(video) and s["image"] == f.name
        assert re.fullmatch(r"\d{7}-\d{8}T\d{6}\.\d{3}Z\.jpg", f.name) and f.name.startswith(f"{s['frame']:07d}-")
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", s["time"])
        assert abs(s["t"] - s["frame"] / 10) < 0.06
        assert cv2.imread(str(f)).shape == (480, 640, 3)  # the whole frame, as captured
    # a second run into the same folder saves nothing new: those scenes are already there
    r, _ = run("--model", trained.model, "--source", video, "--headless", "--collect", out, "--collect-below", 1.0,
               "--collect-every", 0)
    assert saved(out) == files and "collected 0 of 40" in r.stderr


def test_cap_and_rate_limit(trained, video, tmp_path):
    r, _ = run("--model", trained.model, "--source", video, "--headless", "--collect", tmp_path / "a", "--collect-below",
               1.0, "--collect-every", 0, "--collect-max", 3)
    assert r.exit_code == 0 and len(saved(tmp_path / "a")) == 3 and "over the cap of 3" in r.stderr
    # at most one frame per 1.25 s of video (10 frames per second): frames 0, 13, 26 and 39
    r, _ = run("--model", trained.model, "--source", video, "--headless", "--collect", tmp_path / "b", "--collect-below",
               1.0, "--collect-every", 1.25)
    frames = sorted(collect.sidecar_of(f)["frame"] for f in saved(tmp_path / "b"))
    assert frames == [0, 13, 26, 39] and "within 1.25 s of the last one saved" in r.stderr


def test_nothing_saved_when_the_model_is_sure(trained, video, tmp_path):
    out = tmp_path / "hard"
    r, _ = run("--model", trained.model, "--source", video, "--headless", "--collect", out, "--collect-below", 0,
               "--collect-every", 0)
    assert r.exit_code == 0 and saved(out) == [] and "collected 0 of 0 unsure frames" in r.stderr


def test_unknown_under_threshold_is_collected(trained, video, tmp_path):
    _, rows = run("--model", trained.model, "--source", video, "--headless")
    mid = float(np.median([x["prob"] for x in rows]))
    out = tmp_path / "hard"
    r, rows = run("--model", trained.model, "--source", video, "--headless", "--threshold", mid, "--collect", out,
                  "--collect-below", 0, "--collect-every", 0)
    unknown = {x["frame"] // PER_PHOTO for x in rows if x["label"] == "unknown"}
    sides = [collect.sidecar_of(f) for f in saved(out)]
    assert unknown and sorted(s["frame"] // PER_PHOTO for s in sides) == sorted(unknown)
    assert all(s["decision"] == "unknown" and s["reason"].startswith("unknown") for s in sides)


def test_collect_options_need_collect(trained, video):
    r, _ = run("--model", trained.model, "--source", video, "--headless", "--collect-max", 3)
    assert r.exit_code == 2 and "--collect-max needs --collect DIR" in r.output


def test_unwritable_collect_folder_is_one_line(trained, video, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    r, _ = run("--model", trained.model, "--source", video, "--headless", "--collect", blocker / "sub")
    assert r.exit_code == 1 and r.output.startswith("Error: cannot create output folder")
    assert len(r.output.strip().splitlines()) == 1


def test_collected_photos_moved_into_classes_are_the_only_ones_embedded(trained, video, tmp_path):
    from edgetl.data.embed import embed_folder

    data = tmp_path / "data"
    shutil.copytree(trained.data, data)
    out = tmp_path / "hard"
    r, _ = run("--model", trained.model, "--source", video, "--headless", "--collect", out, "--collect-below", 1.0,
               "--collect-every", 0, "--collect-max", 4)
    files = saved(out)
    assert len(files) == 4
    for f in files:  # the user sorts them: JPEG and sidecar into the class folder
        shutil.move(f, data / f.parent.name / f.name)
        shutil.move(f.with_suffix(".json"), data / f.parent.name / f.with_suffix(".json").name)
    r = CliRunner().invoke(main, ["train-head", str(data), "--backbone", str(trained.backbone), "--cache",
                                  str(trained.cache), "-o", str(tmp_path / "out")])
    assert r.exit_code == 0, r.output
    assert "embedded: 4 new, 12 reused, 0 skipped" in r.stderr  # sidecars are not photos
    assert embed_folder(data, trained.backbone, trained.cache).new == 0


# --- the collector on its own ------------------------------------------------------------------------

class FakeModel:
    def __init__(self, tmp_path, classes=("a", "b", "c")):
        self.classes = list(classes)
        self.path = tmp_path / "m.onnx"
        self.path.write_bytes(b"model")


def frame(i, t, seed):
    bgr = np.asarray(photo(seed, size=(160, 120)))[..., ::-1].copy()
    return live.Frame(i, t, bgr, None, 0.0, 0.0)


def test_reasons(tmp_path):
    c = collect.Collector(tmp_path / "o", FakeModel(tmp_path), below=0.5, margin=0.2, threshold=0.0)
    assert c.reason(np.array([0.9, 0.05, 0.05]), "a") is None
    assert c.reason(np.array([0.45, 0.3, 0.25]), "a").startswith("low confidence")
    assert c.reason(np.array([0.55, 0.4, 0.05]), "a").startswith("small margin")
    assert c.reason(np.array([0.9, 0.05, 0.05]), live.UNKNOWN).startswith("unknown")
    off = collect.Collector(tmp_path / "o", FakeModel(tmp_path), below=None, margin=None)
    assert off.reason(np.array([0.34, 0.33, 0.33]), "a") is None


def test_similar_frames_and_folder_names(tmp_path):
    model = FakeModel(tmp_path, classes=("../up", ".hidden", "ok"))
    c = collect.Collector(tmp_path / "o", model, below=1.0, every=0.0)
    p = np.array([0.5, 0.3, 0.2])
    assert c.offer(frame(0, 0.0, 1), p, "x") is not None
    noisy = frame(1, 0.1, 1)
    noisy.bgr = np.clip(noisy.bgr.astype(int) + np.random.default_rng(0).integers(-6, 7, noisy.bgr.shape), 0, 255
                        ).astype(np.uint8)
    assert c.offer(noisy, p, "x") is None and c.counts.similar == 1  # camera noise: the same scene
    assert c.offer(frame(2, 0.2, 7), np.array([0.2, 0.5, 0.3]), "x") is not None  # another scene
    names = sorted(d.name for d in (tmp_path / "o").iterdir())
    assert names == ["_.._up", "_.hidden"] and not (tmp_path / "up").exists()
    other = collect.dhash(frame(0, 0, 7).bgr)[None]
    assert collect.hash_distance(collect.dhash(frame(0, 0, 1).bgr), other)[0] > 2 * collect.SAME_SCENE


def test_collector_needs_no_torch():
    import subprocess
    import sys

    code = ("import sys, edgetl.deploy.collect; "
            "bad = [k for k in sys.modules if k.split('.')[0] in ('torch', 'torchvision', 'timm')]; assert not bad, bad")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
