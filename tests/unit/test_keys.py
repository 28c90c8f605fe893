"""Content keys (featurebank.client.keys) and cache keys (featurebank.server.keys): defined, distinct, stable, short."""

from __future__ import annotations

import hashlib
import os
import re

import blake3
import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from featurebank.client import content_key
from featurebank.client import keys as ckeys
from featurebank.client.inputs import to_input
from featurebank.client.tensors import TensorError
from featurebank.server import keys as server_keys
from featurebank.server.keys import KEY_PREFIX, cache_key, cache_keys
from featurebank.v1 import featurebank_pb2 as pb

HEX32 = re.compile(r"[0-9a-f]{32}")
TENSOR_DTYPES = ["float32", "float16", "uint8", "int32", "int64"]


# ----------------------------------------------------------------------------- the definition, independently


def reference_key(kind: str, payload, version: int = 2) -> str:
    """The content key exactly as the header of proto/featurebank/v1/featurebank.proto defines it:
    BLAKE3 (version 2) or BLAKE2b (version 1), 16 bytes, over the documented layout."""
    if kind == "image":
        body = b"image\0" + bytes(payload)
    elif kind == "text":
        body = b"text\0" + payload.encode("utf-8")
    else:
        a = np.asarray(payload)
        le = a.astype(a.dtype.newbyteorder("<"), copy=False)
        shape = ",".join(str(d) for d in a.shape).encode()
        body = b"tensor\0" + a.dtype.name.encode() + b"\0" + shape + b"\0" + np.ascontiguousarray(le).tobytes()
    if version == 1:
        return hashlib.blake2b(body, digest_size=16).hexdigest()
    return blake3.blake3(body).digest(length=16).hex()


def identity(kind: str, payload):
    """What makes two inputs the same input: kind plus the exact bytes the key covers."""
    if kind == "tensor":
        a = np.asarray(payload)
        return (kind, a.dtype.name, a.shape, a.astype(a.dtype.newbyteorder("<")).tobytes())
    return (kind, payload)


tensor_arrays = st.sampled_from(TENSOR_DTYPES).flatmap(
    lambda name: st.sampled_from(["<", ">"]).flatmap(
        lambda order: hnp.arrays(
            np.dtype(name).newbyteorder(order),
            # 0-d arrays are covered separately (see test_scalar_array_key_uses_empty_shape).
            hnp.array_shapes(min_dims=1, max_dims=4, min_side=0, max_side=4),
        )
    )
)
inputs = st.one_of(
    st.tuples(st.just("image"), st.binary(max_size=64)),
    st.tuples(st.just("text"), st.text(max_size=32)),
    st.tuples(st.just("tensor"), tensor_arrays),
)


# ----------------------------------------------------------------------------- content keys


@given(inputs)
@settings(max_examples=300, deadline=None)
def test_content_key_matches_documented_layout(item):
    """content_key equals an independent BLAKE3-128 of the byte layout documented in the proto header,
    and its version 1 an independent BLAKE2b-128 (the keys of SDKs and servers before key versions)."""
    kind, payload = item
    key = content_key(payload)
    assert key == reference_key(kind, payload, 2)
    assert HEX32.fullmatch(key)
    assert content_key(payload, version=1) == reference_key(kind, payload, 1) != key


def test_unknown_key_version_is_value_error():
    """A key version the SDK does not know is refused, not silently hashed some other way."""
    with pytest.raises(ValueError, match="version 3"):
        content_key(b"x", version=3)


@given(inputs)
@settings(max_examples=100, deadline=None)
def test_content_key_is_stable(item):
    """The same input gives the same key every time, and its Input message gives the same key as the raw value."""
    _, payload = item
    first = content_key(payload)
    assert content_key(payload) == first
    as_msg = to_input(payload)
    assert ckeys.input_key(as_msg) == first
    assert content_key(pb.Input.FromString(as_msg.SerializeToString())) == first


@given(inputs, inputs)
@settings(max_examples=300, deadline=None)
def test_distinct_inputs_have_distinct_keys(a, b):
    """Two inputs that differ in kind, dtype, shape or bytes have different content keys."""
    assume(identity(*a) != identity(*b))
    assert content_key(a[1]) != content_key(b[1])


@given(st.binary(max_size=64))
@settings(deadline=None)
def test_same_bytes_differ_across_kinds(data):
    """An image, a text and a uint8 tensor holding the same bytes have three different keys."""
    keys = {content_key(data), content_key(np.frombuffer(data, np.uint8).copy())}
    try:
        keys.add(content_key(data.decode("utf-8")))
        expected = 3
    except UnicodeDecodeError:
        expected = 2
    assert len(keys) == expected


def test_tensor_key_covers_dtype_and_shape():
    """The same tensor bytes under another dtype or shape give another key (uint8 x8, int64 x1, float32 x2; 6 vs 2x3 vs 3x2)."""
    raw = np.arange(8, dtype=np.uint8)
    same_bytes = {
        content_key(raw),
        content_key(raw.view("<i8")),
        content_key(raw.view("<f4")),
        content_key(raw.view("<f2")),
    }
    assert len(same_bytes) == 4
    six = np.arange(6, dtype=np.int32)
    shapes = {
        content_key(six),
        content_key(six.reshape(2, 3)),
        content_key(six.reshape(3, 2)),
        content_key(six.reshape(1, 6)),
    }
    assert len(shapes) == 4


@pytest.mark.parametrize("dtype", TENSOR_DTYPES)
def test_scalar_array_key_uses_empty_shape(dtype):
    """A 0-d array's key uses the empty shape string (the proto's "" for a scalar) and differs from the 1-element array's."""
    scalar = np.array(7, dtype=dtype)
    assert content_key(scalar) == reference_key("tensor", scalar)
    assert content_key(scalar) != content_key(np.array([7], dtype=dtype))


@pytest.mark.parametrize("dtype", ["float32", "float16", "int32", "int64"])
def test_big_endian_array_has_the_little_endian_key(dtype):
    """A big-endian array has the same key as the equal little-endian array (keys cover values, not byte order)."""
    le = np.arange(12, dtype=np.dtype(dtype).newbyteorder("<")).reshape(3, 4)
    be = le.astype(le.dtype.newbyteorder(">"))
    assert content_key(be) == content_key(le) == reference_key("tensor", le)


def test_empty_image_and_text_have_defined_keys():
    """Empty bytes and the empty string are valid inputs with the documented (and different) keys."""
    assert content_key(b"") == blake3.blake3(b"image\0").digest(length=16).hex()
    assert content_key("") == blake3.blake3(b"text\0").digest(length=16).hex()
    assert content_key(b"", version=1) == hashlib.blake2b(b"image\0", digest_size=16).hexdigest()


def test_content_key_accepts_every_documented_input_type(tmp_path):
    """bytes, bytearray, memoryview, str, pathlib.Path, other os.PathLike, numpy arrays and Input messages all have keys."""
    image = b"\x89PNG\r\n\x1a\nnot really a png"
    path = tmp_path / "cat.png"
    path.write_bytes(image)

    class CustomPath(os.PathLike):
        def __fspath__(self) -> str:
            return str(path)

    image_key = reference_key("image", image)
    assert content_key(image) == image_key
    assert content_key(bytearray(image)) == image_key
    assert content_key(memoryview(image)) == image_key
    assert content_key(path) == image_key  # a Path is read: its bytes are the image
    assert content_key(CustomPath()) == image_key
    assert content_key(pb.Input(image=image)) == image_key

    assert content_key("a cat on a mat") == reference_key("text", "a cat on a mat")
    assert content_key(pb.Input(text="a cat on a mat")) == reference_key("text", "a cat on a mat")

    arr = np.arange(6, dtype=np.float32).reshape(2, 3)
    tensor_msg = pb.Input(tensor=pb.Tensor(dtype=pb.FLOAT32, shape=[2, 3], data=arr.tobytes()))
    assert content_key(arr) == content_key(tensor_msg) == reference_key("tensor", arr)


def test_str_is_text_even_when_it_names_a_file(tmp_path):
    """A plain str is always text: a str that is an existing file's path is hashed as text, not read."""
    path = tmp_path / "image.jpg"
    path.write_bytes(b"JPEG bytes")
    assert content_key(str(path)) == reference_key("text", str(path))
    assert content_key(str(path)) != content_key(path)


def test_missing_path_raises_file_not_found(tmp_path):
    """A pathlib.Path that does not exist raises FileNotFoundError (no key is made up)."""
    with pytest.raises(FileNotFoundError):
        content_key(tmp_path / "missing.png")


def test_input_without_payload_is_value_error():
    """An Input message with none of image/text/tensor set raises ValueError."""
    with pytest.raises(ValueError, match="no payload"):
        content_key(pb.Input())


@pytest.mark.parametrize("dtype", [pb.DTYPE_UNSPECIFIED, 99])
def test_input_with_unknown_tensor_dtype_is_value_error(dtype):
    """An Input tensor with an unspecified or unknown dtype raises ValueError naming the dtype."""
    with pytest.raises(ValueError, match=str(dtype)):
        content_key(pb.Input(tensor=pb.Tensor(dtype=dtype, shape=[1], data=b"\0")))


@pytest.mark.parametrize("value", [5, 1.5, None, [b"x"], ("a",), {"text": "x"}, object()], ids=type)
def test_unknown_input_type_is_type_error(value):
    """A value that is not bytes, str, a path, an array or an Input raises TypeError naming its type."""
    with pytest.raises(TypeError, match=type(value).__name__):
        content_key(value)


@pytest.mark.parametrize("dtype", ["float64", "bool", "int8", "complex64"])
def test_array_of_unsupported_dtype_is_tensor_error(dtype):
    """A numpy array whose dtype the protocol has no enum for raises TensorError (a ValueError) naming it."""
    with pytest.raises(TensorError, match=dtype):
        content_key(np.zeros(3, dtype=dtype))


# ----------------------------------------------------------------------------- cache keys

FIELDS = ("content_key", "fingerprint", "layer", "storage_dtype", "namespace")
parts = st.text(max_size=40)


def make_cache_key(values: dict[str, str]) -> str:
    return cache_key(
        values["content_key"],
        fingerprint=values["fingerprint"],
        layer=values["layer"],
        storage_dtype=values["storage_dtype"],
        namespace=values["namespace"],
    )


@given(st.fixed_dictionaries({f: parts for f in FIELDS}), st.sampled_from(FIELDS), parts)
@settings(max_examples=300, deadline=None)
def test_cache_key_changes_with_every_field(values, field, new_value):
    """Changing any one of content key, fingerprint, layer, storage dtype or namespace changes the cache key."""
    assume(new_value != values[field])
    changed = dict(values, **{field: new_value})
    assert make_cache_key(changed) != make_cache_key(values)


@given(st.fixed_dictionaries({f: parts for f in FIELDS}))
@settings(deadline=None)
def test_cache_key_is_stable_and_short(values):
    """The cache key is deterministic, starts with the version prefix and is at most 40 characters."""
    key = make_cache_key(values)
    assert key == make_cache_key(dict(values))
    assert key.startswith(KEY_PREFIX)
    assert len(key) <= 40
    assert re.fullmatch(re.escape(KEY_PREFIX) + r"[0-9a-f]{32}", key)


@given(st.text(max_size=10), st.text(max_size=10), st.text(max_size=10))
@settings(deadline=None)
def test_cache_key_fields_do_not_run_together(a, b, c):
    """Moving text across a field boundary ("ab","c" vs "a","bc") or swapping fields gives another key."""
    assume(b)
    base = dict(content_key="k", fingerprint=a + b, layer=c, storage_dtype="float32", namespace="")
    shifted = dict(base, fingerprint=a, layer=b + c)
    assert make_cache_key(base) != make_cache_key(shifted)
    swapped = dict(base, fingerprint=base["layer"], layer=base["fingerprint"])
    if swapped != base:
        assert make_cache_key(base) != make_cache_key(swapped)


def test_default_namespace_is_empty():
    """Omitting the namespace is the same as the empty namespace; a namespace (tenant salt) changes the key."""
    ck = content_key(b"img")
    plain = cache_key(ck, fingerprint="fp", layer="pooled", storage_dtype="float32")
    assert plain == cache_key(ck, fingerprint="fp", layer="pooled", storage_dtype="float32", namespace="")
    assert plain != cache_key(ck, fingerprint="fp", layer="pooled", storage_dtype="float32", namespace="tenant-a")


def straightforward_cache_key(
    content_key: str, *, fingerprint: str, layer: str, storage_dtype: str, namespace: str = "", key_version: int = 2
) -> str:
    """cache_key as it was first written: one fresh BLAKE2b per key, every field fed in turn (the key
    version after the dtype, except for version 1, whose keys are exactly those of before key versions)."""
    h = hashlib.blake2b(digest_size=16)
    version = () if key_version == 1 else (str(key_version),)
    for part in (namespace, fingerprint, layer, storage_dtype, *version, content_key):
        b = part.encode()
        h.update(len(b).to_bytes(4, "little"))
        h.update(b)
    return KEY_PREFIX + h.hexdigest()


@given(st.lists(st.fixed_dictionaries({f: parts for f in FIELDS}), min_size=1, max_size=8))
@settings(max_examples=300, deadline=None)
def test_prefed_hasher_keys_are_byte_identical_to_the_straightforward_ones(many):
    """The copied, pre-fed BLAKE2b gives exactly the keys of the plain computation, however calls
    with different and repeated prefixes interleave (the cached hasher is never fed a content key)."""
    for values in many + many[::-1]:
        assert make_cache_key(values) == straightforward_cache_key(**values)


@given(st.fixed_dictionaries({f: parts for f in FIELDS if f != "content_key"}), st.lists(parts, max_size=6))
@settings(max_examples=200, deadline=None)
def test_cache_keys_equals_cache_key_per_item(shared, content_keys):
    """The batch form is the single form, item by item, in order."""
    assert cache_keys(content_keys, **shared) == [straightforward_cache_key(k, **shared) for k in content_keys]


def test_version_1_cache_keys_are_the_keys_from_before_key_versions():
    """Entries written before key versions stay readable: a version-1 cache key is byte for byte the
    old derivation (pinned here as a literal), and the version-2 key of the same content key differs."""
    fields = dict(fingerprint="fp", layer="pooled", storage_dtype="float32", namespace="")
    ck = "0123456789abcdef0123456789abcdef"
    old = (
        "fb1:"
        + hashlib.blake2b(
            b"".join(len(p).to_bytes(4, "little") + p for p in (b"", b"fp", b"pooled", b"float32", ck.encode())),
            digest_size=16,
        ).hexdigest()
    )
    assert cache_key(ck, key_version=1, **fields) == old
    assert cache_keys([ck], key_version=1, **fields) == [old]
    assert cache_key(ck, **fields) != old
    assert cache_key(ck, **fields) == straightforward_cache_key(ck, **fields, key_version=2)


def test_prefix_cache_is_bounded():
    """More distinct prefixes than the bound evict the least recently used; keys stay right."""
    server_keys._prefix.cache_clear()
    for i in range(server_keys.PREFIX_CACHE_SIZE + 10):
        ns = f"tenant-{i}"
        assert cache_key(
            "k" * 32, fingerprint="fp", layer="l", storage_dtype="float16", namespace=ns
        ) == straightforward_cache_key("k" * 32, fingerprint="fp", layer="l", storage_dtype="float16", namespace=ns)
    assert server_keys._prefix.cache_info().currsize == server_keys.PREFIX_CACHE_SIZE
