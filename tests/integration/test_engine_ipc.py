"""The engine over its Unix socket: a real EngineServer (toy workers) and EngineClients in one event loop."""

from __future__ import annotations

import asyncio
import os
import tempfile

import grpc
import numpy as np
import pytest
import pytest_asyncio

from featurebank.common.errors import DeadlineExceededError, FeatureBankError, QueueFullError
from featurebank.server.config import ServerConfig
from featurebank.server.engine_client import EngineClient
from featurebank.server.engine_server import EngineServer
from featurebank.server.servicer import ServedBackbone
from featurebank.workers.backbones.base import InputItem
from support import random_images

pytestmark = pytest.mark.slow


@pytest_asyncio.fixture(loop_scope="function")  # the test's loop: the engine's tasks run while it awaits
async def engine():
    """An engine on a private socket: one toy worker, items wait up to 2 s for a batch of 8, queue of 8."""
    config = ServerConfig(backbone=["toy"], max_batch_size=8, max_batch_delay_ms=2000, max_queue_size=8)
    run_dir = tempfile.mkdtemp(prefix="fb-engine-test-")
    server = EngineServer(config, os.path.join(run_dir, "engine.sock"))
    task = asyncio.ensure_future(server.run())
    clients: list[EngineClient] = []

    async def connect() -> EngineClient:
        client = EngineClient(server.socket_path)
        client.start()
        await asyncio.wait_for(client.wait_ready(), 120)
        clients.append(client)
        return client

    yield server, connect
    for c in clients:
        await c.close()
    server.stop()
    await asyncio.wait_for(task, 60)


def _served(client: EngineClient) -> ServedBackbone:
    return ServedBackbone(info=client.backbones["toy"], batcher=None)


async def _compute(client: EngineClient, keys: list[str], images: list[bytes], deadline: float | None = None):
    payloads = {k: InputItem("image", img) for k, img in zip(keys, images)}
    served = _served(client)
    return await client.compute(served, served.info.default_layer, keys, payloads, deadline=deadline)


async def test_compute_answers_features_and_per_item_errors(engine):
    """Features per key, and a bad input's INVALID_ARGUMENT as its own outcome, neighbours unharmed."""
    _, connect = engine
    client = await connect()
    good = random_images(1, seed=21)[0]
    out = await _compute(client, ["good", "bad"], [good, b"not an image"])
    assert isinstance(out["good"].features, np.ndarray) and out["good"].features.size > 0
    assert isinstance(out["bad"], FeatureBankError) and out["bad"].code == grpc.StatusCode.INVALID_ARGUMENT


async def test_queue_full_refuses_the_request_across_the_socket(engine):
    """More new keys than the engine's queue holds: QueueFullError (RESOURCE_EXHAUSTED) raised in the frontend."""
    _, connect = engine
    client = await connect()
    images = random_images(9, seed=22)
    with pytest.raises(QueueFullError, match="max_queue_size=8"):
        await _compute(client, [f"k{i}" for i in range(9)], images)


async def test_cancel_in_one_frontend_leaves_the_other_waiting(engine):
    """Two frontends wait on one key; one cancels: the owner stays, the other gets the features, computed once."""
    server, connect = engine
    a, b = await connect(), await connect()
    image = random_images(1, seed=23)[0]
    task_a = asyncio.ensure_future(_compute(a, ["same"], [image]))
    task_b = asyncio.ensure_future(_compute(b, ["same"], [image]))
    flights = server.engine.misses.flights
    while "same" not in flights or flights.get("same").waiters < 2:
        await asyncio.sleep(0.01)
    task_a.cancel()
    out = await task_b  # an abandoned owner would have answered b with CancelledError
    assert isinstance(out["same"].features, np.ndarray)
    assert task_a.cancelled()
    assert server.metrics.batch_size.labels("toy")._sum.get() == 1  # one item computed
    assert server.metrics.dropped_items.labels("toy", "cancelled")._value.get() == 0


async def test_cancel_by_the_last_waiter_drops_the_queued_item(engine):
    """The only request for a queued key is cancelled in the frontend: the engine frees the key and drops the item."""
    server, connect = engine
    client = await connect()
    task = asyncio.ensure_future(_compute(client, ["alone"], random_images(1, seed=24)))
    batcher = server.engine.batchers["toy"]
    while len(batcher) < 1:
        await asyncio.sleep(0.01)
    task.cancel()
    while "alone" in server.engine.misses.flights:
        await asyncio.sleep(0.01)
    while len(batcher):
        await asyncio.sleep(0.05)  # dropped when the batch forms (at the 2 s delay)
    assert server.metrics.dropped_items.labels("toy", "cancelled")._value.get() == 1
    assert server.metrics.batch_size.labels("toy")._sum.get() == 0
    assert not client.flights


async def test_deadline_crosses_as_remaining_time(engine):
    """A request whose deadline passes while its item is queued gets DeadlineExceededError for that item."""
    _, connect = engine
    client = await connect()
    deadline = asyncio.get_running_loop().time() + 0.2
    out = await _compute(client, ["late"], random_images(1, seed=25), deadline=deadline)
    assert isinstance(out["late"], DeadlineExceededError)
