"""The repository's own rules: ruff lint and format, and the import layers of pyproject.toml."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(*cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)


@pytest.mark.parametrize("args", [("check", "."), ("format", "--check", ".")])
def test_ruff(args):
    result = _run(sys.executable, "-m", "ruff", *args)
    assert result.returncode == 0, result.stdout + result.stderr


def test_imports_only_point_downward():
    lint_imports = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    assert lint_imports, "import-linter is part of the dev extra: pip install -e '.[dev]'"
    result = _run(lint_imports)
    assert result.returncode == 0, result.stdout + result.stderr
