"""common/framing.py: one message per frame, arrays and large bytes beside the pickle."""

from __future__ import annotations

import numpy as np
import pytest

from featurebank.common.framing import OUT_OF_BAND_BYTES, frame, out_of_band, unframe
from featurebank.workers.messages import Batch, InputItem, with_bytes


def test_a_batch_comes_back_equal_its_arrays_as_views_of_what_was_read():
    pixels = [np.arange(32 * 32 * 3, dtype=np.uint8).reshape(32, 32, 3) + i for i in range(3)]
    image = bytes(range(256)) * 100  # over OUT_OF_BAND_BYTES: beside the pickle
    batch = Batch(
        7, [InputItem("preprocessed", p) for p in pixels] + [InputItem("image", out_of_band(image))], ["a"] * 4
    )
    parts = frame(batch)
    assert len(parts) == 2 + 4  # header, pickle, 3 arrays and the image, none copied into the pickle
    assert sum(len(memoryview(p).cast("B")) for p in parts[1:2]) < 2000
    data = bytearray(b"".join(parts))
    got = unframe(data)
    assert got.batch_id == 7 and got.layers == ["a"] * 4
    for sent, item in zip(pixels, got.items):
        np.testing.assert_array_equal(item.payload, sent)
        assert np.shares_memory(item.payload, np.frombuffer(data, np.uint8))  # a view, no copy
    assert with_bytes(got.items[3]) == InputItem("image", image)  # bytes again for the backbone


def test_small_bytes_stay_in_the_pickle_and_arrive_as_bytes():
    small = b"x" * (OUT_OF_BAND_BYTES - 1)
    assert out_of_band(small) is small
    assert unframe(b"".join(frame(InputItem("image", out_of_band(small))))) == InputItem("image", small)


@pytest.mark.parametrize("cut", [1, 20])
def test_a_frame_cut_short_or_padded_is_refused(cut):
    data = b"".join(frame({"a": np.zeros(1000)}))
    with pytest.raises(ValueError, match="bad frame"):
        unframe(data[:-cut])
    with pytest.raises(ValueError, match="bad frame"):
        unframe(data + b"\0" * cut)
