"""Shared fixtures: a real Redis-protocol server and real featurebank server processes."""

from __future__ import annotations

import pytest

from support import RedisProcess, ServerProcess


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
