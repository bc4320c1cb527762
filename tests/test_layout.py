"""The repository layout keeps Python's stdlib `platform` importable."""

import subprocess
import sys

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
