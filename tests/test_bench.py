import json
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import photo
from PIL import Image

from edgetl.cli import main
from edgetl.deploy import bench


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_onnx):
    """(model.onnx, model.int8.onnx, photos folder) of a tiny model trained on synthetic photos."""
    tmp = tmp_path_factory.mktemp("bench")
    for split, n in (("train", 8), ("val", 4)):
        for ci, cls in enumerate(("a", "b")):
            d = tmp / "data" / split / cls
            d.mkdir(parents=True)
            for i in range(n):
                img = np.asarray(photo(ci * 100 + i + (50 if split == "val" else 0))).astype(np.int16)
                img[..., ci] = np.clip(img[..., ci] + 90, 0, 255)
                Image.fromarray(img.astype(np.uint8)).save(d / f"{i}.jpg")
    r = cli("train-head", tmp / "data", "--backbone", tiny_onnx, "--cache", tmp / "cache", "-o", tmp / "out")
    assert r.exit_code == 0, r.output
    model = tmp / "out" / "model.onnx"
    r = cli("quantize", model, "--data", tmp / "data", "--force")
    assert r.exit_code == 0, r.output
    return model, model.with_name("model.int8.onnx"), tmp / "data" / "val"


def test_bench_json_schema(models):
    fp32, int8, photos = models
    r = cli("bench", fp32, int8, "--batch", "1,3", "--threads", "1,2", "--rounds", "3", "--images", photos, "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert set(out) == {"machine", "models", "results", "images"}
    m = out["machine"]
    assert set(m) == {"cpu", "cores", "onnxruntime", "device", "spin", "peak_rss_mb"}
    assert m["spin"] is True
    assert isinstance(m["cpu"], str) and isinstance(m["cores"], int) and m["device"] == "cpu"
    assert isinstance(m["peak_rss_mb"], float) and m["peak_rss_mb"] > 0
    assert [x["path"] for x in out["models"]] == [str(fp32), str(int8)]
    assert [x["precision"] for x in out["models"]] == ["float32", "int8"]
    for x in out["models"]:
        assert set(x) == {"path", "precision", "size_mb", "provider", "memory_mb", "input_size"}
        assert x["provider"] == "CPUExecutionProvider" and x["input_size"] == [64, 64]
        assert isinstance(x["size_mb"], float) and x["size_mb"] > 0
        assert isinstance(x["memory_mb"], float) and x["memory_mb"] > 0
    rows = out["results"]
    assert len(rows) == 2 * 2 * 2  # models × batches × threads
    assert {(x["batch"], x["threads"]) for x in rows} == {(1, 1), (3, 1), (1, 2), (3, 2)}
    for x in rows:
        assert set(x) == {"model", "precision", "provider", "batch", "threads", "p50_ms", "p90_ms", "p99_ms",
                          "mean_ms", "min_ms", "runs", "throughput_ips"}
        assert x["min_ms"] <= x["p50_ms"] and x["min_ms"] <= x["mean_ms"]
        assert x["provider"] == "CPUExecutionProvider" and x["runs"] == 3
        assert 0 < x["p50_ms"] <= x["p90_ms"] <= x["p99_ms"]
        assert x["throughput_ips"] == pytest.approx(x["batch"] / (x["p50_ms"] / 1e3))
    im = out["images"]
    assert set(im) == {"n", "skipped", "read_ms", "decode_ms", "resize_ms", "models"}
    assert im["n"] == 8 and im["skipped"] == 0 and set(im["models"]) == {str(fp32), str(int8)}
    for v in im["models"].values():
        assert v["inference_ms"] > 0 and 0 < v["inference_share"] < 1
        assert v["total_ms"] == pytest.approx(im["read_ms"] + im["decode_ms"] + im["resize_ms"] + v["inference_ms"])


def test_bench_table_names_models_and_provider(models):
    fp32, int8, _ = models
    r = cli("bench", fp32, int8, "--batch", "2", "--rounds", "2")
    assert r.exit_code == 0, r.output
    lines = r.stdout.splitlines()
    assert any(line.startswith("model.onnx ") and "float32" in line and "CPUExecutionProvider" in line for line in lines)
    assert any(line.startswith("model.int8.onnx") and "int8" in line for line in lines)
    assert sum(1 for line in lines if line.split()[:2] in (["model.onnx", "2"], ["model.int8.onnx", "2"])) == 2


def test_bench_cuda_is_never_a_silent_fallback(models):
    from edgetl.ort import cuda_usable

    if cuda_usable():
        pytest.skip("CUDA is usable here")
    r = cli("bench", models[0], "--device", "cuda", "--rounds", "1")
    assert r.exit_code == 1 and len(r.output.strip().splitlines()) == 1 and "CUDA provider cannot load" in r.output


def test_bench_rejects_bad_lists_and_non_models(models, tiny_onnx):
    r = cli("bench", models[0], "--batch", "1,x")
    assert r.exit_code == 2 and "comma list" in r.output
    r = cli("bench", tiny_onnx, "--rounds", "1")
    assert r.exit_code == 1 and "not a fused model" in r.output


def test_bench_openvino_names_what_ran(models):
    pytest.importorskip("openvino")
    r = cli("bench", models[0], models[1], "--device", "openvino", "--batch", "2", "--threads", "1", "--rounds", "2",
            "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert all(x["provider"].startswith("OpenVINO CPU ") for x in out["models"] + out["results"])
    assert all(x["p50_ms"] > 0 for x in out["results"])


def test_time_interleaved_rotates_and_counts():
    calls = []
    fns = {n: (lambda n=n: calls.append(n)) for n in "abc"}
    stats = bench.time_interleaved(fns, rounds=4, warmup=2)
    assert calls[:6] == list("aabbcc")  # warm-up, then rounds whose order rotates
    assert calls[6:] == list("abc" "bca" "cab" "abc")
    assert all(s["runs"] == 4 and s["p50_ms"] <= s["p90_ms"] <= s["p99_ms"] for s in stats.values())


def test_percentiles_nearest_rank():
    s = bench.percentiles([i / 1000 for i in range(1, 101)])  # 1..100 ms
    assert (s["p50_ms"], s["p90_ms"], s["p99_ms"], s["runs"]) == (pytest.approx(50.5), pytest.approx(90),
                                                                   pytest.approx(99), 100)


def test_bench_is_torch_free(models):
    fp32, int8, photos = models
    code = ("import sys, edgetl.deploy.bench as b; "
            f"b.bench([{str(fp32)!r}, {str(int8)!r}], rounds=2, images={str(photos)!r}, memory_check=False); "
            "bad = [k for k in sys.modules if k.split('.')[0] in ('torch', 'torchvision', 'timm')]; "
            "assert not bad, bad; print('ok')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr
