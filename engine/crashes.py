"""Poison inputs: crashes counted per input across requests, shared by a backbone's worker and preprocessing pools."""

from __future__ import annotations

import collections
import hashlib
import pickle

import numpy as np

from featurebank.common.errors import WorkerCrashError
from featurebank.common.metrics import Metrics
from featurebank.engine.batching import PendingItem

# An item that killed a process is retried alone once; an item that kills a process on its second
# try gets an error of its own, and so does every later request for it (whoever sends it):
# crashes are counted per content key, across requests, in a bounded LRU.
MAX_ATTEMPTS = 2
MAX_POISON_KEYS = 4096


def content_key(item: PendingItem) -> str:
    """What crashes are counted under: the item's cache key, else a hash of its input."""
    if item.key:
        return item.key
    h = hashlib.blake2b(digest_size=16)
    payload = item.payload.payload
    h.update(f"{item.payload.kind}\0{item.layer}\0".encode())
    if isinstance(payload, np.ndarray):
        h.update(f"{payload.dtype.str}{payload.shape}".encode())
        h.update(np.ascontiguousarray(payload).tobytes())
    elif isinstance(payload, str):
        h.update(payload.encode("utf-8", "surrogatepass"))
    elif isinstance(payload, (bytes, bytearray, memoryview)):
        h.update(bytes(payload))
    else:  # already preprocessed (token ids): its pickle is as deterministic as its content
        h.update(pickle.dumps(payload, protocol=5))
    return "input:" + h.hexdigest()


class CrashLedger:
    """Crashes per input content key for one backbone (a bounded LRU), whichever process the input killed.

    One ledger is shared by the backbone's model workers and its preprocessing processes, so an
    input counts as poison however it kills: twice, and it is refused without reaching a process.
    """

    def __init__(self, backbone: str, metrics: Metrics, max_keys: int = MAX_POISON_KEYS):
        self.backbone = backbone
        self.metrics = metrics
        self.max_keys = max_keys
        self._crashes: collections.OrderedDict[str, int] = collections.OrderedDict()

    def __bool__(self) -> bool:
        return bool(self._crashes)

    def count(self, item: PendingItem) -> int:
        """One more crash for this item's input (and its tenant); the input's crashes so far."""
        key = content_key(item)
        crashes = self._crashes.pop(key, 0) + 1
        self._crashes[key] = crashes
        while len(self._crashes) > self.max_keys:
            self._crashes.popitem(last=False)
        self.metrics.input_crashes.labels(self.backbone, item.tenant).inc()
        return crashes

    def crashed(self, item: PendingItem, attempts: int, what: str, reason: str) -> WorkerCrashError | None:
        """Count a crash by ``item``'s input on its ``attempts``-th try: the error that ends it, or None to retry it.

        ``what`` names the process in the error ("the toy worker"), ``reason`` says how it died.
        """
        crashes = self.count(item)
        if max(attempts, crashes) < MAX_ATTEMPTS:
            return None
        return WorkerCrashError(f"this input crashed {what} {crashes} times ({reason}); not retried")

    def forget(self, item: PendingItem) -> None:
        """The item was computed after a crash: it was a bystander, not the cause."""
        if self._crashes:
            self._crashes.pop(content_key(item), None)

    def refusal(self, item: PendingItem, what: str = "workers") -> WorkerCrashError | None:
        """The error for an input that already crashed MAX_ATTEMPTS times (counted as refused), else None."""
        crashes = self._crashes.get(content_key(item), 0) if self._crashes else 0
        if crashes < MAX_ATTEMPTS:
            return None
        self.metrics.poison_refused.labels(self.backbone, item.tenant).inc()
        return WorkerCrashError(
            f"refused: this input crashed {self.backbone} {what} {crashes} times before; it is not sent to one again"
        )

    def refuse_poison(self, items: list[PendingItem], what: str = "workers") -> list[PendingItem]:
        """Fail, without a process, the items whose input already crashed MAX_ATTEMPTS times; the rest."""
        if not self._crashes:
            return items
        keep = []
        for item in items:
            if self._crashes.get(content_key(item), 0) < MAX_ATTEMPTS:
                keep.append(item)
            elif not item.future.done():
                item.future.set_exception(self.refusal(item, what))
        return keep
