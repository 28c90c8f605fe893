"""The README's Python and shell examples run as written against a live server with its default backbones."""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest

from support import DATA_DIR, TESTS_DIR, ServerProcess

pytestmark = pytest.mark.slow

ROOT = TESTS_DIR.parent
# Blocks that install or start things (pip, `featurebank serve`, the test suite) are not run here:
# tests/unit/test_readme.py checks those lines against pyproject.toml and .ci/run.
_SETUP = re.compile(r"pip install|featurebank serve|pytest")


def readme_snippets(text: str | None = None) -> list[tuple[str, int, str]]:
    """(language, line number, code) of every ```python and ```bash block that is an example, in order."""
    text = (ROOT / "README.md").read_text() if text is None else text
    out = []
    for m in re.finditer(r"^```(python|bash)\n(.*?)^```", text, re.S | re.M):
        lang, code = m.group(1), m.group(2)
        if lang == "bash" and _SETUP.search(code):
            continue
        out.append((lang, text.count("\n", 0, m.start()) + 1, code))
    return out


SNIPPETS = readme_snippets()


def make_inputs(root: pathlib.Path) -> None:
    """The files the README's examples name: cat.jpg, dog.png, a.jpg, new.jpg, reviews.txt, and
    photos/<class>/ folders (the layout `bank.features("photos/")` and `featurebank train-head` take)."""
    from PIL import Image, ImageOps

    sources = {p.stem: Image.open(p).convert("RGB") for p in sorted(DATA_DIR.glob("*.png"))}
    sources["chelsea"].save(root / "cat.jpg")
    sources["coffee"].save(root / "dog.png")
    sources["astronaut"].save(root / "a.jpg")
    sources["rocket"].save(root / "new.jpg")
    for label, names in (("cat", ("chelsea", "coffee")), ("dog", ("astronaut", "rocket"))):
        folder = root / "photos" / label
        folder.mkdir(parents=True)
        for name in names:  # a few variants of each picture: 6 images a class
            image = sources[name]
            for i, variant in enumerate((image, ImageOps.mirror(image), image.rotate(8))):
                variant.save(folder / f"{name}-{i}.jpg")
    (root / "reviews.txt").write_text("A warm, funny film.\nThe plot falls apart in the second hour.\nNot bad.\n")


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    """The README's default server (efficientnet_lite0 + minilm, in-process cache) and a folder of inputs."""
    workdir = tmp_path_factory.mktemp("readme")
    make_inputs(workdir)
    server = ServerProcess("--heads-dir", str(workdir / "heads")).start(timeout_s=900)
    yield server, workdir
    assert server.terminate() == 0


def _localise(code: str, server: ServerProcess) -> str:
    # The server listens on free ports, not the README's 50051 / 9464.
    return code.replace("localhost:50051", server.target).replace("localhost:9464", f"127.0.0.1:{server.metrics_port}")


def run_snippet(lang: str, code: str, server: ServerProcess, workdir: pathlib.Path) -> subprocess.CompletedProcess:
    path = workdir / f"snippet.{'py' if lang == 'python' else 'sh'}"
    path.write_text(_localise(code, server))
    env = {
        **os.environ,
        "FEATUREBANK_TARGET": server.target,
        "PATH": os.pathsep.join([str(pathlib.Path(sys.executable).parent), os.environ.get("PATH", "")]),
    }
    command = [sys.executable, str(path)] if lang == "python" else ["bash", "-eo", "pipefail", str(path)]
    return subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True, timeout=900)


def test_readme_has_runnable_examples():
    """The README's SDK, heads and CLI examples are all found by the extractor (none silently skipped)."""
    langs = [lang for lang, _, _ in SNIPPETS]
    assert langs.count("python") >= 2 and langs.count("bash") >= 2
    assert any("fit_head" in code for _, _, code in SNIPPETS) and any(
        "featurebank extract" in c for _, _, c in SNIPPETS
    )


@pytest.mark.parametrize("lang,line,code", SNIPPETS, ids=[f"README.md:{line}" for _, line, _ in SNIPPETS])
def test_readme_example_runs(live, lang, line, code):
    """Each README example exits 0 on the live default server, in README order, with its inputs generated."""
    server, workdir = live
    r = run_snippet(lang, code, server, workdir)
    assert r.returncode == 0, f"README.md:{line} ({lang}) failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    if "featurebank extract photos/" in code:
        # The README promises the second run is all hits, with the backbone's 1280-d features.
        assert "0 computed" in r.stdout and np.load(workdir / "feats.npy").shape[1:] == (1280,)
