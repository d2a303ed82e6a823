"""The package's imports run one way (docs/architecture.md): no cycle, no private name taken from another
module, edgetl imports at the top of modules, and import-linter's contracts kept (and able to break)."""

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "edgetl"
# edgetl imports allowed inside a function outside cli.py (at most 10), each with its reason.
INSIDE_FUNCTIONS: dict[tuple[str, str], str] = {}


def modules() -> dict[str, Path]:
    out = {}
    for p in sorted(PACKAGE.rglob("*.py")):
        name = ".".join(p.relative_to(ROOT).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = p
    return out


def edgetl_imports(mods: dict[str, Path]):
    """(module, imported module, name or None, inside a function?) for every edgetl import, nested ones too."""
    for mod, path in mods.items():
        tree = ast.parse(path.read_text(), str(path))

        def walk(node, in_function, mod=mod):
            for ch in ast.iter_child_nodes(node):
                inside = in_function or isinstance(ch, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
                if isinstance(ch, ast.ImportFrom) and (ch.level or (ch.module or "").startswith("edgetl")):
                    assert not ch.level, f"{mod}: relative import"
                    for a in ch.names:
                        target = f"{ch.module}.{a.name}"
                        yield mod, target if target in mods else ch.module, a.name, inside
                elif isinstance(ch, ast.Import):
                    for a in ch.names:
                        if a.name.startswith("edgetl"):
                            yield mod, a.name, None, inside
                yield from walk(ch, inside)

        yield from walk(tree, False)


def test_no_import_cycle_between_edgetl_modules():
    mods = modules()
    graph = {m: set() for m in mods}
    for src, dst, _, _ in edgetl_imports(mods):
        if dst in mods and dst != src:
            graph[src].add(dst)
    state: dict[str, int] = {}
    cycles = []

    def visit(m, stack):
        state[m] = 1
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                cycles.append(stack[stack.index(n):] + [n])
            elif n not in state:
                visit(n, stack + [n])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, f"import cycles: {cycles[:3]}"


def test_edgetl_imports_sit_at_the_top_of_modules():
    inside = {(src, dst) for src, dst, _, f in edgetl_imports(modules()) if f and src != "edgetl.cli"}
    unexplained = inside - set(INSIDE_FUNCTIONS)
    assert not unexplained, f"edgetl imports inside functions (move them to the top, or give a reason): {sorted(unexplained)}"
    assert len(inside) <= 10


def test_no_private_name_taken_from_another_module():
    taken = [(src, dst, name) for src, dst, name, _ in edgetl_imports(modules())
             if name and name.startswith("_") and not name.startswith("__") and dst != src]
    assert not taken, taken


def test_no_module_over_500_lines_but_the_cli():
    long = {p.relative_to(ROOT).as_posix(): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 500 and p.name != "cli.py"}
    assert not long, long


def lint_imports(cwd: Path) -> subprocess.CompletedProcess:
    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or shutil.which("lint-imports")
    if exe is None:
        pytest.skip("import-linter is not installed (pip install import-linter)")
    return subprocess.run([exe, "--no-cache"], cwd=cwd, capture_output=True, text=True, timeout=300,
                          env={"PATH": str(Path(sys.executable).parent), "PYTHONPATH": str(cwd)})


def test_import_linter_contracts_are_kept():
    r = lint_imports(ROOT)
    assert r.returncode == 0 and "0 broken" in r.stdout, r.stdout[-3000:] + r.stderr[-2000:]


@pytest.mark.parametrize("module, line, contract", [
    ("edgetl/deploy/live.py", "import torch", "torch-free"),  # the device runtime reaches torch
    ("edgetl/data/scan.py", "from edgetl.quality import metrics", "layers"),  # data imports a layer above it
])
def test_import_linter_fails_on_a_planted_violation(tmp_path, module, line, contract):
    shutil.copytree(PACKAGE, tmp_path / "edgetl", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    target = tmp_path / module
    text = target.read_text()
    cut = text.index("\nfrom edgetl")  # after the module's first edgetl import line
    target.write_text(text[:cut] + f"\n{line}" + text[cut:])
    r = lint_imports(tmp_path)
    assert r.returncode == 1, r.stdout[-3000:]
    broken = [ln for ln in r.stdout.splitlines() if ln.endswith("BROKEN")]
    assert len(broken) == 1 and contract in broken[0], r.stdout[-3000:]
