import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import encode, photo

from edgetl.cli import main
from edgetl.data import cache as cache_mod
from edgetl.data import scan as data_mod
from edgetl.data.encode import embed_batch
from edgetl.data.embed import embed_folder, open_backbone
from edgetl.errors import DataError, ModelError


def entries(ns):
    keys, emb = ns.load()
    return dict(zip(keys, emb))


def test_incremental_and_rename_proof(tmp_path, make_dataset, tiny_onnx):
    data = make_dataset({"a": 5, "b": 4})
    r1 = embed_folder(data, tiny_onnx, tmp_path / "cache")
    assert (r1.new, r1.reused, r1.skipped) == (9, 0, [])
    assert len(r1.namespace.keys()) == 9

    make_dataset({"a": 7}, root=tmp_path / "more", seed=7)  # two new photos into class a
    for p in sorted((tmp_path / "more" / "a").iterdir())[:2]:
        shutil.copy(p, data / "a" / f"new_{p.name}")
    r2 = embed_folder(data, tiny_onnx, tmp_path / "cache")
    assert (r2.new, r2.reused) == (2, 9)

    (data / "a" / "img_000.jpg").rename(data / "b" / "moved.jpg")  # rename + move: nothing re-embedded
    r3 = embed_folder(data, tiny_onnx, tmp_path / "cache")
    assert (r3.new, r3.reused) == (0, 11)
    assert len(entries(r3.namespace)) == 11


def test_duplicate_photos_are_embedded_once(tmp_path, make_dataset, tiny_onnx):
    data = make_dataset({"a": 3})
    shutil.copy(data / "a" / "img_000.jpg", data / "a" / "copy.jpg")
    r = embed_folder(data, tiny_onnx, tmp_path / "cache")
    assert (r.new, r.reused) == (3, 1) and len(set(r.keys)) == 3
    one_by_one = embed_folder(data, tiny_onnx, tmp_path / "cache1", batch_size=1)  # the copy in a later batch
    assert (one_by_one.new, one_by_one.reused) == (3, 1) and one_by_one.keys == r.keys
    assert sum(int(np.load(s)["keys"].shape[0]) for s in one_by_one.namespace.dir.glob("shard-*.npz")) == 3


def test_cached_embeddings_equal_a_direct_run(tmp_path, make_dataset, tiny_onnx):
    data = make_dataset({"a": 4})
    r = embed_folder(data, tiny_onnx, tmp_path / "cache", batch_size=3)
    sess, spec, _ = open_backbone(tiny_onnx)
    paths = [it.path for it in r.dataset.items]
    direct = embed_batch(sess, spec, paths)
    _, cached = r.namespace.load(r.keys)
    assert np.abs(direct - cached).max() < 1e-6
    from_bytes = embed_batch(sess, spec, [p.read_bytes() for p in paths])
    assert np.array_equal(from_bytes, direct)



def test_sessions_side_by_side_give_the_same_cache(tmp_path, make_dataset, tiny_onnx, monkeypatch):
    """On the CPU, several single-thread sessions (from the second batch on) cache exactly what one
    session does; shards hold at least SHARD_ROWS photos; a session that fails to load is one error."""
    from edgetl.data import embed as embed_mod

    data = make_dataset({"a": 41, "b": 30})
    made = []
    real = embed_mod._cpu_runner
    monkeypatch.setattr(embed_mod, "_cpu_runner", lambda *a: made.append(a) or real(*a))
    side = embed_folder(data, tiny_onnx, tmp_path / "side", device="cpu", threads=3, batch_size=4)
    assert len(made) == 3 and all(threads == 1 for _, threads, _ in made)  # three sessions of one thread
    made.clear()
    one = embed_folder(data, tiny_onnx, tmp_path / "one", device="cpu", threads=1, batch_size=4)
    assert made == [] and side.keys == one.keys and side.new == one.new == 71
    a, b = entries(side.namespace), entries(one.namespace)
    assert a.keys() == b.keys() and max(float(np.abs(a[k] - b[k]).max()) for k in a) == 0.0
    rows = sorted(int(np.load(s)["keys"].shape[0]) for s in side.namespace.dir.glob("shard-*.npz"))
    assert sum(rows) == 71 and all(n >= embed_mod.SHARD_ROWS for n in rows[1:]), rows

    small = make_dataset({"a": 3}, root=tmp_path / "small")  # one batch: the session opened first, no other
    embed_folder(small, tiny_onnx, tmp_path / "side", device="cpu", threads=3, batch_size=4)
    assert made == []

    def broken(*a):
        raise ModelError("cannot load the second session")

    monkeypatch.setattr(embed_mod, "_cpu_runner", broken)
    with pytest.raises(ModelError, match="second session"):
        embed_folder(data, tiny_onnx, tmp_path / "broken", device="cpu", threads=2, batch_size=4)
    again = embed_folder(data, tiny_onnx, tmp_path / "broken", device="cpu", threads=1, batch_size=4)
    assert again.new + again.reused == 71 and len(entries(again.namespace)) == 71


def test_a_backbone_replaced_during_embed_is_refused(tmp_path, make_dataset, tiny_onnx, monkeypatch):
    """The sessions made after the first run the graph that was checked, or the run stops: a file
    swapped meanwhile never lands in the cache under the first one's namespace."""
    import onnx

    from edgetl.data import embed as embed_mod

    data = make_dataset({"a": 12, "b": 12})
    path = tmp_path / "backbone.onnx"
    shutil.copy(tiny_onnx, path)
    other = onnx.load(str(tiny_onnx))
    w = other.graph.initializer[0]
    arr = onnx.numpy_helper.to_array(w).copy()
    arr.flat[0] += 1
    w.CopyFrom(onnx.numpy_helper.from_array(arr, w.name))
    real_open = embed_mod.open_backbone

    def open_then_swap(p, *a, **k):
        out = real_open(p, *a, **k)
        onnx.save(other, str(path))
        return out

    monkeypatch.setattr(embed_mod, "open_backbone", open_then_swap)
    with pytest.raises(ModelError, match="changed while it was being used"):
        embed_folder(data, path, tmp_path / "cache", device="cpu", threads=2, batch_size=4)
    assert not list((tmp_path / "cache").glob("*/shard-*.npz"))

def test_backbones_never_share_a_namespace(tmp_path, make_dataset, tiny_onnx, tiny_backbone):
    import torch

    from edgetl import backbones
    from edgetl.export import torch_onnx as export

    state = {k: v + 0.01 if v.is_floating_point() else v for k, v in tiny_backbone.model.state_dict().items()}
    torch.save(state, tmp_path / "other.pth")
    other = tmp_path / "other.onnx"
    export.export_backbone(backbones.get("tiny_test", str(tmp_path / "other.pth")), other)

    data = make_dataset({"a": 3})
    r1 = embed_folder(data, tiny_onnx, tmp_path / "cache")
    r2 = embed_folder(data, other, tmp_path / "cache")
    assert r1.namespace.dir != r2.namespace.dir and r2.new == 3
    a, b = entries(r1.namespace), entries(r2.namespace)
    assert a.keys() == b.keys() and all(not np.allclose(a[k], b[k]) for k in a)


def test_namespace_folder_of_something_else_is_refused(tmp_path, make_dataset, tiny_onnx):
    from edgetl.errors import CacheError

    data = make_dataset({"a": 2})
    r = embed_folder(data, tiny_onnx, tmp_path / "cache")
    meta = (r.namespace.dir / "namespace.json")
    meta.write_text(meta.read_text().replace('"dim": 256', '"dim": 128'))
    with pytest.raises(CacheError, match="another backbone"):
        embed_folder(data, tiny_onnx, tmp_path / "cache")


def test_corrupt_images_are_skipped_listed_and_never_cached(tmp_path, make_dataset, tiny_onnx):
    data = make_dataset({"a": 3})
    bad = data / "a"
    (bad / "zero.jpg").write_bytes(b"")
    (bad / "text.jpg").write_text("not a picture")
    full = encode(photo(9, size=(300, 200)))
    (bad / "truncated.jpg").write_bytes(full[: len(full) * 2 // 3])
    import struct
    import zlib

    def chunk(t, d):
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))

    (bad / "bomb.png").write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 40000, 40000, 8, 2, 0, 0, 0)))
    (bad / "notes.txt").write_text("ignored, not an image")
    (bad / ".hidden.jpg").write_bytes(full)
    (bad / "UPPER.JPG").write_bytes(encode(photo(11)))
    (bad / "no_extension").write_bytes(encode(photo(12), "PNG"))
    r = embed_folder(data, tiny_onnx, tmp_path / "cache")
    assert r.new == 5  # 3 + UPPER.JPG + no_extension
    reasons = sorted(os.path.basename(p) for p, _ in r.skipped)
    assert reasons == ["bomb.png", "text.jpg", "truncated.jpg", "zero.jpg"]
    assert all("\n" not in why for _, why in r.skipped)
    assert len(r.namespace.keys()) == 5


def test_unlabelled_flat_folder(tmp_path, tiny_onnx):
    flat = tmp_path / "flat"
    flat.mkdir()
    for i in range(4):
        photo(i).save(flat / f"p{i}.png")
    r = embed_folder(flat, tiny_onnx, tmp_path / "cache")
    assert r.dataset.layout == "flat" and r.dataset.classes == [] and r.new == 4
    assert all(it.label is None for it in r.dataset.items)


def test_split_layout_is_kept(tmp_path, make_dataset):
    root = tmp_path / "d"
    make_dataset({"x": 2, "y": 2}, root=root, split="train")
    make_dataset({"x": 1, "y": 1}, root=root, split="val", seed=3)
    ds = data_mod.scan(root)
    assert ds.layout == "split" and ds.classes == ["x", "y"]
    assert ds.counts("train") == {"x": 2, "y": 2} and ds.counts("val") == {"x": 1, "y": 1}


def test_empty_folder_and_bad_backbone(tmp_path, tiny_onnx):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images"):
        embed_folder(tmp_path / "empty", tiny_onnx, tmp_path / "cache")
    (tmp_path / "x.onnx").write_bytes(b"nope")
    (tmp_path / "empty" / "a.png").write_bytes(encode(photo(0), "PNG"))
    with pytest.raises(ModelError):
        embed_folder(tmp_path / "empty", tmp_path / "x.onnx", tmp_path / "cache")


def test_kill_9_and_resume_loses_nothing(tmp_path, make_dataset, tiny_onnx):
    """A real subprocess killed with SIGKILL at several moments; the final cache equals a clean run."""
    data = make_dataset({"a": 150, "b": 150})
    ref = embed_folder(data, tiny_onnx, tmp_path / "ref", batch_size=4)
    cache = tmp_path / "cache"
    cmd = [sys.executable, "-m", "edgetl.cli", "embed", str(data), "--backbone", str(tiny_onnx),
           "--cache", str(cache), "--batch-size", "4", "--device", "cpu"]
    killed = 0

    def shards():
        return set(cache.glob("*/shard-*.npz"))

    for target in (1, 2, 3):  # kill after this many new shards (of 32 photos at least) of this run
        before = shards()
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 60
        while proc.poll() is None and len(shards() - before) < target and time.time() < deadline:
            time.sleep(0.005)
        if proc.poll() is None:
            time.sleep(0.003 * target)  # land inside a batch, not just after a write
            proc.send_signal(signal.SIGKILL)
            killed += 1
        proc.wait()
        for shard in shards():  # every visible shard is whole
            with np.load(shard) as z:
                assert z["keys"].shape[0] == z["emb"].shape[0]
    assert killed >= 2
    final = embed_folder(data, tiny_onnx, cache, batch_size=4)
    assert final.new < 300 or killed == 0
    a, b = entries(ref.namespace), entries(final.namespace)
    assert a.keys() == b.keys()
    assert max(float(np.abs(a[k] - b[k]).max()) for k in a) <= 1e-5


def test_cli_embed_reports_and_suggests_next(tmp_path, make_dataset, tiny_onnx):
    data = make_dataset({"a": 2, "b": 2})
    (data / "a" / "bad.jpg").write_text("x")
    r = CliRunner().invoke(main, ["embed", str(data), "--backbone", str(tiny_onnx), "--cache", str(tmp_path / "c")])
    assert r.exit_code == 0, r.output
    assert "embedded 5 images, 2 classes: 4 new, 0 reused, 1 skipped" in r.output
    assert "bad.jpg" in r.output and f"next: edgetl train-head {data}" in r.output


def test_cli_cuda_without_gpu(tmp_path, make_dataset, tiny_onnx):
    from edgetl.ort import cuda_usable

    if cuda_usable():
        pytest.skip("a usable GPU is present")
    data = make_dataset({"a": 1})
    r = CliRunner().invoke(main, ["embed", str(data), "--backbone", str(tiny_onnx), "--device", "cuda",
                                  "--cache", str(tmp_path / "c")])
    assert r.exit_code == 1 and "CUDA provider cannot load" in r.output


def test_key_is_content_hash():
    a = encode(photo(1))
    assert cache_mod.image_key(a) == cache_mod.image_key(bytes(a)) != cache_mod.image_key(encode(photo(2)))


def test_compaction_merges_in_bounded_chunks_and_keeps_every_entry(tmp_path):
    ns = cache_mod.Namespace(tmp_path, "x", "fp", '{"a": 1}', 8).open()
    rng = np.random.default_rng(0)
    for _ in range(80):
        ns.add([rng.bytes(32) for _ in range(3)], rng.normal(size=(3, 8)).astype(np.float32))
    before = entries(ns)
    ns.compact(min_shards=64, chunk_bytes=4000)  # a shard of 3 rows holds 96 bytes of floats: ~42 a chunk
    after = entries(cache_mod.Namespace(tmp_path, "x", "fp", '{"a": 1}', 8).open())
    assert len(ns.shards()) == 2
    assert before.keys() == after.keys() and all(np.array_equal(before[k], after[k]) for k in before)


def test_unchanged_rerun_reads_no_photo_and_changed_ones_are_read(tmp_path, make_dataset, tiny_onnx, monkeypatch):
    import edgetl.data.embed as embed_mod

    data = make_dataset({"a": 4, "b": 4})
    cache = tmp_path / "cache"
    first = embed_folder(data, tiny_onnx, cache)
    reads = []
    real = embed_mod.read_regular
    monkeypatch.setattr(embed_mod, "read_regular", lambda p, *a: reads.append(p) or real(p, *a))
    again = embed_folder(data, tiny_onnx, cache)
    assert (again.new, again.reused, reads) == (0, 8, []) and again.keys == first.keys
    changed = data / "a" / "img_000.jpg"
    changed.write_bytes(encode(photo(77)))  # new content: read, hashed and embedded
    st = changed.stat()
    os.utime(changed, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    third = embed_folder(data, tiny_onnx, cache)
    assert reads == [changed] and third.new == 1 and third.keys[0] != first.keys[0]
    (cache / "files.sqlite").write_bytes(b"not a database")  # a damaged index only costs a re-read
    for extra in cache.glob("files.sqlite-*"):
        extra.unlink()
    fourth = embed_folder(data, tiny_onnx, cache)
    assert fourth.new == 0 and fourth.keys == third.keys
