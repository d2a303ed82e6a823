import json
import shutil

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from conftest import photo
from PIL import Image

from edgetl import contract as C
from edgetl.cli import main
from edgetl.deploy import runtime
from edgetl.errors import GateRefused, ModelError
from edgetl.export import quantize as Q
from edgetl.export.graph import check_model, prepare, sha256_bytes
from edgetl.ort import session


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def synthetic(root, train=12, val=6, classes=("cats", "dogs")):
    """root/train|val/<class>/*.jpg: structured pictures with a class-dependent colour shift."""
    for split, n, seed in (("train", train, 0), ("val", val, 7)):
        for ci, cls in enumerate(classes):
            d = root / split / cls
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                img = np.asarray(photo(seed * 1000 + ci * 100 + i)).astype(np.int16)
                img[..., ci % 3] = np.clip(img[..., ci % 3] + 90, 0, 255)
                Image.fromarray(img.astype(np.uint8)).save(d / f"{i:03d}.jpg", quality=90)
    return root


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tiny_onnx):
    """(model.onnx, data) — a tiny fused model trained on a synthetic train/val folder."""
    tmp = tmp_path_factory.mktemp("quant")
    data = synthetic(tmp / "data")
    r = cli("train-head", data, "--backbone", tiny_onnx, "--cache", tmp / "cache", "-o", tmp / "out")
    assert r.exit_code == 0, r.output
    return tmp / "out" / "model.onnx", data


@pytest.fixture(autouse=True)
def short_gate(monkeypatch):
    monkeypatch.setattr(Q, "GATE_ROUNDS", 10)


@pytest.fixture(scope="module")
def int8(tiny):
    """The tiny model's int8 copy, written by the CLI (--force: a 64x64 model need not be faster)."""
    model, data = tiny
    r = cli("quantize", model, "--data", data, "--force")
    assert r.exit_code == 0, r.output
    return model.with_name("model.int8.onnx"), r


# --- the opset de-duplication ----------------------------------------------------------------------

def test_fused_model_imports_each_opset_domain_once(tiny):
    model = onnx.load(str(tiny[0]))
    domains = [o.domain or "ai.onnx" for o in model.opset_import]
    assert len(domains) == len(set(domains)) and [o.version for o in model.opset_import if o.domain == ""] == [C.OPSET]


def test_check_refuses_a_repeated_opset_domain(tiny):
    model = onnx.load(str(tiny[0]))
    check_model(model)
    model.opset_import.add(domain="", version=C.OPSET)
    with pytest.raises(ModelError, match="imports opset domain 'ai.onnx' twice"):
        check_model(model)
    model.opset_import[-1].domain = "ai.onnx"  # the same domain under its other name
    with pytest.raises(ModelError, match="twice"):
        check_model(model)


def test_prepare_keeps_the_outputs(tiny):
    model = onnx.load(str(tiny[0]))
    prepared = prepare(model)
    check_model(prepared)
    x = np.random.default_rng(0).integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)
    a = session(model.SerializeToString(), "cpu").run(None, {C.IMAGE: x})[0]
    b = session(prepared.SerializeToString(), "cpu").run(None, {C.IMAGE: x})[0]
    assert np.abs(a - b).max() <= C.FUSE_ATOL


# --- int8 -----------------------------------------------------------------------------------------

def test_int8_is_written_beside_the_model_with_its_figures(tiny, int8):
    (model, _), (path, r) = tiny, int8
    wrote, nxt = r.stdout.strip().splitlines()
    assert wrote.startswith(f"wrote {path} (int8, ") and "val accuracy int8 " in wrote and "vs float32 " in wrote
    assert "top-1 agreement" in wrote and "x)" in wrote
    assert nxt == f"next: edgetl bench {model} {path}"
    q = onnx.load(str(path))
    check_model(q)
    assert {n.op_type for n in q.graph.node} >= {"QuantizeLinear", "DequantizeLinear", "Conv"}
    (inp,), (out,) = q.graph.input, q.graph.output
    assert (inp.name, inp.type.tensor_type.elem_type) == (C.IMAGE, onnx.TensorProto.UINT8)
    assert (out.name, out.type.tensor_type.elem_type) == (C.PROBABILITIES, onnx.TensorProto.FLOAT)
    meta, fmeta = ({p.key: p.value for p in m.metadata_props} for m in (q, onnx.load(str(model))))
    for key in (C.KEY_CLASSES, C.KEY_PREPROCESS, C.KEY_BACKBONE_SHA256, C.KEY_HEAD_SHA256, C.KEY_FINGERPRINT):
        assert meta[key] == fmeta[key]
    assert meta[C.KEY_FORMAT] == C.FORMAT_MODEL and meta[C.KEY_PRECISION] == "int8"
    assert meta[C.KEY_SOURCE_SHA256] == sha256_bytes(model.read_bytes())
    cal = json.loads(meta[C.KEY_CALIBRATION])
    assert cal["method"] == "minmax" and cal["images"] == 24 and cal["per_channel"] is True  # all 24 training photos
    gate = json.loads(meta[C.KEY_GATE])
    assert gate["validation_images"] == 12 and gate["forced"] in (True, False)
    assert 0 <= gate["agreement"] <= 1 and gate["latency"]["float32_ms"] > 0 and gate["latency"]["int8_ms"] > 0
    assert gate["float32_accuracy"] - gate["int8_accuracy"] == pytest.approx(gate["accuracy_drop"])


def test_run_predict_evaluate_load_an_int8_model(tiny, int8):
    (model, data), (path, _) = tiny, int8
    m = runtime.load_model(path)
    assert m.classes == ["cats", "dogs"] and m.metadata[C.KEY_PRECISION] == "int8"
    r = cli("evaluate", path, data, "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["n"] == 12
    r = cli("predict", path, data / "val", "--format", "json")
    assert r.exit_code == 0, r.output
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert len(rows) == 12 and all(row["top"][0]["class"] in m.classes for row in rows)
    float_rows = [json.loads(line) for line in cli("predict", model, data / "val", "--format", "json").stdout.splitlines()]
    agree = np.mean([a["top"][0]["class"] == b["top"][0]["class"] for a, b in zip(rows, float_rows)])
    assert agree >= 0.75
    r = cli("run", "--model", path, "--source", data / "val" / "cats", "--headless")
    assert r.exit_code == 0, r.output
    frames = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    assert len(frames) == 6 and all(f["label"] in m.classes for f in frames)


def test_an_int8_model_is_not_quantized_again(int8, tiny):
    r = cli("quantize", int8[0], "--data", tiny[1], "-o", int8[0].with_name("again.onnx"))
    assert r.exit_code == 1 and "is already int8" in r.output and len(r.output.strip().splitlines()) == 1
    assert not int8[0].with_name("again.onnx").exists()


@pytest.fixture
def black_calibration(tiny, tmp_path):
    """The tiny model's validation photos, and one black photo per class as its training side."""
    bad = tmp_path / "bad"
    shutil.copytree(tiny[1] / "val", bad / "val")
    for cls in ("cats", "dogs"):
        (bad / "train" / cls).mkdir(parents=True)
        Image.new("RGB", (80, 80)).save(bad / "train" / cls / "black.jpg")
    return bad


def test_calibration_on_a_black_photo_is_refused_and_writes_nothing(tiny, black_calibration, tmp_path):
    """Calibrated on a single black photo, int8 collapses: refused after trying float nodes."""
    out = tmp_path / "out"
    out.mkdir()
    r = cli("quantize", tiny[0], "--data", black_calibration, "--calib-images", 1, "-o", out / "m.int8.onnx")
    assert r.exit_code == 1, r.output
    err = r.output.strip().splitlines()[-1]
    assert err.startswith("Error: int8 refused: val accuracy ") and "vs float32 " in err and "nothing written" in err
    assert "also with the first conv, the head and " in err and " depthwise convs kept in float" in err
    assert list(out.iterdir()) == []
    with pytest.raises(GateRefused) as e:
        Q.quantize_model(tiny[0], black_calibration, calib_images=1)
    s = e.value.summary
    assert len(s["attempts"]) >= 2 and all(a["accuracy_drop"] > 0.01 for a in s["attempts"])
    assert s["calibration"]["images"] == 1 and s["passed"] is False


def test_max_drop_decides(tiny, black_calibration, tmp_path):
    """The same collapsed int8: refused at --max-drop 0, accepted (then forced past speed) at --max-drop 1."""
    out = tmp_path / "m.onnx"
    with pytest.raises(GateRefused, match=r"> --max-drop 0\.0\)"):
        Q.quantize_file(tiny[0], black_calibration, out, max_drop=0.0)
    assert not out.exists()
    r, _ = Q.quantize_file(tiny[0], black_calibration, out, max_drop=1.0, force=True)
    assert out.exists() and r.summary["accuracy_drop"] > 0.01
    assert r.summary["attempts"][0]["kept_float"] == "the first conv and the head"


def test_not_faster_is_refused_unless_forced(tiny, tmp_path):
    model, data = tiny
    out = tmp_path / "m.int8.onnx"
    with pytest.raises(GateRefused, match=r"^int8 is not faster here: .* nothing written \(--force writes it anyway\)$"):
        Q.quantize_file(model, data, out, min_speedup=1e9)
    assert not out.exists()
    r, path = Q.quantize_file(model, data, out, min_speedup=1e9, force=True)
    assert path == out and out.read_bytes() == r.data
    assert r.summary["forced"] is True and r.summary["passed"] is False
    assert json.loads(runtime.load_model(out).metadata[C.KEY_GATE])["forced"] is True


def test_no_validation_photos_is_one_line(tiny, tmp_path):
    model, data = tiny
    only_train = tmp_path / "d"
    shutil.copytree(data / "train", only_train / "train")
    r = cli("quantize", model, "--data", only_train)
    assert r.exit_code == 1 and len(r.output.strip().splitlines()) == 1
    assert r.output.startswith("Error: no validation photos to check the int8 model on")


def test_library_api_writes_nothing(tiny):
    model, data = tiny
    before = sorted(p.name for p in model.parent.iterdir())
    r = Q.quantize_model(onnx.load(str(model)), data, force=True)
    assert sorted(p.name for p in model.parent.iterdir()) == before
    s = r.summary
    assert s["precision"] == "int8" and s["source_sha256"] == sha256_bytes(model.read_bytes())
    assert set(s) >= {"float32", "int8", "accuracy_drop", "agreement", "latency", "calibration", "attempts"}
    assert s["int8"]["n"] == s["float32"]["n"] == 12 and len(s["int8"]["confusion_matrix"]) == 2


def test_unwritable_output_fails_before_the_work(tiny, tmp_path):
    model, data = tiny
    (tmp_path / "file").write_text("x")
    r = cli("quantize", model, "--data", data, "-o", tmp_path / "file" / "m.onnx")
    assert r.exit_code == 1 and "cannot create output folder" in r.output
    r = cli("quantize", model, "--data", data, "-o", model)
    assert r.exit_code == 1 and "would overwrite the float32 model" in r.output


# --- fp16 -----------------------------------------------------------------------------------------

def test_fp16_keeps_uint8_in_float32_out_and_agrees(tiny, tmp_path):
    model, data = tiny
    r, path = Q.quantize_file(model, data, tmp_path / "m.fp16.onnx", precision="fp16", device="cpu", force=True)
    q = onnx.load(str(path))
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in q.graph.initializer)
    (inp,), (out,) = q.graph.input, q.graph.output
    assert inp.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert out.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert r.summary["agreement"] == 1.0 and r.summary["calibration"] is None
    m, f = runtime.load_model(path, "cpu"), runtime.load_model(model, "cpu")
    assert m.metadata[C.KEY_PRECISION] == "fp16"
    x = np.random.default_rng(1).integers(0, 256, (4, 64, 64, 3), dtype=np.uint8)
    assert np.abs(m.probabilities(x) - f.probabilities(x)).max() < 1e-2


# --- the real default backbone ----------------------------------------------------------------------

@pytest.mark.slow
def test_lite0_int8_on_real_photos_drops_at_most_one_point(lite0_onnx, real_folder, tmp_path):
    """train-head --int8: the int8 copy goes through the same gate and lands in the same output set."""
    _, data = real_folder
    out = tmp_path / "out"
    r = cli("train-head", data, "--backbone", lite0_onnx, "--cache", tmp_path / "cache", "-o", out, "--int8")
    assert r.exit_code == 0, r.output
    prepared = prepare(onnx.load(str(out / "model.onnx")))
    ops = {n.op_type for n in prepared.graph.node}
    assert not ops & {"Shape", "Pad", "Gather"}, ops  # "same" padding folded into the convolutions
    summary = json.loads((out / "metrics.json").read_text())
    s = summary["int8"]
    assert s["written"] and (out / "model.int8.onnx").exists(), s  # about 2.5x faster here: far above the gate
    n_train = sum(summary["counts"]["train"].values())
    assert s["validation"]["images"] == summary["metrics"]["n"] and s["calibration"]["images"] == min(200, n_train)
    assert s["accuracy_drop"] <= 0.01 and s["agreement"] >= 0.97
    assert s["calibration"]["kept_float"]["what"] == "the first conv and the head"
    assert s["calibration"]["kept_float"]["nodes"][-1].startswith("head/")
    assert "## int8 copy\n`model.int8.onnx`: val accuracy int8" in (out / "MODEL_CARD.md").read_text()
    assert f"wrote {out / 'model.int8.onnx'}: val accuracy int8" in r.output
