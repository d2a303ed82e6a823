"""Attacks on every input edgetl reads: each ends in one line (or a correct result), no hang, nothing lost."""

import errno
import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
import time

import numpy as np
import onnx
import pytest
from click.testing import CliRunner


from edgetl import contract as C
from edgetl.cli import main
from edgetl.data import scan as scan_mod
from edgetl.data.embed import embed_folder


def cli(*args, **kw):
    return CliRunner().invoke(main, [str(a) for a in args], **kw)


def one_line_error(r, code=1):
    """The error is one line (the last; progress lines may come before it), with no traceback."""
    assert r.exit_code == code, r.output
    lines = r.output.strip().splitlines()
    errors = [line for line in lines if line.startswith("Error: ")]
    assert errors == lines[-1:] and "Traceback" not in r.output, r.output
    return lines[-1]


def digest(folder):
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_onnx):
    import sys as _sys
    from pathlib import Path

    _sys.path.insert(0, str(Path(__file__).parent))
    from conftest import photo as make

    root = tmp_path_factory.mktemp("hard")
    data = root / "data"
    for ci, cls in enumerate(["a", "b"]):
        (data / cls).mkdir(parents=True)
        for i in range(8):
            img = np.asarray(make(ci * 100 + i)).astype(np.int16)
            img[..., ci] = np.clip(img[..., ci] + 90, 0, 255)
            from PIL import Image

            Image.fromarray(img.astype(np.uint8)).save(data / cls / f"{i}.jpg")
    out = root / "out"
    r = cli("train-head", data, "--backbone", tiny_onnx, "--cache", root / "cache", "-o", out)
    assert r.exit_code == 0, r.output
    return data, out, root / "cache"


# 1. bounded work from any flag

def test_huge_top_k_is_clamped_before_anything_is_built(trained):
    data, out, _ = trained
    t = time.monotonic()
    r = cli("predict", out / "model.onnx", data / "a" / "0.jpg", "--format", "csv", "--top-k", "99999999999999999999")
    assert r.exit_code == 0 and time.monotonic() - t < 20
    assert r.output.splitlines()[0] == "path,class1,prob1,class2,prob2,error"


# 2. link loops and links across classes

def test_self_links_and_links_across_classes(tmp_path, make_dataset, tiny_onnx):
    data = make_dataset({"a": 3, "b": 2})
    os.symlink(".", data / "a" / "loop1")
    os.symlink(".", data / "a" / "loop2")
    os.symlink("../b", data / "a" / "to_b")  # b's photos must stay b's
    os.symlink(data / "a" / "img_000.jpg", data / "b" / "same_photo.jpg")  # one file, reached twice
    t = time.monotonic()
    ds = scan_mod.scan(data)
    assert time.monotonic() - t < 5
    assert ds.counts() == {"a": 3, "b": 2}
    assert any("not followed again" in n for n in ds.notes)
    r = embed_folder(data, tiny_onnx, tmp_path / "c")
    assert len(r.dataset.items) == 5
    # a folder linked from outside is followed, once
    other = tmp_path / "elsewhere"
    make_dataset({"x": 2}, root=other, seed=3)
    os.symlink(other / "x", data / "b" / "more")
    assert scan_mod.scan(data).counts() == {"a": 3, "b": 4}


def test_links_among_class_folders_of_a_split_are_not_classes(tmp_path, make_dataset):
    """train/loop -> .. (the folder holding train/ and val/) and val/a_again -> ../train/a are links to
    folders already read: no class "loop", no val photos filed as training ones, a note."""
    root = tmp_path / "d"
    make_dataset({"a": 3, "b": 3}, root=root, split="train")
    make_dataset({"a": 1, "b": 1}, root=root, split="val", seed=3)
    os.symlink("..", root / "train" / "loop")
    os.symlink("../train/a", root / "val" / "a_again")
    ds = scan_mod.scan(root)
    assert ds.classes == ["a", "b"]
    assert ds.counts("train") == {"a": 3, "b": 3} and ds.counts("val") == {"a": 1, "b": 1}
    assert any("2 links to folders or files already scanned were not followed again" in n for n in ds.notes)


# 3. special files are never opened

def test_fifo_as_source_or_photo_never_blocks(trained, tmp_path):
    data, out, _ = trained
    fifo = tmp_path / "f.jpg"
    os.mkfifo(fifo)
    t = time.monotonic()
    r = cli("run", "--model", out / "model.onnx", "--source", fifo, "--headless")
    assert "not a regular file" in one_line_error(r)
    r = cli("predict", out / "model.onnx", fifo)
    assert r.exit_code == 1
    os.mkfifo(data / "a" / "pipe.jpg")
    try:
        assert scan_mod.scan(data).counts()["a"] == 8  # skipped in a photo folder too
    finally:
        os.unlink(data / "a" / "pipe.jpg")
    assert time.monotonic() - t < 20


# 5. model metadata is checked against the graph

def _altered(model_path, tmp_path, name, **changes):
    m = onnx.load(str(model_path))
    for p in m.metadata_props:
        if p.key in changes:
            p.value = changes[p.key]
    path = tmp_path / f"{name}.onnx"
    onnx.save(m, str(path))
    return path


@pytest.mark.parametrize("name,key,value,expect", [
    ("one_class", C.KEY_CLASSES, '["a"]', "names 1 classes but the graph outputs 2"),
    ("five_classes", C.KEY_CLASSES, '["a", "b", "c", "d", "e"]', "names 5 classes but the graph outputs 2"),
    ("string_classes", C.KEY_CLASSES, '"ab"', "not a list of names"),
    ("dict_classes", C.KEY_CLASSES, '{"a": 1}', "not a list of names"),
    ("nested_classes", C.KEY_CLASSES, "[" * 5000 + "]" * 5000, "class"),
    ("huge_input", C.KEY_PREPROCESS, '{"input_size": [40000, 40000], "resize_size": 40000, "mean": [0, 0, 0], '
                                      '"std": [1, 1, 1]}', "input_size"),
    ("text_size", C.KEY_PREPROCESS, '{"input_size": ["a", 64], "resize_size": 73, "mean": [0, 0, 0], '
                                     '"std": [1, 1, 1]}', "input_size"),
    ("zero_size", C.KEY_PREPROCESS, '{"input_size": [0, 0], "resize_size": 0, "mean": [0, 0, 0], "std": [1, 1, 1]}',
     "input_size"),
    ("other_size", C.KEY_PREPROCESS, '{"input_size": [96, 96], "resize_size": 110, "mean": [0, 0, 0], '
                                      '"std": [1, 1, 1]}', "metadata says input 96x96 but the graph takes 64x64"),
    ("zero_std", C.KEY_PREPROCESS, '{"input_size": [64, 64], "resize_size": 73, "mean": [0, 0, 0], "std": [0, 1, 1]}',
     "std must be positive"),
])
def test_metadata_that_lies_is_one_line(trained, tmp_path, name, key, value, expect):
    data, out, _ = trained
    path = _altered(out / "model.onnx", tmp_path, name, **{key: value})
    for args in (("predict", path, data / "a" / "0.jpg"), ("evaluate", path, data),
                 ("run", "--model", path, "--source", data, "--headless")):
        assert expect in one_line_error(cli(*args))


def test_foreign_model_with_copied_metadata(trained, tmp_path):
    from onnx import TensorProto, helper

    _, out, _ = trained
    meta = {p.key: p.value for p in onnx.load(str(out / "model.onnx")).metadata_props}
    g = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", C.OPSET)])
    m.ir_version = C.IR_VERSION
    for k, v in meta.items():
        m.metadata_props.add(key=k, value=v)
    onnx.save(m, str(tmp_path / "foreign.onnx"))
    assert "does not take image uint8" in one_line_error(cli("predict", tmp_path / "foreign.onnx", out))


# 6. cache shards are checked on every read

def _shard(cache):
    shards = sorted(cache.glob("*/shard-*.npz"))
    assert shards
    return shards[0]


@pytest.mark.parametrize("damage", ["flip", "truncate", "empty", "wrong_dim"])
def test_bad_cache_shards_are_quarantined_and_recomputed(tmp_path, make_dataset, tiny_onnx, damage):
    from edgetl.data.cache import Namespace

    data = make_dataset({"a": 4, "b": 4})
    cache = tmp_path / "c"
    ref = embed_folder(data, tiny_onnx, cache)
    shard = _shard(cache)
    raw = bytearray(shard.read_bytes())
    if damage == "flip":
        for i in range(16):
            raw[len(raw) // 2 + i] ^= 0xFF
        shard.write_bytes(bytes(raw))
    elif damage == "truncate":
        shard.write_bytes(bytes(raw[: len(raw) // 2]))
    elif damage == "empty":
        shard.write_bytes(b"")
    else:  # a valid shard, with the right name for its bytes, of another dimension
        shard.unlink()
        ns = ref.namespace
        other = Namespace(tmp_path / "x", "x", "fp", ns.meta["preprocess"] and json.dumps(ns.meta["preprocess"]), 7).open()
        src = other.add([b"\x01" * 32], np.zeros((1, 7), np.float32))
        shutil.copy(src, ns.dir / src.name)
        shard = ns.dir / src.name
    r = cli("embed", data, "--backbone", tiny_onnx, "--cache", cache)
    assert r.exit_code == 0, r.output
    assert f"cache shard {shard.name}" in r.output and "set aside" in r.output
    assert (shard.parent / "quarantine" / shard.name).exists()  # set aside, not deleted
    assert "8 images, 2 classes: 8 new" in r.output or (damage == "wrong_dim" and "0 new" in r.output)
    again = embed_folder(data, tiny_onnx, cache)  # what is there now is whole
    assert again.new == 0 and not again.namespace.problems and len(again.namespace.keys()) == 8
    t = cli("train-head", data, "--backbone", tiny_onnx, "--cache", cache, "-o", tmp_path / "o")
    assert t.exit_code == 0, t.output


def test_lying_backbone_gets_its_own_namespace(tmp_path, make_dataset, tiny_onnx, lite0_onnx):
    """A small graph that copies EfficientNet's metadata must not reuse EfficientNet's embeddings."""
    data = make_dataset({"a": 2})
    real = embed_folder(data, lite0_onnx, tmp_path / "c")
    liar = onnx.load(str(tiny_onnx))
    lite_meta = {p.key: p.value for p in onnx.load(str(lite0_onnx)).metadata_props}
    for p in liar.metadata_props:
        if p.key in (C.KEY_FINGERPRINT, C.KEY_BACKBONE, C.KEY_WEIGHTS_SHA256):
            p.value = lite_meta[p.key]
    onnx.save(liar, str(tmp_path / "liar.onnx"))
    lied = embed_folder(data, tmp_path / "liar.onnx", tmp_path / "c")
    assert lied.namespace.dir != real.namespace.dir and lied.new == 2



def test_graph_hash_reads_the_graph_not_the_metadata(tmp_path, tiny_onnx):
    """The cache's graph hash is the graph's own bytes: onnx's serialisation of the parsed graph, unmoved
    by metadata, moved by any weight; a file that is not a model is a ModelError."""
    from edgetl.ort import graph_sha256
    from edgetl.errors import ModelError

    model = onnx.load(str(tiny_onnx))
    assert graph_sha256(tiny_onnx) == hashlib.sha256(model.graph.SerializeToString()).hexdigest()
    model.metadata_props.add(key="note", value="x" * 1000)
    onnx.save(model, str(tmp_path / "more_meta.onnx"))
    assert graph_sha256(tmp_path / "more_meta.onnx") == graph_sha256(tiny_onnx)
    w = model.graph.initializer[0]
    arr = onnx.numpy_helper.to_array(w).copy()
    arr.flat[0] += 1
    w.CopyFrom(onnx.numpy_helper.from_array(arr, w.name))
    onnx.save(model, str(tmp_path / "other_weights.onnx"))
    assert graph_sha256(tmp_path / "other_weights.onnx") != graph_sha256(tiny_onnx)
    for i, junk in enumerate([b"", b"\xff" * 12, b"not a model", tiny_onnx.read_bytes()[:5000]]):
        (tmp_path / f"junk{i}.onnx").write_bytes(junk)
        with pytest.raises(ModelError, match="cannot read its graph"):
            graph_sha256(tmp_path / f"junk{i}.onnx")


# 7. two writers

def test_two_concurrent_embeds_with_compaction(tmp_path, make_dataset, tiny_onnx):
    data = make_dataset({"a": 90, "b": 90})
    cache = tmp_path / "c"
    cmd = [sys.executable, "-m", "edgetl.cli", "embed", str(data), "--backbone", str(tiny_onnx), "--cache", str(cache),
           "--batch-size", "1", "--device", "cpu"]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_, e) in zip(procs, outs):
        assert p.returncode == 0 and "Traceback" not in e, e
    final = embed_folder(data, tiny_onnx, cache)
    assert final.new == 0 and len(final.namespace.keys()) == 180
    assert len(final.namespace.shards()) < 180  # compacted


# 8. output sets are written whole

def test_failed_train_head_leaves_the_previous_set_intact(trained, tmp_path, tiny_onnx, monkeypatch):
    from edgetl.train import card

    data, _, cache = trained
    out = tmp_path / "set"
    assert cli("train-head", data, "--backbone", tiny_onnx, "--cache", cache, "-o", out).exit_code == 0
    before = digest(out)

    def full_disk(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(card, "plot_curves", full_disk)
    r = cli("train-head", data, "--backbone", tiny_onnx, "--cache", cache, "-o", out, "--seed", "3")
    assert "No space left on device" in one_line_error(r)
    assert digest(out) == before and not [p for p in tmp_path.iterdir() if p.name.startswith(".set")]

    def interrupt(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(card, "plot_curves", interrupt)
    fresh = tmp_path / "fresh"
    from edgetl.train.heads import HeadConfig
    from edgetl.train.orchestrate import train_head
    from edgetl.train.request import TrainRequest

    with pytest.raises(KeyboardInterrupt):  # (the CLI would exit 130; in-process we see the interrupt itself)
        train_head(TrainRequest(data, tiny_onnx, cache, fresh, HeadConfig()))
    assert not fresh.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".fresh")]


# 9. one error path

def test_usage_errors_are_one_line(trained):
    _, out, _ = trained
    r = cli("train-head")
    assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 1 and "see `main train-head --help`" in r.output
    r = cli("predict", out / "model.onnx", "x.jpg", "--top-k", "0")
    assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 1
    r = cli("no-such-command")
    assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 1


def test_unexpected_errors_are_one_line_and_debug_shows_them(trained, monkeypatch):
    from edgetl.deploy import runtime

    data, out, _ = trained

    def boom(*a, **k):
        raise RuntimeError("something odd\nover two lines")

    monkeypatch.setattr(runtime, "evaluate", boom)
    assert one_line_error(cli("evaluate", out / "model.onnx", data)) == \
        "Error: RuntimeError: something odd over two lines (run with --debug for details)"
    r = cli("--debug", "evaluate", out / "model.onnx", data)
    assert r.exit_code == 1 and isinstance(r.exception, RuntimeError)


def test_unreadable_subfolder_is_skipped_with_a_note(tmp_path, make_dataset, monkeypatch):
    data = make_dataset({"a": 3, "b": 3})
    (data / "a" / "private").mkdir()
    real = os.scandir

    def scandir(path):
        if str(path).endswith("private"):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(scan_mod.os, "scandir", scandir)
    ds = scan_mod.scan(data)
    assert ds.counts() == {"a": 3, "b": 3} and any("unreadable folder" in n and "private" in n for n in ds.notes)


# 10. many classes

def test_many_single_photo_classes_finish(tmp_path, tiny_onnx):
    import cv2

    rng = np.random.default_rng(0)
    data = tmp_path / "data"
    for i in range(1500):
        (data / f"c{i:04d}").mkdir(parents=True)
        cv2.imwrite(str(data / f"c{i:04d}" / "x.jpg"), rng.integers(0, 255, (24, 24, 3), dtype=np.uint8))
    r = cli("train-head", data, "--backbone", tiny_onnx, "--cache", tmp_path / "c", "-o", tmp_path / "o")
    assert r.exit_code == 0, r.output
    assert "1500 classes" in r.output and "have a single photo each" in r.output
    m = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert m["metrics"]["confusion_matrix"] is None and not (tmp_path / "o" / "confusion.png").exists()


# weak spots

def test_files_follow_the_umask(trained):
    _, out, _ = trained
    mask = os.umask(0)
    os.umask(mask)
    for p in out.iterdir():
        assert stat.S_IMODE(p.stat().st_mode) == 0o666 & ~mask, p
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~mask


def test_huge_png_is_refused_without_decoding(tmp_path):
    import struct
    import zlib

    from edgetl.spec import Spec
    from edgetl.data.preprocess import load_image
    from edgetl.errors import ImageError

    def chunk(t, d):
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))

    raw = zlib.compress(b"\x00" * (13000 * 3 + 1) * 8)  # the first rows; the header says 13000x13000
    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 13000, 13000, 8, 2, 0, 0, 0))
           + chunk(b"IDAT", raw) + chunk(b"IEND", b""))
    spec = Spec.from_crop_pct((64, 64), 0.875, (0.5,) * 3, (0.5,) * 3)
    t = time.monotonic()
    with pytest.raises(ImageError, match="13000x13000 pixels is over the limit"):
        load_image(png, spec)
    assert time.monotonic() - t < 1


def test_odd_names_stay_valid_json_and_escaped(trained, tmp_path, tiny_onnx):
    data, out, _ = trained
    odd = tmp_path / os.fsdecode(b"caf\xe9\xff.jpg")  # not UTF-8
    shutil.copy(data / "a" / "0.jpg", odd)
    r = subprocess.run([sys.executable, "-m", "edgetl.cli", "predict", str(out / "model.onnx"), os.fsencode(odd),
                        "--format", "json"], capture_output=True)
    assert r.returncode == 0
    row = json.loads(r.stdout.decode("utf-8"))
    assert os.fsencode(row["path"]) == os.fsencode(odd)
    # class names with control characters and pipes: escaped on the terminal, intact in the card table
    weird = tmp_path / "weird"
    for cls, src in (("a|b", "a"), ("bell\x07\x1b[31m", "b")):
        shutil.copytree(data / src, weird / cls)
    r = cli("train-head", weird, "--backbone", tiny_onnx, "--cache", tmp_path / "c", "-o", tmp_path / "w")
    assert r.exit_code == 0, r.output
    assert "\x1b" not in r.output and "\x07" not in r.output
    card = (tmp_path / "w" / "MODEL_CARD.md").read_text()
    rows = [line for line in card.splitlines() if line.startswith("| a")]
    assert rows and rows[0].count("|") - rows[0].count("\\|") == 7 and "\x1b" not in card


def test_predict_exit_status_and_video_hint(trained, tmp_path):
    _, out, _ = trained
    (tmp_path / "clip.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42")
    (tmp_path / "bad.jpg").write_text("no")
    r = cli("predict", out / "model.onnx", tmp_path / "clip.mp4", tmp_path / "bad.jpg")
    assert r.exit_code == 1 and "is a video: edgetl run --source" in r.output
    r = cli("predict", out / "model.onnx", tmp_path / "bad.jpg", out.parent / "data" / "a" / "0.jpg")
    assert r.exit_code == 0
