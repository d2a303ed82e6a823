"""The Ray engine and s3:// data: a local Ray (2 CPUs) and a local S3-compatible server (moto), both
started and stopped here. The ray extra is installed by scripts/setup.sh: these tests never skip."""

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import ray
from click.testing import CliRunner
from conftest import encode, photo

import edgetl
from edgetl.cli import main
from edgetl.data import sources
from edgetl.data.cache import image_key
from edgetl.data.embed import embed_folder
from edgetl.data.engines import Engine
from edgetl.data.engines import ray as ray_engine
from edgetl.data.scan import scan
from edgetl.errors import DataError

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # Ray's own, about its own settings
RAY = Engine("ray")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ray_cluster():
    """One local Ray for the module (starting one takes seconds); its GCS address for other drivers."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto S3 server on 127.0.0.1 (a thread of this process) and credentials for it; yields
    (endpoint, s3fs filesystem)."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in [*env, "AWS_ENDPOINT_URL", "AWS_SESSION_TOKEN", "AWS_PROFILE"]}
    os.environ.update(env)
    for k in ("AWS_ENDPOINT_URL", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        os.environ.pop(k, None)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        src = sources.S3Source(endpoint)
        src.fs.mkdir("photos")
        yield endpoint, src.fs
    finally:
        server.stop()
        sources._REGISTERED.clear()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def upload(fs, folder: Path, prefix: str) -> str:
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            fs.pipe(f"photos/{prefix}/{p.relative_to(folder).as_posix()}", p.read_bytes())
    return f"s3://photos/{prefix}"


def entries(ns) -> dict:
    keys, emb = ns.load()
    return dict(zip(keys, emb))


def shard_rows(ns) -> int:
    return sum(int(np.load(s)["keys"].shape[0]) for s in ns.shards())


def noisy_dataset(root: Path, n: int, size=(480, 360)) -> Path:
    """n photos of two classes that take real time to decode (noise compresses badly)."""
    rng = np.random.default_rng(0)
    from PIL import Image

    for i in range(n):
        d = root / ("a" if i % 2 else "b")
        d.mkdir(parents=True, exist_ok=True)
        img = np.asarray(photo(i, size)).astype(np.int16) + rng.integers(-40, 40, (size[1], size[0], 3))
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(d / f"p{i:04d}.jpg", quality=92)
    return root


def bad_images(folder: Path) -> None:
    full = encode(photo(9, size=(300, 200)))
    (folder / "zero.jpg").write_bytes(b"")
    (folder / "text.jpg").write_text("not a picture")
    (folder / "truncated.jpg").write_bytes(full[: len(full) * 2 // 3])
    (folder / "no_extension").write_bytes(encode(photo(12), "PNG"))  # an image all the same (by content)
    (folder / "notes.txt").write_text("not an image")
    (folder / ".hidden.jpg").write_bytes(full)


# --- Ray ------------------------------------------------------------------------------------------

def test_workers_import_this_edgetl(ray_cluster):
    where = ray.get(ray.remote(lambda: __import__("edgetl").__file__).remote())
    assert where == edgetl.__file__


def test_ray_cache_equals_local_run(tmp_path, make_dataset, tiny_onnx, ray_cluster):
    data = make_dataset({"a": 21, "b": 19})
    local = embed_folder(data, tiny_onnx, tmp_path / "local", batch_size=8)
    remote = embed_folder(data, tiny_onnx, tmp_path / "ray", batch_size=8, engine=RAY)
    assert (remote.new, remote.reused, remote.skipped) == (40, 0, [])
    assert remote.keys == local.keys and "on Ray, 2 workers" in remote.summary()
    a, b = entries(local.namespace), entries(remote.namespace)
    assert a.keys() == b.keys() and len(a) == 40 and shard_rows(remote.namespace) == 40
    assert max(float(np.abs(a[k] - b[k]).max()) for k in a) == 0.0  # same function, same CPU provider
    again = embed_folder(data, tiny_onnx, tmp_path / "ray", batch_size=8, engine=RAY)
    assert (again.new, again.reused) == (0, 40)  # the file index: nothing read, Ray not even asked


def test_bad_images_are_reported_as_locally(tmp_path, make_dataset, tiny_onnx, ray_cluster):
    data = make_dataset({"a": 6, "b": 5})
    bad_images(data / "a")
    local = embed_folder(data, tiny_onnx, tmp_path / "local", batch_size=4)
    remote = embed_folder(data, tiny_onnx, tmp_path / "ray", batch_size=4, engine=RAY)
    assert remote.skipped == local.skipped and len(local.skipped) == 3
    assert (remote.new, remote.reused) == (local.new, local.reused) == (12, 0)
    assert remote.keys == local.keys
    a, b = entries(local.namespace), entries(remote.namespace)
    assert a.keys() == b.keys() and max(float(np.abs(a[k] - b[k]).max()) for k in a) <= 1e-5


def ray_workers() -> list:
    import psutil

    found = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        line = " ".join(p.info["cmdline"] or [])
        if "MapWorker(MapBatches(Embedder))" in line:
            found.append(p)
    return found


def test_worker_killed_mid_run_every_image_once(tmp_path, tiny_onnx, ray_cluster, monkeypatch):
    data = noisy_dataset(tmp_path / "d", 240)
    monkeypatch.setattr(ray_engine, "SHARD_ROWS", 8)  # a shard every 8 rows: the kill lands mid-run
    cache = tmp_path / "cache"
    out: dict = {}
    run = threading.Thread(target=lambda: out.update(r=embed_folder(data, tiny_onnx, cache, batch_size=4, engine=RAY)))
    run.start()
    deadline = time.time() + 120
    while not list(cache.glob("*/shard-*.npz")) and time.time() < deadline and run.is_alive():
        time.sleep(0.01)
    victims = ray_workers()
    assert run.is_alive() and victims, "the run ended before a worker could be killed"
    os.kill(victims[0].pid, signal.SIGKILL)
    written_then = len(list(cache.glob("*/shard-*.npz")))
    run.join(180)
    assert not run.is_alive() and "r" in out
    r = out["r"]
    assert not victims[0].is_running() and written_then < 240 // 8
    assert (r.new, r.reused, r.skipped) == (240, 0, [])
    expected = {image_key(it.path.read_bytes()) for it in r.dataset.items}
    assert set(r.keys) == expected == r.namespace.keys()
    assert shard_rows(r.namespace) == 240  # every image once: no row written twice


def test_driver_killed_rerun_embeds_only_what_is_missing(tmp_path, tiny_onnx, ray_cluster):
    data = noisy_dataset(tmp_path / "d", 240)
    cache = tmp_path / "cache"
    code = ("import sys; import edgetl.data.engines.ray as r; r.SHARD_ROWS = 8; from edgetl.cli import main; "
            "sys.argv[0] = 'edgetl'; main()")
    cmd = [sys.executable, "-c", code, "embed", str(data), "--engine", "ray", "--address", ray_cluster,
           "--backbone", str(tiny_onnx), "--cache", str(cache), "--batch-size", "4"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 120
        while len(list(cache.glob("*/shard-*.npz"))) < 3 and time.time() < deadline and proc.poll() is None:
            time.sleep(0.01)
        assert proc.poll() is None, f"the driver ended first: {proc.stderr.read().decode()[-500:]}"
        proc.send_signal(signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        proc.stderr.close()
    from edgetl.data.cache import open_for_backbone
    from edgetl.data.embed import open_backbone

    _, _, meta = open_backbone(tiny_onnx)
    cached = len(open_for_backbone(cache, meta, graph_sha256=meta["graph_sha256"]).keys())
    assert 0 < cached < 240
    r = embed_folder(data, tiny_onnx, cache, batch_size=4, engine=RAY)
    assert (r.new, r.reused, r.skipped) == (240 - cached, cached, [])
    assert len(r.namespace.keys()) == 240 and shard_rows(r.namespace) == 240


def test_ray_options_and_missing_extra(tmp_path, make_dataset, tiny_onnx, monkeypatch):
    data = make_dataset({"a": 1})
    base = ["embed", str(data), "--backbone", str(tiny_onnx), "--cache", str(tmp_path / "c")]
    r = CliRunner().invoke(main, base + ["--workers", "2"])
    assert r.exit_code == 2 and "--workers needs --engine ray" in r.output
    r = CliRunner().invoke(main, base + ["--endpoint-url", "http://127.0.0.1:9"])
    assert r.exit_code == 2 and "--endpoint-url is for s3:// DATA" in r.output
    monkeypatch.setitem(sys.modules, "ray", None)
    r = CliRunner().invoke(main, base + ["--engine", "ray"])
    assert r.exit_code == 1 and r.output.strip() == "Error: --engine ray needs the ray extra: pip install 'edgetl[ray]'"
    monkeypatch.setitem(sys.modules, "s3fs", None)
    r = CliRunner().invoke(main, ["embed", "s3://bucket/photos", "--backbone", str(tiny_onnx)])
    assert r.exit_code == 1 and r.output.strip() == "Error: s3:// data needs the ray extra: pip install 'edgetl[ray]'"


# --- S3 -------------------------------------------------------------------------------------------

def relative(ds) -> list:
    root = str(ds.root)
    return [(str(it.path)[len(root) + 1:].replace(os.sep, "/"), it.label, it.split) for it in ds.items]


def test_s3_listing_follows_the_local_layout_rules(tmp_path, make_dataset, s3):
    endpoint, fs = s3
    split = make_dataset({"x": 2, "y": 3}, root=tmp_path / "split", split="train")
    make_dataset({"x": 1, "y": 1}, root=split, split="val", seed=3)
    (split / "train" / "x" / "deeper").mkdir()
    (split / "train" / "x" / "deeper" / "z.png").write_bytes(encode(photo(5), "PNG"))
    (split / "train" / "x" / "sniffed").write_bytes(encode(photo(6)))
    (split / "train" / "x" / "readme.txt").write_text("no")
    (split / "train" / "x" / ".hidden.jpg").write_bytes(encode(photo(7)))
    (split / "train" / "y" / "cache").mkdir()  # edgetl's own output inside a class: never photos
    (split / "train" / "y" / "cache" / ".edgetl").write_text("edgetl cache")
    (split / "train" / "y" / "cache" / "x.jpg").write_bytes(encode(photo(8)))
    classes = make_dataset({"c": 2, "d": 1}, root=tmp_path / "classes")
    (classes / "loose.jpg").write_bytes(encode(photo(9)))
    flat = tmp_path / "flat"
    flat.mkdir()
    for i in range(3):
        (flat / f"f{i}.jpg").write_bytes(encode(photo(i)))
    for name, folder in (("split", split), ("classes", classes), ("flat", flat)):
        uri = upload(fs, folder, name)
        local, remote = scan(folder), sources.scan(uri, endpoint_url=endpoint)
        assert (remote.layout, remote.classes, remote.root) == (local.layout, local.classes, uri)
        assert relative(remote) == relative(local) and len(local.items) > 2
        assert [n.replace(uri, str(folder)) for n in remote.notes] == local.notes
        assert isinstance(remote.source, sources.S3Source) and local.source is None
    wrong = make_dataset({"a": 1, "train": 1}, root=tmp_path / "wrong")
    with pytest.raises(DataError) as local_error:
        scan(wrong)
    with pytest.raises(DataError) as remote_error:
        sources.scan(upload(fs, wrong, "wrong"), endpoint_url=endpoint)
    assert str(remote_error.value) == str(local_error.value).replace(str(wrong), "s3://photos/wrong")
    with pytest.raises(DataError, match=r"not a folder: s3://photos/none .*\(nothing under it\)"):
        sources.scan("s3://photos/none", endpoint_url=endpoint)
    with pytest.raises(DataError, match="not a folder: s3://nobucket/x"):
        sources.scan("s3://nobucket/x", endpoint_url=endpoint)


def test_s3_both_engines_give_the_cache_of_the_folder_on_disk(tmp_path, make_dataset, tiny_onnx, s3, ray_cluster,
                                                             monkeypatch):
    endpoint, fs = s3
    data = make_dataset({"a": 9, "b": 8})
    bad_images(data / "b")
    uri = upload(fs, data, "both")
    disk = embed_folder(data, tiny_onnx, tmp_path / "disk", batch_size=8)
    here = embed_folder(uri, tiny_onnx, tmp_path / "s3-local", batch_size=8, engine=Engine(endpoint_url=endpoint))
    there = embed_folder(uri, tiny_onnx, tmp_path / "s3-ray", batch_size=8, engine=Engine("ray", endpoint_url=endpoint))
    ref = entries(disk.namespace)
    assert len(ref) == 18 and disk.new == 18
    for r in (here, there):
        assert r.keys == disk.keys and (r.new, r.reused) == (disk.new, disk.reused)
        got = entries(r.namespace)
        assert got.keys() == ref.keys() and max(float(np.abs(got[k] - ref[k]).max()) for k in ref) == 0.0
        assert [(p.replace(uri, str(data)), why.replace(uri, str(data))) for p, why in r.skipped] == \
            [(str(p), why) for p, why in disk.skipped]
    reads = []
    real = sources.S3Source.read
    monkeypatch.setattr(sources.S3Source, "read", lambda self, u, *a: reads.append(u) or real(self, u, *a))
    again = embed_folder(uri, tiny_onnx, tmp_path / "s3-local", engine=Engine(endpoint_url=endpoint))
    # unchanged objects (ETag, size, time) are not read again; only the unreadable ones are, as on disk
    assert (again.new, again.reused, len(again.skipped)) == (0, 18, 3)
    assert sorted(reads) == sorted(u for u, _ in again.skipped)


def test_cli_embed_and_train_head_from_s3_on_ray(tmp_path, make_dataset, tiny_onnx, s3, ray_cluster):
    endpoint, fs = s3
    uri = upload(fs, make_dataset({"cats": 8, "dogs": 8}), "cli")
    cache = tmp_path / "cache"
    common = ["--backbone", str(tiny_onnx), "--cache", str(cache), "--engine", "ray", "--endpoint-url", endpoint]
    r = CliRunner().invoke(main, ["embed", uri, *common])
    assert r.exit_code == 0, r.output
    assert "embedded 16 images, 2 classes: 16 new, 0 reused, 0 skipped" in r.output and "on Ray" in r.output
    out = tmp_path / "model"
    r = CliRunner().invoke(main, ["train-head", uri, *common, "-o", str(out), "--epochs", "5"])
    assert r.exit_code == 0, r.output
    assert (out / "model.onnx").is_file() and "wrote" in r.output


def test_a_worker_that_cannot_start_is_one_line(tmp_path, make_dataset, tiny_onnx, ray_cluster, monkeypatch):
    data = make_dataset({"a": 3})
    real = edgetl.__version__
    monkeypatch.setattr(edgetl, "__version__", "0.0.0-elsewhere")  # the workers import the real one
    r = CliRunner().invoke(main, ["embed", str(data), "--backbone", str(tiny_onnx), "--cache", str(tmp_path / "c"),
                                  "--engine", "ray"])
    assert r.exit_code == 1  # (Ray's own log lines from its processes may come around it)
    assert (f"Error: a Ray worker runs edgetl {real}, the driver 0.0.0-elsewhere: install the same version on the "
            "cluster") in r.output.splitlines()
