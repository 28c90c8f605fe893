"""The tree passes ruff's lint and format checks, with the pinned ruff and pyproject.toml's settings."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
FIX = "ruff check --fix . && ruff format ."


def _pinned_ruff() -> str:
    pins = re.findall(r'"ruff==([^"]+)"', (ROOT / "pyproject.toml").read_text())
    assert len(pins) == 1, f"pyproject.toml should pin ruff exactly once, found {pins}"
    return pins[0]


def _ruff(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ruff", *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def ruff() -> None:
    if importlib.util.find_spec("ruff") is None:
        pytest.skip("ruff is not installed in this venv (pip install -e '.[test]' installs it)")
    installed, pinned = importlib.metadata.version("ruff"), _pinned_ruff()
    if installed != pinned:  # another release formats differently: a failure here would be about the tool
        pytest.skip(f"ruff {installed} installed, the tree is checked with ruff {pinned} (pip install -e '.[test]')")


def test_ruff_lint_is_clean(ruff):
    """`ruff check` finds nothing anywhere in the tree (generated stubs excluded by pyproject.toml)."""
    r = _ruff("check", "--output-format", "concise", ".")
    if r.returncode != 0:
        pytest.fail(f"ruff check failed; `{FIX}` fixes most of it:\n{r.stdout}{r.stderr}", pytrace=False)


def test_ruff_format_is_clean(ruff):
    """`ruff format --check` would change no file."""
    r = _ruff("format", "--check", "--output-format", "concise", ".")
    if r.returncode != 0:
        pytest.fail(f"files not formatted; run `ruff format .`:\n{r.stdout}{r.stderr}", pytrace=False)
