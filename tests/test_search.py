"""Choosing by measurement: the backbone sweep and the pieces of the fine-tuning recipe."""

import json

import numpy as np
import torch
from click.testing import CliRunner

from edgetl.cli import main
from edgetl.train import sweep as sw
from edgetl.train.finetune import _Ema, _Mixer, llrd_groups
from edgetl.train.heads import HeadConfig, loss_fn


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def rows(*specs):
    return [sw.Row(name, "1x1", acc, acc, 100, ms, 1.0, 1.0) for name, acc, ms in specs]


def test_pareto_front_and_recommendation():
    r = rows(("fast", 0.90, 5.0), ("mid", 0.945, 10.0), ("slow", 0.95, 20.0), ("bad", 0.90, 30.0))
    sw.mark_pareto(r)
    assert [x.pareto for x in r] == [True, True, True, False]
    name, why = sw.recommend(r)
    assert name == "mid" and "within 1 point" in why and "2.00x faster" in why  # 0.5 point less, twice as fast
    r = rows(("fast", 0.90, 5.0), ("slow", 0.95, 20.0))
    sw.mark_pareto(r)
    name, why = sw.recommend(r)
    assert name == "slow" and "the most accurate" in why and "5.0 points" in why


def test_sweep_command_writes_table_plot_and_recommendation(tmp_path, make_dataset, tiny_onnx, tiny_backbone):
    from edgetl import backbones
    from edgetl.export import torch_onnx

    state = {k: v + 0.01 if v.is_floating_point() else v for k, v in tiny_backbone.model.state_dict().items()}
    torch.save(state, tmp_path / "w.pth")
    other = tmp_path / "other.onnx"
    torch_onnx.export_backbone(backbones.get("tiny_test", str(tmp_path / "w.pth")), other)
    data = make_dataset({"a": 10, "b": 10})
    out = tmp_path / "sweep"
    r = cli("sweep", data, "--backbones", f"{tiny_onnx},{other}", "--cache", tmp_path / "c", "-o", out)
    assert r.exit_code == 0, r.output
    s = json.loads((out / "sweep.json").read_text())
    assert [x["backbone"] for x in s["rows"]] == [str(tiny_onnx), str(other)]
    assert all(x["n_val"] == 4 and x["latency_ms"] > 0 for x in s["rows"])
    assert s["recommended"] in (str(tiny_onnx), str(other)) and f"recommended: {s['recommended']}" in r.output
    assert (out / "sweep.png").stat().st_size > 5000


def test_soft_targets_equal_hard_targets_when_one_hot():
    y = torch.tensor([0, 1, 2, 2, 2, 2])
    logits = torch.randn(6, 3, generator=torch.Generator().manual_seed(0))
    f = loss_fn(HeadConfig(), y.numpy(), 3, "cpu")
    assert torch.allclose(f(logits, y), f(logits, torch.nn.functional.one_hot(y, 3).float()), atol=1e-6)


def test_mixer_mixes_images_and_labels_consistently():
    x = torch.stack([torch.full((8, 8, 3), v, dtype=torch.uint8) for v in (0, 200)])
    y = torch.tensor([0, 1])
    mixed, soft = _Mixer(0.4, 0.0, 2, seed=3)(x, y)
    assert torch.allclose(soft.sum(1), torch.ones(2))
    lam = float(soft[0, 0])  # sample 0 keeps lam of class 0 (itself) when it drew the other as partner
    assert abs(float(mixed[0].float().mean()) - (lam * 0 + (1 - lam) * 200)) <= 1 or lam == 1.0
    cut, soft = _Mixer(0.0, 1.0, 2, seed=4)(x, y)
    share = float((cut[0] == 200).float().mean())  # the pasted patch's share of pixels
    assert abs(share - float(soft[0, 1])) < 1e-6


def test_ema_follows_the_weights_slowly():
    m = torch.nn.Linear(2, 1)
    ema = _Ema(m, 0.9)
    with torch.no_grad():
        m.weight.add_(1.0)
    before = ema.model.weight.clone()
    ema.update(m)
    assert torch.allclose(ema.model.weight, 0.9 * before + 0.1 * m.weight)


def test_layerwise_lr_decays_from_the_top(tiny_backbone):
    import copy

    features = copy.deepcopy(tiny_backbone.model)
    head = torch.nn.Linear(tiny_backbone.dim, 2)
    groups = llrd_groups(None, features, head, 1e-3, 0.5)
    lrs = [g["lr"] for g in groups]
    assert lrs[-1] == 1e-3 and all(a > b for a, b in zip(lrs[:-2], lrs[1:-1]))
    n_params = sum(len(g["params"]) for g in groups)
    assert n_params == len(list(features.parameters())) + len(list(head.parameters()))


def test_candidates_are_compared_on_the_folds_both_ran():
    from edgetl.train.search import Row, best

    cheap, dear, other = Row("cheap", 1), Row("dear", 100), Row("other", 1)
    for bal in (0.95, 1.0, 1.0, 1.0, 1.0):  # cheap: 0.99 over 5 folds, but 0.95 on the first
        cheap.add(1.0, (bal, bal, 0.1), 50)
    dear.add(100.0, (0.98, 0.98, 0.2), 50)  # one fold only: better than cheap on that fold
    for _ in range(5):
        other.add(1.0, (0.97, 0.97, 0.05), 50)
    assert cheap.folds == 5 and np.isclose(cheap.balanced_accuracy, 0.99) and cheap.seconds == 5.0
    assert best([cheap, other]) is cheap  # 0.99 vs 0.97 over the same five folds
    assert best([cheap, dear]) is dear  # 0.98 vs 0.95 on the one fold both ran, not 0.99 vs 0.98
    tie = Row("tie", 1)
    for bal in (0.95, 1.0, 1.0, 1.0, 1.0):
        tie.add(1.0, (bal, bal, 0.05), 50)
    assert best([cheap, tie]) is tie  # equal accuracy: the lower loss wins
    assert best([Row("untried", 1)]) is None


def test_folds_validate_every_group_once():
    import types

    from edgetl.data.split import folds

    labels = ["a"] * 12 + ["b"] * 7 + ["c"]  # c: a single photo, always trained on
    ds = types.SimpleNamespace(classes=["a", "b", "c"], items=[types.SimpleNamespace(label=x) for x in labels])
    keys = [bytes([i]) for i in range(20)]
    keys[1] = keys[0]  # byte-identical pair: validated together
    fs = folds(ds, keys, list(range(20)), 5, seed=3)
    assert len(fs) == 5
    vals = [i for f in fs for i in f.val]
    assert sorted(vals) == list(range(19))  # every photo but the single one, once
    for f in fs:
        assert sorted(f.train + f.val) == list(range(20)) and 19 in f.train
        assert (0 in f.val) == (1 in f.val)
        assert {labels[i] for i in f.train} == {"a", "b", "c"}
    assert [f.val for f in folds(ds, keys, list(range(20)), 5, seed=3)] == [f.val for f in fs]
    assert [f.val for f in folds(ds, keys, list(range(20)), 5, seed=4)] != [f.val for f in fs]


def test_one_standard_error_rule_prefers_training_less():
    from edgetl.train.search import CANDIDATES, Row, choose

    head, mlp, top2, full = (next(c for c in CANDIDATES if c.name == n) for n in
                             ("linear head", "mlp head", "last 2 blocks + linear head", "whole network, augmented"))

    def rows(head_bal, full_bal, photos):
        rs = {c: Row(c.name, 1) for c in (head, mlp, top2, full)}
        for _ in range(5):
            rs[head].add(1.0, (head_bal, head_bal, 0.2), photos)
            rs[mlp].add(1.0, (head_bal - 0.01, head_bal - 0.01, 0.1), photos)
        for _ in range(3):
            rs[top2].add(10.0, (head_bal, head_bal, 0.15), photos)
        rs[full].add(100.0, (full_bal, full_bal, 0.1), photos)
        return rs

    # 50 photos a fold: 0.965 vs 0.98 is inside one standard error (sqrt(.98 * .02 / 50) = 0.0198): the head
    r, why = choose(rows(0.965, 0.98, 50))
    assert r.candidate == "linear head" and "within one standard error (0.020)" in why
    # 600 photos a fold: 0.76 vs 0.80 is 2.4 standard errors (0.0163) apart: the whole network
    r, why = choose(rows(0.76, 0.80, 600))
    assert r.candidate == "whole network, augmented" and why == "the best"
    # the heads compare on their means only: linear (0.96) over mlp (0.95) despite mlp's lower loss
    rs = rows(0.96, 0.5, 50)
    assert choose(rs)[0] is rs[head]
