"""Batch-size buckets: the shapes a forward pass is traced for, and splitting any batch into them."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

# Batch sizes the forward pass is traced for; a batch is zero-padded up to the next one, so no
# request size ever causes a new trace after warm-up.
DEFAULT_BATCH_BUCKETS: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)


def bucket_for(n: int, buckets: Sequence[int]) -> int:
    """Smallest bucket >= n; callers split batches larger than the largest bucket."""
    for b in buckets:
        if b >= n:
            return b
    raise ValueError(f"batch of {n} exceeds the largest bucket {buckets[-1]}")


def split_into_buckets(n: int, buckets: Sequence[int]) -> list[tuple[int, int]]:
    """(items, traced batch size) pieces covering n items with little padding.

    Padding a batch of 9 up to 16 computes 7 rows of zeros (a third of the work at a typical
    mix of request sizes); 9 = 8 + 1 costs one extra call (~1 ms) instead. A remainder only pads
    up when that wastes fewer rows than the calls it saves: at most a quarter of the bucket.
    """
    pieces: list[tuple[int, int]] = []
    while n > 0:
        fit = max((b for b in buckets if b <= n), default=buckets[0])
        up = bucket_for(n, buckets) if n <= buckets[-1] else buckets[-1]
        if up - n <= up // 4 or fit > n:
            take = min(n, up)
            pieces.append((take, up))
        else:
            take = fit
            pieces.append((fit, fit))
        n -= take
    return pieces


def run_bucketed(
    fn: Callable, batch: list[np.ndarray], item_shape: tuple[int, ...], buckets: Sequence[int]
) -> dict[str, np.ndarray]:
    """Call ``fn`` (a traced forward pass returning {layer: tensor}) on traced batch sizes only,
    zero-padding at most a quarter of each piece, and return the layers for exactly ``batch``."""
    out: dict[str, list[np.ndarray]] = {}
    start = 0
    for size, b in split_into_buckets(len(batch), buckets):
        x = np.zeros((b, *item_shape), np.float32)
        for i, p in enumerate(batch[start : start + size]):
            x[i] = p
        start += size
        for k, v in fn(x).items():
            out.setdefault(k, []).append(np.asarray(v)[:size])
    return {k: np.concatenate(v, axis=0) for k, v in out.items()}
