import onnx
from click.testing import CliRunner

from edgetl import contract as C
from edgetl.cli import main


def run(*args):
    return CliRunner().invoke(main, list(args))


def test_help_lists_the_commands():
    r = run("--help")
    assert r.exit_code == 0 and "export-backbone" in r.output and "backbones" in r.output


def test_backbones_lists_the_registry():
    r = run("backbones")
    assert r.exit_code == 0
    lines = r.output.splitlines()
    assert lines[1].split()[:3] == ["efficientnet_lite0", "1280", "224x224"]
    assert any(line.startswith("tiny_test") for line in lines)
    assert run("backbones", "nothing*").exit_code == 1


def test_unknown_backbone_is_one_line_with_close_matches():
    r = run("export-backbone", "--backbone", "efficientnet_lite9")
    assert r.exit_code == 1
    assert r.output == ("Error: unknown backbone 'efficientnet_lite9'; did you mean efficientnet_lite2, "
                        "efficientnet_lite1, efficientnet_lite0?\n")


def test_unwritable_output_folder(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        import os

        if os.access(ro, os.W_OK):  # root ignores permissions; use a path under a file instead
            (tmp_path / "file").write_text("x")
            target, expect = tmp_path / "file" / "b.onnx", "cannot create output folder"
        else:
            target, expect = ro / "b.onnx", "not writable"
        r = run("export-backbone", "--backbone", "tiny_test", "-o", str(target))
    finally:
        ro.chmod(0o700)
    assert r.exit_code == 1 and expect in r.output and len(r.output.strip().splitlines()) == 1


def test_missing_output_folder_is_created(tmp_path):
    out = tmp_path / "new" / "deeper" / "b.onnx"
    r = run("export-backbone", "--backbone", "tiny_test", "-o", str(out))
    assert r.exit_code == 0, r.output
    first, second = r.output.splitlines()
    assert first.startswith(f"wrote {out} (tiny_test, 64x64 → 256") and "max abs diff" in first
    assert second == f"next: edgetl train-head PHOTOS --backbone {out}"
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert meta[C.KEY_BACKBONE] == "tiny_test"


def test_bad_weights_file_is_one_line(tmp_path):
    (tmp_path / "w.pth").write_bytes(b"garbage")
    r = run("export-backbone", "--backbone", "tiny_test", "--weights", str(tmp_path / "w.pth"),
            "-o", str(tmp_path / "b.onnx"))
    assert r.exit_code == 1 and "weights-only checkpoint" in r.output
    assert not (tmp_path / "b.onnx").exists()
