"""Warnings that name every weak spot where the number is shown: imbalance (what it is and what training did
about it) and every class with few validation photos, in train-head and in evaluate."""

from click.testing import CliRunner

from edgetl.cli import main
from edgetl.quality import metrics as M


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_imbalance_and_every_small_class_are_named_by_train_head_and_evaluate(make_dataset, tiny_onnx, tmp_path):
    data = make_dataset({"Tigger": 15, "Misty": 15, "neither": 160})
    out = tmp_path / "out"
    r = cli("train-head", data, "--backbone", tiny_onnx, "--cache", tmp_path / "c", "-o", out)
    assert r.exit_code == 0, r.output
    imbalance = [line for line in r.output.splitlines() if "imbalanced training photos" in line]
    assert len(imbalance) == 1 and "10.7:1" in imbalance[0] and "'neither'" in imbalance[0], r.output
    assert "--balance weighted" in imbalance[0] and "balanced accuracy is the number to watch" in imbalance[0]
    small = [line for line in r.output.splitlines() if "small validation set" in line]
    assert len(small) == 1 and "of 'Misty'" in small[0] and "of 'Tigger'" in small[0], r.output
    ev = cli("evaluate", out / "model.onnx", data)
    assert ev.exit_code == 0, ev.output
    assert any("imbalanced training photos, 10.7:1" in line for line in ev.output.splitlines()), ev.output
    assert any("of 'Misty'" in line and "of 'Tigger'" in line for line in ev.output.splitlines()), ev.output
    none = cli("train-head", data, "--backbone", tiny_onnx, "--cache", tmp_path / "c", "-o", tmp_path / "o2",
               "--balance", "none")
    assert "training did nothing about it (--balance none)" in none.output, none.output


def test_balanced_folders_get_no_imbalance_warning():
    assert M.imbalance_warnings({"a": 10, "b": 25}) == []  # 2.5:1 is below the bound
    assert M.imbalance_warnings({"a": 0, "b": 30}) == []  # an empty class says nothing about balance
    [line] = M.imbalance_warnings({"a": 10, "b": 30}, "sampler")
    assert "3.0:1" in line and "class-balanced batches" in line


def test_the_small_set_warning_names_every_small_class_up_to_a_bound():
    classes = [f"c{i}" for i in range(14)]
    y = [i for i in range(14) for _ in range(2)]
    [line] = [w for w in M.warnings(M.metrics(y, y, classes)) if w.startswith("small validation set")]
    assert line.count(" of 'c") == M.MAX_NAMED and "and 4 more classes" in line
