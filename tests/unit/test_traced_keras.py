"""The traced-Keras base: planned warm-up traces are quiet, an unplanned retrace is counted and logged."""

from __future__ import annotations

import logging

import numpy as np
import pytest

pytest.importorskip("tensorflow")

from featurebank.workers.backbones.toy import ToyBackbone  # noqa: E402


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture
def records():
    """Every record logged by TensorFlow's Python logger and by featurebank, while the test runs."""
    handler = _Records()
    loggers = [logging.getLogger("tensorflow"), logging.getLogger("featurebank")]
    for lg in loggers:
        lg.addHandler(handler)
    yield handler.messages
    for lg in loggers:
        lg.removeHandler(handler)


def test_warmup_traces_are_planned_and_an_unplanned_retrace_is_counted_and_logged(records):
    """Warming six shapes logs no retracing warning; a seventh shape while serving is counted and logged."""
    import tensorflow as tf

    backbone = ToyBackbone(batch_buckets=(1, 2, 4, 8, 16, 32))
    backbone.name = "toy"
    backbone.load()
    backbone.warmup()
    assert backbone.trace_count == 6
    assert not [m for m in records if "retracing" in m or "unplanned" in m], records
    backbone.forward([np.zeros((32, 32, 3), np.uint8)] * 3)  # 3 = 2 + 1: traced shapes only
    assert backbone.trace_count == 6
    backbone._fn(tf.zeros((3, 32, 32, 3)))  # a shape no warm-up planned
    assert backbone.trace_count == 7
    assert any("unplanned trace #7" in m and "(3, 32, 32, 3)" in m for m in records), records
