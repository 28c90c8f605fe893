"""The feature cache's commands pipelined over one connection, RESP written and parsed by hiredis.

redis-py's asyncio client spends ~150-200 us of Python per MGET (connection pool checkout,
command packing, response callbacks); this spends ~12-40 us for the same command (measured
in one run, one 5 KB value: ``benchmarks/redis_read_cost.py``). That difference was the largest
part of a single-image hit's cost beyond gRPC's, and a miss makes five such round trips (read,
claim, write, release, and the version-1 read). Redis Cluster, TLS and URL options this does
not know stay on redis-py.

The wire format is hiredis's (``pack_command``, ``Reader``), the transport asyncio's own: no
RESP is parsed by hand here. Replies come back in the order commands were sent, so each one
goes to the oldest waiting future; a caller that left (cancelled, timed out) leaves its future
in place and its reply is dropped when it arrives, so no later caller ever gets another's reply.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Sequence

import hiredis
from redis.connection import UnixDomainSocketConnection, parse_url

# URL parts this client understands; a URL with any other (TLS, RESP3, socket options...) is
# read through redis-py instead.
_UNDERSTOOD = frozenset({"host", "port", "db", "username", "password", "path", "connection_class"})


class CacheConnectionError(ConnectionError):
    """The cache connection closed or broke; commands in flight on it fail with this."""


def pipelined_connection_for(url: str, timeout_s: float) -> PipelinedConnection | None:
    """A ``PipelinedConnection`` for a plain ``redis://`` or ``unix://`` URL, or None where redis-py must serve."""
    if not url.startswith(("redis://", "unix://")):
        return None  # rediss:// (TLS), redis+cluster://, ...
    params = parse_url(url)
    if not params.keys() <= _UNDERSTOOD:
        return None
    if params.get("connection_class", UnixDomainSocketConnection) is not UnixDomainSocketConnection:
        return None
    return PipelinedConnection(params, timeout_s)


class _Protocol(asyncio.Protocol):
    """One connection: commands written as they come, replies matched to them in order."""

    def __init__(self) -> None:
        self._reader = hiredis.Reader()
        self._waiting: collections.deque[asyncio.Future] = collections.deque()
        self._transport: asyncio.Transport | None = None
        self.closed = False

    def connection_made(self, transport) -> None:
        self._transport = transport

    def data_received(self, data: bytes) -> None:
        self._reader.feed(data)
        try:
            while (reply := self._reader.gets()) is not False:
                future = self._waiting.popleft()  # IndexError: a reply nobody asked for
                if future.done():  # its caller left
                    continue
                if isinstance(reply, hiredis.ReplyError):
                    future.set_exception(reply)
                else:
                    future.set_result(reply)
        except (hiredis.ProtocolError, IndexError) as e:
            self.abort(CacheConnectionError(f"the cache's replies are out of step ({type(e).__name__}: {e})"))

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail_all(CacheConnectionError(f"the cache connection closed ({exc or 'by the server'})"))

    def _fail_all(self, error: Exception) -> None:
        self.closed = True
        while self._waiting:
            future = self._waiting.popleft()
            if not future.done():
                future.set_exception(error)

    def send(self, args: Sequence) -> asyncio.Future:
        """Write one command; the future gets its reply (or the error that ends the connection)."""
        if self.closed or self._transport is None:
            raise CacheConnectionError("the cache connection is closed")
        future = asyncio.get_running_loop().create_future()
        self._waiting.append(future)
        self._transport.write(hiredis.pack_command(tuple(args)))
        return future

    def send_many(self, commands: Sequence[Sequence]) -> list[asyncio.Future]:
        """Write several commands at once (one write, a pipeline); a future for each reply."""
        if self.closed or self._transport is None:
            raise CacheConnectionError("the cache connection is closed")
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in commands]
        self._waiting.extend(futures)
        self._transport.write(b"".join(hiredis.pack_command(tuple(c)) for c in commands))
        return futures

    def abort(self, error: Exception) -> None:
        """Close at once, failing every command in flight (a hung or confused connection)."""
        self._fail_all(error)
        if self._transport is not None:
            self._transport.abort()


class PipelinedConnection:
    """Commands over one lazily opened connection, reopened by the next command after it breaks.

    Callers bound each call with their own timeout and call ``abort()`` when it passes: a server
    that stopped answering must not keep old commands queued ahead of new ones.
    """

    def __init__(self, params: dict, timeout_s: float):
        self._path: str | None = params.get("path")
        self._host: str = params.get("host", "localhost")
        self._port: int = int(params.get("port", 6379))
        self._db = int(params.get("db") or 0)
        self._username: str | None = params.get("username")
        self._password: str | None = params.get("password")
        self.timeout_s = timeout_s
        self._protocol: _Protocol | None = None
        self._opening: asyncio.Lock | None = None

    async def mget(self, keys: Sequence[str]) -> list[bytes | None]:
        protocol = self._protocol
        if protocol is None or protocol.closed:
            protocol = await self._open()
        return await protocol.send(("MGET", *keys))

    async def execute_many(self, commands: Sequence[Sequence]) -> list:
        """Every command's reply, in order, the commands sent as one pipeline (not a transaction).

        Raises the first error reply (after every reply is in, so none is left unretrieved).
        """
        protocol = self._protocol
        if protocol is None or protocol.closed:
            protocol = await self._open()
        replies = await asyncio.gather(*protocol.send_many(commands), return_exceptions=True)
        for reply in replies:
            if isinstance(reply, BaseException):
                raise reply
        return replies

    async def _open(self) -> _Protocol:
        if self._opening is None:
            self._opening = asyncio.Lock()
        async with self._opening:  # one connection, however many reads find it missing at once
            if self._protocol is not None and not self._protocol.closed:
                return self._protocol
            loop = asyncio.get_running_loop()
            async with asyncio.timeout(self.timeout_s):
                if self._path is not None:
                    _, protocol = await loop.create_unix_connection(_Protocol, self._path)
                else:
                    _, protocol = await loop.create_connection(_Protocol, self._host, self._port)
                try:
                    if self._password is not None:
                        auth = (self._username, self._password) if self._username else (self._password,)
                        await protocol.send(("AUTH", *auth))
                    if self._db:
                        await protocol.send(("SELECT", self._db))
                except BaseException:
                    protocol.abort(CacheConnectionError("the cache connection was not set up"))
                    raise
            self._protocol = protocol
            return protocol

    def abort(self) -> None:
        """Drop the connection and fail what is in flight on it; the next read opens a new one."""
        if self._protocol is not None:
            self._protocol.abort(CacheConnectionError("the cache did not answer in time; reconnecting"))
            self._protocol = None

    async def close(self) -> None:
        if self._protocol is not None:
            self._protocol.abort(CacheConnectionError("the cache is closing"))
            self._protocol = None
