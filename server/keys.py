"""The one function that builds cache keys from a content key and what changes the features."""

from __future__ import annotations

import hashlib

KEY_PREFIX = "fb1:"


def cache_key(content_key: str, *, fingerprint: str, layer: str, storage_dtype: str, namespace: str = "") -> str:
    """The Redis key features of one input are stored under.

    Hashes the backbone fingerprint (architecture + weights + preprocessing), the layer (which
    fixes the pooling), the dtype the value is stored in, and an optional namespace (a tenant
    salt) together with the input's content key. The digest keeps keys short (36 bytes), which
    matters at millions of entries; a new fingerprint can never hit an old entry.
    """
    h = hashlib.blake2b(digest_size=16)
    for part in (namespace, fingerprint, layer, storage_dtype, content_key):
        b = part.encode()
        h.update(len(b).to_bytes(4, "little"))
        h.update(b)
    return KEY_PREFIX + h.hexdigest()
