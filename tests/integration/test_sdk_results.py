"""SDK results are plain Python (dataclasses with numpy arrays and one-line reprs), sync and async alike."""

from __future__ import annotations

import asyncio

import grpc
import numpy as np
import pytest

from featurebank.client import AsyncFeatureBank, FeatureBankError, HeadInfo, Prediction
from support import random_images

pytest.importorskip("keras")


@pytest.fixture(scope="module")
def head_and_images(server):
    """A logistic head on toy features, trained once for the module, and the images it was trained on."""
    from featurebank.client import FeatureBank

    images = random_images(40, seed=7)
    labels = [i % 2 for i in range(40)]
    with FeatureBank(server.target) as b:
        head = b.fit_head(images, ["odd" if y else "even" for y in labels], backbone="toy")
    return head, images


def _one_line(obj) -> str:
    text = repr(obj)
    assert "\n" not in text and len(text) < 300, text
    return text


def test_predict_returns_dataclasses_with_numpy_probabilities_and_item_errors(bank, head_and_images):
    """`predict` answers Prediction objects: label, numpy probabilities, per-item error; one-line reprs."""
    head, images = head_and_images
    bank.put_head(head, "plain")
    predictions = bank.predict("plain", images[:3] + [b"junk"])
    assert all(isinstance(p, Prediction) for p in predictions)
    for i, p in enumerate(predictions[:3]):
        assert p.index == i and p.error is None
        assert isinstance(p.probabilities, np.ndarray) and p.probabilities.dtype == np.float32
        assert p.probabilities.shape == (2,) and abs(float(p.probabilities.sum()) - 1) < 1e-4
        assert p.label == head.class_names[int(p.probabilities.argmax())] == head.class_names[p.label_index]
        assert p.probability == pytest.approx(float(p.probabilities.max()))
        assert len(p.key) == 32
        assert p.label in _one_line(p)
    bad = predictions[3]
    assert bad.index == 3 and bad.probabilities is None and bad.label == ""
    assert isinstance(bad.error, FeatureBankError) and bad.error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert bad.error.index == 3
    assert "INVALID_ARGUMENT" in _one_line(bad)


def test_put_head_and_list_heads_return_head_info(bank, head_and_images):
    """`put_head` and `list_heads` answer HeadInfo dataclasses whose repr is one readable line."""
    head, _ = head_and_images
    info = bank.put_head(head, "infos")
    assert isinstance(info, HeadInfo)
    assert (info.name, info.kind, info.backbone, info.layer, info.input_dim) == (
        "infos",
        "logistic",
        "toy",
        "pooled",
        16,
    )
    assert info.class_names == ["even", "odd"] and info.fingerprint == head.fingerprint
    assert isinstance(info.metrics, dict) and "train_examples" in info.metrics
    again = bank.put_head(head, "infos")
    assert again.version == info.version + 1
    listed = bank.list_heads("infos")
    assert [(h.name, h.version) for h in listed] == [("infos", info.version), ("infos", again.version)]
    assert all(isinstance(h, HeadInfo) for h in listed)
    line = _one_line(again)
    assert f"infos v{again.version}" in line and "toy/pooled" in line


def test_extract_items_outcomes_have_one_line_reprs(bank):
    """ItemOutcome's repr is one line: index, hit or error, key, and the features' dtype and shape."""
    good, junk = random_images(1, seed=8)[0], b"junk"
    outcomes = bank.extract_items([good, junk], backbone="toy")
    assert "(16,)" in _one_line(outcomes[0]) and outcomes[0].key[:8] in repr(outcomes[0])
    assert "INVALID_ARGUMENT" in _one_line(outcomes[1])


def test_async_client_has_the_same_head_methods_and_results(server, head_and_images):
    """AsyncFeatureBank's put_head, list_heads, predict and delete_head answer the same dataclasses."""
    head, images = head_and_images

    async def main():
        async with AsyncFeatureBank(server.target) as abank:
            info = await abank.put_head(head, "async-head")
            listed = await abank.list_heads("async-head")
            predictions = await abank.predict("async-head", images[:2] + [b"junk"])
            deleted = await abank.delete_head("async-head")
        return info, listed, predictions, deleted

    info, listed, predictions, deleted = asyncio.run(main())
    assert isinstance(info, HeadInfo) and [h.version for h in listed] == [info.version]
    assert [type(p) for p in predictions] == [Prediction] * 3
    assert predictions[0].label in ("even", "odd") and predictions[2].error is not None
    assert deleted == 1


def test_head_predict_on_raw_inputs_says_what_to_do_or_fetches_with_a_bank(bank, head_and_images):
    """A local Head given raw inputs explains the two ways; with ``bank=`` it fetches their features itself."""
    head, images = head_and_images
    with pytest.raises(TypeError) as raised:
        head.predict(["some raw text"])
    message = str(raised.value)
    assert "bank=" in message and "bank.predict" in message and "bank.features" in message
    fetched = head.predict(images[:4], bank=bank)
    expected = head.predict(bank.features(images[:4], backbone="toy"))
    np.testing.assert_allclose(fetched, expected, atol=1e-6)
