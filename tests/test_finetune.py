import json

import numpy as np
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner

from edgetl import backbones
from edgetl import contract as C
from edgetl.cli import main
from edgetl.data.preprocess import augment_view, decode_bgr, load_image
from edgetl.deploy import runtime
from edgetl.export.stages import CutError, stages, verified_stages
from edgetl.spec import Spec
from edgetl.train.auto import AUTO_ALL_FROM, AUTO_HEAD_BELOW, choose_regime
from edgetl.train.cut import cut_index, freeze_bn, top_and_head


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from conftest import photo
    from PIL import Image

    root = tmp_path_factory.mktemp("ft") / "data"
    for ci, cls in enumerate(["a", "b"]):
        (root / cls).mkdir(parents=True)
        for i in range(12):
            img = np.asarray(photo(ci * 100 + i)).astype(np.int16)
            img[..., ci] = np.clip(img[..., ci] + 90, 0, 255)
            Image.fromarray(img.astype(np.uint8)).save(root / cls / f"{i}.jpg")
    return root


def test_cut_points_reproduce_the_backbones(tmp_path):
    import torchvision

    for name in ("tiny_test", "efficientnet_lite0"):
        st = verified_stages(backbones.get(name))
        assert len(st.blocks) == {"tiny_test": 5, "efficientnet_lite0": 7}[name]
    for arch in ("resnet18", "mobilenet_v3_small"):
        torch.save(torchvision.models.get_model(arch, weights=None).state_dict(), tmp_path / f"{arch}.pth")
        bb = backbones.get(f"torchvision:{arch}", str(tmp_path / f"{arch}.pth"))
        assert len(verified_stages(bb).blocks) >= 4


def test_timm_stage_models_and_unknown_structures():
    import timm

    conv = timm.create_model("test_convnext", num_classes=0).eval()
    st = stages(conv)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        y = st.stem(x)
        for b in st.blocks:
            y = b(y)
        assert torch.allclose(st.tail(y), conv(x), atol=1e-5)
    with pytest.raises(CutError, match="no known cut points for VisionTransformer"):
        stages(timm.create_model("test_vit", num_classes=0))


def test_unfreeze_more_blocks_than_exist(data, tmp_path, tiny_onnx):
    r = cli("train-head", data, "--backbone", tiny_onnx, "--cache", tmp_path / "c", "-o", tmp_path / "o",
            "--unfreeze", "9")
    assert r.exit_code == 1
    assert r.output.strip().splitlines()[-1] == "Error: --unfreeze 9: tiny_test has 5 blocks; use 0..5 or all"
    assert not (tmp_path / "o").exists() or not list((tmp_path / "o").iterdir())
    assert cli("train-head", data, "--backbone", tiny_onnx, "--unfreeze", "some").exit_code == 2


def test_unfreeze_2_fuses_and_evaluates_exactly(data, tmp_path, tiny_onnx):
    out = tmp_path / "o"
    r = cli("train-head", data, "--backbone", tiny_onnx, "--cache", tmp_path / "c", "-o", out, "--unfreeze", "2")
    assert r.exit_code == 0, r.output
    assert {"trunk.onnx", "top.onnx", "model.onnx"} <= {p.name for p in out.iterdir()}
    reported = json.loads((out / "metrics.json").read_text())["metrics"]
    split = json.loads((out / "split.json").read_text())
    model = runtime.load_model(out / "model.onnx")
    files = [data / p for p in split["val"]]
    pred = model.predict_files(files).argmax(1)
    assert reported["correct"] == int(sum(p == model.classes.index(f.parent.name) for p, f in zip(pred, files)))
    # fused vs trunk-then-top, on batch sizes other than the export's
    trunk = ort.InferenceSession(str(out / "trunk.onnx"), providers=["CPUExecutionProvider"])
    top = ort.InferenceSession(str(out / "top.onnx"), providers=["CPUExecutionProvider"])
    for n in (1, 3):
        x = np.stack([load_image(f, model.spec) for f in files[:n]])
        chained = top.run(None, {C.ACTIVATION: trunk.run(None, {C.IMAGE: x})[0]})[0]
        assert np.abs(model.probabilities(x) - chained).max() <= 1e-4
    cut = json.loads(model.metadata[C.KEY_CUT])
    assert cut["unfreeze"] == 2 and cut["block"] == 3 and cut["blocks"] == 5
    # the activation cache: float16, its own namespace (one pass: no full-backbone embeddings made), reused
    ns = [json.loads(p.read_text()) for p in (tmp_path / "c").glob("*/namespace.json")]
    assert [n["dtype"] for n in ns] == ["float16"] and ns[0]["fingerprint"] == cut_fp(model)
    again = cli("train-head", data, "--backbone", tiny_onnx, "--cache", tmp_path / "c", "-o", tmp_path / "o2",
                "--unfreeze", "2")
    assert "trunk activations: 0 new" in again.output


def test_cache_of_another_cut_point_is_refused(data, tmp_path, tiny_onnx):
    r = cli("train-head", data, "--backbone", tiny_onnx, "--cache", tmp_path / "c", "-o", tmp_path / "o",
            "--unfreeze", "1")
    assert r.exit_code == 0, r.output
    trunk_ns = next(p.parent for p in (tmp_path / "c").glob("*/namespace.json")
                    if json.loads(p.read_text())["dtype"] == "float16")
    r = cli("embed", data, "--backbone", tiny_onnx, "--cache", trunk_ns)
    assert r.exit_code == 1 and "holds embeddings of backbone tiny_test" in r.output


def test_cache_size_is_refused_when_the_disk_is_too_small(data, tmp_path, tiny_onnx, monkeypatch):
    import collections

    import edgetl.data.embed as embed_mod

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(embed_mod.shutil, "disk_usage", lambda p: usage(10**6, 10**6 - 1000, 1000))
    r = cli("train-head", data, "--backbone", tiny_onnx, "--cache", tmp_path / "c", "-o", tmp_path / "o",
            "--unfreeze", "1")
    assert r.exit_code == 1 and "the cache would need" in r.output and "GB free" in r.output


def test_unfreeze_all_with_augmentation(data, tmp_path, tiny_onnx):
    out = tmp_path / "o"
    r = cli("train-head", data, "--backbone", tiny_onnx, "--cache", tmp_path / "c", "-o", out, "--unfreeze", "all",
            "--augment", "1", "--epochs", "3")
    assert r.exit_code == 0, r.output
    assert "ETA" in r.output and "whole network fine-tuned with augmentation" in r.output
    tuned = {p.key: p.value for p in __import__("onnx").load(str(out / "backbone.onnx")).metadata_props}
    assert tuned[C.KEY_WEIGHTS_SHA256] != backbones.get("tiny_test").weights_sha256  # the weights moved
    ev = cli("evaluate", out / "model.onnx", data, "--split", "all")
    assert ev.exit_code == 0


def test_unfreeze_all_with_a_recipe(data, tmp_path, tiny_onnx):
    out = tmp_path / "o"
    r = cli("train-head", data, "--backbone", tiny_onnx, "--cache", tmp_path / "c", "-o", out, "--unfreeze", "all",
            "--augment", "1", "--epochs", "2", "--recipe", "warmup,ema=0.9,mixup,cutmix,trivialaugment,llrd")
    assert r.exit_code == 0, r.output
    recipe = "warmup=0.1,ema=0.9,mixup=0.2,cutmix=1,trivialaugment,llrd=0.7"
    assert json.loads((out / "metrics.json").read_text())["regime"].endswith(f"(recipe {recipe})")
    head = {p.key: p.value for p in __import__("onnx").load(str(out / "model.onnx")).metadata_props}[C.KEY_HEAD]
    assert json.loads(head)["recipe"] == recipe
    for args, words in ((["--unfreeze", "all", "--recipe", "ema=2"], "outside"),
                        (["--unfreeze", "all", "--recipe", "dropblock"], "unknown step 'dropblock'"),
                        (["--recipe", "ema"], "use it with --unfreeze all")):
        bad = cli("train-head", data, "--backbone", tiny_onnx, "--cache", tmp_path / "c", "-o", tmp_path / "x", *args)
        assert bad.exit_code == 2 and words in bad.output and len(bad.output.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()


def test_augmented_views_are_seeded_and_cached(data, tmp_path, tiny_onnx):
    spec = Spec.from_crop_pct((64, 64), 0.875, (0.5,) * 3, (0.5,) * 3)
    bgr = decode_bgr((data / "a" / "0.jpg").read_bytes())
    a, b, c = (augment_view(bgr, spec, s) for s in (1, 1, 2))
    assert a.shape == (64, 64, 3) and np.array_equal(a, b) and not np.array_equal(a, c)
    r = cli("train-head", data, "--backbone", tiny_onnx, "--cache", tmp_path / "c", "-o", tmp_path / "o",
            "--augment", "2")
    assert r.exit_code == 0, r.output
    assert "augmented view 2/2" in r.output
    views = sorted(json.loads(p.read_text())["view"] for p in (tmp_path / "c").glob("*/namespace.json"))
    assert views == ["aug0", "aug1", "center"]
    r2 = cli("train-head", data, "--backbone", tiny_onnx, "--cache", tmp_path / "c", "-o", tmp_path / "o2",
             "--augment", "2")
    assert "augmented view 1/2: 0 new" in r2.output


def test_auto_rule_and_its_report(data, tmp_path, tiny_onnx):
    assert choose_regime(AUTO_HEAD_BELOW - 1)[0] == "0"
    assert choose_regime(AUTO_HEAD_BELOW)[0] == "2"
    assert choose_regime(AUTO_ALL_FROM)[0] == "all"
    out = tmp_path / "o"
    # a small budget keeps the test short: the heads still run every fold, the dear candidates what fits
    r = cli("train-head", data, "--backbone", tiny_onnx, "--cache", tmp_path / "c", "-o", out, "--unfreeze", "auto",
            "--budget", "4")
    assert r.exit_code == 0, r.output
    s = json.loads((out / "metrics.json").read_text())
    rows = s["search"]["rows"]
    from edgetl.train import search as S

    assert {row["candidate"] for row in rows} == {c.name for c in S.CANDIDATES}
    tried = [row for row in rows if row["status"] == "tried"]
    assert len(tried) >= 4 and all(0 <= row["balanced_accuracy"] <= 1 for row in tried)
    assert "linear head on several depths" in {row["candidate"] for row in tried}  # Head-to-Toe is a candidate
    inner = s["search"]["inner"]
    assert inner["photos"] == sum(s["counts"]["train"].values()) and inner["folds"] == S.FOLDS
    assert max(row["folds"] for row in tried) == S.FOLDS  # the cheap candidates ran every fold
    for row in tried:
        assert row["folds"] == len(row["per_fold"]) and np.isclose(row["balanced_accuracy"],
                                                                 np.mean([f[0] for f in row["per_fold"]]))
    best, _ = S.choose({c: S.Row(**next(row for row in rows if row["candidate"] == c.name)) for c in S.CANDIDATES})
    assert s["search"]["chosen"] == best.candidate and f"--unfreeze auto: {best.candidate} (" in r.output
    assert "## How the regime was chosen (--unfreeze auto)" in (out / "MODEL_CARD.md").read_text()


def test_auto_keeps_to_its_budget(data, tmp_path, tiny_onnx, monkeypatch):
    from edgetl.train import search as S

    slow = S.Probe(embed=0.5, top={1: 5.0, 2: 5.0, 3: 5.0}, full=5.0)  # seconds per image: only heads fit
    monkeypatch.setattr(S, "probe", lambda *a, **k: slow)
    out = tmp_path / "o"
    r = cli("train-head", data, "--backbone", tiny_onnx, "--cache", tmp_path / "c", "-o", out, "--unfreeze", "auto",
            "--budget", "1")
    assert r.exit_code == 0, r.output
    rows = {row["candidate"]: row for row in json.loads((out / "metrics.json").read_text())["search"]["rows"]}
    assert rows["linear head"]["status"] == "tried" and rows["whole network, augmented"]["status"] == "over budget"
    assert rows["last 2 blocks + linear head"]["status"] == "over budget"


def test_auto_without_photos_to_cross_validate_falls_back_on_the_rule(data, tmp_path, tiny_onnx):
    import shutil

    one = tmp_path / "one"
    for cls in ("a", "b"):
        (one / cls).mkdir(parents=True)
        shutil.copy(data / cls / "0.jpg", one / cls / "0.jpg")
    out = tmp_path / "o"
    r = cli("train-head", one, "--backbone", tiny_onnx, "--cache", tmp_path / "c", "-o", out, "--unfreeze", "auto")
    assert r.exit_code == 0, r.output
    s = json.loads((out / "metrics.json").read_text())
    assert s["search"]["rows"] == [] and s["search"]["chosen"] == "--unfreeze 0"
    assert "too few training photos to measure" in s["auto_reason"]


def test_batchnorm_statistics_stay_frozen_by_default():
    bb = backbones.get("tiny_test")
    st = stages(bb.model)
    top = top_and_head(st, cut_index(st, 2, "tiny_test"), torch.nn.Linear(bb.dim, 2))
    before = {k: v.clone() for k, v in top.state_dict().items() if "running_mean" in k}
    x = torch.randn(4, *_shape(bb, st, 3))
    for train_bn, changed in ((False, False), (True, True)):
        top.train()
        freeze_bn(top, train_bn)
        top(x)
        after = {k: v for k, v in top.state_dict().items() if "running_mean" in k}
        assert any(not torch.equal(before[k], after[k]) for k in before) == changed


def cut_fp(model):
    return model.metadata[C.KEY_FINGERPRINT]


def _shape(bb, st, k):
    with torch.no_grad():
        y = st.stem(torch.zeros(1, 3, *bb.spec.input_size))
        for b in st.blocks[:k]:
            y = b(y)
    return tuple(y.shape[1:])


def test_weights_must_match_the_exported_backbone(data, tmp_path, tiny_backbone):
    from edgetl.export import torch_onnx as export

    state = {k: v + 0.01 if v.is_floating_point() else v for k, v in tiny_backbone.model.state_dict().items()}
    torch.save(state, tmp_path / "w.pth")
    export.export_backbone(backbones.get("tiny_test", str(tmp_path / "w.pth")), tmp_path / "b.onnx")
    r = cli("train-head", data, "--backbone", tmp_path / "b.onnx", "--cache", tmp_path / "c", "-o", tmp_path / "o",
            "--unfreeze", "1")
    assert r.exit_code == 1 and "pass the same --weights FILE" in r.output
    r = cli("train-head", data, "--backbone", tmp_path / "b.onnx", "--cache", tmp_path / "c", "-o", tmp_path / "o",
            "--unfreeze", "1", "--weights", tmp_path / "w.pth")
    assert r.exit_code == 0, r.output
