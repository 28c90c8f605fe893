"""Hit answers written straight in protobuf's wire format, from the cached bytes.

A hit's features already are a ``Tensor``'s ``data`` (see ``codec.check``). Building the
response as messages and serialising it copied them twice and cost ~6.5 us + ~7 us per item
in upb (64 cached items: 418 us to build, 456 us to serialise, against 11 us to join the same
bytes), which was most of a batch Lookup's or Extract's CPU beyond gRPC's. Here each hit is a
handful of tag and length bytes around its data, joined once into the response: the data is
copied once, into the message gRPC sends.

The encoding is protobuf's own: the same bytes ``SerializeToString`` writes for the same
message, field by field in field-number order (``tests/unit/test_wire.py`` checks byte
equality against upb). Any result that is not a plain hit (an error, a computed miss, a
converted dtype) is serialised by protobuf and placed among them as it is. The message
definitions are in ``proto/featurebank/v1/featurebank.proto``: a field added to ``Tensor``,
``ItemResult`` or ``ExtractResponse`` that a hit sets must be added here too.
"""

from __future__ import annotations

from featurebank.v1 import featurebank_pb2 as pb

# Tags: (field number << 3) | wire type (0 varint, 2 length-delimited).
_RESULTS = b"\x0a"  # ExtractResponse.results = 1
_FEATURES = b"\x0a"  # ItemResult.features = 1
_CACHE_HIT_TRUE = b"\x10\x01"  # ItemResult.cache_hit = 2
_KEY = b"\x1a"  # ItemResult.key = 3
_DTYPE = b"\x08"  # Tensor.dtype = 1
_SHAPE = b"\x12"  # Tensor.shape = 2 (packed)
_DATA = b"\x1a"  # Tensor.data = 3


def _encode_varint(n: int) -> bytes:
    out = bytearray()
    while n >= 128:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


# Every varint of up to two bytes (lengths below 16 KiB: keys, shapes, most features), looked up.
_VARINTS = [_encode_varint(n) for n in range(1 << 14)]


def varint(n: int) -> bytes:
    """``n`` (>= 0) as a protobuf base-128 varint."""
    return _VARINTS[n] if n < 16384 else _encode_varint(n)


class ResponseWriter:
    """An ``ExtractResponse`` assembled result by result, in order, then joined once."""

    __slots__ = ("_parts", "_tensor_heads")

    def __init__(self) -> None:
        self._parts: list = []
        # (dtype, shape, data bytes) -> the ItemResult's bytes before the data, and their count
        # with the data's: the same for every hit of one backbone layer, so built once per response.
        self._tensor_heads: dict[tuple[int, tuple[int, ...], int], tuple[bytes, int]] = {}

    def hit(self, key: str, dtype: int, shape: tuple[int, ...], data) -> None:
        """A cache hit: ``ItemResult{features: Tensor{dtype, shape, data}, cache_hit: true, key}``.

        ``data`` is any bytes-like object (a memoryview over the cached value: not copied here).
        """
        n = len(data)
        known = self._tensor_heads.get((dtype, shape, n))
        if known is None:
            packed = b"".join(varint(d) for d in shape)
            tensor_head = (_DTYPE + varint(dtype) if dtype else b"") + (
                _SHAPE + varint(len(packed)) + packed if shape else b""
            )
            tensor_head += _DATA + varint(n) if n else b""
            head = _FEATURES + varint(len(tensor_head) + n) + tensor_head
            known = self._tensor_heads[(dtype, shape, n)] = (head, len(head) + n)
        head, size = known
        k = key.encode()
        tail = _CACHE_HIT_TRUE + _KEY + _VARINTS[len(k)] + k if k and len(k) < 16384 else self._tail(k)
        self._parts += (_RESULTS, varint(size + len(tail)), head, data, tail)

    @staticmethod
    def _tail(k: bytes) -> bytes:
        return _CACHE_HIT_TRUE + (_KEY + varint(len(k)) + k if k else b"")

    def message(self, result: pb.ItemResult) -> None:
        """Any other result, serialised by protobuf."""
        encoded = result.SerializeToString()
        self._parts += (_RESULTS, varint(len(encoded)), encoded)

    def finish(self, backbone_fingerprint: str, backbone: str, layer: str) -> bytes:
        """The whole response: its results, then the fields after them."""
        tail = pb.ExtractResponse(
            backbone_fingerprint=backbone_fingerprint, backbone=backbone, layer=layer
        ).SerializeToString()
        self._parts.append(tail)
        return b"".join(self._parts)


def passing_bytes(serializer):
    """A response serializer that sends bytes a handler already encoded as they are."""

    def serialize(response) -> bytes:
        return response if response.__class__ is bytes else serializer(response)

    return serialize
