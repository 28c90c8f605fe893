"""Where heads persist: per tenant, write-once versions, in a Redis that never evicts them or in a directory."""

from __future__ import annotations

import abc
import asyncio
import logging
import os
import pathlib
import urllib.parse
import uuid

import grpc

from featurebank.common.errors import FailedPreconditionError, FeatureBankError, NotFoundError, UnavailableError
from featurebank.server.heads import check_name, head_info
from featurebank.v1 import featurebank_pb2 as pb

logger = logging.getLogger(__name__)


class HeadVersionTakenError(FeatureBankError):
    """A PutHead naming a version that exists, or existed: versions are written once, never reused."""

    code = grpc.StatusCode.ALREADY_EXISTS


class HeadStoreEvictableError(RuntimeError):
    """The heads Redis would evict heads under memory pressure: the server refuses to start."""


class HeadStore(abc.ABC):
    """Every version of every head of every tenant (``owner``; "" without tokens), as serialised Head.

    A version is written once: ``create`` with version 0 takes the next number atomically (so
    concurrent puts get distinct versions), an explicit version must be above every version ever
    taken, and a deleted version's number is never given out again.
    """

    async def start(self) -> None:
        """Check the store is fit to hold heads (called once, before the server serves)."""

    async def close(self) -> None:
        return None

    @abc.abstractmethod
    async def create(self, owner: str, head: pb.Head) -> int:
        """Store a head (version 0: the next one); its version. Raises HeadVersionTakenError."""

    @abc.abstractmethod
    async def read(self, owner: str, name: str, version: int) -> pb.Head | None: ...

    @abc.abstractmethod
    async def versions(self, owner: str, name: str) -> list[int]: ...

    @abc.abstractmethod
    async def infos(self, owner: str, name: str) -> list[pb.HeadInfo]:
        """HeadInfo of every version of a head, oldest first, without reading its weights."""

    @abc.abstractmethod
    async def names(self, owner: str) -> list[str]:
        """The names an owner has heads under (an index: never a scan of the store)."""

    @abc.abstractmethod
    async def owners(self) -> list[str]: ...

    @abc.abstractmethod
    async def remove(self, owner: str, name: str, version: int) -> int:
        """Delete one version (0: every version); how many were deleted."""

    async def resolve(self, owner: str, name: str, version: int) -> int:
        """The version a request means (0: the latest). Raises NotFoundError."""
        check_name(name)
        versions = await self.versions(owner, name)
        if not versions:
            raise NotFoundError(f"no head named {name!r}")
        if version == 0:
            return max(versions)
        if version not in versions:
            raise NotFoundError(f"no head {name!r} version {version} (versions: {sorted(versions)})")
        return version


def _taken_message(head: pb.Head) -> str:
    return (
        f"head {head.name!r} version {head.version} is not above every version this name has had: versions are "
        f"written once and never reused (send version 0 for the next one)"
    )


def _version_zero(head: pb.Head) -> tuple[bytes, bytes]:
    """The head and its HeadInfo serialised without a version: the store's number is the truth."""
    copy = pb.Head()
    copy.CopyFrom(head)
    copy.version = 0
    return copy.SerializeToString(), head_info(copy).SerializeToString()


# ----------------------------------------------------------------------------- directory


class DirectoryHeadStore(HeadStore):
    """Heads as files: DIR/default/NAME/VERSION.head without tokens, DIR/tenants/TENANT/NAME/VERSION.head.

    A version is taken by hard-linking its file into place (``link`` fails if the name exists),
    so concurrent writers, other processes on the same volume included, never share a number; a
    deleted version leaves VERSION.gone behind so its number stays taken. File I/O runs in threads.
    """

    def __init__(self, root: str):
        self.root = pathlib.Path(root)

    def _owner_dir(self, owner: str) -> pathlib.Path:
        return self.root / "tenants" / urllib.parse.quote(owner, safe="") if owner else self.root / "default"

    @staticmethod
    def _numbers(d: pathlib.Path, suffix: str) -> list[int]:
        if not d.is_dir():
            return []
        return [
            int(p.name[: -len(suffix)])
            for p in d.iterdir()
            if p.name.endswith(suffix) and p.name[: -len(suffix)].isdigit()
        ]

    def _create(self, owner: str, head: pb.Head) -> int:
        d = self._owner_dir(owner) / head.name
        d.mkdir(parents=True, exist_ok=True)
        data, _ = _version_zero(head)
        tmp = d / f".{uuid.uuid4().hex}.tmp"
        tmp.write_bytes(data)
        try:
            taken = max(self._numbers(d, ".head") + self._numbers(d, ".gone"), default=0)
            if head.version:  # explicit: above every version ever taken, like RedisHeadStore
                try:
                    if head.version <= taken:
                        raise FileExistsError
                    os.link(tmp, d / f"{head.version}.head")
                except FileExistsError:
                    raise HeadVersionTakenError(_taken_message(head)) from None
                return head.version
            version = taken + 1
            while True:
                try:
                    os.link(tmp, d / f"{version}.head")
                    return version
                except FileExistsError:  # another writer took it first
                    version += 1
        finally:
            tmp.unlink(missing_ok=True)

    async def create(self, owner: str, head: pb.Head) -> int:
        return await asyncio.to_thread(self._create, owner, head)

    def _read(self, owner: str, name: str, version: int) -> pb.Head | None:
        p = self._owner_dir(owner) / name / f"{version}.head"
        try:
            head = pb.Head.FromString(p.read_bytes())
        except FileNotFoundError:
            return None
        head.version = version
        return head

    async def read(self, owner: str, name: str, version: int) -> pb.Head | None:
        return await asyncio.to_thread(self._read, owner, name, version)

    async def versions(self, owner: str, name: str) -> list[int]:
        return sorted(await asyncio.to_thread(self._numbers, self._owner_dir(owner) / name, ".head"))

    def _infos(self, owner: str, name: str) -> list[pb.HeadInfo]:
        heads = (self._read(owner, name, v) for v in sorted(self._numbers(self._owner_dir(owner) / name, ".head")))
        return [head_info(h) for h in heads if h is not None]

    async def infos(self, owner: str, name: str) -> list[pb.HeadInfo]:
        return await asyncio.to_thread(self._infos, owner, name)

    def _names(self, owner: str) -> list[str]:
        d = self._owner_dir(owner)
        return sorted(p.name for p in d.iterdir() if p.is_dir() and self._numbers(p, ".head")) if d.is_dir() else []

    async def names(self, owner: str) -> list[str]:
        return await asyncio.to_thread(self._names, owner)

    def _owners(self) -> list[str]:
        d = self.root / "tenants"
        tenants = [urllib.parse.unquote(p.name) for p in d.iterdir() if p.is_dir()] if d.is_dir() else []
        return sorted(tenants + ([""] if (self.root / "default").is_dir() else []))

    async def owners(self) -> list[str]:
        return await asyncio.to_thread(self._owners)

    def _remove(self, owner: str, name: str, version: int) -> int:
        d = self._owner_dir(owner) / name
        deleted = 0
        for v in [version] if version else self._numbers(d, ".head"):
            p = d / f"{v}.head"
            if not p.exists():
                continue
            (d / f"{v}.gone").touch()  # first: the number stays taken even if we die here
            try:
                p.unlink()
                deleted += 1
            except FileNotFoundError:  # another process deleted it meanwhile
                pass
        return deleted

    async def remove(self, owner: str, name: str, version: int) -> int:
        return await asyncio.to_thread(self._remove, owner, name, version)


# ----------------------------------------------------------------------------- Redis

# Takes a version atomically. KEYS: heads hash, infos hash, version counter, names index;
# ARGV: version (0: the next), head bytes, info bytes, name. Returns the version, or -1 when an
# explicit version is not above every version ever taken (the counter is a high-water mark that
# deletes never lower, so a number is never given out twice).
_CREATE = """
local v = tonumber(ARGV[1])
if v == 0 then
  v = redis.call('INCR', KEYS[3])
else
  if v <= tonumber(redis.call('GET', KEYS[3]) or '0') then return -1 end
  redis.call('SET', KEYS[3], v)
end
redis.call('HSET', KEYS[1], v, ARGV[2])
redis.call('HSET', KEYS[2], v, ARGV[3])
redis.call('SADD', KEYS[4], ARGV[4])
return v
"""
# KEYS: heads hash, infos hash, names index; ARGV: version (0: all), name. Returns how many went.
_REMOVE = """
local n
if ARGV[1] == '0' then
  n = redis.call('HLEN', KEYS[1])
  redis.call('DEL', KEYS[1], KEYS[2])
else
  n = redis.call('HDEL', KEYS[1], ARGV[1])
  redis.call('HDEL', KEYS[2], ARGV[1])
end
if redis.call('EXISTS', KEYS[1]) == 0 then redis.call('SREM', KEYS[3], ARGV[2]) end
return n
"""
OWNERS_KEY = "fbheads:owners"
HEADS_MIN_TIMEOUT_S = 2.0


def _redacted(url: str) -> str:
    """A Redis URL without its password, for messages."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


class RedisHeadStore(HeadStore):
    """Heads in a Redis shared by every replica, no TTL, one hash tag per tenant (Redis Cluster safe).

    Keys: ``fbheads:{t.TENANT}:head:NAME`` (version -> Head), ``...:info:NAME`` (version ->
    HeadInfo, so ListHeads never reads weights), ``...:seq:NAME`` (the highest version ever taken),
    ``...:names`` (the tenant's index) and ``fbheads:owners``; ``{default}`` without tokens.
    """

    def __init__(self, url: str, timeout_s: float, flag: str = "--heads-redis-url"):
        from featurebank.common.cache import redis_client

        self.url = url
        self.flag = flag
        self._redis = redis_client(url, timeout_s)
        self._create = self._redis.register_script(_CREATE)
        self._remove = self._redis.register_script(_REMOVE)
        self._checked = False

    @staticmethod
    def _keys(owner: str, name: str = "") -> tuple[str, str, str, str]:
        tag = "{t." + urllib.parse.quote(owner, safe="") + "}" if owner else "{default}"
        base = f"fbheads:{tag}"
        return f"{base}:head:{name}", f"{base}:info:{name}", f"{base}:seq:{name}", f"{base}:names"

    async def start(self) -> None:
        """Refuse a Redis whose policy evicts keys without a TTL (allkeys-*): it drops heads silently."""
        await self._check(at_start=True)

    async def _config(self, name: str) -> str:
        answer = await self._redis.config_get(name)
        # A cluster client answers per node ({node: {name: value}}) or merged ({name: value}).
        values = [v for v in answer.values() if isinstance(v, dict)] or [answer]
        return ",".join(sorted({str(v.get(name, "")) for v in values}))

    async def _check(self, at_start: bool) -> None:
        from redis.exceptions import ConnectionError as RedisConnectionError
        from redis.exceptions import ResponseError
        from redis.exceptions import TimeoutError as RedisTimeout

        where = f"the heads Redis {_redacted(self.url)}"
        try:
            policy = await self._config("maxmemory-policy")
            appendonly = await self._config("appendonly")
            save = await self._config("save")
        except (RedisConnectionError, RedisTimeout, OSError) as e:
            if at_start:  # checked again before the first head RPC: the rest of the server serves
                logger.warning(
                    "%s is unreachable (%s: %s): head RPCs answer UNAVAILABLE until it is", where, type(e).__name__, e
                )
                return
            raise UnavailableError(f"head store (Redis) unavailable: {type(e).__name__}: {e}") from None
        except ResponseError as e:  # managed Redis often refuses CONFIG: say what to check by hand
            logger.warning(
                "%s refuses CONFIG GET (%s): make sure its maxmemory-policy is noeviction (or volatile-*) "
                "and it persists (appendonly yes): heads have no TTL and are not recomputable",
                where,
                e,
            )
            self._checked = True
            return
        if "allkeys-" in policy:
            message = (
                f"{where} has maxmemory-policy {policy}: cache pressure would evict heads silently. Point "
                f"{self.flag} at a Redis with maxmemory-policy noeviction and appendonly yes "
                f"(deploy/k8s/components/heads-redis), or set its policy to noeviction"
            )
            if at_start:
                raise HeadStoreEvictableError(message)
            raise FailedPreconditionError(message)
        if appendonly != "yes" and not save.strip():
            logger.warning(
                "%s neither appends (appendonly %s) nor snapshots (save ''): a restart of it loses every head",
                where,
                appendonly,
            )
        self._checked = True

    async def _do(self, coro):
        try:
            if not self._checked:
                await self._check(at_start=False)
            return await coro
        except FeatureBankError:
            coro.close()
            raise
        except Exception as e:  # the head store is not optional for head RPCs: say so
            raise UnavailableError(f"head store (Redis) unavailable: {type(e).__name__}: {e}") from None

    async def create(self, owner: str, head: pb.Head) -> int:
        data, info = _version_zero(head)
        await self._do(self._redis.sadd(OWNERS_KEY, owner))
        version = int(
            await self._do(
                self._create(keys=list(self._keys(owner, head.name)), args=[head.version, data, info, head.name])
            )
        )
        if version < 0:
            raise HeadVersionTakenError(_taken_message(head))
        return version

    async def read(self, owner: str, name: str, version: int) -> pb.Head | None:
        data = await self._do(self._redis.hget(self._keys(owner, name)[0], str(version)))
        if data is None:
            return None
        head = pb.Head.FromString(data)
        head.version = version
        return head

    async def versions(self, owner: str, name: str) -> list[int]:
        return sorted(int(v) for v in await self._do(self._redis.hkeys(self._keys(owner, name)[1])))

    async def infos(self, owner: str, name: str) -> list[pb.HeadInfo]:
        found = await self._do(self._redis.hgetall(self._keys(owner, name)[1]))
        infos = []
        for version, data in sorted(found.items(), key=lambda kv: int(kv[0])):
            info = pb.HeadInfo.FromString(data)
            info.version = int(version)
            infos.append(info)
        return infos

    async def names(self, owner: str) -> list[str]:
        return sorted(n.decode() for n in await self._do(self._redis.smembers(self._keys(owner)[3])))

    async def owners(self) -> list[str]:
        return sorted(o.decode() for o in await self._do(self._redis.smembers(OWNERS_KEY)))

    async def remove(self, owner: str, name: str, version: int) -> int:
        head_key, info_key, _, names_key = self._keys(owner, name)
        return int(await self._do(self._remove(keys=[head_key, info_key, names_key], args=[version, name])))

    async def close(self) -> None:
        await self._redis.aclose()


def open_head_store(config) -> HeadStore:
    """The heads store a ServerConfig names: --heads-redis-url, else the cache's --redis-url (refused at
    start-up if it evicts with allkeys-*), else --heads-dir."""
    # A head RPC that times out fails (a cache read that does is only a miss), and head RPCs are
    # off the hot path: give the heads Redis at least 2 s, whatever the cache's round-trip budget.
    timeout_s = max(config.redis_timeout_ms / 1000.0, HEADS_MIN_TIMEOUT_S)
    if config.heads_redis_url:
        return RedisHeadStore(config.heads_redis_url, timeout_s, flag="--heads-redis-url")
    if config.redis_url:
        return RedisHeadStore(
            config.redis_url, timeout_s, flag="--heads-redis-url (without it heads live in the --redis-url Redis)"
        )
    return DirectoryHeadStore(config.heads_path)
