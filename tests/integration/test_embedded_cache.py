"""The embedded cache (server/embedded_cache.py): a real valkey-server, bounded, persistent, one per data dir, gone with its server."""

from __future__ import annotations

import os
import pathlib
import signal
import stat

import pytest
import redis

from featurebank.client import FeatureBank
from featurebank.common.cache import CLAIM_CACHED, CLAIM_HELD, CLAIM_TAKEN, RedisCache
from featurebank.common.metrics import Metrics
from featurebank.server.embedded_cache import PID_NAME, RDB_NAME, SOCKET_NAME, EmbeddedCache, EmbeddedCacheError
from featurebank.server.testing import cmdline, descendants
from support import ServerProcess, random_images, wait_until

MiB = 1024 * 1024


def alive(pid: int) -> bool:
    """Whether a process runs (a zombie does not)."""
    try:
        state = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def valkey_pids(server: ServerProcess) -> list[int]:
    """The valkey-server processes under a featurebank server."""
    return [p for p in descendants(server.pid) if "valkey-server" in cmdline(p)]


@pytest.fixture
def embedded(tmp_path):
    """Start EmbeddedCaches on tmp_path/<name>; all are stopped at teardown."""
    started: list[EmbeddedCache] = []

    def _start(name: str = "data", max_bytes: int = 64 * MiB, **kw) -> EmbeddedCache:
        e = EmbeddedCache(tmp_path / name, max_bytes, **kw)
        started.append(e)
        e.start()
        return e

    yield _start
    for e in started:
        e.stop()


def cache_of(url: str) -> RedisCache:
    return RedisCache(url, ttl_seconds=3600, timeout_s=5.0, metrics=Metrics(), name="embedded")


# ------------------------------------------------------------------------------ the cache itself


async def test_cache_claims_and_scripts_work_over_the_unix_socket(embedded):
    """RedisCache over the embedded cache's unix:// URL reads, writes, claims (Lua) and releases."""
    e = embedded()
    assert e.url.startswith("unix://") and pathlib.Path(e.url[len("unix://") :]).is_socket()
    cache, other_process = cache_of(e.url), cache_of(e.url)  # two token prefixes, as two processes have
    try:
        await cache.set_many([("a", b"1" * 100), ("b", b"2")])
        assert await cache.get_many(["a", "b", "c"]) == [b"1" * 100, b"2", None]
        mine, other = cache.claim_token(), other_process.claim_token()
        assert await cache.claim_many(["a", "c"], 5000, [mine, mine]) == [CLAIM_CACHED, CLAIM_TAKEN]
        assert await other_process.claim_many(["c"], 5000, [other]) == [CLAIM_HELD]
        await other_process.release_many(["c"], [other])  # not its claim: compare-and-delete leaves it
        assert await other_process.claim_many(["c"], 5000, [other]) == [CLAIM_HELD]
        await cache.release_many(["c"], [mine])
        assert await other_process.claim_many(["c"], 5000, [other]) == [CLAIM_TAKEN]
    finally:
        await cache.close()
        await other_process.close()


def test_only_the_owner_can_reach_the_cache(embedded):
    """The embedded cache listens on no TCP port, only on a Unix socket of mode 700 in the data dir, with the configured bound and policy."""
    e = embedded(max_bytes=16 * MiB)
    assert stat.S_IMODE(e.socket_path.stat().st_mode) == 0o700
    assert stat.S_IMODE(e.data_dir.stat().st_mode) == 0o700
    config = redis.Redis(unix_socket_path=str(e.socket_path)).config_get("*")
    assert config["port"] == "0" and config["unixsocket"] == str(e.socket_path)
    assert config["maxmemory"] == str(16 * MiB) and config["maxmemory-policy"] == "allkeys-lru"
    assert config["dir"] == str(e.data_dir) and config["save"] == "300 1"


async def test_memory_stays_under_the_byte_bound_and_old_keys_are_evicted(embedded):
    """Written past --cache-max-bytes, valkey's memory stays under the bound, the oldest keys go, the newest stay, and it keeps serving."""
    e = embedded(max_bytes=8 * MiB)
    cache = cache_of(e.url)
    r = redis.Redis(unix_socket_path=str(e.socket_path))
    value = os.urandom(64 * 1024)
    keys = [f"k{i}" for i in range(3 * 8 * MiB // len(value))]  # three times the bound
    try:
        for i in range(0, len(keys), 16):
            await cache.set_many([(k, value) for k in keys[i : i + 16]])
            assert r.info("memory")["used_memory"] <= 8 * MiB + len(value)  # at most the write in progress
        got = await cache.get_many(keys)
        assert got[0] is None and got[len(keys) // 4] is None  # the first quarter alone is more than the bound
        assert got[-1] == value and got[-2] == value
        assert r.info("stats")["evicted_keys"] > 0
        await cache.set_many([("after", b"x")])
        assert await cache.get_many(["after"]) == [b"x"]
    finally:
        await cache.close()
        r.close()


def test_stop_writes_a_snapshot_the_next_start_loads(embedded, tmp_path):
    """Values written before stop() (SIGTERM) are read back, same bytes, after the next start on the same data dir."""
    value = os.urandom(4096)
    e = embedded()
    redis.Redis(unix_socket_path=str(e.socket_path)).set("k", value, ex=3600)
    e.stop()
    assert (tmp_path / "data" / RDB_NAME).stat().st_size > len(value)
    assert stat.S_IMODE((tmp_path / "data" / RDB_NAME).stat().st_mode) == 0o600  # every tenant's features
    e2 = embedded()
    assert redis.Redis(unix_socket_path=str(e2.socket_path)).get("k") == value


def test_a_sigkilled_valkey_leaves_nothing_that_blocks_the_next_start(embedded, tmp_path):
    """After valkey is SIGKILLed (stale socket and pid file left) and its owner gone, the next start on that data dir succeeds."""
    e = embedded()
    os.kill(e.pid, signal.SIGKILL)
    e.proc.wait()
    e._unlock()  # as the kernel does when the owning process dies
    assert (tmp_path / "data" / SOCKET_NAME).exists() and (tmp_path / "data" / PID_NAME).exists()
    e2 = embedded()
    assert redis.Redis(unix_socket_path=str(e2.socket_path)).ping()


def test_a_valkey_left_running_by_a_dead_owner_is_stopped_and_replaced(embedded):
    """A valkey whose owner died (lock free, valkey still up) is stopped by its PID at the next start, which then runs its own."""
    e = embedded()
    old = e.pid
    redis.Redis(unix_socket_path=str(e.socket_path)).set("kept", b"v", ex=3600)
    e._unlock()  # the owner is gone; its valkey is not
    e2 = embedded()
    assert e.proc.wait(timeout=30) == 0  # stopped by SIGTERM, so it saved
    assert e2.pid != old and alive(e2.pid)
    assert redis.Redis(unix_socket_path=str(e2.socket_path)).get("kept") == b"v"


def test_a_second_owner_of_a_data_dir_is_refused(embedded, tmp_path):
    """While one EmbeddedCache runs on a data dir, starting another there fails with one line naming the data dir and the alternatives, and the first keeps serving."""
    e = embedded()
    with pytest.raises(EmbeddedCacheError) as err:
        EmbeddedCache(tmp_path / "data", 64 * MiB).start()
    message = str(err.value)
    assert f"in use by another featurebank server (pid {os.getpid()})" in message and "\n" not in message
    assert "--redis-url" in message and "--cache memory" in message
    assert redis.Redis(unix_socket_path=str(e.socket_path)).ping()


def test_an_unloadable_snapshot_is_set_aside_and_the_cache_starts_empty(embedded, tmp_path):
    """A snapshot valkey cannot load (a truncated file) is renamed aside and the cache starts empty rather than not at all."""
    e = embedded()
    redis.Redis(unix_socket_path=str(e.socket_path)).set("k", os.urandom(100_000))
    e.stop()
    rdb = tmp_path / "data" / RDB_NAME
    rdb.write_bytes(rdb.read_bytes()[:200])
    e2 = embedded()
    assert redis.Redis(unix_socket_path=str(e2.socket_path)).dbsize() == 0
    assert len(list(rdb.parent.glob(RDB_NAME + ".unreadable-*"))) == 1


def test_a_missing_binary_is_one_clear_error(tmp_path):
    """A missing valkey-server binary fails start() with one line naming it, --redis-url and --cache memory."""
    with pytest.raises(EmbeddedCacheError) as err:
        EmbeddedCache(tmp_path / "data", 64 * MiB, binary=str(tmp_path / "no-valkey-server")).start()
    assert "no-valkey-server is missing" in str(err.value) and "--redis-url" in str(err.value)


def test_a_binary_that_exits_at_start_is_one_clear_error_and_frees_the_data_dir(tmp_path):
    """A binary that exits during start-up fails start() with its exit code, and the data dir can be used at once."""
    with pytest.raises(EmbeddedCacheError, match=r"exited 1 during start-up.*--cache memory"):
        EmbeddedCache(tmp_path / "data", 64 * MiB, binary="/bin/false").start()
    e = EmbeddedCache(tmp_path / "data", 64 * MiB)
    e.start()
    e.stop()


def test_a_socket_path_too_long_for_unix_sockets_names_data_dir(tmp_path):
    """A --data-dir whose socket path exceeds the 107 bytes of sun_path is refused naming --data-dir, before anything starts."""
    with pytest.raises(EmbeddedCacheError, match="give a shorter --data-dir"):
        EmbeddedCache(tmp_path / ("d" * 120), 64 * MiB).start()


# ------------------------------------------------------------------------------ through the server


def test_server_restart_keeps_features(tmp_path):
    """Features computed before a SIGTERM are cache hits, same bytes, after a restart on the same --data-dir."""
    images = random_images(4, seed=1101)
    args = ("--backbone", "toy", "--data-dir", str(tmp_path / "data"))
    first = ServerProcess(*args).start()
    try:
        assert "cache embedded (unix://" in first.log()
        with FeatureBank(first.target, timeout_s=60) as bank:
            before = bank.extract_items(images, backbone="toy")
        assert [o.cache_hit for o in before] == [False] * 4
    finally:
        assert first.terminate() == 0
    second = ServerProcess(*args).start()
    try:
        with FeatureBank(second.target, timeout_s=60) as bank:
            after = bank.extract_items(images, backbone="toy", lookup_first=False)
        assert [o.cache_hit for o in after] == [True] * 4
        for a, b in zip(before, after):
            assert a.features.tobytes() == b.features.tobytes()
        assert second.metric("featurebank_items_total", backbone="toy", result="miss") == 0
    finally:
        assert second.terminate() == 0


def test_sigterm_leaves_no_valkey_behind(start_server):
    """After the server's SIGTERM drain, the valkey-server it started (by PID) is gone, and the server exited 0."""
    server = start_server("--backbone", "toy")
    pids = valkey_pids(server)
    assert len(pids) == 1
    assert server.terminate() == 0
    assert not alive(pids[0])


def test_a_sigkilled_server_leaves_no_valkey_and_restarts_with_its_features(tmp_path):
    """A SIGKILLed server's valkey exits with it (saving), and the next server on that --data-dir starts and hits."""
    images = random_images(2, seed=1102)
    args = ("--backbone", "toy", "--data-dir", str(tmp_path / "data"))
    first = ServerProcess(*args).start()
    with FeatureBank(first.target, timeout_s=60) as bank:
        bank.extract_items(images, backbone="toy")
    (valkey,) = valkey_pids(first)
    first.proc.send_signal(signal.SIGKILL)
    first.proc.wait()
    wait_until(lambda: not alive(valkey), 30, "the killed server's valkey to exit")
    second = ServerProcess(*args).start()
    try:
        with FeatureBank(second.target, timeout_s=60) as bank:
            assert [o.cache_hit for o in bank.extract_items(images, backbone="toy")] == [True, True]
    finally:
        assert second.terminate() == 0


def test_a_second_server_on_the_same_data_dir_is_refused(start_server, tmp_path):
    """A second server on a --data-dir in use exits 1 with one line naming it, --redis-url and --cache memory, before loading any model; the first keeps serving."""
    first = start_server("--backbone", "toy", "--data-dir", str(tmp_path / "data"))
    second = start_server("--backbone", "toy", "--data-dir", str(tmp_path / "data"), wait=False)
    assert second.proc.wait(timeout=120) == 1
    errors = [l for l in second.log().splitlines() if l.startswith("featurebank serve:")]
    assert len(errors) == 1 and "in use by another featurebank server" in errors[0], second.log()
    assert "--redis-url" in errors[0] and "--cache memory" in errors[0]
    assert "Traceback" not in second.log() and "worker" not in second.log().lower()
    assert first.health() == "SERVING"


def test_a_missing_binary_fails_the_server_with_one_line(start_server, tmp_path):
    """A server whose valkey-server binary is missing exits 1 with one line naming --redis-url and --cache memory, no traceback."""
    server = start_server("--backbone", "toy", "--cache-server-binary", str(tmp_path / "nope"), wait=False)
    assert server.proc.wait(timeout=120) == 1
    assert "Traceback" not in server.log()
    errors = [l for l in server.log().splitlines() if l.startswith("featurebank serve:")]
    assert len(errors) == 1 and "--redis-url" in errors[0] and "--cache memory" in errors[0], server.log()


def test_cache_memory_runs_no_valkey(start_server):
    """--cache memory serves from the in-process cache and starts no valkey-server."""
    server = start_server("--backbone", "toy", "--cache", "memory")
    assert valkey_pids(server) == [] and "cache memory" in server.log()
    with FeatureBank(server.target, timeout_s=60) as bank:
        images = random_images(2, seed=1103)
        bank.extract_items(images, backbone="toy")
        assert [o.cache_hit for o in bank.extract_items(images, backbone="toy", lookup_first=False)] == [True] * 2
    assert server.terminate() == 0


def test_a_valkey_killed_while_serving_is_restarted_and_caching_resumes(start_server):
    """SIGKILL of the embedded valkey under a serving server: requests still succeed (uncached), a new valkey is started, and new features are hits again."""
    server = start_server("--backbone", "toy")
    (old,) = valkey_pids(server)
    with FeatureBank(server.target, timeout_s=60) as bank:
        os.kill(old, signal.SIGKILL)
        answered = bank.extract_items(random_images(3, seed=1104), backbone="toy")
        assert [o.error for o in answered] == [None] * 3
        new = wait_until(lambda: [p for p in valkey_pids(server) if p != old], 30, "a new valkey-server")
        assert len(new) == 1
        images = random_images(2, seed=1105)

        def cached() -> bool:
            bank.extract_items(images, backbone="toy")
            return all(o.cache_hit for o in bank.extract_items(images, backbone="toy", lookup_first=False))

        wait_until(cached, 30, "caching to resume")
    assert "exited -9; starting another" in server.log()
    assert server.terminate() == 0
    assert not alive(new[0])


def test_make_cache_selects_one_backend_and_takes_a_pod_cache_url(tmp_path):
    """make_cache gives the in-process cache for --cache memory, the --redis-url Redis when set, the data dir's socket for embedded, and a given url (another process's embedded cache) over it."""
    from featurebank.common.cache import LRUCache
    from featurebank.server.app import make_cache
    from featurebank.server.config import ServerConfig

    m = Metrics()
    assert isinstance(make_cache(ServerConfig(cache="memory", cache_max_bytes=0), m), LRUCache)
    redis_cache = make_cache(ServerConfig(redis_url="redis://h:1/0", cache="memory"), m)
    assert (redis_cache.name, redis_cache.url) == ("redis", "redis://h:1/0")
    own = make_cache(ServerConfig(data_dir=str(tmp_path)), m)
    assert (own.name, own.url) == ("embedded", f"unix://{tmp_path / SOCKET_NAME}")
    given = make_cache(ServerConfig(data_dir=str(tmp_path)), m, "unix:///run/pod/cache.sock")
    assert (given.name, given.url) == ("embedded", "unix:///run/pod/cache.sock")
