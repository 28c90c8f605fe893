"""Malicious images against a real server: refused quickly, each alone, with the worker's memory flat and capped."""

from __future__ import annotations

import logging

import grpc
import numpy as np
import pytest
from malicious_images import animated_gif, ico_bomb, tiff_bytes

from featurebank.client import FeatureBank
from fixture_backbones import ALLOC_MARKER
from support import png_bytes, random_images

logger = logging.getLogger(__name__)
FAULTY = "fixture_backbones:FaultyToy"


def peak_rss_mb(pid: int) -> float:
    """A process's peak resident memory (VmHWM) in MB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmHWM for pid {pid}")


def decoders(server, preprocess_workers: str) -> list[int]:
    """The processes that decode: the model worker without a pool, else the preprocessing processes."""
    pids = server.worker_pids() if preprocess_workers == "0" else server.preprocess_pids()
    assert len(pids) == (1 if preprocess_workers == "0" else int(preprocess_workers)), pids
    return sorted(pids)


@pytest.mark.parametrize("preprocess_workers", ["0", "2"])
def test_malicious_images_fail_alone_and_worker_memory_stays_flat(start_server, preprocess_workers):
    """An .ico PNG bomb and a TIFF get INVALID_ARGUMENT naming the format, a 3,000-frame GIF gives its first
    frame's features, their neighbours get features, and the peak memory of the process that decodes
    (the worker, or each preprocessing process) barely moves."""
    # The 3,000-frame GIF is ~8 MB: the server must receive it to prove it decodes one frame only.
    server = start_server(
        "--backbone", "toy", "--max-message-bytes", str(64 << 20), "--preprocess-workers", preprocess_workers
    )
    good = random_images(2, seed=70)
    gif, first_frame = animated_gif(3000)
    (worker,) = server.worker_pids()
    pids = decoders(server, preprocess_workers)
    with FeatureBank(server.target, timeout_s=120) as bank:
        bank.extract(good, backbone="toy")  # the decoders' steady state, before the bombs
        before_mb = {p: peak_rss_mb(p) for p in pids}
        outcomes = bank.extract_items([good[0], ico_bomb(), gif, tiff_bytes(), good[1]], backbone="toy")
        after_mb = {p: peak_rss_mb(p) for p in pids}
        expected_gif = bank.extract([png_bytes(first_frame)], backbone="toy")[0]
    logger.info("decoders' peak memory %s MB before the bombs, %s MB after", before_mb, after_mb)
    assert [o.error for o in (outcomes[0], outcomes[2], outcomes[4])] == [None] * 3
    ico, tiff = outcomes[1].error, outcomes[3].error
    assert ico.code == grpc.StatusCode.INVALID_ARGUMENT and "ICO is not accepted" in ico.message, ico
    assert tiff.code == grpc.StatusCode.INVALID_ARGUMENT and "TIFF is not accepted" in tiff.message, tiff
    np.testing.assert_allclose(outcomes[2].features, expected_gif, rtol=1e-6)
    for p in pids:
        assert after_mb[p] - before_mb[p] < 100, f"peak memory of {p} rose {after_mb[p] - before_mb[p]:.0f} MB"
    assert server.worker_pids() == [worker]
    assert decoders(server, preprocess_workers) == pids
    assert server.metric("featurebank_worker_restarts_total") == 0
    assert server.metric("featurebank_preprocess_crashes_total") == 0


@pytest.mark.parametrize("preprocess_workers", ["0", "2"])
def test_worker_memory_cap_stops_an_exotic_decoder(start_server, preprocess_workers):
    """An input whose preprocessing wants 4 GB, in a worker (or preprocessing process) capped at 2 GB, fails
    alone with a message naming the cap; the process survives it and its neighbours get features."""
    server = start_server(
        "--backbone",
        FAULTY,
        "--worker-memory-limit-mb",
        "2048",
        "--preprocess-workers",
        preprocess_workers,
        env={"FB_TEST_ALLOC_MB": "4096"},
    )
    good = random_images(2, seed=71)
    (worker,) = server.worker_pids()
    pids = decoders(server, preprocess_workers)
    with FeatureBank(server.target, timeout_s=120) as bank:
        outcomes = bank.extract_items([good[0], ALLOC_MARKER + b"x", good[1]], backbone=FAULTY)
    assert outcomes[0].error is None and outcomes[2].error is None
    err = outcomes[1].error
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT and "worker_memory_limit_mb=2048" in err.message, err
    assert all(peak_rss_mb(p) < 2048 for p in pids)
    assert server.worker_pids() == [worker]
    assert decoders(server, preprocess_workers) == pids
