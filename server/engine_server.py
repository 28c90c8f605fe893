"""The engine process of ``--frontends N``: one Engine serving every frontend over a Unix socket."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal

from featurebank.common.errors import FeatureBankError, UnavailableError
from featurebank.common.metrics import Metrics
from featurebank.engine.misses import Computed
from featurebank.server import engine_messages as msgs
from featurebank.server.config import ServerConfig
from featurebank.server.engine_core import Engine

logger = logging.getLogger(__name__)


class _Connection:
    """One frontend: its stream, and its requests being computed (by request id)."""

    def __init__(self, writer: asyncio.StreamWriter):
        self.writer = writer
        self.tasks: dict[int, asyncio.Task] = {}
        self.closed = False

    async def send(self, message) -> None:
        if self.closed:
            return
        try:
            await msgs.write_message(self.writer, message)
        except (ConnectionError, RuntimeError):  # the frontend went away: its reader cleans up
            self.closed = True


class EngineServer:
    """Runs an Engine and answers ComputeRequests from frontends; pushes EngineState to each.

    A frontend that disconnects (crashed, restarted) has its requests cancelled: as with a client
    leaving in-process, a key's owner stays while another request (any frontend's) waits on it.
    """

    def __init__(self, config: ServerConfig, socket_path: str, cache_url: str = ""):
        from featurebank.server.app import make_cache  # the cache the frontends read (claims, writes)

        self.config = config
        self.socket_path = socket_path
        self.metrics = Metrics()
        self.cache = make_cache(config, self.metrics, cache_url)  # cache_url: the pod's embedded cache
        self.engine = Engine(config, self.metrics, self.cache, on_ready_change=self._on_ready_change)
        self.connections: set[_Connection] = set()
        self.server: asyncio.AbstractServer | None = None
        self._stop = asyncio.Event()
        self._push_tasks: set[asyncio.Task] = set()

    def state(self) -> msgs.EngineState:
        backbones = [b.info for b in self.engine.backbones.values()] if self.engine.backbones else None
        return msgs.EngineState(backbones=backbones, ready_workers=self.engine.ready_counts())

    def _on_ready_change(self, backbone: str, ready: int) -> None:
        if self.engine.backbones:  # before that, the state pushed once every worker is up says it all
            self._push_state()

    def _push_state(self) -> None:
        state = self.state()
        for conn in list(self.connections):
            task = asyncio.ensure_future(conn.send(state))
            self._push_tasks.add(task)  # held until done: the loop keeps only weak references
            task.add_done_callback(self._push_tasks.discard)

    async def run(self) -> None:
        """Spawn the workers, listen, push SERVING once every worker is ready, run until stop()."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket_path)  # a previous engine's (crashed) socket
        self.engine.spawn()
        self.server = await asyncio.start_unix_server(self._serve, path=self.socket_path)
        os.chmod(self.socket_path, 0o600)  # the run dir is private too: only this user's frontends
        try:
            ready = await self.engine.wait_ready()
        except BaseException:
            await self._close()
            raise
        for b in ready.values():
            logger.info("engine: serving %s (fingerprint %s)", b.info.name, b.info.fingerprint[:12])
        self._push_state()
        await self._stop.wait()
        await self._close()

    def stop(self) -> None:
        self._stop.set()

    async def _close(self) -> None:
        if self.server is not None:
            self.server.close()
        for conn in list(self.connections):
            for task in conn.tasks.values():
                task.cancel()
            conn.writer.close()
        await self.engine.misses.flights.close()
        await self.engine.close()
        await self.cache.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = _Connection(writer)
        self.connections.add(conn)
        await conn.send(self.state())
        try:
            while True:
                message = await msgs.read_message(reader)
                if isinstance(message, msgs.ComputeRequest):
                    task = asyncio.ensure_future(self._compute(conn, message))
                    conn.tasks[message.request_id] = task
                    task.add_done_callback(lambda _, rid=message.request_id: conn.tasks.pop(rid, None))
                elif isinstance(message, msgs.CancelCompute):
                    task = conn.tasks.get(message.request_id)
                    if task is not None:
                        task.cancel()
                else:
                    logger.error("engine: unexpected %s from a frontend; closing it", type(message).__name__)
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the frontend closed (stopped, crashed)
        finally:
            conn.closed = True
            self.connections.discard(conn)
            for task in list(conn.tasks.values()):
                task.cancel()
            writer.close()

    async def _compute(self, conn: _Connection, req: msgs.ComputeRequest) -> None:
        served = self.engine.backbones.get(req.backbone)
        if served is None:
            error = UnavailableError(f"the engine does not serve {req.backbone!r} (yet): retry")
            await conn.send(msgs.ComputeResult(req.request_id, error=msgs.encode_error(error)))
            return
        loop = asyncio.get_running_loop()
        recent = self.engine.misses.recent
        # Written a moment ago by an owner whose cache write raced this frontend's cache read.
        outcomes: dict[str, Computed | BaseException] = {
            k: Computed(recent[k], from_cache=True) for k in req.keys if k in recent
        }
        todo = [k for k in req.keys if k not in outcomes]
        try:
            if todo:
                outcomes.update(
                    await self.engine.misses.compute(
                        served,
                        req.layer,
                        todo,
                        dict(zip(req.keys, req.payloads)),
                        deadline=None if req.timeout_s is None else loop.time() + req.timeout_s,
                        tenant=req.tenant,
                        claim=req.claim,
                        write=req.write,
                        wait_for_room=req.wait_for_room,
                    )
                )
        except FeatureBankError as e:  # QueueFullError: the whole request is refused
            await conn.send(msgs.ComputeResult(req.request_id, error=msgs.encode_error(e)))
            return
        result = msgs.ComputeResult(req.request_id)
        for key in req.keys:
            o = outcomes[key]
            if isinstance(o, BaseException):
                result.features.append(None)
                result.from_cache.append(False)
                result.errors.append(msgs.encode_error(o))
            else:
                result.features.append(o.features)
                result.from_cache.append(o.from_cache)
                result.errors.append(None)
        await conn.send(result)


async def serve_engine(config: ServerConfig, socket_path: str, cache_url: str = "") -> None:
    """The engine process's main: run until SIGTERM (the supervisor sends it once every frontend drained)."""
    server = EngineServer(config, socket_path, cache_url)
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, server.stop)
    # Ctrl-C reaches the whole process group: the supervisor drains the frontends first, then stops us.
    loop.add_signal_handler(signal.SIGINT, lambda: None)
    await server.run()
    logger.info("engine stopped")
