"""The installed `featurebank` distribution: one top-level namespace, and a client that does not pull in TensorFlow."""

from __future__ import annotations

import importlib
import importlib.metadata
import json
import os
import subprocess
import sys
import sysconfig

import pytest

DIST = "featurebank"
REPO_DIRS = ("server", "engine", "common", "workers", "client", "proto")


@pytest.fixture(scope="module")
def dist() -> importlib.metadata.Distribution:
    """The featurebank distribution installed in site-packages.

    Looked up there explicitly: with the repository root on sys.path (``python -m pytest``), a plain
    ``importlib.metadata.distribution`` may find the source tree's featurebank.egg-info instead.
    """
    site_dirs = sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})
    found = list(importlib.metadata.Distribution.discover(name=DIST, path=site_dirs))
    assert found, f"featurebank is not installed in {site_dirs}"
    return found[0]


def python(code: str, cwd) -> subprocess.CompletedProcess:
    """Run code in a fresh interpreter of this venv, from a neutral directory and without PYTHONPATH."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def test_top_level_is_only_featurebank(dist):
    """The installed distribution's top_level.txt names exactly one importable package: featurebank."""
    top_level = (dist.read_text("top_level.txt") or "").split()
    assert top_level == ["featurebank"]


def test_installed_files_stay_in_the_namespace(dist):
    """No file the distribution installed is a bare top-level server/, workers/, client/ or proto/ package or module."""
    files = dist.files
    assert files, "featurebank is installed without a RECORD"
    for f in files:
        top = f.parts[0]
        allowed = (
            top == "featurebank"
            or top.endswith(".dist-info")
            or top == ".."  # the console script under bin/
            or top.startswith("__editable__")  # editable-install hook (.pth / finder)
            or top == "__pycache__"
            and "__editable__" in f.name
        )
        assert allowed, f"unexpected installed file {f}"
        assert top.split(".")[0] not in REPO_DIRS, f"bare top-level {top} installed"


def test_editable_finder_maps_only_featurebank_names(dist):
    """For an editable install, every module name the import hook maps is featurebank or featurebank.*."""
    finders = [f for f in dist.files or [] if f.name.startswith("__editable___") and f.suffix == ".py"]
    if not finders:
        pytest.skip("not an editable install: the RECORD check above covers a regular install")
    finder = importlib.import_module(finders[0].stem)
    names = set(finder.MAPPING) | set(getattr(finder, "NAMESPACES", {}))
    assert "featurebank" in names
    assert all(n == "featurebank" or n.startswith("featurebank.") for n in names), names


def test_bare_repo_dirs_are_not_importable(tmp_path):
    """Outside the repository, `server`, `workers`, `client` and `proto` are not importable; the featurebank.* packages are."""
    code = (
        "import importlib.util, json;"
        f"print(json.dumps({{n: importlib.util.find_spec(n) is not None for n in {list(REPO_DIRS)!r}}}));"
        "import featurebank.common.codec, featurebank.workers.backbones.registry, featurebank.client, featurebank.v1.featurebank_pb2"
    )
    r = python(code, tmp_path)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {n: False for n in REPO_DIRS}


def test_client_import_does_not_import_tensorflow(tmp_path):
    """`import featurebank.client` (the TF-free base install) leaves tensorflow, keras and the workers unimported."""
    r = python(
        "import featurebank.client, featurebank.client.keys, featurebank.client.inputs, featurebank.client.tensors, sys;"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'keras', 'keras_hub'));"
        "assert 'tensorflow' not in sys.modules, bad;"
        "assert not bad, bad",
        tmp_path,
    )
    assert r.returncode == 0, r.stderr


def test_console_script_points_into_the_namespace(dist):
    """The `featurebank` console script resolves to featurebank.client.cli:main, a callable."""
    (ep,) = dist.entry_points.select(group="console_scripts", name="featurebank")
    assert ep.value == "featurebank.client.cli:main"
    assert callable(ep.load())


def test_base_dependencies_exclude_tensorflow(dist):
    """The base requirements (no extras) do not include tensorflow; the server extra does."""
    reqs = dist.requires or []
    base = [r for r in reqs if "extra ==" not in r]
    assert not any(r.lower().startswith(("tensorflow", "keras")) for r in base), base
    assert any(r.lower().startswith("tensorflow") and 'extra == "server"' in r for r in reqs), reqs
