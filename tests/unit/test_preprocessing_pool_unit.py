"""The preprocessing pool on its own: real spawned processes, no server, no TensorFlow in them."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from featurebank.common.errors import FeatureBankError
from featurebank.common.metrics import Metrics
from featurebank.engine.batching import PendingItem
from featurebank.engine.crashes import CrashLedger
from featurebank.engine.preprocess_pool import PreprocessPool
from featurebank.workers.backbones.base import BackboneInfo, InputItem, LayerSpec
from featurebank.workers.backbones.images import image_input
from featurebank.workers.messages import PREPROCESSED
from support import random_images

TOY_INFO = BackboneInfo("toy", "f" * 64, "image", "pooled", (LayerSpec("pooled", (16,)),), (32, 32, 3), "")


async def test_items_of_one_turn_are_spread_over_the_processes_in_chunks_without_tensorflow():
    """Items submitted in one loop turn come back preprocessed exactly as the backbone does it, in one chunk per
    process (not one round trip per item); a bad item fails alone; no process imported TensorFlow."""
    metrics = Metrics()
    pool = PreprocessPool("toy", options={}, num_processes=2, metrics=metrics, crashes=CrashLedger("toy", metrics))
    assert await pool.start(TOY_INFO)
    loop = asyncio.get_running_loop()
    try:
        assert not pool.tensorflow_loaded
        raw = [InputItem("image", b) for b in random_images(8, seed=86)]
        raw.insert(3, InputItem("image", b"not an image"))
        items = [PendingItem(r, "pooled", loop.create_future(), key=f"k{i}") for i, r in enumerate(raw)]
        results = await asyncio.gather(*(pool.preprocess(it) for it in items), return_exceptions=True)
        chunks = next(pool._chunk_ids)
    finally:
        await pool.close()
    assert chunks == 2, chunks  # 9 items, 2 processes: two round trips
    assert isinstance(results[3], FeatureBankError) and results[3].code.name == "INVALID_ARGUMENT"
    for r, got in zip(raw, results):
        if r.payload == b"not an image":
            continue
        assert got.kind == PREPROCESSED
        np.testing.assert_array_equal(got.payload, image_input(r, "toy", 40_000_000, (32, 32)))


async def test_a_backbone_that_preprocesses_only_with_its_model_leaves_the_pool_disabled():
    """A backbone whose preprocess() may need its model (overridden without load_preprocessing) is preprocessed
    by its model workers: start() says so and the pool stays disabled."""
    metrics = Metrics()
    pool = PreprocessPool(
        "fixture_backbones:ModelBoundPreprocessing",
        options={},
        num_processes=1,
        metrics=metrics,
        crashes=CrashLedger("x", metrics),
    )
    assert not await pool.start(TOY_INFO)
    assert not pool.enabled and pool.ready_count == 0
    await pool.close()


@pytest.mark.parametrize(
    "files, quota_cpus",
    [
        ({"cpu.max": "150000 100000\n"}, 2),  # cgroup v2, 1.5 CPUs: rounded up
        ({"cpu.max": "max 100000\n"}, None),  # v2, no quota
        ({"cpu/cpu.cfs_quota_us": "100000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 1),  # v1, 1 CPU
        ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),  # v1, no quota
        ({}, None),  # no cgroup files
    ],
)
def test_usable_cpus_follows_affinity_and_the_cgroup_quota(tmp_path, files, quota_cpus):
    """usable_cpus is the affinity mask's size, lowered to a cgroup v1 or v2 CPU quota (rounded up), never 0."""
    import os

    from featurebank.common.cpus import usable_cpus

    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    affinity = len(os.sched_getaffinity(0))
    assert usable_cpus(str(tmp_path)) == (affinity if quota_cpus is None else min(affinity, quota_cpus))


def test_preprocess_workers_is_validated():
    """--preprocess-workers below -1 is refused with a message naming it and its range; -1 resolves to >= 1."""
    from featurebank.server.config import ServerConfig

    with pytest.raises(ValueError, match=r"preprocess_workers=-2.*-1 \(auto\)"):
        ServerConfig(backbone=["toy"], preprocess_workers=-2)
    assert ServerConfig(backbone=["toy"], preprocess_workers=-1).num_preprocess_workers >= 1
    assert ServerConfig(backbone=["toy"], preprocess_workers=0).num_preprocess_workers == 0
