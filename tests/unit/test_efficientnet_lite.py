"""EfficientNet-Lite0: the torch-free .pth reader and the Keras port against the PyTorch reference outputs."""

from __future__ import annotations

import io
import logging
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest

from featurebank.workers.backbones.base import InputItem
from featurebank.workers.backbones.pth_reader import LEGACY_MAGIC_NUMBER, PthFormatError, load_legacy_pth

logger = logging.getLogger(__name__)

DATA = Path(__file__).resolve().parent.parent / "data"
REFERENCE_TOP1 = [285, 967, 560, 540]  # Egyptian cat, espresso, astronaut's space shuttle, rocket
POOLED_ATOL = 1e-3
LOGITS_ATOL = 1e-3


@pytest.fixture(scope="module")
def reference():
    with np.load(DATA / "efficientnet_lite0_reference.npz") as z:
        return {k: z[k] for k in z.files}


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("featurebank-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FEATUREBANK_CACHE_DIR", str(d))
        yield d


@pytest.fixture(scope="module")
def backbone(cache_dir):
    from featurebank.workers.backbones.efficientnet_lite import EfficientNetLite0

    b = EfficientNetLite0(batch_buckets=(1, 8))
    b.load()
    return b


def test_pth_reader_loads_state_dict_without_torch(monkeypatch):
    """The legacy .pth reader yields every EfficientNet-Lite0 tensor (4,694,024 values) with torch unimportable."""
    from featurebank.workers.backbones.efficientnet_lite import _weights_path

    monkeypatch.setitem(sys.modules, "torch", None)  # any `import torch` now raises ImportError
    with _weights_path() as path:
        state = load_legacy_pth(path)
    params = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    assert sum(v.size for v in params.values()) == 4_694_024
    assert all(v.dtype == np.float32 and v.flags.c_contiguous for v in params.values())
    assert list(state)[:2] == ["_conv_stem.weight", "_bn0.weight"]
    assert state["_conv_stem.weight"].shape == (32, 3, 3, 3)
    assert state["_blocks.3._depthwise_conv.weight"].shape == (144, 1, 5, 5)
    assert state["_blocks.15._project_conv.weight"].shape == (320, 1152, 1, 1)
    assert state["_conv_head.weight"].shape == (1280, 320, 1, 1)
    assert state["_fc.weight"].shape == (1000, 1280) and state["_fc.bias"].shape == (1000,)
    assert "_blocks.0._expand_conv.weight" not in state  # expand ratio 1: no expansion conv
    assert not any(k.startswith("_blocks.16.") for k in state)
    assert "torch" not in {m.split(".")[0] for m, mod in sys.modules.items() if mod is not None}


def test_pth_reader_refuses_foreign_globals(tmp_path):
    """A .pth whose pickle names anything beyond the allowed torch rebuild names is refused, not executed."""
    f = io.BytesIO()
    for header in (LEGACY_MAGIC_NUMBER, 1001, {"protocol_version": 1001, "little_endian": True}):
        pickle.dump(header, f, protocol=2)
    f.write(b"cos\nsystem\n(S'echo pwned'\ntR.")  # GLOBAL os.system, called with one argument
    path = tmp_path / "evil.pth"
    path.write_bytes(f.getvalue())
    with pytest.raises(PthFormatError, match="refusing to load os.system"):
        load_legacy_pth(path)


def test_cache_dir_follows_environment(monkeypatch, tmp_path):
    """Converted weights go to $FEATUREBANK_CACHE_DIR, else $XDG_CACHE_HOME/featurebank, else ~/.cache/featurebank."""
    from featurebank.workers.backbones.efficientnet_lite import _cache_dir

    monkeypatch.setenv("FEATUREBANK_CACHE_DIR", str(tmp_path / "explicit"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert _cache_dir() == tmp_path / "explicit"
    monkeypatch.delenv("FEATUREBANK_CACHE_DIR")
    assert _cache_dir() == tmp_path / "xdg" / "featurebank"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert _cache_dir() == tmp_path / "home" / ".cache" / "featurebank"


@pytest.mark.slow
def test_pooled_features_and_top1_match_pytorch_reference(backbone, reference):
    """On the reference pixels, pooled features match PyTorch to 1e-3 and the classifier gives the same top-1."""
    out = backbone.forward(list(reference["pixels_uint8"]))
    diff = float(np.abs(out["pooled"] - reference["pooled_1280"]).max())
    logger.info("max abs diff of pooled features vs the PyTorch reference: %.3g", diff)
    assert diff <= POOLED_ATOL, diff

    w, b = backbone.classifier_weights()
    assert w.shape == (1280, 1000) and b.shape == (1000,)
    logits = out["pooled"] @ w + b
    assert logits.argmax(axis=1).tolist() == REFERENCE_TOP1
    np.testing.assert_allclose(logits, reference["logits_1000"], atol=LOGITS_ATOL)


@pytest.mark.slow
def test_png_decoding_reproduces_reference_pixels(backbone, reference):
    """Decoding each 224x224 reference PNG through preprocess() yields exactly the reference pixels."""
    for name, expected in zip(reference["names"], reference["pixels_uint8"]):
        pixels = backbone.preprocess(InputItem("image", (DATA / f"{name}.png").read_bytes()))
        assert pixels.dtype == np.uint8 and pixels.shape == (224, 224, 3)
        np.testing.assert_array_equal(pixels, expected, err_msg=str(name))


@pytest.mark.slow
def test_layers_have_documented_shapes(backbone, reference):
    """pooled is (1280,), stage4 (paper stage 4) (40,), stage6 (paper stage 6) (112,), each a different feature."""
    info = backbone.info()
    assert {l.name: l.shape for l in info.layers} == {"pooled": (1280,), "stage4": (40,), "stage6": (112,)}
    assert info.default_layer == "pooled" and info.input_size == (224, 224, 3)
    assert "(x - 127) / 128" in info.preprocessing

    out = backbone.forward(list(reference["pixels_uint8"][:2]))
    assert {k: v.shape for k, v in out.items()} == {"pooled": (2, 1280), "stage4": (2, 40), "stage6": (2, 112)}
    assert not np.allclose(out["stage4"], out["pooled"][:, :40])
    assert not np.allclose(out["stage6"], out["pooled"][:, :112])
    assert not np.allclose(out["stage4"], out["stage6"][:, :40])


@pytest.mark.slow
def test_inference_mode_is_batch_independent_and_frozen(backbone, reference):
    """An image's features do not depend on its batch-mates, and forward never changes a weight (BN stats included)."""
    model = backbone.keras_model()
    assert model.trainable is False
    before = [w.copy() for w in model.get_weights()]

    images = list(reference["pixels_uint8"])
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)
    alone = backbone.forward([images[1]])
    batched = backbone.forward([images[0], noise, images[1], images[2], images[3]])  # 5, padded to 8
    for k in alone:
        np.testing.assert_allclose(batched[k][2], alone[k][0], atol=1e-5, err_msg=k)
    for _ in range(3):
        backbone.forward(images)

    after = model.get_weights()
    assert len(before) == len(after)
    for w0, w1 in zip(before, after):
        np.testing.assert_array_equal(w0, w1)


@pytest.mark.slow
def test_second_load_uses_cached_converted_weights(backbone, reference, cache_dir):
    """The first load caches the converted weights; a new instance loads them and gives identical features."""
    from featurebank.workers.backbones.efficientnet_lite import EfficientNetLite0

    assert backbone.loaded_from_cache is False
    cached = backbone.cache_path()
    assert cached.parent == cache_dir and cached.is_file()
    assert cached.name.startswith("efficientnet_lite0-") and cached.name.endswith(".weights.h5")
    assert [p.name for p in cache_dir.iterdir()] == [cached.name]  # no temp file left behind

    again = EfficientNetLite0(batch_buckets=(1, 8))  # same buckets: same kernels, so bit-identical output
    again.load()
    assert again.loaded_from_cache is True
    assert again.info().fingerprint == backbone.info().fingerprint
    images = list(reference["pixels_uint8"])
    first, second = backbone.forward(images), again.forward(images)
    for k in first:
        np.testing.assert_array_equal(second[k], first[k], err_msg=k)
