"""Right answers on real-world data: imbalance, honest validation, duplicates, tiny sets, own output."""

import json
import random
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from edgetl.cli import main
from edgetl.quality import metrics as M
from edgetl.train.heads import HeadConfig, loss_fn


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def strict_json(path):
    def refuse(name):
        raise ValueError(f"{name} is not JSON")

    return json.loads(path.read_text(), parse_constant=refuse)


def pets_layout(pets, root, tigger: str, misty: str, n_neither: int, seed: int = 0):
    """The seed's story: 10 photos of each of two cats, many of "neither" (other breeds, cats and dogs)."""
    photos = {}
    for p in sorted(pets.glob("*/*/*.jpg")):
        photos.setdefault(p.parent.name, []).append(p)
    others = sorted(p for breed, ps in photos.items() if breed not in (tigger, misty) for p in ps)
    chosen = {"Tigger": photos[tigger], "Misty": photos[misty], "neither": random.Random(seed).sample(others, n_neither)}
    for cls, ps in chosen.items():
        (root / cls).mkdir(parents=True)
        for p in ps:
            shutil.copy(p, root / cls / p.name)
    return root


@pytest.mark.slow
@pytest.mark.datasets("pets")
@pytest.mark.parametrize("n_neither", [350, 80])
def test_imbalanced_pets_default_options_are_right(tmp_path_factory, pets, lite0_onnx, n_neither):
    cats = sorted({p.name for p in pets.glob("*/*") if p.name[0].isupper()})
    pairs = random.Random(9).sample([(a, b) for a in cats for b in cats if a < b], 3)  # not hand-picked
    cache = tmp_path_factory.getbasetemp() / "pets-cache"
    accs, bals = [], []
    for k, (a, b) in enumerate(pairs):
        work = tmp_path_factory.mktemp(f"pets{n_neither}-{k}")
        data = pets_layout(pets, work / "photos", a, b, n_neither, seed=k)
        out = work / "out"
        r = cli("train-head", data, "--backbone", lite0_onnx, "--cache", cache, "-o", out)
        assert r.exit_code == 0, r.output
        m = strict_json(out / "metrics.json")["metrics"]
        accs.append(m["accuracy"])
        bals.append(m["balanced_accuracy"])
        if k == 0:  # evaluate on the flat folder reproduces train-head's validation number exactly
            ev = cli("evaluate", out / "model.onnx", data, "--json")
            e = json.loads(ev.output)
            assert (e["correct"], e["n"], e["balanced_accuracy"]) == (m["correct"], m["n"], m["balanced_accuracy"])
            assert e["trained_on"] == 0 and "validation photos recorded in the model" in e["scored"]
    assert np.mean(accs) >= 0.93 and np.mean(bals) >= 0.85, (pairs, accs, bals)


def test_weighted_loss_keeps_smoothing_uniform():
    """Each sample's whole label-smoothed loss is weighted by its class: with one class only, weights
    change nothing; smoothing never favours the heavily weighted (rare) classes."""
    import torch
    import torch.nn.functional as F

    y_train = np.array([0] * 30 + [1] * 3 + [2] * 3)
    logits = torch.randn(36, 3, generator=torch.Generator().manual_seed(0))
    y = torch.from_numpy(y_train)
    cfg = HeadConfig(label_smoothing=0.1)
    got = loss_fn(cfg, y_train, 3, "cpu")(logits, y)
    w = torch.tensor([36 / 90, 36 / 9, 36 / 9])[y]
    per = F.cross_entropy(logits, y, reduction="none", label_smoothing=0.1)
    assert torch.allclose(got, (per * w).sum() / w.sum(), atol=1e-6)
    # uniform logits: the smoothed part is the same for every sample, whatever its class weight
    flat = torch.zeros(36, 3, requires_grad=True)
    loss_fn(cfg, y_train, 3, "cpu")(flat, y).backward()
    grad_towards = -flat.grad.sum(0)  # how much the update raises each class's logit overall
    assert torch.allclose(grad_towards, torch.zeros(3), atol=1e-6)  # balanced: no class pulled up overall
    legacy = torch.zeros(36, 3, requires_grad=True)
    loss_fn(HeadConfig(label_smoothing=0.1, balance="legacy"), y_train, 3, "cpu")(legacy, y).backward()
    assert not torch.allclose(-legacy.grad.sum(0), torch.zeros(3), atol=1e-3)  # the old composition is not


def test_duplicates_never_straddle_the_split(tmp_path, make_dataset, tiny_onnx):
    data = make_dataset({"a": 3, "b": 3})
    for cls in ("a", "b"):  # 40 copies of each photo
        for p in sorted((data / cls).iterdir()):
            for i in range(40):
                shutil.copy(p, data / cls / f"{p.stem}_copy{i}.jpg")
    out = tmp_path / "out"
    r = cli("train-head", data, "--backbone", tiny_onnx, "--cache", tmp_path / "c", "-o", out)
    assert r.exit_code == 0, r.output
    split = json.loads((out / "split.json").read_text())

    def stem(rel):  # class/img_000_copy7.jpg → class/img_000: the photo, whichever copy
        return rel.split("_copy")[0].removesuffix(".jpg")

    assert {stem(p) for p in split["train"]}.isdisjoint({stem(p) for p in split["val"]})
    assert "byte-identical copies" in r.output
    m = strict_json(out / "metrics.json")
    assert m["metrics"]["n"] == len(split["val"]) == 82  # one original of each class, with its 40 copies


def test_leakage_across_own_split_is_left_out_and_said(tmp_path, make_dataset, tiny_onnx):
    root = tmp_path / "d"
    make_dataset({"a": 6, "b": 6}, root=root, split="train")
    make_dataset({"a": 3, "b": 3}, root=root, split="val", seed=4)
    shutil.copy(root / "train" / "a" / "img_000.jpg", root / "val" / "a" / "leak.jpg")
    shutil.copy(root / "train" / "b" / "img_001.jpg", root / "val" / "b" / "leak.jpg")
    out = tmp_path / "o"
    r = cli("train-head", root, "--backbone", tiny_onnx, "--cache", tmp_path / "c", "-o", out)
    assert r.exit_code == 0, r.output
    assert "2 validation photos are byte-identical to training photos (leakage)" in r.output
    m = strict_json(out / "metrics.json")
    assert m["metrics"]["n"] == 6 and m["leaked_val_photos"] == 2
    assert "leakage" in (out / "MODEL_CARD.md").read_text()
    ev = cli("evaluate", out / "model.onnx", root, "--json")  # the val/ folder as it is: it says so
    assert json.loads(ev.output)["trained_on"] == 2 and "2 of them were used for training" in json.loads(ev.output)["scored"]


def test_one_photo_per_class_trains_without_validation_and_says_so(tmp_path, make_dataset, tiny_onnx):
    data = make_dataset({"Tigger": 1, "Misty": 1})
    out = tmp_path / "o"
    r = cli("train-head", data, "--backbone", tiny_onnx, "--cache", tmp_path / "c", "-o", out)
    assert r.exit_code == 0, r.output
    assert "no validation photos (accuracy not measured)" in r.output
    assert "classes 'Misty', 'Tigger' have a single photo each: trained on, not validated" in r.output
    s = strict_json(out / "metrics.json")
    assert s["metrics"]["accuracy"] is None and s["metrics"]["n"] == 0
    assert s["epochs_run"] == s["best_epoch"]  # no early stopping on training loss: the last epoch is kept
    assert "No validation photos" in (out / "MODEL_CARD.md").read_text()
    ev = cli("evaluate", out / "model.onnx", data)
    assert ev.exit_code == 1 and "every photo" in ev.output and "was used to train" in ev.output


def test_small_validation_set_gets_an_interval(tmp_path, make_dataset, tiny_onnx):
    data = make_dataset({"a": 3, "b": 3})
    out = tmp_path / "o"
    r = cli("train-head", data, "--backbone", tiny_onnx, "--cache", tmp_path / "c", "-o", out)
    assert r.exit_code == 0, r.output
    line = [x for x in r.output.splitlines() if x.startswith("warning: small validation set")]
    assert line and "95% interval" in line[0]
    m = strict_json(out / "metrics.json")["metrics"]
    lo, hi = m["accuracy_ci95"]
    assert m["small_val"] and lo <= m["accuracy"] <= hi and hi - lo > 0.3


def test_metrics_balanced_accuracy_baseline_and_warnings():
    classes = ["Tigger", "Misty", "neither"]
    y = [0] * 2 + [1] * 2 + [2] * 70
    always_neither = M.metrics(y, [2] * 74, classes)
    assert always_neither["accuracy"] == pytest.approx(70 / 74)
    assert always_neither["balanced_accuracy"] == pytest.approx(1 / 3)
    assert always_neither["majority_accuracy"] == pytest.approx(70 / 74)
    w = M.warnings(always_neither)
    assert any("not clearly above always answering the largest class" in x for x in w)
    assert any("'Tigger' is almost never recognised" in x for x in w)
    good = M.metrics(y, y, classes)
    assert good["balanced_accuracy"] == 1.0 and not any("largest class" in x for x in M.warnings(good))
    empty = M.metrics([], [], classes)
    assert empty["accuracy"] is None and json.loads(M.dumps(empty))["balanced_accuracy"] is None


def test_never_trains_on_its_own_output(tmp_path, make_dataset, tiny_onnx, monkeypatch):
    data = make_dataset({"a": 4, "b": 4})
    monkeypatch.chdir(data)  # `edgetl train-head .` from inside the photo folder, twice
    for _ in range(2):
        r = cli("train-head", ".", "--backbone", tiny_onnx)
        assert r.exit_code == 0, r.output
    assert strict_json(data / "exports" / "data" / "metrics.json")["classes"] == ["a", "b"]
    out = data / "zz_out"  # -o inside DATA, twice
    for _ in range(2):
        r = cli("train-head", data, "--backbone", tiny_onnx, "--cache", data / "zz_cache", "-o", out)
        assert r.exit_code == 0, r.output
    assert strict_json(out / "metrics.json")["classes"] == ["a", "b"]


def test_a_class_named_val_is_a_question(tmp_path, make_dataset, tiny_onnx):
    data = make_dataset({"cats": 3, "dogs": 3, "val": 3})
    r = cli("train-head", data, "--backbone", tiny_onnx, "--cache", tmp_path / "c", "-o", tmp_path / "o")
    assert r.exit_code == 1 and len(r.output.strip().splitlines()) == 1
    assert "val/ beside class folders (cats, dogs): is 'val' a class?" in r.output
    assert not (tmp_path / "o").exists()
