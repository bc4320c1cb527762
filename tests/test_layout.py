"""The repository layout keeps Python's stdlib `platform` importable."""

import ast
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from tests.conftest import ROOT


def test_platform_folder_is_not_a_package() -> None:
    # a platform/__init__.py would shadow the stdlib module for torch, ray, mlflow, pandas
    assert not (ROOT / "platform" / "__init__.py").exists()


def test_stdlib_platform_imports_from_repo_root() -> None:
    # `python -m pytest` and `python cli.py` put the repo root first on sys.path
    code = (
        "import platform, sys; print(platform.system()); import tunelab, torch, ray, mlflow, pandas"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "Linux"


# --- the library's architecture (issue 8) -----------------------------------------------------

LIBRARY = ROOT / "platform" / "tunelab"
# The two modules allowed past the size limit: the statistics and the HTML report.
LONG_MODULES = {"verdicts.py", "report.py"}
MAX_MODULE_LINES = 500
# The driver: run, resume, Ray start, signals, the Tuner and the results it writes.
DRIVER_MODULES = ("_driver.py", "_ray_start.py", "_finalize.py", "_trial.py", "_preemption.py")
KIND_NAMES = ("seed_cull", "sweep", "lever_ab")


def _python_files(*roots: Path) -> list[Path]:
    files: list[Path] = []
    for root in roots:
        files.extend([root] if root.is_file() else sorted(root.rglob("*.py")))
    return files


def test_no_library_module_is_over_500_lines() -> None:
    # one concern per module: a module past the limit is doing several jobs
    long = {
        str(p.relative_to(LIBRARY)): n
        for p in _python_files(LIBRARY)
        if p.name not in LONG_MODULES
        and (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_MODULE_LINES
    }
    assert long == {}


def _private_tunelab_imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    names: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.append(node.module)
            names += [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            names += re.findall(r"\btunelab(?:\.\w+)+", node.value)  # import_module("...")
    return [
        n
        for n in names
        if n.split(".")[0] == "tunelab" and any(part.startswith("_") for part in n.split(".")[1:])
    ]


def test_nothing_outside_the_library_imports_a_private_tunelab_module() -> None:
    # cli.py, bench/, trainables/ and the tests use the published API only
    roots = [ROOT / "cli.py", ROOT / "bench", ROOT / "trainables", ROOT / "tests", ROOT / "scripts"]
    found = {
        str(p.relative_to(ROOT)): hits
        for p in _python_files(*[r for r in roots if r.exists()])
        if p != Path(__file__).resolve()  # this file's probe below names private modules
        and (hits := _private_tunelab_imports(p))
    }
    assert found == {}


def test_the_private_import_check_sees_every_form() -> None:
    # the check above must be able to fail: each form of a private import is caught
    code = (
        "import tunelab._driver\n"
        "from tunelab import _trial\n"
        "from tunelab.slurm._auth import x\n"
        "importlib.import_module('tunelab.kinds._base')\n"
        "from tunelab import spec\n"
    )
    with tempfile.TemporaryDirectory() as tmp:
        probe = Path(tmp) / "probe.py"
        probe.write_text(code, encoding="utf-8")
        hits = _private_tunelab_imports(probe)
    assert {"tunelab._driver", "tunelab._trial", "tunelab.slurm._auth", "tunelab.kinds._base"} <= (
        set(hits)
    )
    assert not any(h.startswith("tunelab.spec") for h in hits)


def test_the_driver_has_no_branch_on_the_kind() -> None:
    # the driver asks the spec's ExperimentKind; it never names a kind or compares spec.kind
    branches: list[str] = []
    for name in DRIVER_MODULES:
        path = LIBRARY / name
        if not path.exists():
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Constant) and node.value in KIND_NAMES:
                branches.append(f"{name}:{node.lineno}: {node.value!r}")
            if isinstance(node, ast.Compare):
                operands = [node.left, *node.comparators]
                if any(isinstance(o, ast.Attribute) and o.attr == "kind" for o in operands):
                    branches.append(f"{name}:{node.lineno}: compares .kind")
    assert (LIBRARY / "_driver.py").exists()
    assert branches == []
