"""The coalescer's batching rules, driven by plain dispatch functions under event control (no network)."""

from __future__ import annotations

import threading
import time

import grpc
import pytest

from featurebank.client.coalesce import Coalescer
from featurebank.client.errors import FeatureBankError
from featurebank.client.results import ItemOutcome
from featurebank.v1 import featurebank_pb2 as pb


def msgs(*texts: str) -> list[pb.Input]:
    return [pb.Input(text=t) for t in texts]


def answer(batch, timeout_s):
    """Outcomes as the planning core returns them: merged indices; every 'bad' text an item error."""
    return [
        ItemOutcome(i, m.text, False, None, FeatureBankError(grpc.StatusCode.INVALID_ARGUMENT, "bad", i))
        if m.text == "bad"
        else ItemOutcome(i, m.text, False, None, None)
        for i, m in enumerate(batch)
    ]


class InFlight:
    """A first call held inside its dispatch until released, so later calls see one in flight."""

    def __init__(self, coalescer: Coalescer):
        self.started, self.release = threading.Event(), threading.Event()

        def held(batch, timeout_s):
            self.started.set()
            self.release.wait(30)
            return answer(batch, timeout_s)

        self.thread = threading.Thread(target=coalescer.run, args=("k", msgs("first"), 10.0, held))
        self.thread.start()
        assert self.started.wait(30)

    def finish(self):
        self.release.set()
        self.thread.join(30)


def test_lingering_batch_scatters_own_indices_and_errors_and_spends_the_callers_deadline():
    """Callers merged behind an in-flight call get their own re-indexed outcomes; the merged call's timeout is what is left of theirs."""
    c = Coalescer(linger_s=600, max_items=5)  # the five inputs fill the batch: it goes once both joined
    first = InFlight(c)
    seen: list[tuple[list[str], float]] = []

    def record(batch, timeout_s):
        seen.append(([m.text for m in batch], timeout_s))
        return answer(batch, timeout_s)

    results: dict[str, list[ItemOutcome]] = {}
    calls = {"a": msgs("a0", "a1"), "b": msgs("b0", "bad", "b2")}
    threads = [
        threading.Thread(target=lambda n=n: results.__setitem__(n, c.run("k", calls[n], 10.0, record))) for n in calls
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    first.finish()
    assert len(seen) == 1 and sorted(seen[0][0]) == ["a0", "a1", "b0", "b2", "bad"]
    assert 9.0 < seen[0][1] < 10.0  # the time the batch waited came out of the deadline
    assert [(o.index, o.key) for o in results["a"]] == [(0, "a0"), (1, "a1")]
    assert [(o.index, o.key) for o in results["b"]] == [(0, "b0"), (1, "bad"), (2, "b2")]
    assert results["b"][1].error.index == 1 and str(results["b"][1].error).startswith("input 1: ")


def test_different_keys_are_never_merged():
    """Calls with different options (another layer, dtype, policy...) go in separate requests."""
    c = Coalescer(linger_s=0.2, max_items=256)
    first = InFlight(c)
    seen: list[list[str]] = []
    lock = threading.Lock()

    def record(batch, timeout_s):
        with lock:
            seen.append([m.text for m in batch])
        return answer(batch, timeout_s)

    threads = [threading.Thread(target=c.run, args=(key, msgs(key), 10.0, record)) for key in ("x", "y")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    first.finish()
    assert sorted(seen) == [["x"], ["y"]]


def test_a_full_batch_goes_without_waiting_out_the_linger():
    """A batch that reaches max_items is sent at once, however long the linger."""
    c = Coalescer(linger_s=600, max_items=4)
    first = InFlight(c)
    threads = [threading.Thread(target=c.run, args=("k", msgs(f"t{k}"), 10.0, answer)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not any(t.is_alive() for t in threads)
    first.finish()


def test_request_error_is_raised_in_every_caller_of_the_batch():
    """The merged request's failure reaches each caller as its own FeatureBankError."""
    c = Coalescer(linger_s=0.2, max_items=256)
    first = InFlight(c)

    def fail(batch, timeout_s):
        raise FeatureBankError(grpc.StatusCode.UNAVAILABLE, "gone")

    errors: list = []
    lock = threading.Lock()

    def call(name):
        try:
            c.run("k", msgs(name), 10.0, fail)
        except FeatureBankError as e:
            with lock:
                errors.append(e)

    threads = [threading.Thread(target=call, args=(n,)) for n in ("a", "b", "c")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    first.finish()
    assert [e.code for e in errors] == [grpc.StatusCode.UNAVAILABLE] * 3
    assert len({id(e) for e in errors}) == 3


def test_negative_linger_is_refused():
    """A negative linger is a configuration error naming the setting."""
    with pytest.raises(ValueError, match="linger"):
        Coalescer(linger_s=-0.001, max_items=4)


def test_a_caller_that_does_not_fit_sends_the_open_batch_and_opens_the_next():
    """A call too big for the open batch's room sends that batch at once and starts the next one."""
    c = Coalescer(linger_s=600, max_items=3)
    first = InFlight(c)
    seen: list[list[str]] = []
    lock = threading.Lock()

    def record(batch, timeout_s):
        with lock:
            seen.append([m.text for m in batch])
        return answer(batch, timeout_s)

    def start(*texts):
        opened = c._open.get("k")
        t = threading.Thread(target=c.run, args=("k", msgs(*texts), 10.0, record))
        t.start()
        deadline_s = time.monotonic() + 30
        while c._open.get("k") is opened and t.is_alive() and time.monotonic() < deadline_s:
            time.sleep(0.005)  # until this caller has opened its batch
        return t

    a = start("a0", "a1")
    b = start("b0", "b1")  # no room beside a's two: a's batch goes now
    a.join(30)
    assert not a.is_alive() and seen == [["a0", "a1"]]
    c_ = threading.Thread(target=c.run, args=("k", msgs("c0"), 10.0, record))
    c_.start()  # fills b's batch, which then goes
    for t in (b, c_):
        t.join(30)
    first.finish()
    assert seen == [["a0", "a1"], ["b0", "b1", "c0"]]
