"""Backbones that misbehave on purpose, one failure mode each, for the fault tests.

Served as "fixture_backbones:NAME"; the server's tests put this folder on PYTHONPATH, and the
spawned workers inherit it. Behaviour is set by env vars so one class covers each contract.
"""

from __future__ import annotations

import os
import signal
import time

from featurebank.workers.backbones.toy import ToyBackbone

KILL_MARKER = b"KILL"


class FaultyToy(ToyBackbone):
    """The toy backbone, plus: FB_TEST_FAIL_SETUP raises in load(); FB_TEST_LOAD_DELAY_S sleeps
    before loading; FB_TEST_FORWARD_DELAY_MS sleeps in every served forward pass; an image whose
    bytes start with KILL makes the worker SIGKILL itself."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._warm = False

    def load(self) -> None:
        if os.environ.get("FB_TEST_FAIL_SETUP"):
            raise RuntimeError("fixture backbone refuses to load (FB_TEST_FAIL_SETUP)")
        time.sleep(float(os.environ.get("FB_TEST_LOAD_DELAY_S", "0")))
        super().load()

    def warmup(self) -> None:
        super().warmup()
        self._warm = True

    def preprocess(self, item):
        if item.kind == "image" and item.payload.startswith(KILL_MARKER):
            os.kill(os.getpid(), signal.SIGKILL)
        return super().preprocess(item)

    def forward(self, batch):
        if self._warm:
            time.sleep(float(os.environ.get("FB_TEST_FORWARD_DELAY_MS", "0")) / 1000.0)
        return super().forward(batch)
