"""The real pre-trained backbones served through gRPC reproduce their reference implementations."""

from __future__ import annotations

import json

import grpc
import numpy as np
import pytest

from featurebank.client import content_key
from support import DATA_DIR, ServerProcess

pytestmark = pytest.mark.slow

REFERENCE_PNGS = ("chelsea", "coffee", "astronaut", "rocket")


@pytest.fixture(scope="module")
def server(shared_redis, tmp_path_factory):
    cache_dir = tmp_path_factory.mktemp("weights-cache")
    s = ServerProcess(
        "--backbone",
        "efficientnet_lite0,minilm",
        "--redis-url",
        shared_redis.url,
        env={"FEATUREBANK_CACHE_DIR": str(cache_dir)},
    ).start(timeout_s=600)
    yield s
    assert s.terminate() == 0


@pytest.fixture(scope="module")
def efficientnet_reference():
    ref = np.load(DATA_DIR / "efficientnet_lite0_reference.npz")
    return {k: ref[k] for k in ref.files}


def test_efficientnet_lite0_reproduces_reference_features_and_classes(bank, efficientnet_reference):
    """The four reference PNGs sent as encoded images give the reference pooled features and top-1 classes."""
    from featurebank.workers.backbones.efficientnet_lite import EfficientNetLite0

    names = [str(n) for n in efficientnet_reference["names"]]
    images = [(DATA_DIR / f"{n}.png").read_bytes() for n in names]
    pooled = bank.extract(images, backbone="efficientnet_lite0")
    assert pooled.shape == (4, 1280)
    diff = np.abs(pooled - efficientnet_reference["pooled_1280"]).max()
    assert diff <= 1e-3, diff
    w, b = EfficientNetLite0().classifier_weights()
    top1 = (pooled @ w + b).argmax(axis=1)
    np.testing.assert_array_equal(top1, efficientnet_reference["logits_1000"].argmax(axis=1))
    assert list(top1) == [285, 967, 560, 540] if names == list(REFERENCE_PNGS) else True


def test_efficientnet_raw_pixels_get_the_backbone_preprocessing(bank, efficientnet_reference):
    """Raw uint8 pixels sent as a tensor are normalised by the server exactly like the decoded PNG."""
    pixels = efficientnet_reference["pixels_uint8"]
    from_pixels = bank.extract(list(pixels), backbone="efficientnet_lite0")
    np.testing.assert_allclose(from_pixels, efficientnet_reference["pooled_1280"], atol=1e-3)


def test_efficientnet_layers_have_documented_shapes_and_keys(bank, server):
    """stage4, stage6 and pooled have their documented shapes and are cached under different keys."""
    img = (DATA_DIR / "coffee.png").read_bytes()
    shapes = {}
    for layer in ("stage4", "stage6", "pooled"):
        (o,) = bank.extract_items([img], backbone="efficientnet_lite0", layer=layer, cache_policy=2)  # REFRESH
        shapes[layer] = o.features.shape
        assert o.key == content_key(img)
    assert shapes == {"stage4": (40,), "stage6": (112,), "pooled": (1280,)}
    (info,) = [b for b in bank.backbones() if b.name == "efficientnet_lite0"]
    assert info.default_layer == "pooled" and tuple(info.input_size) == (224, 224, 3)
    assert "(x - 127) / 128" in info.preprocessing


def test_minilm_reproduces_reference_embeddings(bank):
    """The reference sentences give the sentence-transformers embeddings with cosine >= 0.9999 each."""
    ref = json.loads((DATA_DIR / "minilm_reference.json").read_text())
    emb = bank.extract(ref["sentences"], backbone="minilm")
    expected = np.asarray(ref["embeddings"], np.float32)
    cos = (emb * expected).sum(1) / np.linalg.norm(emb, axis=1) / np.linalg.norm(expected, axis=1)
    assert cos.min() >= 0.9999, cos
    # Text is the minilm default: a request naming no backbone goes there.
    np.testing.assert_allclose(bank.extract(ref["sentences"][:2]), emb[:2], atol=1e-6)


def test_minilm_long_text_is_truncated_and_empty_text_is_an_item_error(bank):
    """A 1,000-word text is embedded (truncated at 256 tokens); an empty one gets INVALID_ARGUMENT alone."""
    long_text = " ".join(["featurebank"] * 1000)
    outcomes = bank.extract_items([long_text, "", "a short one"], backbone="minilm")
    assert outcomes[0].features.shape == (384,) and abs(np.linalg.norm(outcomes[0].features) - 1) < 1e-4
    assert outcomes[1].error.code == grpc.StatusCode.INVALID_ARGUMENT and "empty" in outcomes[1].error.message
    assert outcomes[2].error is None


def test_minilm_layers(bank):
    """mean_pooled, cls and an earlier layer are 384-d, differ, and are cached separately."""
    text = ["layers are chosen per request"]
    feats = {
        l: bank.extract_items(text, backbone="minilm", layer=l)[0] for l in ("mean_pooled", "cls", "layer3_mean_pooled")
    }
    assert all(o.features.shape == (384,) for o in feats.values())
    assert not np.allclose(feats["mean_pooled"].features, feats["cls"].features)
    assert not np.allclose(feats["mean_pooled"].features, feats["layer3_mean_pooled"].features)
