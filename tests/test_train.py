import hashlib
import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from edgetl import contract as C
from edgetl.cli import main
from edgetl.spec import Spec
from edgetl.data.preprocess import load_image
from edgetl.deploy import runtime
from edgetl.train.heads import HeadConfig, train


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.fixture
def trained(tmp_path, make_dataset, tiny_onnx):
    data = make_dataset({"Misty cat": 12, "Tigger": 12, "neither é": 12})
    out = tmp_path / "out"
    r = cli("train-head", data, "--backbone", tiny_onnx, "--cache", tmp_path / "cache", "-o", out)
    assert r.exit_code == 0, r.output
    return data, out, r


def test_train_head_writes_everything_and_evaluate_agrees(trained):
    data, out, r = trained
    assert {p.name for p in out.iterdir()} == {"head.onnx", "model.onnx", "metrics.json", "confusion.png",
                                               "curves.png", "MODEL_CARD.md", "split.json", ".edgetl"}
    metrics = json.loads((out / "metrics.json").read_text())
    reported = float(r.output.split("val accuracy ")[1].split()[0])
    assert abs(metrics["metrics"]["accuracy"] - reported) < 1e-4
    assert metrics["metrics"]["accuracy"] >= 0.5  # colour-separable classes, random tiny features (chance: 1/3)
    split = json.loads((out / "split.json").read_text())
    # evaluate on exactly the saved validation images gives exactly the reported numbers
    model = runtime.load_model(out / "model.onnx")
    val = [data / p for p in split["val"]]
    labels = [model.classes.index(p.parent.name) for p in val]
    pred = model.predict_files(val).argmax(1)
    assert np.mean(pred == np.array(labels)) == metrics["metrics"]["accuracy"]
    assert model.classes == ["Misty cat", "Tigger", "neither é"]
    assert "Misty cat" in (out / "MODEL_CARD.md").read_text()


def test_fused_model_metadata_and_parity(trained, tiny_onnx):
    data, out, _ = trained
    m = onnx.load(str(out / "model.onnx"))
    meta = {p.key: p.value for p in m.metadata_props}
    assert meta[C.KEY_FORMAT] == C.FORMAT_MODEL
    assert json.loads(meta[C.KEY_CLASSES]) == ["Misty cat", "Tigger", "neither é"]
    assert Spec.from_json(meta[C.KEY_PREPROCESS]).input_size == (64, 64)
    assert meta[C.KEY_BACKBONE_SHA256] == hashlib.sha256(onnx.load(str(tiny_onnx)).SerializeToString()).hexdigest()
    assert meta[C.KEY_HEAD_SHA256] == hashlib.sha256((out / "head.onnx").read_bytes()).hexdigest()
    assert "val_accuracy" in json.loads(meta[C.KEY_TRAINING])
    assert [i.name for i in m.graph.input] == [C.IMAGE] and [o.name for o in m.graph.output] == [C.PROBABILITIES]
    # fused vs backbone-then-head on batch sizes other than the export's
    import onnxruntime as ort

    sf, sb, sh = (ort.InferenceSession(str(p), providers=["CPUExecutionProvider"])
                  for p in (out / "model.onnx", tiny_onnx, out / "head.onnx"))
    spec = Spec.from_json(meta[C.KEY_PREPROCESS])
    files = sorted(data.rglob("*.jpg"))
    for n in (1, 5):
        x = np.stack([load_image(f, spec) for f in files[:n]])
        fused = sf.run(None, {C.IMAGE: x})[0]
        chained = sh.run(None, {C.EMBEDDING: sb.run(None, {C.IMAGE: x})[0]})[0]
        assert fused.shape == (n, 3) and np.abs(fused - chained).max() <= C.FUSE_ATOL
        assert np.allclose(fused.sum(1), 1, atol=1e-5)


def test_split_is_reproducible(tmp_path, trained, tiny_onnx):
    data, out, _ = trained
    r = cli("train-head", data, "--backbone", tiny_onnx, "--cache", tmp_path / "cache", "-o", tmp_path / "again")
    assert r.exit_code == 0
    assert (tmp_path / "again" / "split.json").read_text() == (out / "split.json").read_text()
    assert "0 new" in r.output  # the cache was reused


def test_dataset_val_split_is_used(tmp_path, make_dataset, tiny_onnx):
    root = tmp_path / "d"
    make_dataset({"a": 8, "b": 8}, root=root, split="train")
    make_dataset({"a": 3, "b": 2}, root=root, split="val", seed=5)
    out = tmp_path / "o"
    r = cli("train-head", root, "--backbone", tiny_onnx, "--cache", tmp_path / "c", "-o", out, "--head", "mlp",
            "--hidden", "32,16")
    assert r.exit_code == 0, r.output
    assert "(5/5)" in r.output or "/5)" in r.output
    assert not (out / "split.json").exists()
    m = json.loads((out / "metrics.json").read_text())
    assert m["counts"] == {"train": {"a": 8, "b": 8}, "val": {"a": 3, "b": 2}}
    assert m["head"]["hidden"] == [32, 16]
    ev = cli("evaluate", out / "model.onnx", root)
    assert ev.exit_code == 0
    assert ev.output.splitlines()[0].startswith(f"accuracy {m['metrics']['accuracy']:.4f} ({m['metrics']['correct']}/5), ")
    assert ev.output.splitlines()[1] == f"scored: the val/ folder of {root}"


@pytest.mark.slow
def test_default_backbone_on_real_photos_end_to_end(tmp_path, lite0_onnx, real_folder):
    name, data = real_folder
    out = tmp_path / name
    r = cli("train-head", data, "--backbone", lite0_onnx, "--cache", tmp_path / "c", "-o", out)
    assert r.exit_code == 0, r.output
    reported = float(r.output.split("val accuracy ")[1].split()[0])
    balanced = float(r.output.split("balanced accuracy ")[1].split(";")[0])
    diff = float(r.output.split("max abs diff ")[1].split()[0])
    # samples: 8 Tigger / 8 Misty / 70 neither, a validation set of ~18; hymenoptera: 153 validation photos
    assert (reported >= 0.94 if name == "hymenoptera" else reported >= 0.8 and balanced >= 0.7) and diff <= 1e-5
    ev = cli("evaluate", out / "model.onnx", data, "--json")
    assert ev.exit_code == 0
    assert round(json.loads(ev.output)["accuracy"], 4) == reported


def test_one_class_only(tmp_path, make_dataset, tiny_onnx):
    data = make_dataset({"only": 5})
    r = cli("train-head", data, "--backbone", tiny_onnx, "--cache", tmp_path / "c", "-o", tmp_path / "o")
    assert r.exit_code == 1 and r.output.strip() == f"Error: only one class ('only') in {data}: a classifier needs at least two"


def test_class_without_images_and_nothing_overwritten(tmp_path, trained, tiny_onnx):
    data, out, _ = trained
    before = digest(out)
    (data / "empty class").mkdir()
    r = cli("train-head", data, "--backbone", tiny_onnx, "--cache", tmp_path / "cache", "-o", out)
    assert r.exit_code == 1 and "class 'empty class' has no readable images" in r.output
    assert digest(out) == before


def test_cache_folder_of_another_backbone(tmp_path, make_dataset, tiny_onnx, lite0_onnx):
    data = make_dataset({"a": 3, "b": 3})
    r1 = cli("embed", data, "--backbone", tiny_onnx, "--cache", tmp_path / "c")
    ns_dir = r1.output.split("cache ")[1].split()[0].rstrip(";")
    r = cli("train-head", data, "--backbone", lite0_onnx, "--cache", ns_dir, "-o", tmp_path / "o")
    assert r.exit_code == 1 and "holds embeddings of backbone tiny_test" in r.output
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def test_not_an_edgetl_model(tmp_path, make_dataset, tiny_onnx):
    from onnx import TensorProto, helper

    g = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", C.OPSET)])
    m.ir_version = C.IR_VERSION
    onnx.save(m, str(tmp_path / "other.onnx"))
    data = make_dataset({"a": 1, "b": 1})
    for args in (("evaluate", tmp_path / "other.onnx", data), ("predict", tmp_path / "other.onnx", data),
                 ("evaluate", tiny_onnx, data)):
        r = cli(*args)
        assert r.exit_code == 1 and len(r.output.strip().splitlines()) == 1, r.output
        assert "not an edgetl model" in r.output or "not a fused model" in r.output
    (tmp_path / "junk.onnx").write_bytes(b"junk")
    r = cli("predict", tmp_path / "junk.onnx", data)
    assert r.exit_code == 1 and "onnxruntime cannot load it" in r.output and len(r.output) < 400


def test_fuse_command_and_foreign_head(tmp_path, trained, tiny_onnx, lite0_onnx):
    _, out, _ = trained
    r = cli("fuse", tiny_onnx, out / "head.onnx", "-o", tmp_path / "m.onnx")
    assert r.exit_code == 0 and "max abs diff" in r.output
    a = runtime.load_model(tmp_path / "m.onnx")
    assert a.classes == ["Misty cat", "Tigger", "neither é"]
    r = cli("fuse", lite0_onnx, out / "head.onnx", "-o", tmp_path / "bad.onnx")
    assert r.exit_code == 1 and "trained on another backbone" in r.output and not (tmp_path / "bad.onnx").exists()


def test_predict_formats(trained, tmp_path):
    data, out, _ = trained
    (tmp_path / "broken.jpg").write_text("nope")
    files = sorted((data / "Tigger").iterdir())[:2]
    r = cli("predict", out / "model.onnx", *files, tmp_path / "broken.jpg", "--top-k", "2", "--format", "json")
    assert r.exit_code == 0
    rows = [json.loads(line) for line in r.output.splitlines() if line.startswith("{")]
    assert [row["path"] for row in rows] == [str(f) for f in files] + [str(tmp_path / "broken.jpg")]
    assert all(len(row["top"]) == 2 and row["top"][0]["prob"] >= row["top"][1]["prob"] for row in rows[:2])
    assert "error" in rows[2]
    r = cli("predict", out / "model.onnx", str(data / "Tigger" / "*.jpg"), "--format", "csv")
    lines = r.output.strip().splitlines()
    assert lines[0] == "path,class1,prob1,error" and len(lines) == 13
    r = cli("predict", out / "model.onnx", str(data / "nothing*.png"))
    assert r.exit_code == 1 and "no such file" in r.output


def test_head_training_behaviour():
    rng = np.random.default_rng(0)
    centers = rng.normal(0, 3, (3, 16))
    y = np.repeat([0, 1, 2], [60, 20, 10])  # imbalanced
    x = centers[y] + rng.normal(0, 1, (len(y), 16))
    yv = np.repeat([0, 1, 2], 10)
    xv = centers[yv] + rng.normal(0, 1, (30, 16))
    r = train(x.astype(np.float32), y, xv.astype(np.float32), yv, 3, HeadConfig(patience=10))
    assert r.class_weights == pytest.approx([90 / 180, 90 / 60, 90 / 30])
    best = int(np.argmin(r.history["val_loss"])) + 1
    assert r.best_epoch == best and r.epochs_run <= best + 10
    import torch

    with torch.no_grad():
        acc = (r.model(torch.from_numpy(xv.astype(np.float32))).argmax(1).numpy() == yv).mean()
    assert acc >= 0.9
    r2 = train(x.astype(np.float32), y, xv.astype(np.float32), yv, 3, HeadConfig(patience=10))
    assert r2.history == r.history  # seeded
