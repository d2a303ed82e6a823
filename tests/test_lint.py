"""`edgetl lint`: duplicates, leakage, conflicts, label errors, outliers, sizes, unreadable files; exit status."""

import json
import shutil

import cv2
import numpy as np
import pytest
from click.testing import CliRunner
from conftest import photo
from PIL import Image

from edgetl.cli import LINT_CHECKS, main
from edgetl.quality import lint
from edgetl.train.lint import lint as run_lint


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def error_line(r) -> str:
    """The one error line of a failed command (progress lines may come before it), and no traceback."""
    errors = [line for line in r.output.splitlines() if line.startswith("Error:")]
    assert r.exit_code == 1 and len(errors) == 1 and r.output.strip().endswith(errors[0]), r.output
    assert "Traceback" not in r.output
    return errors[0]


def make_split_data(root, n_train=10, n_val=4, classes=("cats", "dogs")):
    for si, (split, n) in enumerate((("train", n_train), ("val", n_val))):
        for ci, cls in enumerate(classes):
            d = root / split / cls
            d.mkdir(parents=True)
            for i in range(n):  # a distinct photo each (str hashes vary from run to run: not a seed)
                img = np.asarray(photo(1 + 1000 * si + 100 * ci + i, size=(120, 90))).astype(np.int16)
                img[..., ci % 3] = np.clip(img[..., ci % 3] + 90, 0, 255)
                Image.fromarray(img.astype(np.uint8)).save(d / f"{split}_{i:02d}.jpg", quality=90)
    return root


def groups_with(report, *paths):
    return [g for g in report["duplicates"] if set(paths) <= {it["path"] for it in g["items"]}]


def test_exact_copies_across_the_split_are_leakage_and_fail_ci(tmp_path, tiny_onnx):
    data = make_split_data(tmp_path / "data")
    shutil.copy(data / "val/cats/val_00.jpg", data / "train/cats/copy.jpg")
    args = ["lint", data, "--backbone", tiny_onnx, "--cache", tmp_path / "c"]
    r = cli(*args, "--json")
    assert r.exit_code == 1, r.output
    report = json.loads(r.stdout)  # strict JSON on stdout, nothing else
    (g,) = groups_with(report, "val/cats/val_00.jpg", "train/cats/copy.jpg")
    assert g["kind"] == "exact" and g["leakage"] and not g["conflict"] and g["similarity"] == 1.0
    assert report["counts"]["leakage"] >= 1 and report["failed"] == ["leakage"]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("lint failed: leakage (") and last.endswith("(--fail-on leakage,conflict)")
    r = cli(*args, "--fail-on", "none")  # reported, not failed
    assert r.exit_code == 0 and "leakage" in r.stdout and "FAIL" not in r.stdout
    assert "embedded: 0 new, 29 reused" in r.stderr  # from the cache


def test_copies_under_two_classes_are_a_conflict(tmp_path, tiny_onnx):
    data = make_split_data(tmp_path / "data")
    shutil.copy(data / "train/cats/train_03.jpg", data / "train/dogs/same.jpg")
    r = cli("lint", data, "--backbone", tiny_onnx, "--cache", tmp_path / "c", "--fail-on", "conflict", "--json")
    assert r.exit_code == 1
    report = json.loads(r.stdout)
    (g,) = groups_with(report, "train/cats/train_03.jpg", "train/dogs/same.jpg")
    assert g["conflict"] and not g["leakage"] and report["failed"] == ["conflict"]
    assert r.stderr.strip().splitlines()[-1].startswith("lint failed: conflict (")


def test_class_folders_use_the_split_train_head_would_make(tmp_path, make_dataset, tiny_onnx):
    data = make_dataset({"cats": 10, "dogs": 10})
    shutil.copy(data / "cats/img_000.jpg", data / "cats/again.jpg")  # byte-identical: one side, never leakage
    report = run_lint(data, tiny_onnx, tmp_path / "c")
    assert report["split"].startswith("the split train-head would make: stratified 20% validation split")
    (g,) = groups_with(report, "cats/img_000.jpg", "cats/again.jpg")
    assert g["kind"] == "exact" and not g["leakage"] and not g["conflict"]
    assert report["counts"]["duplicate"] >= 1


def test_sizes_imbalance_and_unreadable(tmp_path, make_dataset, tiny_onnx):
    data = make_dataset({"cats": 12, "dogs": 3})
    Image.fromarray(np.asarray(photo(5, size=(50, 40)))).save(data / "cats/tiny.jpg")  # input is 64x64
    rng = np.random.default_rng(0)
    small = rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)
    cv2.imwrite(str(data / "cats/upscaled.png"), cv2.resize(small, (110, 110), interpolation=cv2.INTER_CUBIC))
    cv2.imwrite(str(data / "cats/sharp.png"), rng.integers(0, 256, (110, 110, 3), dtype=np.uint8))
    (data / "dogs/broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    report = run_lint(data, tiny_onnx, tmp_path / "c", fail_on=())
    kinds = {s["path"]: s["kind"] for s in report["small_images"]}
    assert kinds.get("cats/tiny.jpg") == "tiny" and kinds.get("cats/upscaled.png") == "upscaled"
    assert "cats/sharp.png" not in kinds and "cats/img_000.jpg" not in kinds
    assert report["imbalance"]["flagged"] and report["imbalance"]["largest"][0] == "cats"
    assert [u["path"] for u in report["unreadable"]] == ["dogs/broken.jpg"]
    assert report["counts"]["unreadable"] == 1 and report["failed"] == []
    json.loads(lint.to_json(report))


def test_detail_ratio_tells_enlarged_photos(real_photo_files):
    for p in real_photo_files[:10]:
        grey = cv2.imread(str(p), cv2.IMREAD_GRAYSCALE)
        h, w = grey.shape
        assert lint.detail_ratio(grey) > lint.UPSCALED_RATIO, p
        up = cv2.resize(cv2.resize(grey, (w // 2, h // 2), interpolation=cv2.INTER_AREA), (w, h),
                        interpolation=cv2.INTER_LINEAR)
        assert lint.detail_ratio(up) < lint.UPSCALED_RATIO, p


def test_bad_input_is_one_line(tmp_path, make_dataset, tiny_onnx):
    (tmp_path / "empty").mkdir()
    r = cli("lint", tmp_path / "empty", "--backbone", tiny_onnx, "--cache", tmp_path / "c")
    assert error_line(r) == f"Error: no images found in {tmp_path / 'empty'}"
    bad = tmp_path / "bad" / "cats"
    bad.mkdir(parents=True)
    for i in range(3):
        (bad / f"{i}.jpg").write_bytes(b"garbage")
    r = cli("lint", tmp_path / "bad", "--backbone", tiny_onnx, "--cache", tmp_path / "c")
    assert error_line(r).startswith("Error: no readable images in")
    data = make_dataset({"cats": 6, "dogs": 6})
    r = cli("lint", data, "--backbone", tiny_onnx, "--cache", tmp_path / "c", "--fail-on", "leakage,typo")
    assert "unknown check 'typo'" in error_line(r)
    r = cli("lint", data, "--backbone", tiny_onnx, "--cache", tmp_path / "c", "--fail-on", "lekage")
    assert "did you mean leakage?" in r.output
    # a cache folder that holds another backbone's embeddings
    other = tmp_path / "other"
    other.mkdir()
    (other / "namespace.json").write_text(json.dumps({"backbone": "resnet50", "fingerprint": "abc123", "view": "center"}))
    r = cli("lint", data, "--backbone", tiny_onnx, "--cache", other)
    assert "holds embeddings of backbone resnet50" in error_line(r)
    # a file that is not a backbone
    r = cli("lint", data, "--backbone", data / "cats/img_000.jpg", "--cache", tmp_path / "c")
    print(error_line(r))


def test_one_class_and_unlabelled_folders_are_linted(tmp_path, make_dataset, tiny_onnx):
    one = make_dataset({"cats": 10}, root=tmp_path / "one")
    shutil.copy(one / "cats/img_001.jpg", one / "cats/dup.jpg")
    report = run_lint(one, tiny_onnx, tmp_path / "c")
    assert "label errors not checked: the folder has one class" in report["notes"]
    assert groups_with(report, "cats/img_001.jpg", "cats/dup.jpg") and report["imbalance"] is None
    flat = tmp_path / "flat"
    flat.mkdir()
    for p in sorted((one / "cats").glob("*.jpg"))[:9]:
        shutil.copy(p, flat / p.name)
    r = cli("lint", flat, "--backbone", tiny_onnx, "--cache", tmp_path / "c", "--json")
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert report["layout"] == "flat" and report["classes"] == {} and report["label_errors"] == []


def test_html_page_is_self_contained_and_escapes_names(tmp_path, make_dataset, tiny_onnx):
    data = make_dataset({"a<b>": 8, "c&d": 8})
    shutil.copy(data / "a<b>/img_000.jpg", data / "c&d/x<script>.jpg")
    page = tmp_path / "lint.html"
    r = cli("lint", data, "--backbone", tiny_onnx, "--cache", tmp_path / "c", "--html", page)
    assert r.exit_code == 1 and f"wrote {page}" in r.stderr  # a conflict: written, then failed
    text = page.read_text()
    assert "a&lt;b&gt;" in text and "c&amp;d/x&lt;script&gt;.jpg" in text
    assert "<script" not in text and "a<b>" not in text
    assert text.count("data:image/jpeg;base64,") >= 2 and "http://" not in text and "https://" not in text


def test_fail_on_names_match_the_library():
    assert LINT_CHECKS == lint.CATEGORIES
    assert lint.parse_fail_on("none") == () and lint.parse_fail_on("all") == lint.CATEGORIES
    assert lint.parse_fail_on(" leakage, conflict ,leakage") == ("leakage", "conflict")


def test_confident_learning_flags_confident_disagreement_only():
    y = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    p = np.array([[.9, .1], [.8, .2], [.85, .15], [.1, .9],  # the 4th is labelled 0 but looks like 1
                  [.2, .8], [.1, .9], [.45, .55], [.15, .85]])
    flags, best, t = lint.confident_errors(p, y)
    assert flags.tolist() == [False, False, False, True, False, False, False, False] and best[3] == 1


@pytest.mark.slow
@pytest.mark.datasets("hymenoptera")
def test_planted_label_errors_and_duplicates_in_hymenoptera(tmp_path, hymenoptera, lite0_onnx):
    """5 % of the training labels flipped at random: lint finds >= 60 % of them at >= 50 % precision;
    photos of val/ copied into train/ (3 byte-identical, 3 resized and re-encoded): all reported as leakage."""
    import sys
    import time
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    from bench_lint import plant

    data = tmp_path / "hym"
    flipped, copies = plant(hymenoptera, data, seed=0)
    t = time.perf_counter()
    r = cli("lint", data, "--backbone", lite0_onnx, "--cache", tmp_path / "c", "--json", "--html", tmp_path / "l.html")
    seconds = time.perf_counter() - t
    assert r.exit_code == 1 and r.stderr.strip().splitlines()[-1].startswith("lint failed: leakage (6)")
    report = json.loads(r.stdout)
    flagged = {e["path"] for e in report["label_errors"]}
    found = flagged & flipped
    recall, precision = len(found) / len(flipped), len(found) / max(len(flagged), 1)
    print(f"planted: {len(flipped)} flips, {len(flagged)} flagged, recall {recall:.2f}, precision {precision:.2f}; "
          f"{seconds:.1f} s")
    assert len(flipped) == 12 and recall >= 0.6 and precision >= 0.5
    leaks = [{it["path"] for it in g["items"]} for g in report["duplicates"] if g["leakage"]]
    assert all(any(c <= g for g in leaks) for c in copies) and len(leaks) == 6
    near = [g for g in report["duplicates"] if g["kind"] == "near"]
    assert len(near) == 3 and all(g["similarity"] >= report["settings"]["near_duplicate_cosine"] for g in near)
    assert report["counts"]["conflict"] == 0
