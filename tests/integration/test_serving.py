"""The serving core end to end: real server process, real Redis-protocol server, toy backbone."""

from __future__ import annotations

import concurrent.futures
import subprocess
import sys
import time

import grpc
import numpy as np
import pytest

from featurebank.client import BYPASS, FLOAT16, REFRESH, FeatureBankError, content_key
from featurebank.v1 import featurebank_pb2 as pb
from featurebank.v1 import featurebank_pb2_grpc as pb_grpc
from support import png_bytes, random_images


def test_health_serving_and_reflection_lists_the_service(server):
    """A ready server reports SERVING and exposes its services through reflection."""
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    assert server.health() == "SERVING"
    assert server.health("featurebank.v1.FeatureBank") == "SERVING"
    with grpc.insecure_channel(server.target) as ch:
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        responses = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        names = {s.name for r in responses for s in r.list_services_response.service}
    assert "featurebank.v1.FeatureBank" in names and "grpc.health.v1.Health" in names


def test_repeated_input_is_a_cache_hit_with_flag_and_metric(server, bank):
    """The second request for the same input is answered from the cache, flagged and counted.

    (``lookup_first=False``: the inputs themselves go to Extract, whose cache path is tested here;
    the SDK's default keys-first path is tested in test_lookup_first.py.)"""
    images = random_images(3, seed=101)
    hits_before = server.metric("featurebank_items_total", backbone="toy", result="hit")
    first = bank.extract_items(images, backbone="toy")
    second = bank.extract_items(images, backbone="toy", lookup_first=False)
    assert [o.cache_hit for o in first] == [False] * 3
    assert [o.cache_hit for o in second] == [True] * 3
    np.testing.assert_array_equal(np.stack([o.features for o in first]), np.stack([o.features for o in second]))
    assert server.metric("featurebank_items_total", backbone="toy", result="hit") - hits_before == 3


def test_key_is_the_documented_content_hash(bank):
    """ItemResult.key is the version-2 content key (BLAKE3, 16 bytes) the client computes locally; version 1 is
    BLAKE2b-16 over the same bytes."""
    import hashlib

    import blake3

    img = random_images(1, seed=7)[0]
    text_arr = np.arange(12, dtype=np.uint8).reshape(2, 2, 3)
    outcomes = bank.extract_items([img, text_arr], backbone="toy")
    assert outcomes[0].key == blake3.blake3(b"image\0" + img).hexdigest(16) == content_key(img)
    tensor_bytes = b"tensor\0uint8\x002,2,3\0" + text_arr.tobytes()
    assert outcomes[1].key == blake3.blake3(tensor_bytes).hexdigest(16) == content_key(text_arr)
    assert content_key(img, version=1) == hashlib.blake2b(b"image\0" + img, digest_size=16).hexdigest()
    assert content_key(text_arr, version=1) == hashlib.blake2b(tensor_bytes, digest_size=16).hexdigest()


def test_one_corrupt_image_fails_alone(bank):
    """A request with one undecodable image returns that item's error and the others' features."""
    good = random_images(2, seed=202)
    outcomes = bank.extract_items([good[0], b"\x89PNG\r\n\x1a\n-truncated", good[1]], backbone="toy")
    assert outcomes[0].error is None and outcomes[2].error is None
    assert outcomes[0].features.shape == (16,)
    err = outcomes[1].error
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT and err.index == 1
    assert "cannot decode image" in err.message
    with pytest.raises(FeatureBankError) as e:
        bank.extract([good[0], b"junk"], backbone="toy")
    assert e.value.index == 1


def test_bad_items_of_every_kind_fail_alone(bank):
    """Empty input, empty image, text for an image backbone and a malformed tensor each get their own error."""
    bad_tensor = pb.Input(tensor=pb.Tensor(dtype=pb.FLOAT32, shape=[4, 4, 3], data=b"\0" * 7))
    nan_pixels = np.full((4, 4, 3), np.nan, np.float32)
    good = random_images(1, seed=303)[0]
    outcomes = bank.extract_items(
        [pb.Input(), pb.Input(image=b""), "some text", bad_tensor, nan_pixels, good], backbone="toy"
    )
    messages = [o.error.message if o.error else None for o in outcomes]
    assert "empty input" in messages[0]
    assert "empty image" in messages[1]
    assert "takes image inputs, not text" in messages[2]
    assert "needs 192" in messages[3]
    assert "NaN" in messages[4]
    assert messages[5] is None
    assert all(o.error.code == grpc.StatusCode.INVALID_ARGUMENT for o in outcomes[:5])


def test_bad_requests_fail_with_clear_status(bank):
    """Unknown backbone or layer is NOT_FOUND, an empty request INVALID_ARGUMENT, each with a message."""
    img = random_images(1, seed=1)[0]
    with pytest.raises(FeatureBankError) as e:
        bank.extract([img], backbone="nope")
    assert e.value.code == grpc.StatusCode.NOT_FOUND and "unknown backbone 'nope'" in e.value.message
    with pytest.raises(FeatureBankError) as e:
        bank.extract([img], backbone="toy", layer="logits")
    assert e.value.code == grpc.StatusCode.NOT_FOUND and "no layer 'logits'" in e.value.message
    with grpc.insecure_channel(bank.target) as ch, pytest.raises(grpc.RpcError) as e:
        pb_grpc.FeatureBankStub(ch).Extract(pb.ExtractRequest(backbone="toy"), timeout=10)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "no inputs" in e.value.details()


def test_features_equal_the_backbone_in_process(bank):
    """Served features equal the same backbone called directly in-process on the same pixels."""
    from featurebank.workers.backbones import registry
    from featurebank.workers.backbones.base import InputItem

    images = random_images(5, seed=404, size=(32, 32))
    served = bank.extract(images, backbone="toy", cache_policy=BYPASS)
    local = registry.create("toy")
    local.load()
    direct = local.forward([local.preprocess(InputItem("image", b)) for b in images])["pooled"]
    np.testing.assert_allclose(served, direct, rtol=0, atol=1e-6)


def test_pixels_as_tensor_equal_the_encoded_image(bank):
    """Raw pixels sent as a uint8 tensor give the same features as the PNG of those pixels."""
    pixels = np.random.default_rng(5).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    a, b = bank.extract([png_bytes(pixels), pixels], backbone="toy")
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_layer_choice_and_output_dtype(bank):
    """Two layers of one input have their documented shapes and separate cache entries; FLOAT16 is a cast."""
    img = random_images(1, seed=505)[0]
    conv = bank.extract_items([img], backbone="toy", layer="conv")[0]
    pooled = bank.extract_items([img], backbone="toy", layer="pooled")[0]
    assert conv.features.shape == (8,) and pooled.features.shape == (16,)
    assert not conv.cache_hit and not pooled.cache_hit  # the first layer's entry did not answer the second
    half = bank.extract_items([img], backbone="toy", layer="pooled", output_dtype=FLOAT16)[0]
    assert half.cache_hit and half.features.dtype == np.float16
    np.testing.assert_array_equal(half.features, pooled.features.astype(np.float16))


def test_cache_policies(bank, server):
    """REFRESH recomputes a cached item and BYPASS neither reads nor writes the cache."""
    img = random_images(1, seed=606)[0]
    bank.extract([img], backbone="toy")
    assert bank.extract_items([img], backbone="toy", cache_policy=REFRESH)[0].cache_hit is False
    fresh = random_images(1, seed=607)[0]
    assert bank.extract_items([fresh], backbone="toy", cache_policy=BYPASS)[0].cache_hit is False
    assert bank.extract_items([fresh], backbone="toy")[0].cache_hit is False  # BYPASS did not write it


def test_lookup_returns_cached_keys_and_not_found_for_others(bank):
    """Lookup answers cached content keys, NOT_FOUND for absent ones, INVALID_ARGUMENT for malformed ones."""
    img, absent = random_images(2, seed=707)
    feats = bank.extract([img], backbone="toy")[0]
    outcomes = bank.lookup([content_key(img), content_key(absent), "not-a-key"], backbone="toy")
    np.testing.assert_array_equal(outcomes[0].features, feats)
    assert outcomes[0].cache_hit
    assert outcomes[1].error.code == grpc.StatusCode.NOT_FOUND
    assert outcomes[2].error.code == grpc.StatusCode.INVALID_ARGUMENT


def test_identical_inputs_are_computed_once(bank, server):
    """Duplicates within a request and across concurrent requests reach a worker once."""
    img = random_images(1, seed=808)[0]
    items_before = server.metric("featurebank_batch_size_sum", backbone="toy")
    with concurrent.futures.ThreadPoolExecutor(8) as ex:
        results = list(ex.map(lambda _: bank.extract([img, img, img], backbone="toy"), range(8)))
    for r in results:
        np.testing.assert_array_equal(r, results[0])
    assert server.metric("featurebank_batch_size_sum", backbone="toy") - items_before == 1


def test_list_backbones_describes_layers(bank):
    """ListBackbones reports input kind, size, layers with shapes, default layer, preprocessing, fingerprint."""
    (info,) = bank.backbones()
    assert info.name == "toy" and info.input_kind == "image" and info.default_layer == "pooled"
    assert {l.name: tuple(l.shape) for l in info.layers} == {"conv": (8,), "pooled": (16,)}
    assert tuple(info.input_size) == (32, 32, 3) and len(info.fingerprint) == 32 and "255" in info.preprocessing
    assert info.workers_ready == 1


def test_worker_idle_and_read_time_are_counted(bank, server):
    """The worker's own clock: seconds with nothing to compute and seconds reading batches."""

    def worker_seconds():
        return [server.metric(f"featurebank_worker_{w}_seconds_total", backbone="toy") for w in ("idle", "read")]

    bank.extract(random_images(1, seed=770), backbone="toy", cache_policy=BYPASS)
    idle0, read0 = worker_seconds()
    time.sleep(0.5)
    bank.extract(random_images(2, seed=771), backbone="toy", cache_policy=BYPASS)
    idle1, read1 = worker_seconds()
    assert idle1 - idle0 >= 0.5  # nothing to do while this test slept
    assert 0 < read1 - read0 < 0.5


def test_no_retraces_after_warmup(bank, server):
    """Requests of every size after warm-up cause no new tf.function trace."""
    before = server.metric("featurebank_worker_traces", backbone="toy")
    assert before > 0
    for n in (1, 2, 3, 5, 17, 31, 40):
        bank.extract(random_images(n, seed=900 + n), backbone="toy", cache_policy=BYPASS)
    assert server.metric("featurebank_worker_traces", backbone="toy") == before


def test_metrics_exposition_is_valid(server):
    """/metrics parses, has every documented metric, and passes promtool when it is installed."""
    import shutil

    from prometheus_client.parser import text_string_to_metric_families

    text = server.metrics_text()
    names = {f.name for f in text_string_to_metric_families(text)}
    for required in (
        "featurebank_requests",
        "featurebank_items",
        "featurebank_request_duration_seconds",
        "featurebank_batch_size",
        "featurebank_queue_delay_seconds",
        "featurebank_inference_duration_seconds",
        "featurebank_queue_depth",
        "featurebank_workers_ready",
        "featurebank_worker_restarts",
        "featurebank_cache_errors",
    ):
        assert required in names, required
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (.ci/run installs it); exposition parsed by prometheus_client only")
    check = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr


def test_cli_extract_twice_second_time_all_hits(server, tmp_path):
    """`featurebank extract` writes features; the second run is answered entirely from the cache."""
    paths = []
    for i, b in enumerate(random_images(3, seed=1001)):
        p = tmp_path / f"img{i}.png"
        p.write_bytes(b)
        paths.append(str(p))
    cmd = [
        sys.executable,
        "-m",
        "featurebank.client.cli",
        "extract",
        *paths,
        "--out",
        str(tmp_path / "f.npy"),
        "--target",
        server.target,
        "--backbone",
        "toy",
        "--quiet",
    ]
    first = subprocess.run(cmd, capture_output=True, text=True, check=True)
    second = subprocess.run(cmd, capture_output=True, text=True, check=True)
    assert "0 cache hits, 3 computed" in first.stdout
    assert "3 cache hits, 0 computed" in second.stdout
    assert np.load(tmp_path / "f.npy").shape == (3, 16)


@pytest.mark.parametrize("lookup_first", [True, False])
def test_an_input_over_the_message_limit_fails_alone(bank, lookup_first):
    """An input too large for any request (over the server's --max-message-bytes) gets its own
    RESOURCE_EXHAUSTED item error naming the flag; its neighbours still get features."""
    small = random_images(2, seed=71)
    huge = np.random.default_rng(72).integers(0, 256, (1400, 1400, 3), dtype=np.uint8)  # ~5.9 MB of pixels
    outcomes = bank.extract_items([small[0], huge, small[1]], backbone="toy", lookup_first=lookup_first)
    assert outcomes[0].error is None and outcomes[2].error is None
    assert outcomes[0].features.shape == outcomes[2].features.shape == (16,)
    err = outcomes[1].error
    assert err is not None and err.code == grpc.StatusCode.RESOURCE_EXHAUSTED and err.index == 1
    assert "--max-message-bytes" in err.message


def test_an_input_over_the_message_limit_fails_alone_in_a_stream(bank):
    """extract_stream answers an input too large for any request with its own RESOURCE_EXHAUSTED
    item error; the stream goes on and the other inputs get features."""
    small = random_images(3, seed=73)
    huge = np.random.default_rng(74).integers(0, 256, (1400, 1400, 3), dtype=np.uint8)
    outcomes = list(bank.extract_stream([small[0], huge, small[1], small[2]], backbone="toy", lookup_first=True))
    assert [o.index for o in outcomes] == [0, 1, 2, 3]
    assert [o.error is None for o in outcomes] == [True, False, True, True]
    assert outcomes[1].error.code == grpc.StatusCode.RESOURCE_EXHAUSTED and outcomes[1].error.index == 1
