"""Benchmark inputs: distinct 224x224 PNGs and short sentences, made fast and reproducibly."""

from __future__ import annotations

import json
import pathlib
import struct
import zlib

import numpy as np

REPO_DIR = pathlib.Path(__file__).resolve().parent.parent
# What each benchmarked backbone takes.
KINDS = {"efficientnet_lite0": "image", "minilm": "text"}
DATA_DIR = REPO_DIR / "tests" / "data"
IMAGE_SIZE = 224
# Rows at the bottom of each image that carry the variation (index + set tag + noise).
VARIED_ROWS = 8


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


class PngFactory:
    """Distinct, valid 224x224 RGB PNGs derived from the photos in tests/data.

    Every image is one of the test photos with its last ``VARIED_ROWS`` rows replaced by pixels
    that encode (set tag, index) and seeded noise, so content keys never collide across sets.
    Scanlines use PNG's "Up" filter and zlib level 6 (sizes close to the originals, 70-110 KB);
    the compressor state after the shared rows is copied per image, so one image costs ~0.3 ms
    instead of ~20 ms for a full encode, which lets a run prepare tens of thousands.
    """

    def __init__(self, data_dir: pathlib.Path = DATA_DIR):
        from PIL import Image

        paths = sorted(data_dir.glob("*.png"))
        if not paths:
            raise FileNotFoundError(f"no PNGs in {data_dir}")
        self._bases = []
        for p in paths:
            with Image.open(p) as img:
                rgb = img.convert("RGB").resize((IMAGE_SIZE, IMAGE_SIZE))
            pixels = np.asarray(rgb, dtype=np.uint8)
            shared = pixels[: IMAGE_SIZE - VARIED_ROWS]
            compressor = zlib.compressobj(6)
            prefix = compressor.compress(self._filtered(shared, None))
            self._bases.append((compressor, prefix, shared[-1]))
        head = struct.pack(">IIBBBBB", IMAGE_SIZE, IMAGE_SIZE, 8, 2, 0, 0, 0)  # 8-bit RGB, no interlace
        self._head = b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", head)
        self._tail = _png_chunk(b"IEND", b"")

    @staticmethod
    def _filtered(rows: np.ndarray, previous: np.ndarray | None) -> bytes:
        """Scanlines with filter type 2 (Up): each byte minus the byte above it, mod 256."""
        above = np.empty_like(rows)
        above[0] = 0 if previous is None else previous
        above[1:] = rows[:-1]
        diff = (rows.astype(np.int16) - above).astype(np.uint8)
        out = np.empty((rows.shape[0], 1 + rows.shape[1] * 3), np.uint8)
        out[:, 0] = 2
        out[:, 1:] = diff.reshape(rows.shape[0], -1)
        return out.tobytes()

    def image(self, tag: int, index: int) -> bytes:
        """The PNG for (tag, index); the same arguments always give the same bytes."""
        compressor, prefix, last_shared = self._bases[index % len(self._bases)]
        rng = np.random.default_rng([tag, index])
        rows = rng.integers(0, 256, (VARIED_ROWS, IMAGE_SIZE, 3), dtype=np.uint8)
        rows.reshape(-1)[:8] = np.frombuffer(struct.pack("<II", tag, index), np.uint8)  # distinct by construction
        c = compressor.copy()
        idat = prefix + c.compress(self._filtered(rows, last_shared)) + c.flush()
        return self._head + _png_chunk(b"IDAT", idat) + self._tail

    def images(self, tag: int, count: int, start: int = 0) -> list[bytes]:
        return [self.image(tag, i) for i in range(start, start + count)]


_SUBJECTS = (
    "a man",
    "a woman",
    "the child",
    "an old dog",
    "two cats",
    "the pilot",
    "a chef",
    "the band",
    "my neighbour",
    "a small robot",
    "the teacher",
    "a cyclist",
    "the farmer",
    "a student",
)
_VERBS = (
    "is eating",
    "is painting",
    "is carrying",
    "is watching",
    "repairs",
    "is riding",
    "is reading",
    "is playing",
    "photographs",
    "is cleaning",
    "is selling",
    "is climbing",
    "is feeding",
    "is building",
)
_OBJECTS = (
    "a piece of bread",
    "a red bicycle",
    "the old guitar",
    "a wooden boat",
    "a map of the city",
    "a basket of apples",
    "the kitchen table",
    "a paper kite",
    "a green umbrella",
    "a heavy box",
    "the garden fence",
    "a bowl of soup",
    "a tall ladder",
    "a blue notebook",
)
_PLACES = (
    "in the park",
    "near the river",
    "at the station",
    "on the roof",
    "in a quiet street",
    "by the sea",
    "in the morning",
    "after dinner",
    "during the storm",
    "at the market",
)


def reference_sentences() -> list[str]:
    return list(json.loads((DATA_DIR / "minilm_reference.json").read_text())["sentences"])


def sentence(tag: int, index: int) -> str:
    """A short distinct English sentence (about 10-16 WordPiece tokens) for (tag, index)."""
    rng = np.random.default_rng([tag, index])
    parts = [rng.choice(_SUBJECTS), rng.choice(_VERBS), rng.choice(_OBJECTS), rng.choice(_PLACES)]
    # The trailing number makes every (tag, index) distinct without changing the length much.
    return f"{' '.join(parts).capitalize()}, case {tag}-{index}."


def sentences(tag: int, count: int, start: int = 0) -> list[str]:
    refs = reference_sentences() if tag == 0 and start == 0 else []
    out = refs[:count]
    out += [sentence(tag, i) for i in range(start + len(out), start + count)]
    return out


class InputMaker:
    """Inputs for one backbone kind ("image" or "text"), by (tag, index)."""

    def __init__(self, kind: str):
        self.kind = kind
        self._png = PngFactory() if kind == "image" else None

    def make(self, tag: int, count: int, start: int = 0) -> list:
        if self.kind == "image":
            return self._png.images(tag, count, start)
        return sentences(tag, count, start)

    def make_indices(self, tag: int, indices) -> list:
        if self.kind == "image":
            return [self._png.image(tag, int(i)) for i in indices]
        return [sentence(tag, int(i)) for i in indices]


def zipf_draws(num_distinct: int, num_draws: int, exponent: float, seed: int = 0) -> np.ndarray:
    """Ranks 0..num_distinct-1 drawn with P(rank r) proportional to (r + 1) ** -exponent."""
    weights = np.arange(1, num_distinct + 1, dtype=np.float64) ** -exponent
    weights /= weights.sum()
    return np.random.default_rng(seed).choice(num_distinct, size=num_draws, p=weights).astype(np.int32)
