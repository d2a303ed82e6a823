"""HTML pages: `evaluate --html` and `lint --html` are self-contained and render in a real headless browser."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from click.testing import CliRunner

from edgetl.cli import main

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from screenshot import blank, find_browser, screenshot  # noqa: E402


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, tiny_onnx):
    """A tiny model trained on 8+8 synthetic photos, its evaluate page, and a lint page of the same folder."""
    from conftest import photo

    tmp = tmp_path_factory.mktemp("pages")
    data = tmp / "data"
    for ci, cls in enumerate(("cats", "dogs <&>")):
        (data / cls).mkdir(parents=True)
        for i in range(8):
            img = cv2.cvtColor(np.asarray(photo(100 * ci + i, size=(160, 120))), cv2.COLOR_RGB2BGR)
            cv2.imwrite(str(data / cls / f"{i}.jpg"), img)
    r = cli("train-head", data, "--backbone", tiny_onnx, "--cache", tmp / "cache", "-o", tmp / "out")
    assert r.exit_code == 0, r.output
    page = tmp / "report.html"
    r = cli("evaluate", tmp / "out" / "model.onnx", data, "--split", "all", "--html", page)
    assert r.exit_code == 0, r.output
    lint_page = tmp / "lint.html"
    r = cli("lint", data, "--backbone", tiny_onnx, "--cache", tmp / "cache", "--html", lint_page, "--fail-on", "none")
    assert r.exit_code == 0, r.output
    return page, lint_page, r


def test_evaluate_page_is_self_contained(evaluated):
    page, _, _ = evaluated
    text = page.read_text()
    assert text.startswith("<!DOCTYPE html>") and "Content-Security-Policy" in text
    assert "dogs &lt;&amp;&gt;" in text and "dogs <&>" not in text
    assert not re.search(r"""(src|href)=["']?(https?:|//|file:)""", text)
    for section in ("Per class", "Confusion matrix", "Most confident mistakes"):
        assert section in text
    n_wrong = int(re.search(r"Most confident mistakes \((\d+) in all\)", text).group(1))
    assert text.count("data:image/jpeg;base64,") == min(n_wrong, 24)


def test_pages_need_no_torch(evaluated, tmp_path):
    page, _, _ = evaluated
    model = page.parent / "out" / "model.onnx"
    code = ("import sys; from edgetl.cli import main; "
            f"main(['evaluate', {str(model)!r}, {str(page.parent / 'data')!r}, '--html', {str(tmp_path / 'p.html')!r}], "
            "standalone_mode=False); "
            "bad = [k for k in sys.modules if k.split('.')[0] in ('torch', 'torchvision', 'timm')]; assert not bad, bad")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "p.html").stat().st_size > 1000


@pytest.mark.skipif(find_browser() is None, reason="chromium is not installed (apt-get install chromium; CI installs it)")
def test_pages_render_in_headless_chromium(evaluated, tmp_path):
    page, lint_page, _ = evaluated
    for p in (page, lint_page):
        copy = tmp_path / p.name  # no sibling file to lean on: the page alone
        shutil.copy(p, copy)
        png = screenshot(copy, tmp_path / f"{p.stem}.png", (1200, 900))
        img = cv2.imread(str(png))
        assert img.shape == (900, 1200, 3)
        assert blank(png) is None, blank(png)
        colourful = (img.max(axis=2).astype(int) - img.min(axis=2)) > 60  # thumbnails and shading are drawn
        assert colourful.mean() > 0.005, p
    (tmp_path / "empty.html").write_text("<!DOCTYPE html><html><body></body></html>")
    assert blank(screenshot(tmp_path / "empty.html", tmp_path / "empty.png")) is not None  # the check can fail
