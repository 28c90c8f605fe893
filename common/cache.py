"""Feature cache backends behind one interface: Redis-protocol (a Redis, or the embedded valkey) and an in-process LRU."""

from __future__ import annotations

import abc
import asyncio
import collections
import logging
import os
import time
from collections.abc import Sequence

from featurebank.common.metrics import Metrics

logger = logging.getLogger(__name__)


class FeatureCache(abc.ABC):
    """Multi-key get/set of encoded feature values. Never raises on backend trouble: a cache that
    cannot answer reports misses and drops writes, so requests still succeed uncached."""

    name = "cache"

    @abc.abstractmethod
    async def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        """Values for keys, None where missing (one round trip)."""

    @abc.abstractmethod
    async def set_many(self, items: Sequence[tuple[str, bytes]]) -> None:
        """Store values with the configured TTL (one round trip)."""

    has_claims = False  # whether other processes share this cache (and claims mean anything)

    def claim_token(self) -> str:
        """A token naming one owner of claims (one computation of one key)."""
        return ""

    async def claim_many(self, keys: Sequence[str], ttl_ms: int, tokens: Sequence[str] | None = None) -> list[int]:
        """Claim (or, with the token already holding it, extend) the right to compute each key for
        ``ttl_ms``: CLAIM_TAKEN, CLAIM_HELD where another process holds the claim, or
        CLAIM_CACHED where the value is in the cache already (nothing to compute).

        An in-process cache has no other processes: every claim succeeds (single-flight inside
        the process already dedupes).
        """
        return [CLAIM_TAKEN] * len(keys)

    async def release_many(self, keys: Sequence[str], tokens: Sequence[str] | None = None) -> None:
        """Give back the claims these tokens hold (compare-and-delete: never another owner's)."""
        return None

    async def close(self) -> None:
        return None


# Reads out at once per cache before further ones wait and are gathered into one MGET: enough to
# overlap two round trips, few enough that a loaded server sends many keys per command.
READS_IN_FLIGHT = 2

CLAIM_PREFIX = "fb1claim:"
CLAIM_HELD, CLAIM_TAKEN, CLAIM_CACHED = 0, 1, 2  # what claim_many answers per key


def claim_key(key: str) -> str:
    """The claim on a cache key: its hash tag is the cache key, so both live in one Redis Cluster
    slot and the claim script can see whether the value is there."""
    return CLAIM_PREFIX + "{" + key + "}"


# Claims are leases with an owner token ("<process token>:<n>"), taken, extended and released by
# scripts so each step is one atomic compare on the server (Redis, valkey and Redis Cluster alike:
# one slot per script). A claim is taken when it is free, already this owner's, or left behind by
# an earlier owner in this same process: inside one process single-flight allows one live owner
# per key, so such a claim belongs to an owner that was abandoned before it could release it.
CLAIM_SCRIPT = """
if redis.call('EXISTS', KEYS[2]) == 1 then
  return 2
end
local held = redis.call('GET', KEYS[1])
if held and held ~= ARGV[1] and string.sub(held, 1, string.len(ARGV[3])) ~= ARGV[3] then
  return 0
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
"""
RELEASE_SCRIPT = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


def is_cluster_url(url: str) -> bool:
    """``redis+cluster://host:port`` (or ``rediss+cluster://``) names a Redis Cluster seed node."""
    return url.startswith(("redis+cluster://", "rediss+cluster://"))


def redis_client(url: str, timeout_s: float):
    """An asyncio client for a Redis URL, or for a Redis Cluster with a ``+cluster`` URL scheme."""
    kwargs = dict(socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
    if is_cluster_url(url):
        from redis.asyncio.cluster import RedisCluster

        return RedisCluster.from_url(url.replace("+cluster", "", 1), **kwargs)
    import redis.asyncio as redis

    return redis.Redis.from_url(url, health_check_interval=30, max_connections=256, **kwargs)


class LRUCache(FeatureCache):
    """In-process cache bounded in bytes (values + keys), with a TTL: ``--cache memory``."""

    name = "memory"

    def __init__(self, max_bytes: int, ttl_seconds: float):
        self.max_bytes = max_bytes
        self.ttl_seconds = ttl_seconds
        self._data: collections.OrderedDict[str, tuple[bytes, float]] = collections.OrderedDict()
        self.bytes_used = 0

    async def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        now = time.monotonic()
        out: list[bytes | None] = []
        for k in keys:
            entry = self._data.get(k)
            if entry is None or entry[1] < now:
                if entry is not None:
                    self._evict(k)
                out.append(None)
                continue
            self._data.move_to_end(k)
            out.append(entry[0])
        return out

    async def set_many(self, items: Sequence[tuple[str, bytes]]) -> None:
        expires = time.monotonic() + self.ttl_seconds
        for k, v in items:
            size = len(k) + len(v)
            if k in self._data:
                self._evict(k)  # even when the new value is too big to keep: never leave the old one
            if size > self.max_bytes:
                continue
            self._data[k] = (v, expires)
            self.bytes_used += size
            while self.bytes_used > self.max_bytes:
                self._evict(next(iter(self._data)))

    def _evict(self, key: str) -> None:
        v, _ = self._data.pop(key)
        self.bytes_used -= len(key) + len(v)


def _is_bug(err: BaseException) -> bool:
    """An AttributeError, NameError or TypeError raised in this module's own code (e.g.
    asyncio.timeout, missing before Python 3.11), not from inside redis-py or asyncio, which can
    raise such errors on a connection torn down mid-call: those are outages."""
    if not isinstance(err, (AttributeError, NameError, TypeError)):
        return False
    tb = err.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and tb.tb_frame.f_code.co_filename == __file__


class RedisCache(FeatureCache):
    """Redis (or any Redis-protocol server): MGET / pipelined SET EX, bounded by timeouts.

    When Redis errors or times out, the cache counts it, logs it (once per outage) and stays out
    of the request path for ``retry_interval_s``; then the next request tries again, so caching
    resumes by itself when Redis is back.
    """

    name = "redis"
    has_claims = True

    def __init__(
        self,
        url: str,
        *,
        ttl_seconds: int,
        timeout_s: float,
        metrics: Metrics,
        retry_interval_s: float = 1.0,
        name: str = "redis",
    ):
        self.name = name  # "embedded" for the valkey this server runs (embedded_cache.py): in logs
        self.url = url
        self.ttl_seconds = int(ttl_seconds)
        self.timeout_s = timeout_s
        self.retry_interval_s = retry_interval_s
        self._metrics = metrics
        self._client = None
        # Commands go through a lean pipelined connection where the URL allows (redis_pipeline.py);
        # redis-py serves Redis Cluster, TLS and URL options that connection does not know.
        from featurebank.common.redis_pipeline import pipelined_connection_for  # server-only dependencies

        self._conn = pipelined_connection_for(url, timeout_s) if not is_cluster_url(url) else None
        self._down_until = 0.0
        self._outage = False
        self._token = os.urandom(8).hex()  # this process, in its claims' tokens
        self._claims_made = 0
        self._reads_in_flight = 0  # MGETs out now
        self._waiting: list[tuple[Sequence[str], asyncio.Future]] = []  # reads to send when one is back
        self._batches: set[asyncio.Task] = set()

    @property
    def cluster(self) -> bool:
        return is_cluster_url(self.url)

    def _redis(self):
        if self._client is None:  # lazily, so a server starts even when Redis is down
            self._client = redis_client(self.url, self.timeout_s)
        return self._client

    def _available(self) -> bool:
        return time.monotonic() >= self._down_until

    async def _pipeline(self, commands: list[tuple]) -> list:
        """The replies to ``commands``, sent as one pipeline (not a transaction)."""
        if self._conn is not None:
            return await self._conn.execute_many(commands)
        pipe = self._redis().pipeline(transaction=False)
        for command in commands:
            pipe.execute_command(*command)
        return await pipe.execute()

    def _failed(self, op: str, err: BaseException) -> None:
        if _is_bug(err):
            raise err  # a bug here (asyncio.timeout before 3.11, a typo) is not an outage: never "uncached" forever
        if isinstance(err, TimeoutError) and self._conn is not None:
            self._conn.abort()  # commands queued behind an unanswered one would time out too
        self._metrics.cache_errors.labels(op=op).inc()
        self._down_until = time.monotonic() + self.retry_interval_s
        if not self._outage:
            logger.warning(
                "%s cache %s failed (%s: %s); serving uncached, retrying every %.1fs",
                self.name,
                op,
                type(err).__name__,
                err,
                self.retry_interval_s,
            )
        self._outage = True

    def _ok(self) -> None:
        if self._outage:
            logger.info("%s cache is back; caching resumed", self.name)
        self._outage = False

    async def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        if not keys:
            return []
        if not self._available():
            return [None] * len(keys)
        if self._reads_in_flight < READS_IN_FLIGHT and not self._waiting:
            # Redis is keeping up: this read goes at once, with no task or future of its own.
            self._reads_in_flight += 1
            try:
                return await self._mget(list(keys))
            finally:
                self._reads_in_flight -= 1
                self._send_waiting()
        # READS_IN_FLIGHT round trips are out: wait for one to come back and go with every other
        # read that waited meanwhile, in one MGET. Under load requests arrive one per event-loop
        # turn (grpc.aio starts each RPC in its own turn: coalescing one turn's reads measured 1.02
        # RPCs per MGET), so reads are gathered while earlier ones are out instead.
        future = asyncio.get_running_loop().create_future()
        self._waiting.append((keys, future))
        return await future

    def _send_waiting(self) -> None:
        """Send every waiting read in one MGET, if a round trip is free."""
        if not self._waiting or self._reads_in_flight >= READS_IN_FLIGHT:
            return
        batch, self._waiting = self._waiting, []
        self._reads_in_flight += 1
        task = asyncio.ensure_future(self._run_waiting(batch))
        self._batches.add(task)
        task.add_done_callback(self._batches.discard)

    async def _run_waiting(self, batch: list[tuple[Sequence[str], asyncio.Future]]) -> None:
        try:
            live = [(keys, f) for keys, f in batch if not f.done()]  # a caller that left costs nothing
            if not live:
                return
            try:
                answers = await self._mget_batch([keys for keys, _ in live])
            except Exception as e:  # a bug (see _is_bug): every caller of the batch raises it
                for _, f in live:
                    if not f.done():
                        f.set_exception(e)
                        f.exception()  # retrieved: its caller may have left
                return
            for (_, f), values in zip(live, answers):
                if not f.done():
                    f.set_result(values)
        finally:
            self._reads_in_flight -= 1
            self._send_waiting()

    async def _mget_batch(self, key_lists: Sequence[Sequence[str]]) -> list[list[bytes | None]]:
        """One MGET for the key lists of several ``get_many`` calls, split back per call."""
        if len(key_lists) == 1:
            return [await self._mget(list(key_lists[0]))]
        unique = list(dict.fromkeys(k for keys in key_lists for k in keys))
        by_key = dict(zip(unique, await self._mget(unique)))
        return [[by_key[k] for k in keys] for keys in key_lists]

    async def _mget(self, keys: list[str]) -> list[bytes | None]:
        if not self._available():
            return [None] * len(keys)
        try:
            if self._conn is not None:
                read = self._conn.mget(keys)
            else:
                client = self._redis()
                # A cluster's MGET must stay within one slot: redis-py splits it per slot and
                # sends the parts concurrently, one round trip per node touched.
                read = client.mget_nonatomic(keys) if self.cluster else client.mget(keys)
            # asyncio.timeout rather than wait_for: no extra task (and loop turns) per call.
            async with asyncio.timeout(self.timeout_s):
                values = await read
        except Exception as e:  # redis errors, OSError, timeouts: all mean "uncached"
            self._failed("get", e)
            return [None] * len(keys)
        self._ok()
        return values

    async def set_many(self, items: Sequence[tuple[str, bytes]]) -> None:
        if not items or not self._available():
            return
        try:
            async with asyncio.timeout(self.timeout_s):
                await self._pipeline([("SET", k, v, "EX", self.ttl_seconds) for k, v in items])
        except Exception as e:
            self._failed("set", e)
            return
        self._ok()

    def claim_token(self) -> str:
        self._claims_made += 1
        return f"{self._token}:{self._claims_made}"

    async def claim_many(self, keys: Sequence[str], ttl_ms: int, tokens: Sequence[str] | None = None) -> list[int]:
        """The claim script for every key in one pipeline: replicas compute each new input once."""
        if not keys or not self._available():
            return [CLAIM_TAKEN] * len(keys)
        tokens = tokens or [f"{self._token}:0"] * len(keys)
        prefix = self._token + ":"
        try:
            async with asyncio.timeout(self.timeout_s):
                results = await self._pipeline(
                    [("EVAL", CLAIM_SCRIPT, 2, claim_key(k), k, t, int(ttl_ms), prefix) for k, t in zip(keys, tokens)]
                )
        except Exception as e:
            self._failed("claim", e)
            return [CLAIM_TAKEN] * len(keys)  # without Redis, compute locally
        return [int(r) for r in results]

    async def release_many(self, keys: Sequence[str], tokens: Sequence[str] | None = None) -> None:
        if not keys or not self._available():
            return
        tokens = tokens or [f"{self._token}:0"] * len(keys)
        try:
            async with asyncio.timeout(self.timeout_s):
                await self._pipeline([("EVAL", RELEASE_SCRIPT, 1, claim_key(k), t) for k, t in zip(keys, tokens)])
        except Exception as e:
            self._failed("release", e)

    async def close(self) -> None:
        if self._conn is not None:
            await self._conn.close()
        if self._client is not None:
            await self._client.aclose()
            self._client = None
