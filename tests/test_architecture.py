"""The house rules of docs/architecture.md, checked: the import-linter contracts in pyproject.toml
hold (and break when a back-edge is added), nothing below the CLI imports or launches it, no
private name is used outside its module, and no file grows past ~300 lines."""

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

PACKAGES = ("workflows", "cache_teacher", "distill", "detector", "data", "core")
CLI = ("cli", "cli_options")  # the top layer: cli.py and how it makes its options
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")
MAX_LINES = 300
NAMEDTUPLE_API = {"_replace", "_asdict", "_fields", "_make"}  # public API despite the underscore


def _python_files(*tops: str):
    for top in tops:
        path = ROOT / top
        yield from ([path] if path.suffix == ".py" else sorted(path.rglob("*.py")))


def _lint(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(LINT_IMPORTS), "--no-cache"], cwd=root, capture_output=True, text=True, timeout=300)


def test_import_contracts_hold():
    proc = _lint(ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "5 kept, 0 broken" in proc.stdout


@pytest.mark.parametrize("module, line, broken", [
    ("cache_teacher/dump.py", "import distill.engine", "cache_teacher is not allowed to import distill"),
    ("detector/rows.py", "import cache_teacher.schema", "detector is not allowed to import cache_teacher"),
    ("data/views.py", "import detector.model", "data is not allowed to import detector"),
    ("core/errors.py", "import data.views", "core is not allowed to import data"),
    ("distill/teachers.py", "import zarr", "zarr only in the cache reader and writer"),
    ("detector/evaluation.py", "import typer", "typer (and its click and rich) only in cli"),
    ("detector/deploy.py", "import onnxruntime", "the optional extras"),
])
def test_a_back_edge_or_a_library_out_of_bounds_breaks_a_contract(tmp_path, module, line, broken):
    for top in (*PACKAGES, "cli.py", "pyproject.toml"):
        (shutil.copytree if (ROOT / top).is_dir() else shutil.copy)(ROOT / top, tmp_path / top)
    with open(tmp_path / module, "a") as f:
        f.write(f"\n{line}  # the edge under test\n")
    proc = _lint(tmp_path)
    assert proc.returncode != 0 and "1 broken" in proc.stdout, proc.stdout[-3000:]
    assert broken in proc.stdout.split("Broken contracts")[1]


def test_nothing_below_the_cli_imports_or_launches_it():
    for path in _python_files(*PACKAGES):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                assert all(a.name.split(".")[0] not in CLI for a in node.names), f"{path}:{node.lineno}"
            elif isinstance(node, ast.ImportFrom):
                assert (node.module or "").split(".")[0] not in CLI, f"{path}:{node.lineno}"
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                assert node.value not in (*CLI, "cli.py", "cli_options.py"), f"{path}:{node.lineno} names the CLI"


def _private_uses(path: Path) -> list[str]:
    """`from x import _y`, and `obj._y` where _y is not defined in this file (self/cls aside)."""
    tree = ast.parse(path.read_text())
    defined = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            defined.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            defined.add(node.id)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            defined.add(node.attr)
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            out += [f"{path.name}:{node.lineno} imports {node.module}.{a.name}" for a in node.names
                    if a.name.startswith("_") and not a.name.startswith("__")]
        elif (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
              and node.attr not in NAMEDTUPLE_API and node.attr not in defined
              and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))):
            out.append(f"{path.name}:{node.lineno} uses {ast.unparse(node)}")
    return out


def test_no_private_name_is_used_outside_its_module():
    uses = [u for path in _python_files(*PACKAGES, "cli.py", "cli_options.py", "benchmarks", "tests", "tools")
            for u in _private_uses(path)]
    assert uses == []


def test_the_checker_sees_a_private_use(tmp_path):
    path = tmp_path / "x.py"
    path.write_text("from cache_teacher.reader import _read_slices\nimport m\nm._hidden()\nself._mine = 1\n")
    assert len(_private_uses(path)) == 2  # the import and m._hidden; self._mine is the module's own


def test_files_stay_short():
    long = {
        str(p.relative_to(ROOT)): n
        for p in _python_files(*PACKAGES, "cli.py", "cli_options.py", "benchmarks", "tests", "tools")
        if (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert long == {}, f"split these (one concept per file, at most ~{MAX_LINES} lines): {long}"


def test_no_project_source_is_ignored_by_git():
    """A .py file the .gitignore hides never reaches a clone, so CI fails where this checkout passes."""
    if not (ROOT / ".git").exists():
        pytest.fail("the tests run from a git checkout (CI clones the repository)")
    tops = (*PACKAGES, *(f"{name}.py" for name in CLI), "tests", "benchmarks")
    sources = [str(p.relative_to(ROOT)) for p in _python_files(*tops)]
    proc = subprocess.run(["git", "check-ignore", "--no-index", *sources], cwd=ROOT, capture_output=True, text=True)
    ignored = proc.stdout.split()
    assert not ignored, f"ignored by .gitignore, so missing from a clone: {ignored}"
