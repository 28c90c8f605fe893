"""Streaming datasets, training heads on store features, and serving them: real server and Redis."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from featurebank.client import FeatureBank, FeatureBankError
from featurebank.client.datasets import FeatureSet
from featurebank.client.heads import Head, HeadMismatchError
from featurebank.v1 import featurebank_pb2 as pb
from support import ServerProcess, png_bytes, random_images


def _two_class_images(n_per_class: int, seed: int = 0) -> tuple[list[bytes], list[str]]:
    """Dark noisy images vs bright noisy images: separable from any reasonable features."""
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for label, (lo, hi) in (("dark", (0, 110)), ("bright", (145, 256))):
        for _ in range(n_per_class):
            images.append(png_bytes(rng.integers(lo, hi, (32, 32, 3), dtype=np.uint8)))
            labels.append(label)
    return images, labels


@pytest.fixture(scope="module")
def server(shared_redis):
    s = ServerProcess("--backbone", "toy", "--redis-url", shared_redis.url, "--stream-window", "2").start()
    yield s
    assert s.terminate() == 0


@pytest.fixture
def bank(server):
    with FeatureBank(server.target, timeout_s=120, max_items_per_request=16) as b:
        yield b


def test_stream_equals_unary_extract_in_order(bank):
    """ExtractStream over many chunks returns every item, in order, equal to unary Extract."""
    images = random_images(100, seed=3, size=(20, 20)) + [b"broken"]
    streamed = list(bank.extract_stream(iter(images), backbone="toy"))
    assert [o.index for o in streamed] == list(range(101))
    assert streamed[-1].error.code == grpc.StatusCode.INVALID_ARGUMENT and streamed[-1].error.index == 100
    unary = bank.extract(images[:100], backbone="toy")
    np.testing.assert_array_equal(np.stack([o.features for o in streamed[:100]]), unary)


def test_resumed_stream_uploads_only_misses(bank, server):
    """With lookup_first, a re-run of a stream is answered by Lookup and sends no Extract items."""
    images = random_images(40, seed=4, size=(20, 20))
    list(bank.extract_stream(images, backbone="toy"))
    before = {r: server.metric("featurebank_items_total", backbone="toy", result=r) for r in ("hit", "miss", "error")}
    again = list(bank.extract_stream(images, backbone="toy", lookup_first=True))
    assert all(o.cache_hit for o in again) and len(again) == 40
    after = {r: server.metric("featurebank_items_total", backbone="toy", result=r) for r in ("hit", "miss", "error")}
    assert {r: after[r] - before[r] for r in after} == {"hit": 40, "miss": 0, "error": 0}  # all answered by Lookup


def test_features_from_an_image_folder_then_train_save_load(bank, tmp_path):
    """A class-per-folder dataset becomes a labelled FeatureSet; a head trained on it separates the classes."""
    images, labels = _two_class_images(40, seed=5)
    for i, (img, label) in enumerate(zip(images, labels)):
        (tmp_path / "data" / label).mkdir(parents=True, exist_ok=True)
        (tmp_path / "data" / label / f"{i}.png").write_bytes(img)
    fs = bank.features(tmp_path / "data", backbone="toy")
    assert fs.class_names == ["bright", "dark"] and fs.features.shape == (80, 16)
    assert fs.backbone == "toy" and fs.layer == "pooled" and len(fs.fingerprint) == 32
    fs.save(tmp_path / "fs.npz")
    np.testing.assert_array_equal(FeatureSet.load(tmp_path / "fs.npz").features, fs.features)

    head = bank.fit_head(tmp_path / "data", backbone="toy", head="logistic", validation_split=0.25, epochs=60)
    assert head.metrics["train_accuracy"] >= 0.9  # 10 validation examples a class: trained on all labels
    # Training a head never touches the frozen backbone: recomputed features are unchanged.
    recomputed = bank.extract(images[:8], backbone="toy", cache_policy=1)  # BYPASS
    np.testing.assert_allclose(recomputed, bank.features(images[:8], backbone="toy").features, atol=1e-6)
    head.save(tmp_path / "head.keras")
    loaded = Head.load(tmp_path / "head.keras")
    np.testing.assert_allclose(loaded.predict(fs), head.predict(fs), atol=1e-6)
    other_layer = bank.features(images[:4], backbone="toy", layer="conv")
    with pytest.raises(HeadMismatchError, match="layer differs"):
        head.predict(other_layer)


def test_put_predict_list_delete_and_fingerprint_check(bank, server, tmp_path):
    """An uploaded head predicts through the server like it does locally; a stale fingerprint is refused."""
    images, labels = _two_class_images(30, seed=6)
    head = bank.fit_head(images, labels, backbone="toy", head="mlp", validation_split=0.2, epochs=40)
    info = bank.put_head(head, "brightness")
    assert info.version >= 1 and info.input_dim == 16 and list(info.class_names) == ["bright", "dark"]

    with FeatureBank(server.target) as other_client:  # another service, no training code
        predictions = other_client.predict("brightness", images[:10] + [b"junk"])
    served = np.stack([p.probabilities for p in predictions[:10]])  # Prediction dataclasses, numpy
    np.testing.assert_allclose(served, head.predict(bank.features(images[:10], backbone="toy")), atol=1e-5)
    assert [p.label for p in predictions[:10]] == [labels[i] for i in range(10)]
    assert predictions[10].error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert server.metric("featurebank_head_predictions_total", head="brightness") >= 10

    stale = head.to_proto("stale")
    stale.backbone_fingerprint = "0" * 32
    with grpc.insecure_channel(server.target) as ch:
        from featurebank.v1 import featurebank_pb2_grpc as pb_grpc

        stub = pb_grpc.FeatureBankStub(ch)
        stub.PutHead(pb.PutHeadRequest(head=stale))
        with pytest.raises(grpc.RpcError) as e:
            stub.Predict(pb.PredictRequest(head="stale", inputs=[pb.Input(image=images[0])]))
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "retrain" in e.value.details()

    assert {h.name for h in bank.list_heads()} >= {"brightness", "stale"}
    assert bank.delete_head("stale") == 1
    with pytest.raises(FeatureBankError) as e:
        bank.predict("stale", images[:1])
    assert e.value.code == grpc.StatusCode.NOT_FOUND


@pytest.mark.slow
def test_heads_persist_across_restarts(redis_server, tmp_path):
    """Heads stored in Redis (and in a directory without Redis) are served again after a restart."""
    images, labels = _two_class_images(10, seed=7)
    for args in (("--redis-url", redis_server.url), ("--heads-dir", str(tmp_path / "heads"))):
        first = ServerProcess("--backbone", "toy", *args).start()
        try:
            with FeatureBank(first.target) as bank:
                head = bank.fit_head(images, labels, backbone="toy", epochs=5, validation_split=0.2)
                bank.put_head(head, "kept")
        finally:
            assert first.terminate() == 0
        second = ServerProcess("--backbone", "toy", *args).start()
        try:
            with FeatureBank(second.target) as bank:
                assert [h.name for h in bank.list_heads("kept")] == ["kept"]
                assert bank.predict("kept", images[:2])[0].label in ("bright", "dark")
        finally:
            assert second.terminate() == 0


@pytest.mark.slow
def test_cli_train_head_put_and_predict(server, tmp_path):
    """`featurebank train-head --put` then `featurebank predict` label image files from the command line."""
    import subprocess
    import sys

    images, labels = _two_class_images(20, seed=8)
    paths = []
    for i, (img, label) in enumerate(zip(images, labels)):
        p = tmp_path / "data" / label / f"{i}.png"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(img)
        paths.append(str(p))
    cli = [sys.executable, "-m", "featurebank.client.cli"]
    train = subprocess.run(
        [
            *cli,
            "train-head",
            str(tmp_path / "data"),
            "--backbone",
            "toy",
            "--out",
            str(tmp_path / "h.keras"),
            "--epochs",
            "30",
            "--put",
            "cli-head",
            "--target",
            server.target,
            "--quiet",
        ],
        capture_output=True,
        text=True,
    )
    assert train.returncode == 0, train.stderr
    assert "accuracy" in train.stdout and "serving as cli-head v1" in train.stdout
    predict = subprocess.run(
        [*cli, "predict", "--head", "cli-head", paths[0], paths[-1], "--target", server.target],
        capture_output=True,
        text=True,
    )
    assert predict.returncode == 0, predict.stderr
    rows = [line.split("\t") for line in predict.stdout.splitlines()]
    assert [r[1] for r in rows] == [labels[0], labels[-1]]
