"""run, predict, evaluate (with --html) and bench on a device without the training stack."""

import json
import sys

import pytest
from click.testing import CliRunner

from edgetl.cli import main
from edgetl.deploy.runtime import load_model

from conftest import BLOCKED


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.mark.parametrize("name", BLOCKED)
def test_the_training_stack_cannot_be_imported(name):
    with pytest.raises(ModuleNotFoundError):
        __import__(name)


def test_predict_gives_one_answer_per_photo(model, data):
    photos = sorted(data.rglob("*.jpg"))
    r = cli("predict", model, data, "--format", "json")
    assert r.exit_code == 0, r.output
    rows = [json.loads(line) for line in r.output.splitlines()]
    assert len(rows) == len(photos)
    classes = load_model(model).classes
    assert all(row["top"][0]["class"] in classes for row in rows)


def test_evaluate_with_an_html_page(model, data, tmp_path):
    page = tmp_path / "report.html"
    r = cli("evaluate", model, data, "--split", "all", "--html", page)
    assert r.exit_code == 0, r.output
    assert "\naccuracy " in "\n" + r.output
    html = page.read_text()
    assert "<table" in html and "confusion" in html.lower()


def test_run_on_a_video_prints_a_line_per_frame(model, video):
    r = cli("run", "--model", model, "--source", video, "--headless")
    assert r.exit_code == 0, r.output
    lines = [json.loads(line) for line in r.output.splitlines() if line.startswith("{")]
    assert len(lines) == 5 and [x["frame"] for x in lines] == list(range(5))


def test_bench_measures_the_model(model, data):
    r = cli("bench", model, "--batch", "1", "--images", data, "--json")
    assert r.exit_code == 0, r.output
    result = json.loads(r.output)
    assert result["models"] and result["results"] and result["results"][0]["p50_ms"] > 0


def test_training_says_which_extra_it_needs(data, tmp_path):
    r = cli("train-head", data, "-o", tmp_path / "out")
    assert r.exit_code == 1 and "pip install 'edgetl[train]'" in r.output, r.output


def test_nothing_of_the_training_stack_was_loaded():
    assert not [m for m in sys.modules if m.split(".")[0] in BLOCKED]
