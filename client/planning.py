"""One request-planning core for the blocking, asyncio and streaming clients.

A plan is a generator that does no I/O: it yields the ``Call`` to make next (an RPC name and its
request), is sent the response (or thrown the ``FeatureBankError``), and returns the results in
input order. ``drive`` runs a plan with blocking calls, ``drive_async`` with awaited ones, so
splitting, keys-first lookups, the Lookup fallback and placing answers are written once.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable, Generator, Iterable, Iterator, Sequence
from typing import Any, TypeVar

import grpc

from featurebank.client.errors import FeatureBankError
from featurebank.client.inputs import to_input
from featurebank.client.keys import KEY_VERSION, input_key
from featurebank.client.results import ItemOutcome, Prediction, head_info, outcomes, prediction
from featurebank.common import tensors
from featurebank.v1 import featurebank_pb2 as pb

# Content keys per Lookup request: 32 bytes each, so 1,024 make a ~40 KB request.
LOOKUP_CHUNK = 1024
# A Lookup refused for these reasons (unknown backbone or layer, a server without Lookup) falls
# back to Extract, which then reports the problem per request as it always did; any other
# failure (overload, deadline, auth) is raised at once instead of costing a second call.
LOOKUP_FALLBACK_CODES = frozenset(
    {
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.UNIMPLEMENTED,
    }
)

T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class Call:
    """One unary RPC to make: the stub method's name and its request."""

    method: str
    request: Any


Plan = Generator[Call, Any, T]


@dataclasses.dataclass(frozen=True)
class Limits:
    """How inputs are split into requests (under gRPC's 4 MiB default message size)."""

    max_items: int
    max_bytes: int


def drive(plan: Plan[T], send: Callable[[Call], Any]) -> T:
    """Run a plan with a blocking ``send`` (which raises FeatureBankError for a failed RPC)."""
    try:
        call = next(plan)
        while True:
            try:
                response = send(call)
            except FeatureBankError as e:
                call = plan.throw(e)
            else:
                call = plan.send(response)
    except StopIteration as done:
        return done.value


async def drive_async(plan: Plan[T], send: Callable[[Call], Awaitable[Any]]) -> T:
    """Run a plan with an awaitable ``send``."""
    try:
        call = next(plan)
        while True:
            try:
                response = await send(call)
            except FeatureBankError as e:
                call = plan.throw(e)
            else:
                call = plan.send(response)
    except StopIteration as done:
        return done.value


def chunks(inputs: Iterable[pb.Input], limits: Limits) -> Iterator[tuple[int, list[pb.Input]]]:
    """Consecutive (start, slice) of inputs within the limits; lazy, so an input stream of any length works."""
    start, size, chunk = 0, 0, []
    for item in inputs:
        n = item.ByteSize() + 8
        if chunk and (len(chunk) >= limits.max_items or size + n > limits.max_bytes):
            yield start, chunk
            start, size, chunk = start + len(chunk), 0, []
        chunk.append(item)
        size += n
    if chunk:
        yield start, chunk


def place(items: Sequence, positions: Sequence[int], out: list, base: int = 0) -> None:
    """Put the answers of a request that carried some of the inputs at their positions in ``out``
    (their reported index, errors' too, is ``base`` + position)."""
    for item, i in zip(items, positions):
        item.index = base + i
        if item.error is not None:
            item.error.index = base + i
        out[i] = item


def lookup_hits(
    msgs: Sequence[pb.Input], out: list, *, backbone: str, layer: str, output_dtype: int, base: int = 0
) -> Plan[pb.ExtractResponse | None]:
    """Keys first: Lookup the content keys of ``msgs`` and fill ``out`` with the hits.

    Duplicates are looked up once; an input without a key (no payload, an unknown tensor dtype)
    and every key not found are left as None for Extract, which answers them as without
    lookup-first. A Lookup refused for a LOOKUP_FALLBACK_CODES reason ends the lookups quietly.

    Returns:
        the last Lookup response (its backbone, layer and fingerprint), or None.
    """
    positions: dict[str, list[int]] = {}
    for i, m in enumerate(msgs):
        try:
            positions.setdefault(input_key(m), []).append(i)
        except ValueError:
            continue
    keys = list(positions)
    last = None
    for start in range(0, len(keys), LOOKUP_CHUNK):
        chunk = keys[start : start + LOOKUP_CHUNK]
        try:
            response = yield Call(
                "Lookup",
                pb.LookupRequest(
                    backbone=backbone, layer=layer, keys=chunk, output_dtype=output_dtype, key_version=KEY_VERSION
                ),
            )
        except FeatureBankError as e:
            if e.code not in LOOKUP_FALLBACK_CODES:
                raise  # overload, deadline, auth: Extract would fail the same way
            return last  # e.g. an unknown backbone or layer: Extract reports it as it always did
        last = response
        for key, r in zip(chunk, response.results):
            if r.HasField("error"):
                continue
            features = tensors.from_proto(r.features)
            for i in positions[key]:
                out[i] = ItemOutcome(base + i, key, True, features, None)
    return last


def extract_request(
    msgs: Sequence[pb.Input], *, backbone: str, layer: str, output_dtype: int, cache_policy: int
) -> pb.ExtractRequest:
    return pb.ExtractRequest(
        backbone=backbone, layer=layer, inputs=msgs, output_dtype=output_dtype, cache_policy=cache_policy
    )


def uses_lookup(lookup_first: bool, cache_policy: int, backbone: str) -> bool:
    """Keys first needs a named backbone (only Extract picks one by input kind) and the USE policy."""
    return bool(lookup_first and cache_policy == pb.USE and backbone)


def extract(
    inputs: Iterable,
    limits: Limits,
    *,
    backbone: str = "",
    layer: str = "",
    output_dtype: int = pb.FLOAT32,
    cache_policy: int = pb.USE,
    lookup_first: bool = True,
) -> Plan[list[ItemOutcome]]:
    """ItemOutcomes in input order: Lookup first (see ``lookup_hits``), then Extract the rest in chunks."""
    msgs = [to_input(x) for x in inputs]
    out: list[ItemOutcome | None] = [None] * len(msgs)
    if msgs and uses_lookup(lookup_first, cache_policy, backbone):
        yield from lookup_hits(msgs, out, backbone=backbone, layer=layer, output_dtype=output_dtype)
    rest = [i for i, o in enumerate(out) if o is None]
    for start, chunk in chunks([msgs[i] for i in rest], limits):
        try:
            response = yield Call(
                "Extract",
                extract_request(
                    chunk, backbone=backbone, layer=layer, output_dtype=output_dtype, cache_policy=cache_policy
                ),
            )
        except FeatureBankError as e:
            i = rest[start]
            if not too_large_alone(chunk, limits, e):
                raise
            out[i] = ItemOutcome(i, _key_or_empty(chunk[0]), False, None, too_large_error(e, i))
            continue
        place(outcomes(response), rest[start : start + len(chunk)], out)
    return out  # type: ignore[return-value]


def too_large_alone(chunk: Sequence[pb.Input], limits: Limits, error: FeatureBankError) -> bool:
    """The request was one input over the split size, refused for its size: that input's own error,
    not its neighbours' (they travel in other requests)."""
    return (
        len(chunk) == 1
        and chunk[0].ByteSize() + 8 > limits.max_bytes
        and error.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        and "larger than max" in error.message
    )


def too_large_error(error: FeatureBankError, index: int) -> FeatureBankError:
    return FeatureBankError(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        f"input too large for one request ({error.message}); send a smaller input, or raise the server's "
        f"--max-message-bytes (and the client's max_message_bytes)",
        index,
    )


def _key_or_empty(msg: pb.Input) -> str:
    try:
        return input_key(msg)
    except ValueError:
        return ""


def lookup(
    keys: Sequence[str], *, backbone: str, layer: str = "", output_dtype: int = pb.FLOAT32
) -> Plan[list[ItemOutcome]]:
    """Cached features by content key, LOOKUP_CHUNK keys a request; a key not cached has a NOT_FOUND error."""
    out: list[ItemOutcome] = []
    for start in range(0, len(keys), LOOKUP_CHUNK):
        response = yield Call(
            "Lookup",
            pb.LookupRequest(
                backbone=backbone, layer=layer, keys=keys[start : start + LOOKUP_CHUNK], output_dtype=output_dtype
            ),
        )
        out.extend(outcomes(response, start))
    return out


def predict(
    head: str, inputs: Iterable, limits: Limits, *, version: int = 0, cache_policy: int = pb.USE
) -> Plan[list[Prediction]]:
    """Predictions of a served head in input order, in chunks within the limits."""
    out: list[Prediction] = []
    for start, chunk in chunks([to_input(x) for x in inputs], limits):
        try:
            response = yield Call(
                "Predict", pb.PredictRequest(head=head, version=version, inputs=chunk, cache_policy=cache_policy)
            )
        except FeatureBankError as e:
            if not too_large_alone(chunk, limits, e):
                raise
            out.append(Prediction(start, "", -1, None, False, _key_or_empty(chunk[0]), too_large_error(e, start)))
            continue
        out.extend(prediction(p, start + j) for j, p in enumerate(response.predictions))
    return out


def put_head(head_proto: pb.Head) -> Plan:
    return head_info((yield Call("PutHead", pb.PutHeadRequest(head=head_proto))))


def list_heads(name: str = "") -> Plan:
    response = yield Call("ListHeads", pb.ListHeadsRequest(name=name))
    return [head_info(h) for h in response.heads]


def delete_head(name: str, version: int = 0) -> Plan[int]:
    return (yield Call("DeleteHead", pb.DeleteHeadRequest(name=name, version=version))).deleted


def backbones() -> Plan[list[pb.BackboneInfo]]:
    return list((yield Call("ListBackbones", pb.ListBackbonesRequest())).backbones)
