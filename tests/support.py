"""What tests share beside the process harness (featurebank.server.testing): paths, images, a fixture-aware server."""

from __future__ import annotations

import io
import pathlib

import numpy as np

from featurebank.server import testing
from featurebank.server.testing import RedisProcess, free_cluster_port, free_port, wait_until

__all__ = [
    "DATA_DIR",
    "TESTS_DIR",
    "RedisProcess",
    "ServerProcess",
    "free_cluster_port",
    "free_port",
    "png_bytes",
    "random_images",
    "wait_until",
]

TESTS_DIR = pathlib.Path(__file__).resolve().parent
DATA_DIR = TESTS_DIR / "data"


class ServerProcess(testing.ServerProcess):
    """The harness's featurebank server, with tests/ on its PYTHONPATH so that it can load the fixture backbones."""

    def __init__(self, *args: str, env: dict[str, str] | None = None):
        super().__init__(*args, env=env, pythonpath=[TESTS_DIR])


def png_bytes(pixels: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def random_images(n: int, seed: int = 0, size: tuple[int, int] = (40, 48)) -> list[bytes]:
    rng = np.random.default_rng(seed)
    return [png_bytes(rng.integers(0, 256, (*size, 3), dtype=np.uint8)) for _ in range(n)]
