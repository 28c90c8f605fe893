"""Read PyTorch's legacy (non-zip) .pth state dicts into NumPy arrays, without importing torch."""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
import pickle
from typing import Any, BinaryIO

import numpy as np

logger = logging.getLogger(__name__)

# torch.serialization writes these three pickles before the state dict in the legacy format.
LEGACY_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL_VERSION = 1001

# Storage classes map to plain dtypes; nothing else in the torch namespace is ever resolved, so a
# malicious file cannot make the unpickler call arbitrary code.
_STORAGE_DTYPES: dict[str, np.dtype] = {
    "FloatStorage": np.dtype("<f4"),
    "DoubleStorage": np.dtype("<f8"),
    "HalfStorage": np.dtype("<f2"),
    "LongStorage": np.dtype("<i8"),
    "IntStorage": np.dtype("<i4"),
    "ShortStorage": np.dtype("<i2"),
    "CharStorage": np.dtype("i1"),
    "ByteStorage": np.dtype("u1"),
    "BoolStorage": np.dtype("?"),
}


class PthFormatError(ValueError):
    """The file is not a legacy PyTorch pickle this reader can (or is willing to) read."""


@dataclasses.dataclass(frozen=True)
class _StorageType:
    name: str
    dtype: np.dtype


@dataclasses.dataclass
class _StorageRef:
    """A storage named in the pickle; its bytes follow the pickles, so it is filled in later."""

    key: str
    dtype: np.dtype
    numel: int
    data: np.ndarray | None = None


@dataclasses.dataclass(frozen=True)
class _TensorRef:
    """A tensor view of a storage, materialised once every storage has been read."""

    storage: _StorageRef
    offset: int  # in elements
    size: tuple[int, ...]
    stride: tuple[int, ...]
    view_offset: int = 0  # legacy storage views: extra element offset into the root storage

    def materialise(self) -> np.ndarray:
        base = self.storage.data
        assert base is not None, f"storage {self.storage.key} was never read"
        start = self.view_offset + self.offset
        if not self.size:
            return base[start : start + 1].reshape(()).copy()
        extent = start + sum((n - 1) * s for n, s in zip(self.size, self.stride)) + 1
        if start < 0 or extent > base.size or min(self.stride) < 0:
            raise PthFormatError(f"tensor of size {self.size} overruns storage {self.storage.key}")
        view = np.lib.stride_tricks.as_strided(
            base[start:],
            shape=self.size,
            strides=tuple(s * base.itemsize for s in self.stride),
            writeable=False,
        )
        return np.ascontiguousarray(view)


@dataclasses.dataclass(frozen=True)
class _ViewRef:
    """A legacy storage view: a window into a root storage starting at an element offset."""

    root: _StorageRef
    offset: int


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
    if not isinstance(storage, (_StorageRef, _ViewRef)):
        raise PthFormatError("tensor rebuilt from something that is not a storage")
    if isinstance(storage, _ViewRef):
        return _TensorRef(storage.root, int(storage_offset), tuple(size), tuple(stride), storage.offset)
    return _TensorRef(storage, int(storage_offset), tuple(size), tuple(stride))


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves only the names a state dict needs; storages become references, not torch objects."""

    def __init__(self, f: BinaryIO, storages: dict[str, _StorageRef] | None = None):
        super().__init__(f)
        self._storages = storages if storages is not None else {}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor_v2
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name, _STORAGE_DTYPES[name])
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a .pth file")

    def persistent_load(self, pid: Any) -> Any:
        # Legacy format: ("storage", storage_type, key, location, numel, view_metadata).
        if not (isinstance(pid, tuple) and len(pid) == 6 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r:.80}")
        _, stype, key, _location, numel, view_metadata = pid
        if not isinstance(stype, _StorageType):
            raise pickle.UnpicklingError(f"persistent id names no storage type: {stype!r:.80}")
        ref = self._storages.get(key)
        if ref is None:
            ref = self._storages[key] = _StorageRef(str(key), stype.dtype, int(numel))
        if view_metadata is not None:
            _view_key, offset, _view_size = view_metadata
            return _ViewRef(ref, int(offset))
        return ref


def _read_storages(f: BinaryIO, keys: list[str], storages: dict[str, _StorageRef]) -> None:
    """Read each storage's 8-byte little-endian element count and raw little-endian data, in key order."""
    for key in keys:
        ref = storages.get(key)
        if ref is None:
            raise PthFormatError(f"storage {key!r} has data but no tensor refers to it")
        header = f.read(8)
        if len(header) != 8:
            raise PthFormatError(f"file ends before storage {key!r}")
        numel = int.from_bytes(header, "little")
        if numel != ref.numel:
            raise PthFormatError(f"storage {key!r} holds {numel} elements, the pickle says {ref.numel}")
        nbytes = numel * ref.dtype.itemsize
        raw = f.read(nbytes)
        if len(raw) != nbytes:
            raise PthFormatError(f"file ends inside storage {key!r}")
        ref.data = np.frombuffer(raw, dtype=ref.dtype)


def load_legacy_pth(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Load a legacy-format PyTorch state dict as {name: contiguous array}, in the file's key order."""
    with open(path, "rb") as f:
        try:
            magic = _RestrictedUnpickler(f).load()
            if magic != LEGACY_MAGIC_NUMBER:
                raise PthFormatError(f"{path}: not a legacy PyTorch file (zip-format .pth files are not supported)")
            protocol = _RestrictedUnpickler(f).load()
            if protocol != LEGACY_PROTOCOL_VERSION:
                raise PthFormatError(f"{path}: unsupported legacy protocol version {protocol}")
            sys_info = _RestrictedUnpickler(f).load()
            if not (isinstance(sys_info, dict) and sys_info.get("little_endian", False)):
                raise PthFormatError(f"{path}: only little-endian files are supported")
            storages: dict[str, _StorageRef] = {}
            obj = _RestrictedUnpickler(f, storages).load()
            keys = _RestrictedUnpickler(f).load()
        except (pickle.UnpicklingError, EOFError) as e:
            raise PthFormatError(f"{path}: {e}") from None
        if not isinstance(obj, dict) or not isinstance(keys, list):
            raise PthFormatError(f"{path}: expected a state dict and a list of storage keys")
        _read_storages(f, keys, storages)
    out: dict[str, np.ndarray] = {}
    for name, value in obj.items():
        if not isinstance(value, _TensorRef):
            raise PthFormatError(f"{path}: entry {name!r} is not a tensor")
        out[str(name)] = value.materialise()
    logger.debug("read %d tensors (%d storages) from %s", len(out), len(storages), path)
    return out
