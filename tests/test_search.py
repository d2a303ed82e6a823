"""Choosing by measurement: the backbone sweep and the pieces of the fine-tuning recipe."""

import json

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
