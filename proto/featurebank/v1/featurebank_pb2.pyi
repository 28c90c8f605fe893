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
    __slots__ = ("backbone", "layer", "keys", "output_dtype", "key_version")
    BACKBONE_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_DTYPE_FIELD_NUMBER: _ClassVar[int]
    KEY_VERSION_FIELD_NUMBER: _ClassVar[int]
    backbone: str
    layer: str
    keys: _containers.RepeatedScalarFieldContainer[str]
    output_dtype: DType
    key_version: int
    def __init__(self, backbone: _Optional[str] = ..., layer: _Optional[str] = ..., keys: _Optional[_Iterable[str]] = ..., output_dtype: _Optional[_Union[DType, str]] = ..., key_version: _Optional[int] = ...) -> None: ...

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

class DenseLayer(_message.Message):
    __slots__ = ("kernel", "bias", "activation")
    KERNEL_FIELD_NUMBER: _ClassVar[int]
    BIAS_FIELD_NUMBER: _ClassVar[int]
    ACTIVATION_FIELD_NUMBER: _ClassVar[int]
    kernel: Tensor
    bias: Tensor
    activation: str
    def __init__(self, kernel: _Optional[_Union[Tensor, _Mapping]] = ..., bias: _Optional[_Union[Tensor, _Mapping]] = ..., activation: _Optional[str] = ...) -> None: ...

class Head(_message.Message):
    __slots__ = ("name", "version", "backbone", "backbone_fingerprint", "layer", "class_names", "layers", "metrics", "kind", "created_unix_ms")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    BACKBONE_FIELD_NUMBER: _ClassVar[int]
    BACKBONE_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    CLASS_NAMES_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    CREATED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: int
    backbone: str
    backbone_fingerprint: str
    layer: str
    class_names: _containers.RepeatedScalarFieldContainer[str]
    layers: _containers.RepeatedCompositeFieldContainer[DenseLayer]
    metrics: _containers.ScalarMap[str, float]
    kind: str
    created_unix_ms: int
    def __init__(self, name: _Optional[str] = ..., version: _Optional[int] = ..., backbone: _Optional[str] = ..., backbone_fingerprint: _Optional[str] = ..., layer: _Optional[str] = ..., class_names: _Optional[_Iterable[str]] = ..., layers: _Optional[_Iterable[_Union[DenseLayer, _Mapping]]] = ..., metrics: _Optional[_Mapping[str, float]] = ..., kind: _Optional[str] = ..., created_unix_ms: _Optional[int] = ...) -> None: ...

class HeadInfo(_message.Message):
    __slots__ = ("name", "version", "backbone", "backbone_fingerprint", "layer", "class_names", "metrics", "kind", "created_unix_ms", "input_dim")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    BACKBONE_FIELD_NUMBER: _ClassVar[int]
    BACKBONE_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    CLASS_NAMES_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    CREATED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    INPUT_DIM_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: int
    backbone: str
    backbone_fingerprint: str
    layer: str
    class_names: _containers.RepeatedScalarFieldContainer[str]
    metrics: _containers.ScalarMap[str, float]
    kind: str
    created_unix_ms: int
    input_dim: int
    def __init__(self, name: _Optional[str] = ..., version: _Optional[int] = ..., backbone: _Optional[str] = ..., backbone_fingerprint: _Optional[str] = ..., layer: _Optional[str] = ..., class_names: _Optional[_Iterable[str]] = ..., metrics: _Optional[_Mapping[str, float]] = ..., kind: _Optional[str] = ..., created_unix_ms: _Optional[int] = ..., input_dim: _Optional[int] = ...) -> None: ...

class PutHeadRequest(_message.Message):
    __slots__ = ("head",)
    HEAD_FIELD_NUMBER: _ClassVar[int]
    head: Head
    def __init__(self, head: _Optional[_Union[Head, _Mapping]] = ...) -> None: ...

class ListHeadsRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class ListHeadsResponse(_message.Message):
    __slots__ = ("heads",)
    HEADS_FIELD_NUMBER: _ClassVar[int]
    heads: _containers.RepeatedCompositeFieldContainer[HeadInfo]
    def __init__(self, heads: _Optional[_Iterable[_Union[HeadInfo, _Mapping]]] = ...) -> None: ...

class DeleteHeadRequest(_message.Message):
    __slots__ = ("name", "version")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: int
    def __init__(self, name: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class DeleteHeadResponse(_message.Message):
    __slots__ = ("deleted",)
    DELETED_FIELD_NUMBER: _ClassVar[int]
    deleted: int
    def __init__(self, deleted: _Optional[int] = ...) -> None: ...

class PredictRequest(_message.Message):
    __slots__ = ("head", "version", "inputs", "cache_policy")
    HEAD_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    CACHE_POLICY_FIELD_NUMBER: _ClassVar[int]
    head: str
    version: int
    inputs: _containers.RepeatedCompositeFieldContainer[Input]
    cache_policy: CachePolicy
    def __init__(self, head: _Optional[str] = ..., version: _Optional[int] = ..., inputs: _Optional[_Iterable[_Union[Input, _Mapping]]] = ..., cache_policy: _Optional[_Union[CachePolicy, str]] = ...) -> None: ...

class Prediction(_message.Message):
    __slots__ = ("probabilities", "label_index", "label", "cache_hit", "key", "error")
    PROBABILITIES_FIELD_NUMBER: _ClassVar[int]
    LABEL_INDEX_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    CACHE_HIT_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    probabilities: Tensor
    label_index: int
    label: str
    cache_hit: bool
    key: str
    error: Error
    def __init__(self, probabilities: _Optional[_Union[Tensor, _Mapping]] = ..., label_index: _Optional[int] = ..., label: _Optional[str] = ..., cache_hit: _Optional[bool] = ..., key: _Optional[str] = ..., error: _Optional[_Union[Error, _Mapping]] = ...) -> None: ...

class PredictResponse(_message.Message):
    __slots__ = ("predictions", "head", "version")
    PREDICTIONS_FIELD_NUMBER: _ClassVar[int]
    HEAD_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    predictions: _containers.RepeatedCompositeFieldContainer[Prediction]
    head: str
    version: int
    def __init__(self, predictions: _Optional[_Iterable[_Union[Prediction, _Mapping]]] = ..., head: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...
