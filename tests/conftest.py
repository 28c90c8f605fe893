"""Shared fixtures: a real Redis-protocol server and real featurebank server processes."""

from __future__ import annotations

import os
import tempfile

import pytest

from featurebank.client import FeatureBank
from support import RedisProcess, ServerProcess


@pytest.fixture(scope="session", autouse=True)
def temporary_files_under_pytests_basetemp(tmp_path_factory):
    """Every temporary dir the tests and the servers they start make (server workdirs, Redis dirs,
    engine run dirs) goes under pytest's basetemp, which pytest removes a few runs later: a run
    leaves nothing in /tmp."""
    root = tmp_path_factory.mktemp("tmp", numbered=False)
    saved = tempfile.tempdir, os.environ.get("TMPDIR")
    tempfile.tempdir = str(root)
    os.environ["TMPDIR"] = str(root)  # the processes tests start inherit it
    yield
    tempfile.tempdir = saved[0]
    if saved[1] is None:
        os.environ.pop("TMPDIR", None)
    else:
        os.environ["TMPDIR"] = saved[1]


@pytest.fixture
def redis_server():
    """A fresh Redis-protocol server for one test (stoppable and restartable on its port)."""
    r = RedisProcess().start()
    yield r
    r.stop()


@pytest.fixture(scope="module")
def shared_redis():
    """One Redis-protocol server for a whole test module."""
    r = RedisProcess().start()
    yield r
    r.stop()


@pytest.fixture
def start_server():
    """Start featurebank servers as subprocesses; all are stopped (SIGTERM) at teardown."""
    started: list[ServerProcess] = []

    def _start(*args: str, env: dict[str, str] | None = None, wait: bool = True) -> ServerProcess:
        s = ServerProcess(*args, env=env)
        started.append(s)
        return s.start() if wait else s.spawn()

    yield _start
    for s in started:
        s.terminate()


@pytest.fixture(scope="module")
def server(shared_redis):
    """One toy-backbone server on the module's Redis, for a whole test module; must exit 0.
    A module that needs another server defines its own ``server``; ``bank`` follows it."""
    s = ServerProcess("--backbone", "toy", "--redis-url", shared_redis.url).start()
    yield s
    assert s.terminate() == 0


@pytest.fixture
def bank(server):
    """An SDK client of the module's ``server``."""
    with FeatureBank(server.target, timeout_s=300) as b:
        yield b
