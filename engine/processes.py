"""A spawned child process of the engine (model worker or preprocessing): its pipe, state, death and restart."""

from __future__ import annotations

import asyncio
import concurrent.futures
import enum
import itertools
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import socket
import struct
from collections.abc import Callable
from typing import Any

from featurebank.workers.messages import Shutdown, WorkerFailed

logger = logging.getLogger(__name__)

IOV_MAX = 1024  # parts one sendmsg call may take (Linux's limit)
# Waits between tries to restart a dead process (one that dies again at once is not respawned in a tight loop).
RESTART_BACKOFF_S = (0.5, 1.0, 2.0, 5.0, 10.0)


class WorkerState(enum.Enum):
    NEW = "new"
    STARTING = "starting"
    READY = "ready"
    BUSY = "busy"
    DEAD = "dead"


class WorkerDied(Exception):
    """The worker process exited while we waited on it."""


class WorkerSetupError(RuntimeError):
    """The backbone failed to load in a worker (bad name, missing weights, ...)."""


def describe_exit(code: int | None) -> str:
    """A human reason for a worker's exit code."""
    if code is None:
        return "still running"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        hint = ": killed, out of memory?" if -code == signal.SIGKILL else ""
        return f"exit {code} ({name}{hint})"
    return f"exit {code}"


class LoopChannel:
    """Whole messages over a child's pipe, read and written by the event loop itself: no thread, no
    hop between threads per message (each costs the loop a wake-up and the GIL a hand-over).

    Messages are framed as ``multiprocessing.connection.Connection`` frames them (a 4-byte
    big-endian length, or -1 and an 8-byte one), so the child's blocking Connection reads and
    writes the same bytes. It holds a second descriptor of the same socket and never changes its
    blocking mode (each call is MSG_DONTWAIT), so threads may still use the Connection before and
    after (the ready handshake, Shutdown). Raises EOFError once the child's end is closed.
    """

    def __init__(self, conn: multiprocessing.connection.Connection):
        self.conn = conn
        self._sock = socket.socket(fileno=os.dup(conn.fileno()))

    def close(self) -> None:
        self._sock.close()

    async def send(self, parts: list) -> None:
        """Write one message made of ``parts`` (bytes-like, e.g. ``framing.frame``), gathered by the
        kernel: they are not joined into one buffer first."""
        views = [memoryview(p).cast("B") for p in parts]
        n = sum(v.nbytes for v in views)
        header = struct.pack("!i", n) if n <= 0x7FFFFFFF else struct.pack("!iQ", -1, n)
        await self._send_all([memoryview(header), *(v for v in views if v.nbytes)])

    async def receive(self) -> bytearray:
        (n,) = struct.unpack("!i", await self._read_exactly(4))
        if n == -1:
            (n,) = struct.unpack("!Q", await self._read_exactly(8))
        return await self._read_exactly(n)

    async def _send_all(self, views: list[memoryview]) -> None:
        while views:
            try:
                sent = self._sock.sendmsg(views[:IOV_MAX], (), socket.MSG_DONTWAIT)
            except BlockingIOError:
                await self._ready(asyncio.get_running_loop().add_writer, asyncio.get_running_loop().remove_writer)
                continue
            except OSError as e:  # EPIPE, ECONNRESET: the child is gone
                raise EOFError(str(e)) from e
            while sent and sent >= views[0].nbytes:  # drop what went, keep the rest of a part cut short
                sent -= views.pop(0).nbytes
            if sent:
                views[0] = views[0][sent:]

    async def _read_exactly(self, n: int) -> bytearray:
        buf = bytearray(n)
        view, got = memoryview(buf), 0
        while got < n:
            try:
                k = self._sock.recv_into(view[got:], n - got, socket.MSG_DONTWAIT)
            except BlockingIOError:
                await self._ready(asyncio.get_running_loop().add_reader, asyncio.get_running_loop().remove_reader)
                continue
            except OSError as e:
                raise EOFError(str(e)) from e
            if k == 0:
                raise EOFError("the child closed its end")
            got += k
        return buf

    async def _ready(self, add: Callable, remove: Callable) -> None:
        """Wait until the socket is readable (add_reader) or writable (add_writer)."""
        fut = asyncio.get_running_loop().create_future()
        fd = self._sock.fileno()
        add(fd, lambda: fut.done() or fut.set_result(None))
        try:
            await fut
        finally:
            remove(fd)


class ChildProcess:
    """One spawned child running ``target(conn, setup)``: its pipe, state and why it died.

    The child answers a ready message (``ready_type``) or WorkerFailed first, then serves requests
    in order until Shutdown. Blocking calls (the ready handshake, replies) run in ``thread``, a
    single thread, so they keep their order. Subclasses say how messages travel (``_write``,
    ``_read``) and what state a ready message leaves the child in (``_state_when_ready``).
    """

    _ctx = multiprocessing.get_context("spawn")  # never fork a process that may hold TF/gRPC threads
    ready_type: type = object  # the first message of a child that loaded

    def __init__(self, setup: Any, *, target: Callable[[Any, Any], None], name: str, label: str, description: str):
        self.setup = setup
        self.target = target
        self.name = name  # its thread's name; the process is "featurebank-<name>"
        self.label = label  # how logs name it, e.g. "worker toy-0"
        self.description = description  # what failed to load, e.g. "backbone 'toy'"
        self.state = WorkerState.NEW
        self.process: multiprocessing.process.BaseProcess | None = None
        self.conn: multiprocessing.connection.Connection | None = None
        self.ready: Any = None  # its ready message
        self.killed_because: str | None = None  # set by a watchdog before it kills the process
        self.exited = False  # its sentinel fired, while an event loop watches it (watch_exit)
        self.watched_fd: int | None = None  # its sentinel, while an event loop watches it
        self.thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=name)
        self._channel: LoopChannel | None = None  # on ``conn``, made by ``channel()``

    def _write(self, msg: Any) -> None:
        self.conn.send(msg)

    def _read(self) -> Any:
        return self.conn.recv()

    def _state_when_ready(self, ready: Any) -> WorkerState:
        return WorkerState.READY

    def channel(self) -> LoopChannel:
        """The event loop's channel on the current pipe (a new one after a restart)."""
        if self._channel is None or self._channel.conn is not self.conn:
            self._close_channel()
            self._channel = LoopChannel(self.conn)
        return self._channel

    def _close_channel(self) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel = None

    async def died(self) -> WorkerDied:
        """WorkerDied with why the process died (it joins the process: off the event loop)."""
        return WorkerDied(await asyncio.get_running_loop().run_in_executor(self.thread, self.death_reason))

    def spawn(self) -> None:
        self._close_channel()
        parent, child = self._ctx.Pipe(duplex=True)
        self.process = self._ctx.Process(
            target=self.target, args=(child, self.setup), daemon=True, name=f"featurebank-{self.name}"
        )
        self.state = WorkerState.STARTING
        self.killed_because = None
        self.exited = False
        self.process.start()
        child.close()
        self.conn = parent

    def wait_ready(self, timeout_s: float) -> Any:
        """Block until the child reports ready; raises WorkerSetupError or WorkerDied."""
        msg = self.receive(timeout_s)
        if isinstance(msg, WorkerFailed):
            self.kill()
            raise WorkerSetupError(f"{self.description} failed to load: {msg.error}")
        if not isinstance(msg, self.ready_type):
            raise WorkerSetupError(f"unexpected first message {type(msg).__name__}")
        self.ready = msg
        self.state = self._state_when_ready(msg)
        return msg

    def write(self, msg: Any) -> None:
        """Write one message to the child's pipe; raises WorkerDied if the process is gone."""
        try:
            self._write(msg)
        except (BrokenPipeError, OSError, EOFError) as e:
            raise WorkerDied(self.death_reason()) from e

    def receive(self, timeout_s: float | None = None) -> Any:
        """Wait for the child's next message (replies come in the order requests were written)."""
        ready = multiprocessing.connection.wait([self.conn, self.process.sentinel], timeout_s)
        if not ready:
            self.kill()
            raise WorkerDied(f"no answer within {timeout_s:.0f}s")
        if self.conn in ready:
            try:
                return self._read()
            except (EOFError, OSError):
                pass
        raise WorkerDied(self.death_reason())

    def death_reason(self) -> str:
        """Why the (exited) process died; marks it DEAD."""
        self.state = WorkerState.DEAD
        self.process.join(5)
        reason = describe_exit(self.process.exitcode)
        return f"{self.killed_because}; {reason}" if self.killed_because else reason

    def kill(self) -> None:
        if self.process is not None and self.process.is_alive():
            self.process.kill()
            self.process.join(5)
        self.state = WorkerState.DEAD

    def stop(self, timeout_s: float = 5.0) -> None:
        if self.process is None:
            return
        try:
            if self.process.is_alive():
                self._write(Shutdown())
                self.process.join(timeout_s)
        except (BrokenPipeError, OSError):
            pass
        self.kill()
        self._close_channel()
        if self.conn is not None:
            self.conn.close()
        self.thread.shutdown(wait=False)

    def watch_exit(self, on_exit: Callable[[], None]) -> None:
        """Set ``exited`` and call ``on_exit`` on the running loop when the process exits (busy or idle)."""
        loop = asyncio.get_running_loop()
        fd = self.process.sentinel

        def fired() -> None:
            loop.remove_reader(fd)
            self.exited = True
            on_exit()

        loop.add_reader(fd, fired)
        self.watched_fd = fd

    def unwatch_exit(self) -> None:
        """Stop watching; done before the process is replaced, so a recycled descriptor number is never
        confused with the new sentinel."""
        if self.watched_fd is not None:
            asyncio.get_running_loop().remove_reader(self.watched_fd)
            self.watched_fd = None

    async def restart(self, start_timeout_s: float, closing: Callable[[], bool]) -> bool:
        """Kill and respawn until it is ready again, backing off between tries; False if ``closing()`` stopped it."""
        loop = asyncio.get_running_loop()
        for attempt in itertools.count():
            if closing():
                return False
            try:
                self.kill()
                self.spawn()
                await loop.run_in_executor(self.thread, self.wait_ready, start_timeout_s)
                logger.info("%s is back", self.label)
                return True
            except (WorkerDied, WorkerSetupError) as e:
                delay = RESTART_BACKOFF_S[min(attempt, len(RESTART_BACKOFF_S) - 1)]
                logger.error("restarting %s failed (%s); next try in %.1fs", self.label, e, delay)
                await asyncio.sleep(delay)
