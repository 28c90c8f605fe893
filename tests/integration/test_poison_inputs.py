"""Poison inputs: counted per content key across requests and per tenant, refused at once after two crashes."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from featurebank.client import FeatureBank
from featurebank.common.errors import WorkerCrashError
from featurebank.common.metrics import Metrics
from featurebank.engine.batching import DynamicBatcher, PendingItem
from featurebank.engine.pool import WorkerPool
from featurebank.workers.backbones.base import InputItem
from fixture_backbones import KILL_MARKER
from support import random_images

FAULTY = "fixture_backbones:FaultyToy"


# Where FaultyToy's KILL input dies: in the model worker (no pool), or in a preprocessing process.
CRASH_METRIC = {"0": "featurebank_worker_restarts_total", "2": "featurebank_preprocess_crashes_total"}


@pytest.mark.parametrize("preprocess_workers", ["0", "2"])
def test_an_input_that_crashed_workers_twice_is_refused_at_once_whoever_sends_it(start_server, preprocess_workers):
    """After an input crashed workers (or preprocessing processes) twice, a later request (another client)
    sending it gets INTERNAL at once, with no new crash, and its neighbour gets features."""
    server = start_server(
        "--backbone", FAULTY, "--max-batch-delay-ms", "20", "--preprocess-workers", preprocess_workers
    )
    crashes = CRASH_METRIC[preprocess_workers]
    poison = KILL_MARKER + b"poison-across-requests"
    good = random_images(1, seed=90)
    with FeatureBank(server.target, timeout_s=180) as first:
        (o,) = first.extract_items([poison], backbone=FAULTY)
    assert o.error.code == grpc.StatusCode.INTERNAL
    assert server.metric(crashes) == 2
    with FeatureBank(server.target, timeout_s=180) as second:
        outcomes = second.extract_items([good[0], poison], backbone=FAULTY)
    assert outcomes[0].error is None
    assert outcomes[1].error.code == grpc.StatusCode.INTERNAL
    assert "refused" in outcomes[1].error.message, outcomes[1].error.message
    assert server.metric(crashes) == 2
    assert server.metric("featurebank_worker_restarts_total") == (2 if preprocess_workers == "0" else 0)
    assert server.metric("featurebank_poison_refused_total") == 1


async def test_poison_is_counted_per_key_and_per_tenant():
    """Crashes count against the tenant whose input crashed the worker; the same key sent by another tenant
    is refused without reaching a worker, counted for that tenant."""
    metrics = Metrics()
    batcher = DynamicBatcher(max_batch_size=4, max_batch_delay_ms=5, max_queue_size=64)
    pool = WorkerPool(FAULTY, options={"batch_buckets": (1, 4)}, num_workers=1, batcher=batcher, metrics=metrics)
    pool.spawn()
    await pool.wait_ready()
    loop = asyncio.get_running_loop()
    try:

        def item(tenant: str) -> PendingItem:
            return PendingItem(
                InputItem("image", KILL_MARKER + b"tenant-poison"),
                "pooled",
                loop.create_future(),
                key="fb1:poison",
                tenant=tenant,
            )

        from_a = item("a")
        batcher.submit(from_a)
        with pytest.raises(WorkerCrashError, match="crashed"):
            await asyncio.wait_for(from_a.future, 120)
        from_b = item("b")
        batcher.submit(from_b)
        with pytest.raises(WorkerCrashError, match="refused"):
            await asyncio.wait_for(from_b.future, 30)
    finally:
        await pool.close()
    sample = metrics.registry.get_sample_value
    assert sample("featurebank_input_crashes_total", {"backbone": FAULTY, "tenant": "a"}) == 2
    assert sample("featurebank_input_crashes_total", {"backbone": FAULTY, "tenant": "b"}) is None
    assert sample("featurebank_poison_refused_total", {"backbone": FAULTY, "tenant": "b"}) == 1
    assert sample("featurebank_worker_restarts_total", {"backbone": FAULTY}) == 2
