"""The process harness (featurebank.server.testing) fails fast and says why, and stops what it started."""

from __future__ import annotations

import sys
import time

import pytest

from featurebank.server.testing import RedisProcess, ServedProcess, wait_until


def test_a_redis_that_exits_fails_the_start_at_once_with_its_exit_code_and_log():
    """A Redis-protocol server that refuses its arguments fails start() at once, naming the exit code and its log."""
    r = RedisProcess(extra_args=("--no-such-option", "yes"))
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match=r"exited 1[\s\S]*no-such-option"):
        r.start(timeout_s=60)
    assert time.monotonic() - t0 < 30  # not the timeout: the exit is noticed on the next poll
    r.stop()


def test_redis_stops_by_pid_and_restarts_on_the_same_port():
    """stop() ends the process it started; start() again serves on the same port and URL."""
    r = RedisProcess().start()
    try:
        url, pid = r.url, r.proc.pid
        r.client().set("k", b"v")
        r.stop()
        assert not r.ping()
        r.start()
        assert r.url == url and r.proc.pid != pid and r.ping()
    finally:
        r.stop()


def test_a_server_that_exits_before_it_is_ready_fails_the_wait_with_its_log(tmp_path):
    """wait_ready raises as soon as the process exits, with its exit code and the end of its output."""
    code = "import sys; print('cannot bind: port in use', flush=True); sys.exit(3)"
    s = ServedProcess([sys.executable, "-c", code], name="doomed", workdir=tmp_path).spawn()
    with pytest.raises(RuntimeError, match=r"doomed exited 3[\s\S]*cannot bind: port in use"):
        s.wait_ready(timeout_s=60)
    assert s.terminate() == 3


def test_a_served_process_is_ready_by_its_port_file_and_terminated_by_sigterm(tmp_path):
    """A server without health checks is ready when its --port-file says so; terminate() returns its exit code."""
    code = (
        "import json, os, signal, sys, time\n"
        "signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))\n"
        "path = sys.argv[sys.argv.index('--port-file') + 1]\n"
        "json.dump({'port': 4242, 'metrics_port': -1, 'ready': True}, open(path + '.tmp', 'w'))\n"
        "os.replace(path + '.tmp', path)\n"
        "time.sleep(600)\n"
    )
    s = ServedProcess([sys.executable, "-c", code], name="stub", workdir=tmp_path, check_health=False).start(60)
    assert s.target == "127.0.0.1:4242"
    assert s.pids() == [s.pid]
    with pytest.raises(RuntimeError, match="serves no metrics"):
        s.metrics_text()
    assert s.terminate() == 0
    wait_until(lambda: not s.pids(), 10, "the process to be gone")


def test_servers_sharing_a_workdir_get_their_own_embedded_cache_dir(tmp_path):
    """Two harness servers started in one workdir (a benchmark's before/after pair) never share an embedded cache
    data dir, which the second would be refused (one owner per data dir)."""
    from featurebank.server.testing import ServerProcess

    before = ServerProcess("--backbone", "toy", name="before", workdir=tmp_path)
    after = ServerProcess("--backbone", "toy", name="after", workdir=tmp_path)
    assert before.env["FEATUREBANK_DATA_DIR"] != after.env["FEATUREBANK_DATA_DIR"]
