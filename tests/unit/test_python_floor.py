"""One Python floor: what pyproject declares is what CI runs and what the code needs, and a missing feature is loud."""

from __future__ import annotations

import asyncio
import gc
import pathlib
import re
import sys
import warnings

import pytest
import tomllib
from packaging.specifiers import SpecifierSet
from packaging.version import Version

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _floor(spec: SpecifierSet) -> Version:
    """The lowest X.Y the specifier admits (it must be a single ``>=X.Y``)."""
    (only,) = list(spec)
    assert only.operator == ">=", f"requires-python should be one '>=X.Y' floor, not {spec}"
    return Version(only.version)


def test_running_interpreter_meets_requires_python():
    """The interpreter running the tests satisfies pyproject's requires-python."""
    spec = SpecifierSet(_project()["requires-python"])
    running = f"{sys.version_info.major}.{sys.version_info.minor}.{sys.version_info.micro}"
    assert spec.contains(running), f"Python {running} does not satisfy requires-python {spec}"


def test_requires_python_is_the_version_ci_tests():
    """The declared floor is exactly the python3.X that .ci/run and the README's commands use, and the classifiers list it."""
    floor = _floor(SpecifierSet(_project()["requires-python"]))
    ci = set(re.findall(r"\bpython(3\.\d+)\b", (ROOT / ".ci" / "run").read_text()))
    readme = set(re.findall(r"\bpython(3\.\d+)\b", (ROOT / "README.md").read_text()))
    assert ci == {f"{floor.major}.{floor.minor}"}, f"CI runs {ci}, pyproject declares >={floor}"
    assert readme == ci, f"README's commands use {readme}, CI uses {ci}"
    classifiers = _project().get("classifiers", [])
    versions = {
        c.rsplit(" :: ", 1)[1] for c in classifiers if re.fullmatch(r"Programming Language :: Python :: 3\.\d+", c)
    }
    assert f"{floor.major}.{floor.minor}" in versions, f"classifiers {sorted(versions)} omit the floor {floor}"
    assert all(Version(v) >= floor for v in versions), f"classifiers {sorted(versions)} list versions below the floor"


def test_floor_provides_what_the_server_uses():
    """asyncio.timeout (3.11), used by the Redis cache, exists at the declared floor."""
    floor = _floor(SpecifierSet(_project()["requires-python"]))
    assert floor >= Version("3.11"), "common/cache.py uses asyncio.timeout, new in Python 3.11"
    assert hasattr(asyncio, "timeout")


async def test_a_programming_error_in_the_cache_is_not_swallowed(monkeypatch):
    """An AttributeError raised by the cache's own code (asyncio.timeout missing, as on 3.10) propagates instead of silently meaning 'uncached'."""
    import redis.asyncio  # noqa: F401  (imported first: on 3.10 redis-py brings its own timeout; only cache.py would miss it)

    from featurebank.common.cache import RedisCache
    from featurebank.common.metrics import Metrics

    monkeypatch.delattr(asyncio, "timeout")  # what Python 3.10 looks like to cache.py
    cache = RedisCache("redis://127.0.0.1:9/0", ttl_seconds=60, timeout_s=0.5, metrics=Metrics())
    try:
        for call in (lambda: cache.get_many(["k"]), lambda: cache.set_many([("k", b"v")])):
            with pytest.raises(AttributeError, match="timeout"):
                await call()
    finally:
        await cache.close()
        with warnings.catch_warnings():  # the Redis command the missing timeout never awaited
            warnings.simplefilter("ignore", RuntimeWarning)
            gc.collect()
