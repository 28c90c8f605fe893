"""Hostile image files, generated on demand (megabytes that should never be committed)."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _zlib_zeros(n: int, block: int = 1 << 22) -> bytes:
    """A valid zlib stream of ``n`` zero bytes, built in well under a second.

    Blocks end in a full flush, which resets the compressor, so every block after the first
    compresses to the same bytes and is repeated instead of compressed again; the Adler-32 of
    n zeros is ((n mod 65521) << 16) | 1.
    """
    c = zlib.compressobj(9)
    zeros = bytes(block)
    first = c.compress(zeros) + c.flush(zlib.Z_FULL_FLUSH)
    body = c.compress(zeros) + c.flush(zlib.Z_FULL_FLUSH)
    full, rest = divmod(n, block)
    last = zlib.compressobj(9)
    tail = last.compress(bytes(rest)) + last.flush(zlib.Z_FINISH)  # its own 2-byte header, dropped
    return first + body * (full - 1) + tail[2:-4] + struct.pack(">I", ((n % 65521) << 16) | 1)


def huge_png(width: int, height: int) -> bytes:
    """A real, fully decodable all-black RGBA PNG of width x height (20000 x 20000 is ~1.5 MB)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 6, 0, 0, 0)
    idat = _zlib_zeros((1 + 4 * width) * height)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def ico_bomb(width: int = 20_000, height: int = 20_000) -> bytes:
    """An .ico whose one entry is a huge PNG: Pillow's ICO plugin decodes it inside Image.open."""
    png = huge_png(width, height)
    header = struct.pack("<HHH", 0, 1, 1)
    # width/height 0 mean 256 in the directory; the PNG's own header says the real size.
    entry = struct.pack("<BBBBHHII", 0, 0, 0, 0, 1, 32, len(png), 6 + 16)
    return header + entry + png


def animated_gif(frames: int = 3000, size: tuple[int, int] = (64, 64), seed: int = 0) -> tuple[bytes, np.ndarray]:
    """A GIF with ``frames`` frames of noise, and the RGB pixels of its first frame."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    palette_frames = [
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).quantize(16) for _ in range(min(frames, 8))
    ]
    images = [palette_frames[i % len(palette_frames)] for i in range(frames)]
    buf = io.BytesIO()
    images[0].save(
        buf, format="GIF", save_all=True, append_images=images[1:], duration=10, loop=0, optimize=False, disposal=1
    )
    return buf.getvalue(), np.asarray(images[0].convert("RGB"))


def tiff_bytes(size: tuple[int, int] = (40, 48), seed: int = 0) -> bytes:
    """An ordinary RGB TIFF (a format Pillow decodes, but the server does not accept)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(buf, format="TIFF")
    return buf.getvalue()
