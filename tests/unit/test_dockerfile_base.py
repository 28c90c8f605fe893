"""The Dockerfiles build on any Python 3.11 Debian base given as BASE_IMAGE, not only the official python image."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

DOCKER = Path(__file__).resolve().parents[2] / "deploy" / "docker"


def runs_before_venv(flavour: str) -> list[str]:
    """RUN lines of the build stage up to and including the one that creates the venv."""
    text = (DOCKER / f"Dockerfile.{flavour}").read_text()
    build_stage = text.split(" AS runtime", 1)[0]
    runs = [line for line in build_stage.splitlines() if line.startswith("RUN ")]
    upto = next(i for i, line in enumerate(runs) if " venv " in line)
    return runs[: upto + 1]


@pytest.mark.parametrize("flavour", ["cpu", "gpu"])
def test_venv_is_created_with_python3(flavour):
    """Before the venv exists, the build calls `python3` (Debian's python3 has no `python`; `python -m venv` exits 127 there)."""
    for line in runs_before_venv(flavour):
        assert not re.search(r"(^|[\s;&|(])python(\s|$)", line.removeprefix("RUN ")), line


@pytest.mark.parametrize("flavour", ["cpu", "gpu"])
def test_both_stages_take_the_base_image_argument(flavour):
    """Both stages start FROM ${BASE_IMAGE}, whose default is the official Debian-bookworm Python 3.11 image."""
    text = (DOCKER / f"Dockerfile.{flavour}").read_text()
    assert re.search(r"^ARG BASE_IMAGE=python:3\.11-slim-bookworm$", text, re.M)
    froms = re.findall(r"^FROM (\S+)", text, re.M)
    assert froms == ["${BASE_IMAGE}", "${BASE_IMAGE}"]
