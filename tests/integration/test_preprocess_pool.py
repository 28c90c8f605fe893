"""The preprocessing pool: decode and resize in their own processes, a bad or crashing input fails alone."""

from __future__ import annotations

import io
import os
import signal

import grpc
import numpy as np
import pytest

from featurebank.client import FeatureBank
from featurebank.server.testing import wait_until
from fixture_backbones import KILL_MARKER
from support import random_images

FAULTY = "fixture_backbones:FaultyToy"


def test_a_bad_image_among_good_ones_fails_alone_in_the_pool(start_server):
    """With --preprocess-workers 2 a corrupt image gets INVALID_ARGUMENT and its neighbours get features,
    all decoded by the pool's processes (none by the model worker)."""
    server = start_server("--backbone", "toy", "--preprocess-workers", "2")
    assert len(server.preprocess_pids()) == 2 and len(server.worker_pids()) == 1
    good = random_images(4, seed=80)
    with FeatureBank(server.target, timeout_s=120) as bank:
        outcomes = bank.extract_items([good[0], good[1], b"\x89PNG\r\n\x1a\n not really", good[2], good[3]])
    assert [o.error is None for o in outcomes] == [True, True, False, True, True]
    assert outcomes[2].error.code == grpc.StatusCode.INVALID_ARGUMENT, outcomes[2].error
    assert server.metric("featurebank_preprocess_duration_seconds_count", backbone="toy") == 5
    assert server.metric("featurebank_preprocess_processes_ready", backbone="toy") == 2


def test_a_crashing_preprocessing_process_fails_only_its_input_and_is_restarted(start_server):
    """An input that kills its preprocessing process is retried alone, fails INTERNAL after its second crash,
    its neighbours get features, the model worker is untouched, and the pool is whole again afterwards."""
    server = start_server("--backbone", FAULTY, "--preprocess-workers", "2", "--max-batch-delay-ms", "20")
    (worker,) = server.worker_pids()
    good = random_images(3, seed=81)
    poison = KILL_MARKER + b"preprocess-poison"
    with FeatureBank(server.target, timeout_s=180) as bank:
        outcomes = bank.extract_items([good[0], poison, good[1], good[2]], backbone=FAULTY)
        assert [o.error is None for o in outcomes] == [True, False, True, True]
        assert outcomes[1].error.code == grpc.StatusCode.INTERNAL, outcomes[1].error
        assert server.metric("featurebank_preprocess_crashes_total", backbone=FAULTY) == 2
        assert server.metric("featurebank_worker_restarts_total") == 0
        wait_until(
            lambda: server.metric("featurebank_preprocess_processes_ready", backbone=FAULTY) == 2, 60, "the pool whole"
        )
        assert server.worker_pids() == [worker]
        again = bank.extract_items([poison, *random_images(2, seed=82)], backbone=FAULTY)
    assert "refused" in again[0].error.message, again[0].error
    assert again[1].error is None and again[2].error is None
    assert server.metric("featurebank_preprocess_crashes_total", backbone=FAULTY) == 2
    assert len(server.preprocess_pids()) == 2


def _features(start_server, backbone: str, workers: str, inputs: list) -> list[np.ndarray]:
    server = start_server("--backbone", backbone, "--preprocess-workers", workers)
    with FeatureBank(server.target, timeout_s=600) as bank:
        # One input per request, so every batch is one item both ways: a model's float results may
        # differ in the last bit between batch shapes, which would hide what this compares.
        out = [bank.extract([x], backbone=backbone)[0] for x in inputs]
    pool_items = server.metric("featurebank_preprocess_duration_seconds_count", backbone=backbone)
    assert pool_items == (0 if workers == "0" else len(inputs)), pool_items
    server.terminate()
    return out


def _jpeg(pixels: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _images() -> list[bytes]:
    # Sizes that are resized (up and down) and one already at a model's size, PNG and JPEG alike.
    rng = np.random.default_rng(83)
    pixels = [rng.integers(0, 256, s, dtype=np.uint8) for s in ((40, 48, 3), (300, 200, 3), (224, 224, 3))]
    return random_images(2, seed=84) + [_jpeg(p) for p in pixels]


@pytest.mark.parametrize(
    "backbone",
    [
        "toy",
        pytest.param("efficientnet_lite0", marks=pytest.mark.slow),
        pytest.param("minilm", marks=pytest.mark.slow),
    ],
)
def test_features_are_bit_for_bit_the_same_with_and_without_the_pool(start_server, backbone):
    """The same inputs give identical features (every bit) whether the model worker or the pool preprocesses."""
    inputs = ["a cat on a mat", "featurebank", " ".join(["long"] * 400)] if backbone == "minilm" else _images()
    without = _features(start_server, backbone, "0", inputs)
    with_pool = _features(start_server, backbone, "2", inputs)
    for a, b in zip(without, with_pool, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert a.tobytes() == b.tobytes()


def test_health_is_not_serving_while_a_backbone_has_no_ready_preprocessing_process(start_server, tmp_path):
    """With every preprocessing process of a backbone dead and restarting, health says NOT_SERVING (its items
    could not be decoded); SERVING again, and serving, once one is back."""
    gate = tmp_path / "hold-the-restart"
    server = start_server(
        "--backbone", FAULTY, "--preprocess-workers", "2", env={"FB_TEST_PREPROCESS_GATE_FILE": str(gate)}
    )
    assert server.health() == "SERVING"
    gate.touch()  # restarted processes wait in load_preprocessing() until the gate is gone
    for pid in server.preprocess_pids():
        os.kill(pid, signal.SIGKILL)
    wait_until(lambda: server.health() == "NOT_SERVING", 30, "health NOT_SERVING with no preprocessing process")
    assert server.health(f"featurebank.v1.FeatureBank/{FAULTY}") == "NOT_SERVING"
    assert server.metric("featurebank_preprocess_processes_ready", backbone=FAULTY) == 0
    assert server.metric("featurebank_workers_ready") == 1
    gate.unlink()
    wait_until(lambda: server.health() == "SERVING", 60, "health SERVING once a preprocessing process is back")
    with FeatureBank(server.target, timeout_s=60) as bank:
        assert bank.extract(random_images(1, seed=85), backbone=FAULTY).shape == (1, 16)
    assert server.metric("featurebank_preprocess_crashes_total", backbone=FAULTY) == 2


def test_items_being_preprocessed_count_against_the_queue_bound(start_server, tmp_path):
    """Items admitted but still being decoded hold their room in the queue: while 4 items of a full
    --max-queue-size 4 are held in preprocessing, another request is refused RESOURCE_EXHAUSTED at once
    (not admitted, decoded, then refused, or left waiting), and served once they are through."""
    import concurrent.futures

    from featurebank.client import FeatureBankError

    gate = tmp_path / "hold-preprocessing"
    gate.touch()
    server = start_server(
        "--backbone", FAULTY, "--preprocess-workers", "1", "--max-batch-size", "4", "--max-queue-size", "4",
        env={"FB_TEST_ITEM_GATE_FILE": str(gate)},
    )  # fmt: skip
    images = random_images(5, seed=86)
    with FeatureBank(server.target, timeout_s=60) as bank, concurrent.futures.ThreadPoolExecutor(1) as pool:
        first = pool.submit(bank.extract, images[:4], backbone=FAULTY, cache_policy=1)
        wait_until(lambda: os.path.exists(f"{gate}.entered"), 60, "the first request's items in preprocessing")
        with pytest.raises(FeatureBankError) as refused, FeatureBank(server.target, timeout_s=10) as other:
            other.extract(images[4:], backbone=FAULTY, cache_policy=1)
        assert refused.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED, refused.value
        gate.unlink()
        assert first.result(60).shape == (4, 16)
        assert bank.extract(images[4:], backbone=FAULTY, cache_policy=1).shape == (1, 16)


def test_items_cancelled_while_waiting_for_the_pool_are_counted_as_dropped(start_server, tmp_path):
    """Items whose request is cancelled while they wait for a preprocessing process never reach it,
    and featurebank_dropped_items_total{reason="cancelled"} counts them, as it does for items dropped
    from the batch queue (before, the pool skipped them silently: the counter stayed at 0)."""
    from featurebank.v1 import featurebank_pb2 as pb
    from featurebank.v1 import featurebank_pb2_grpc as pb_grpc

    gate = tmp_path / "hold-preprocessing"
    gate.touch()
    server = start_server(
        "--backbone", FAULTY, "--preprocess-workers", "1", env={"FB_TEST_ITEM_GATE_FILE": str(gate)}
    )  # fmt: skip
    images = random_images(4, seed=87)
    with grpc.insecure_channel(server.target) as ch:
        stub = pb_grpc.FeatureBankStub(ch)
        held = stub.Extract.future(pb.ExtractRequest(backbone=FAULTY, inputs=[pb.Input(image=images[0])]), timeout=60)
        wait_until(lambda: os.path.exists(f"{gate}.entered"), 60, "the first item held in its process")
        waiting = stub.Extract.future(
            pb.ExtractRequest(backbone=FAULTY, inputs=[pb.Input(image=img) for img in images[1:]]), timeout=60
        )
        waiting_items = lambda: server.metric("featurebank_preprocess_waiting_items", backbone=FAULTY)  # noqa: E731
        wait_until(lambda: waiting_items() == 3, 20, "the second request's 3 items waiting for the process")
        waiting.cancel()
        gate.unlink()
        assert held.result().results[0].HasField("features")
    wait_until(
        lambda: server.metric("featurebank_dropped_items_total", backbone=FAULTY, reason="cancelled") >= 3,
        10,
        "the 3 cancelled items counted as dropped",
    )
    assert server.metric("featurebank_preprocess_duration_seconds_count", backbone=FAULTY) == 1
    assert server.metric("featurebank_batch_size_sum", backbone=FAULTY) == 1
