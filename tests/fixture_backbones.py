"""Backbones that misbehave on purpose, one failure mode each, for the fault tests.

Served as "fixture_backbones:NAME"; the server's tests put this folder on PYTHONPATH, and the
spawned workers inherit it. Behaviour is set by env vars so one class covers each contract.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import numpy as np

from featurebank.workers.backbones.toy import ToyBackbone

KILL_MARKER = b"KILL"
HANG_MARKER = b"HANG"
ALLOC_MARKER = b"ALLOC"


class FaultyToy(ToyBackbone):
    """The toy backbone, plus: FB_TEST_FAIL_SETUP raises in load(); FB_TEST_LOAD_DELAY_S sleeps
    before loading; FB_TEST_LOAD_GATE_FILE holds load() while that file exists;
    FB_TEST_PREPROCESS_GATE_FILE holds a preprocessing process's start the same way;
    FB_TEST_ITEM_GATE_FILE holds every item's preprocessing while that file exists (touching FILE.entered
    first); FB_TEST_FORWARD_DELAY_MS sleeps in every served forward pass. An image whose bytes start with
    KILL makes the worker SIGKILL itself; with HANG it never returns; with ALLOC it allocates and
    fills FB_TEST_ALLOC_MB megabytes (an exotic decoder's appetite)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._warm = False

    def load(self) -> None:
        if os.environ.get("FB_TEST_FAIL_SETUP"):
            raise RuntimeError("fixture backbone refuses to load (FB_TEST_FAIL_SETUP)")
        time.sleep(float(os.environ.get("FB_TEST_LOAD_DELAY_S", "0")))
        gate = os.environ.get("FB_TEST_LOAD_GATE_FILE")
        while gate and os.path.exists(gate):
            time.sleep(0.05)
        super().load()

    def load_preprocessing(self, info) -> None:
        gate = os.environ.get("FB_TEST_PREPROCESS_GATE_FILE")
        while gate and os.path.exists(gate):
            time.sleep(0.05)
        super().load_preprocessing(info)

    def warmup(self) -> None:
        super().warmup()
        self._warm = True

    def preprocess(self, item):
        gate = os.environ.get("FB_TEST_ITEM_GATE_FILE")
        if gate and os.path.exists(gate):
            open(gate + ".entered", "w").close()
            while os.path.exists(gate):
                time.sleep(0.05)
        if item.kind == "image" and item.payload.startswith(KILL_MARKER):
            os.kill(os.getpid(), signal.SIGKILL)
        if item.kind == "image" and item.payload.startswith(HANG_MARKER):
            threading.Event().wait()  # stuck for good: only the watchdog gets this worker back
        if item.kind == "image" and item.payload.startswith(ALLOC_MARKER):
            np.ones(int(os.environ.get("FB_TEST_ALLOC_MB", "4096")) * 2**20, np.uint8)
        return super().preprocess(item)

    def forward(self, batch):
        if self._warm:
            time.sleep(float(os.environ.get("FB_TEST_FORWARD_DELAY_MS", "0")) / 1000.0)
        return super().forward(batch)


class ModelBoundPreprocessing(ToyBackbone):
    """The toy backbone as a user's backbone whose own preprocess() may need its model: it overrides
    preprocess() and not load_preprocessing()."""

    def preprocess(self, item):
        return super().preprocess(item)
