from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    FLOAT32: _ClassVar[DType]
    FLOAT16: _ClassVar[DType]
    UINT8: _ClassVar[DType]
    INT32: _ClassVar[DType]
    INT64: _ClassVar[DType]

class CachePolicy(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    USE: _ClassVar[CachePolicy]
    BYPASS: _ClassVar[CachePolicy]
    REFRESH: _ClassVar[CachePolicy]
DTYPE_UNSPECIFIED: DType
FLOAT32: DType
FLOAT16: DType
UINT8: DType
INT32: DType
INT64: DType
USE: CachePolicy
BYPASS: CachePolicy
REFRESH: CachePolicy

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class Input(_message.Message):
    __slots__ = ("image", "text", "tensor")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    image: bytes
    text: str
    tensor: Tensor
    def __init__(self, image: _Optional[bytes] = ..., text: _Optional[str] = ..., tensor: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class ExtractRequest(_message.Message):
    __slots__ = ("backbone", "layer", "inputs", "output_dtype", "cache_policy")
    BACKBONE_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_DTYPE_FIELD_NUMBER: _ClassVar[int]
    CACHE_POLICY_FIELD_NUMBER: _ClassVar[int]
    backbone: str
    layer: str
    inputs: _containers.RepeatedCompositeFieldContainer[Input]
    output_dtype: DType
    cache_policy: CachePolicy
    def __init__(self, backbone: _Optional[str] = ..., layer: _Optional[str] = ..., inputs: _Optional[_Iterable[_Union[Input, _Mapping]]] = ..., output_dtype: _Optional[_Union[DType, str]] = ..., cache_policy: _Optional[_Union[CachePolicy, str]] = ...) -> None: ...

class Error(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class ItemResult(_message.Message):
    __slots__ = ("features", "cache_hit", "key", "error")
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    CACHE_HIT_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    features: Tensor
    cache_hit: bool
    key: str
    error: Error
    def __init__(self, features: _Optional[_Union[Tensor, _Mapping]] = ..., cache_hit: _Optional[bool] = ..., key: _Optional[str] = ..., error: _Optional[_Union[Error, _Mapping]] = ...) -> None: ...

class ExtractResponse(_message.Message):
    __slots__ = ("results", "backbone_fingerprint", "backbone", "layer")
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    BACKBONE_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    BACKBONE_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[ItemResult]
    backbone_fingerprint: str
    backbone: str
    layer: str
    def __init__(self, results: _Optional[_Iterable[_Union[ItemResult, _Mapping]]] = ..., backbone_fingerprint: _Optional[str] = ..., backbone: _Optional[str] = ..., layer: _Optional[str] = ...) -> None: ...

class LookupRequest(_message.Message):
    __slots__ = ("backbone", "layer", "keys", "output_dtype")
    BACKBONE_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_DTYPE_FIELD_NUMBER: _ClassVar[int]
    backbone: str
    layer: str
    keys: _containers.RepeatedScalarFieldContainer[str]
    output_dtype: DType
    def __init__(self, backbone: _Optional[str] = ..., layer: _Optional[str] = ..., keys: _Optional[_Iterable[str]] = ..., output_dtype: _Optional[_Union[DType, str]] = ...) -> None: ...

class ListBackbonesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListBackbonesResponse(_message.Message):
    __slots__ = ("backbones",)
    BACKBONES_FIELD_NUMBER: _ClassVar[int]
    backbones: _containers.RepeatedCompositeFieldContainer[BackboneInfo]
    def __init__(self, backbones: _Optional[_Iterable[_Union[BackboneInfo, _Mapping]]] = ...) -> None: ...

class BackboneInfo(_message.Message):
    __slots__ = ("name", "fingerprint", "input_kind", "default_layer", "layers", "input_size", "preprocessing", "workers_ready")
    NAME_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    INPUT_KIND_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_LAYER_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    INPUT_SIZE_FIELD_NUMBER: _ClassVar[int]
    PREPROCESSING_FIELD_NUMBER: _ClassVar[int]
    WORKERS_READY_FIELD_NUMBER: _ClassVar[int]
    name: str
    fingerprint: str
    input_kind: str
    default_layer: str
    layers: _containers.RepeatedCompositeFieldContainer[LayerInfo]
    input_size: _containers.RepeatedScalarFieldContainer[int]
    preprocessing: str
    workers_ready: int
    def __init__(self, name: _Optional[str] = ..., fingerprint: _Optional[str] = ..., input_kind: _Optional[str] = ..., default_layer: _Optional[str] = ..., layers: _Optional[_Iterable[_Union[LayerInfo, _Mapping]]] = ..., input_size: _Optional[_Iterable[int]] = ..., preprocessing: _Optional[str] = ..., workers_ready: _Optional[int] = ...) -> None: ...

class LayerInfo(_message.Message):
    __slots__ = ("name", "shape")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    name: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, name: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ...) -> None: ...
