"""Heads on features from several depths (`train-head --features multi`, Head-to-Toe)."""

import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from edgetl import backbones
from edgetl import contract as C
from edgetl.deploy.runtime import load_model
from edgetl.errors import ModelError
from edgetl.export.depths import export_multi, read_layout
from edgetl.export.graph import metadata
from edgetl.ort import session
from edgetl.train.depths import candidate_sets, choose, columns, group_scale

from edgetl.cli import main


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def tiny_multi(tmp_path_factory):
    out = tmp_path_factory.mktemp("multi") / "tiny.multi.onnx"
    r = export_multi(backbones.get("tiny_test"), out)
    return out, r


def test_the_multi_depth_export_holds_the_plain_embedding_and_each_block(tiny_multi, tiny_onnx):
    path, r = tiny_multi
    meta = metadata(onnx.load(str(path)))
    depths = read_layout(meta, r.dim, path)
    assert depths[-1]["name"] == "last" and len(depths) >= 3
    assert sum(d["dim"] for d in depths) == r.dim == int(meta[C.KEY_EMBEDDING_DIM])
    assert meta[C.KEY_FINGERPRINT] != metadata(onnx.load(str(tiny_onnx)))[C.KEY_FINGERPRINT]  # its own cache
    x = np.random.default_rng(0).integers(0, 255, (3, 64, 64, 3), dtype=np.uint8)
    multi = session(path, "cpu").run(None, {C.IMAGE: x})[0]
    plain = session(tiny_onnx, "cpu").run(None, {C.IMAGE: x})[0]
    last = depths[-1]
    np.testing.assert_allclose(multi[:, last["start"]:last["start"] + last["dim"]], plain, atol=1e-4)
    assert r.max_abs_diff <= C.EXPORT_ATOL


def test_a_lying_depth_layout_is_refused(tiny_multi):
    path, r = tiny_multi
    meta = metadata(onnx.load(str(path)))
    depths = json.loads(meta[C.KEY_DEPTHS])
    depths[0]["dim"] += 1
    with pytest.raises(ModelError, match="depth layout"):
        read_layout({**meta, C.KEY_DEPTHS: json.dumps(depths)}, r.dim, path)
    with pytest.raises(ModelError, match="not a multi-depth backbone"):
        read_layout({}, r.dim, path)


def test_candidate_sets_grow_from_the_last_layer():
    depths = [{"name": f"block{i}", "start": 8 * (i - 1), "dim": 8} for i in range(1, 8)]
    depths.append({"name": "last", "start": 56, "dim": 32})
    sets = candidate_sets(depths)
    assert [[d["name"] for d in s] for s in sets][0] == ["last"]
    assert [len(s) for s in sets] == [1, 3, 5, 8]
    assert columns(sets[1]).tolist() == list(range(40, 56)) + list(range(56, 88))


def test_one_standard_error_keeps_the_smaller_set():
    scores = [{"depths": ["last"], "balanced": 0.90, "folds": 5, "photos": 1000},
              {"depths": ["b", "last"], "balanced": 0.92, "folds": 5, "photos": 1000},
              {"depths": ["a", "b", "last"], "balanced": 0.99, "folds": 5, "photos": 1000}]
    assert choose(scores)[0] == 2  # 0.99 is more than one standard error (0.003) above the others
    scores[2]["balanced"] = 0.925  # now one standard error is 0.008: 0.92 is within it, 0.90 is not
    assert choose(scores)[0] == 1
    scores[2]["photos"] = 100  # on fewer photos (0.026) even the last layer alone is close enough
    assert choose(scores)[0] == 0
    assert choose([{"depths": ["last"], "balanced": None, "folds": 0, "photos": 0}])[0] == 0


def test_each_depth_is_scaled_to_the_last_layers_size():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(0, 50, (40, 4)), rng.normal(0, 0.5, (40, 6))], 1)
    chosen = [{"name": "block1", "start": 0, "dim": 4}, {"name": "last", "start": 4, "dim": 6}]
    scale = group_scale(x, chosen)
    assert np.all(scale[4:] == 1)  # the last layer as it is: alone, today's head
    rms = [np.sqrt(np.mean(np.square(x[:, :4] * scale[:4]))), np.sqrt(np.mean(np.square(x[:, 4:])))]
    assert abs(rms[0] - rms[1]) < 1e-3 * rms[1]


def test_train_head_on_several_depths_writes_one_verified_model(make_dataset, tiny_onnx, tmp_path):
    data = make_dataset({"cat": 10, "dog": 10, "neither": 14})
    out = tmp_path / "out"
    r = cli("train-head", data, "--backbone", tiny_onnx, "--cache", tmp_path / "c", "-o", out, "--features", "multi")
    assert r.exit_code == 0, r.output
    assert "--features multi:" in r.output and "depths last:" in r.output
    s = json.loads((out / "metrics.json").read_text())
    f = s["features"]
    assert f["kind"] == "multi" and f["depths"][-1] == "last" and len(f["candidates"]) >= 2
    assert s["fuse_max_abs_diff"] <= C.FUSE_ATOL and s["parity_images"] > 0
    assert "- features: pooled outputs of" in (out / "MODEL_CARD.md").read_text()
    model = load_model(out / "model.onnx")
    assert model.classes == ["cat", "dog", "neither"]
    assert json.loads(model.metadata[C.KEY_HEAD])["features"] == "multi"
    ev = cli("evaluate", out / "model.onnx", data)
    assert ev.exit_code == 0 and f"({s['metrics']['correct']}/{s['metrics']['n']})" in ev.output, ev.output
    # a second run embeds nothing again: the multi-depth rows are in the cache
    again = cli("train-head", data, "--backbone", tiny_onnx, "--cache", tmp_path / "c", "-o", tmp_path / "o2",
                "--features", "multi")
    assert again.exit_code == 0 and " 0 new" in again.output, again.output


def test_multi_depth_features_only_with_a_frozen_backbone(make_dataset, tiny_onnx, tmp_path):
    data = make_dataset({"cat": 4, "dog": 4})
    r = cli("train-head", data, "--backbone", tiny_onnx, "--cache", tmp_path / "c", "--features", "multi",
            "--unfreeze", "2")
    assert r.exit_code == 2 and "--features multi" in r.output


def test_sweep_compares_backbones_on_several_depths(make_dataset, tiny_onnx, tmp_path):
    data = make_dataset({"cat": 8, "dog": 8})
    r = cli("sweep", data, "--backbones", tiny_onnx, "--cache", tmp_path / "c", "-o", tmp_path / "sw",
            "--features", "multi")
    assert r.exit_code == 0, r.output
    assert "recommended:" in r.output and list((tmp_path / "c" / "depths").glob("*.onnx"))
