"""`edgetl verify`: every available target against onnxruntime CPU float32 on the model's validation photos."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import train_tiny

from edgetl.cli import main
from edgetl.deploy import runtime, verify


@pytest.fixture(scope="module")
def model_path(tmp_path_factory, tiny_onnx, hymenoptera):
    """A tiny-backbone model trained on class folders: train-head records its validation photos in it."""
    return train_tiny(tmp_path_factory.mktemp("verifymodel"), tiny_onnx, hymenoptera / "train", 15)


def _perturbed_copy(src, dst, k: int) -> None:
    """The model with one weight changed: the bias of class k in the head's last layer, lowered by 4."""
    import onnx
    from onnx import numpy_helper

    m = onnx.load(str(src))
    producer = {o: n for n in m.graph.node for o in n.output}
    node = producer[m.graph.output[0].name]
    while node.op_type not in ("Gemm", "Add"):
        node = producer[node.input[0]]
    inits = {i.name: i for i in m.graph.initializer}
    bias = inits[node.input[2]] if node.op_type == "Gemm" else next(inits[n] for n in node.input if n in inits)
    b = numpy_helper.to_array(bias).copy()
    b.reshape(-1)[k] -= 4.0
    bias.CopyFrom(numpy_helper.from_array(b, bias.name))
    onnx.save(m, str(dst))


def test_a_planted_disagreeing_target_fails_and_is_named(model_path, tmp_path):
    src, data = model_path
    model = tmp_path / "model.onnx"
    shutil.copyfile(src, model)
    ref = runtime.load_model(model, "cpu")
    sel = runtime.select_split(ref, data)
    top = ref.predict_files([it.path for it in sel.items]).argmax(1)
    # in the int8 copy's place (its gate's bound: 1 % of the photos), the class answered most made rarer
    _perturbed_copy(src, tmp_path / "model.int8.onnx", int(np.bincount(top).argmax()))
    r = CliRunner().invoke(main, ["verify", str(model), "--data", str(data), "--targets", "int8", "--json"])
    assert r.exit_code == 1, r.output
    rep = json.loads(r.stdout)
    t = {x["target"]: x for x in rep["targets"]}["int8"]
    assert t["available"] and t["disagree"] > t["bound"] == 0
    # the photos named are exactly those where the two models' top-1 differ
    bad = runtime.load_model(tmp_path / "model.int8.onnx", "cpu")
    named = set(t["disagreeing"])
    expect = {str(it.path) for it in sel.items
              if ref.predict_files([it.path])[0].argmax() != bad.predict_files([it.path])[0].argmax()}
    assert named == expect and expect
    line = [ln for ln in r.stderr.splitlines() if ln.startswith("verify failed: int8")]
    assert line and any(p.rsplit("/", 1)[-1] in line[0] for p in expect)


def test_targets_agree_and_absent_ones_are_reported(model_path, tmp_path):
    src, data = model_path
    html = tmp_path / "verify.html"
    r = CliRunner().invoke(main, ["verify", str(src), "--data", str(data), "--targets", "all", "--html", str(html)])
    assert r.exit_code == 0, r.output
    out = r.stdout
    assert out.splitlines()[1].split()[:4] == ["target", "agree", "allowed", "max"]
    rows = {ln.split()[0]: ln for ln in out.splitlines()[2:] if ln and not ln.split()[0].endswith(":")}
    assert "cpu" in rows
    n = int(out.split(": ", 1)[1].split(" photos", 1)[0])
    assert rows["cpu"].split()[1] == f"{n}/{n}"
    for name in verify.TARGETS:  # every target: a row, or a line saying why not
        assert name in rows or f"{name}: not available: " in out
    assert "int8: not available: no model.int8.onnx beside the model" in out
    assert "verify" in html.read_text() and "not available" in html.read_text()


def test_browser_target_matches_the_reference(model_path):
    pytest.importorskip("playwright.sync_api", reason="needs the playwright package (pip install 'edgetl[web]')")
    if verify.chromium_path() is None:
        pytest.skip("no Chromium (Debian: apt-get install chromium)")
    from edgetl.deploy import web

    try:
        web.fetch_runtime()
    except web.WebError as e:
        pytest.skip(str(e))
    src, data = model_path
    r = verify.verify(src, data, "browser", limit=6)
    b = {x["target"]: x for x in r["targets"]}["browser"]
    assert b["available"], b["reason"]
    assert b["disagree"] == 0 and b["max_prob_diff"] < 1e-2 and r["failed"] == []
    assert b["cold_start_ms"] > 0 and b["latency_ms"] > 0 and "wasm" in b["runs_on"]


def test_unknown_target_is_one_line(model_path):
    src, data = model_path
    r = CliRunner().invoke(main, ["verify", str(src), "--data", str(data), "--targets", "cpu,tpu"])
    assert r.exit_code == 1 and "unknown target 'tpu'" in r.output and len(r.output.strip().splitlines()) == 1


def test_asked_for_target_that_cannot_run_fails(model_path):
    src, data = model_path
    r = CliRunner().invoke(main, ["verify", str(src), "--data", str(data), "--targets", "fp16"])
    assert r.exit_code == 1 and "fp16: asked for but not available" in r.stderr
