"""The one function that builds cache keys from a content key and what changes the features."""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Iterable

from featurebank.common.keys import KEY_VERSION

KEY_PREFIX = "fb1:"
# Distinct (namespace, fingerprint, layer, dtype) prefixes kept pre-hashed: tenants x backbones x
# layers, so a few dozen in practice; the bound only stops a tenant storm from growing it forever.
PREFIX_CACHE_SIZE = 4096


def _feed(h, part: str) -> None:
    b = part.encode()
    h.update(len(b).to_bytes(4, "little") + b)


@functools.lru_cache(maxsize=PREFIX_CACHE_SIZE)
def _prefix(namespace: str, fingerprint: str, layer: str, storage_dtype: str, key_version: int):
    """A BLAKE2b already fed with everything but the content key. Never updated after this:
    callers ``.copy()`` it (a memcpy of its state) instead of re-hashing four fields per key."""
    h = hashlib.blake2b(digest_size=16)
    for part in (namespace, fingerprint, layer, storage_dtype):
        _feed(h, part)
    if key_version != 1:  # version 1 keys hash as they did before key versions: their entries stay readable
        _feed(h, str(key_version))
    return h


def cache_key(
    content_key: str,
    *,
    fingerprint: str,
    layer: str,
    storage_dtype: str,
    namespace: str = "",
    key_version: int = KEY_VERSION,
) -> str:
    """The Redis key features of one input are stored under.

    Hashes the backbone fingerprint (architecture + weights + preprocessing), the layer (which
    fixes the pooling), the dtype the value is stored in, and an optional namespace (a tenant
    salt) together with the input's content key. The digest keeps keys short (36 bytes), which
    matters at millions of entries; a new fingerprint can never hit an old entry.

    Each field is hashed as its UTF-8 length (4 bytes, little-endian) then its bytes, in the
    order namespace, fingerprint, layer, storage dtype, key version (decimal; left out for
    version 1, so keys from before key versions are unchanged), content key. The encoding is
    injective, so a version-1 and a version-2 key never name the same entry.
    """
    h = _prefix(namespace, fingerprint, layer, storage_dtype, key_version).copy()
    _feed(h, content_key)
    return KEY_PREFIX + h.hexdigest()


def cache_keys(
    content_keys: Iterable[str],
    *,
    fingerprint: str,
    layer: str,
    storage_dtype: str,
    namespace: str = "",
    key_version: int = KEY_VERSION,
) -> list[str]:
    """``cache_key`` of many content keys that share everything else (one request's worth)."""
    prefix = _prefix(namespace, fingerprint, layer, storage_dtype, key_version)
    out = []
    for content_key in content_keys:
        h = prefix.copy()
        b = content_key.encode()  # _feed, inlined: this runs once per key of every request
        h.update(len(b).to_bytes(4, "little") + b)
        out.append(KEY_PREFIX + h.hexdigest())
    return out
