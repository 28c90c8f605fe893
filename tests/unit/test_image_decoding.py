"""Image decoding refuses bombs in every format: only JPEG/PNG/WebP/GIF/BMP, first frame, Pillow's limit kept."""

from __future__ import annotations

import io
import resource
import time

import numpy as np
import pytest
from malicious_images import animated_gif, ico_bomb, tiff_bytes
from PIL import Image

from featurebank.workers.backbones.base import InvalidInputError
from featurebank.workers.backbones.images import decode_image

LIMIT = 40_000_000  # the server's default --max-image-pixels


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _encoded(fmt: str, pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt)
    return buf.getvalue()


def test_ico_wrapping_a_huge_png_is_refused_without_decoding_it():
    """A 1.5 MB .ico wrapping a 20000x20000 PNG is refused by its format, and peak memory barely moves."""
    bomb = ico_bomb()
    assert len(bomb) < 2_000_000
    before = _peak_rss_bytes()
    start = time.perf_counter()
    with pytest.raises(InvalidInputError) as e:
        decode_image(bomb, LIMIT)
    elapsed_s = time.perf_counter() - start
    grown_mb = (_peak_rss_bytes() - before) / 2**20
    assert "ICO is not accepted" in str(e.value)
    assert grown_mb < 50, f"decoding the refused .ico raised peak memory by {grown_mb:.0f} MB ({elapsed_s:.2f} s)"


def test_tiff_is_refused_by_name():
    """A TIFF (decodable by Pillow, not accepted here) gets an error naming its format and the accepted ones."""
    with pytest.raises(InvalidInputError) as e:
        decode_image(tiff_bytes(), LIMIT)
    assert "TIFF is not accepted" in str(e.value) and "JPEG, PNG, WebP, GIF, BMP" in str(e.value)


def test_animated_gif_decodes_its_first_frame_only():
    """A GIF of 3,000 frames decodes to exactly its first frame, without walking the others."""
    gif, first = animated_gif(3000)
    before = _peak_rss_bytes()
    pixels = decode_image(gif, LIMIT)
    np.testing.assert_array_equal(pixels, first)
    assert (_peak_rss_bytes() - before) / 2**20 < 50


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "GIF", "BMP"])
def test_accepted_formats_decode(fmt):
    """Every accepted format decodes to RGB pixels of the image's size."""
    pixels = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    out = decode_image(_encoded(fmt, pixels), LIMIT)
    assert out.shape == (20, 30, 3) and out.dtype == np.uint8


def test_pillows_bomb_check_runs_at_the_configured_limit():
    """An image of limit + 1 pixels is refused from its header (Pillow's own check, not disabled); limit pixels decode."""
    at_limit = _encoded("PNG", np.zeros((100, 100, 3), np.uint8))
    assert decode_image(at_limit, 10_000).shape == (100, 100, 3)
    with pytest.raises(InvalidInputError) as e:
        decode_image(_encoded("PNG", np.zeros((100, 101, 3), np.uint8)), 10_000)
    assert "over the limit of 10000" in str(e.value)
    assert Image.MAX_IMAGE_PIXELS == 10_000
