"""Health follows the workers, and a watchdog gets stuck workers back: real servers, real processes."""

from __future__ import annotations

import os
import signal

import grpc
import pytest

from featurebank.client import FeatureBank
from fixture_backbones import HANG_MARKER
from support import random_images, wait_until

FAULTY = "fixture_backbones:FaultyToy"
SERVICE = "featurebank.v1.FeatureBank"


def test_health_is_not_serving_while_a_backbone_has_no_ready_worker(start_server, tmp_path):
    """While the backbone's only worker is dead and restarting, health says NOT_SERVING; SERVING once it is back."""
    gate = tmp_path / "hold-the-restart"
    server = start_server("--backbone", FAULTY, env={"FB_TEST_LOAD_GATE_FILE": str(gate)})
    (worker,) = server.worker_pids()
    gate.touch()  # the restarted worker waits in load() until the gate is gone
    os.kill(worker, signal.SIGKILL)
    wait_until(lambda: server.health() == "NOT_SERVING", 30, "health NOT_SERVING with no ready worker")
    assert server.health(SERVICE) == "NOT_SERVING"
    assert server.health(f"{SERVICE}/{FAULTY}") == "NOT_SERVING"
    assert server.metric("featurebank_workers_ready") == 0
    gate.unlink()
    wait_until(lambda: server.health() == "SERVING", 120, "health SERVING once the worker is back")
    assert server.health(f"{SERVICE}/{FAULTY}") == "SERVING"
    with FeatureBank(server.target, timeout_s=60) as bank:
        assert bank.extract(random_images(1, seed=80), backbone=FAULTY).shape == (1, 16)


# Where FaultyToy's HANG input gets stuck: in the model worker (no pool), or in a preprocessing process.
RESTARTS = {"0": "featurebank_worker_restarts_total", "2": "featurebank_preprocess_crashes_total"}


@pytest.mark.parametrize("preprocess_workers", ["0", "2"])
def test_watchdog_kills_a_stuck_worker_and_its_batch_is_handled_like_a_crash(start_server, preprocess_workers):
    """A batch (or preprocessing chunk) stuck far past the slowest seen gets its process killed (counted); its
    neighbours are re-sent and succeed, the stuck input fails alone after its second try, and the pool keeps
    serving."""
    server = start_server(
        "--backbone",
        FAULTY,
        "--watchdog-floor-s",
        "3",
        "--watchdog-multiple",
        "10",
        "--max-batch-delay-ms",
        "20",
        "--preprocess-workers",
        preprocess_workers,
    )
    good = random_images(3, seed=81)
    with FeatureBank(server.target, timeout_s=90) as bank:
        bank.extract([good[2]], backbone=FAULTY)  # one batch seen: the slowest so far is milliseconds
        outcomes = bank.extract_items([good[0], HANG_MARKER + b"stuck", good[1]], backbone=FAULTY)
        assert outcomes[0].error is None and outcomes[2].error is None
        assert outcomes[1].error.code == grpc.StatusCode.INTERNAL
        assert "stuck" in outcomes[1].error.message, outcomes[1].error.message
        assert bank.extract(random_images(1, seed=82), backbone=FAULTY).shape == (1, 16)
    assert server.metric("featurebank_worker_watchdog_kills_total") == 2
    assert server.metric(RESTARTS[preprocess_workers]) == 2
    assert server.metric("featurebank_worker_restarts_total") == (2 if preprocess_workers == "0" else 0)
    assert "watchdog" in server.log()
