from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Verification(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    VERIFICATION_UNSPECIFIED: _ClassVar[Verification]
    VERIFICATION_COUPLED: _ClassVar[Verification]
    VERIFICATION_REJECTION: _ClassVar[Verification]
VERIFICATION_UNSPECIFIED: Verification
VERIFICATION_COUPLED: Verification
VERIFICATION_REJECTION: Verification

class SamplingParams(_message.Message):
    __slots__ = ("temperature", "top_k", "top_p", "seed", "verification")
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    VERIFICATION_FIELD_NUMBER: _ClassVar[int]
    temperature: float
    top_k: int
    top_p: float
    seed: int
    verification: Verification
    def __init__(self, temperature: _Optional[float] = ..., top_k: _Optional[int] = ..., top_p: _Optional[float] = ..., seed: _Optional[int] = ..., verification: _Optional[_Union[Verification, str]] = ...) -> None: ...

class SparseDistribution(_message.Message):
    __slots__ = ("token_ids", "probs")
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    PROBS_FIELD_NUMBER: _ClassVar[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    probs: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, token_ids: _Optional[_Iterable[int]] = ..., probs: _Optional[_Iterable[float]] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("model", "vocab_size", "vocab_fingerprint", "device", "dtype", "num_layers", "eos_token_ids", "instance_id", "max_sequence_length")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    VOCAB_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    EOS_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    MAX_SEQUENCE_LENGTH_FIELD_NUMBER: _ClassVar[int]
    model: str
    vocab_size: int
    vocab_fingerprint: str
    device: str
    dtype: str
    num_layers: int
    eos_token_ids: _containers.RepeatedScalarFieldContainer[int]
    instance_id: str
    max_sequence_length: int
    def __init__(self, model: _Optional[str] = ..., vocab_size: _Optional[int] = ..., vocab_fingerprint: _Optional[str] = ..., device: _Optional[str] = ..., dtype: _Optional[str] = ..., num_layers: _Optional[int] = ..., eos_token_ids: _Optional[_Iterable[int]] = ..., instance_id: _Optional[str] = ..., max_sequence_length: _Optional[int] = ...) -> None: ...

class ServiceCounters(_message.Message):
    __slots__ = ("calls", "cancelled", "cancelled_mid_forward", "cancelled_queued", "forwards_completed", "layers_run", "cache_hit_tokens", "computed_tokens", "sessions", "sessions_dropped", "cancelled_compute_s", "preempted", "cache_fill_tokens", "background_held_s", "urgent_load")
    CALLS_FIELD_NUMBER: _ClassVar[int]
    CANCELLED_FIELD_NUMBER: _ClassVar[int]
    CANCELLED_MID_FORWARD_FIELD_NUMBER: _ClassVar[int]
    CANCELLED_QUEUED_FIELD_NUMBER: _ClassVar[int]
    FORWARDS_COMPLETED_FIELD_NUMBER: _ClassVar[int]
    LAYERS_RUN_FIELD_NUMBER: _ClassVar[int]
    CACHE_HIT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPUTED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SESSIONS_FIELD_NUMBER: _ClassVar[int]
    SESSIONS_DROPPED_FIELD_NUMBER: _ClassVar[int]
    CANCELLED_COMPUTE_S_FIELD_NUMBER: _ClassVar[int]
    PREEMPTED_FIELD_NUMBER: _ClassVar[int]
    CACHE_FILL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    BACKGROUND_HELD_S_FIELD_NUMBER: _ClassVar[int]
    URGENT_LOAD_FIELD_NUMBER: _ClassVar[int]
    calls: int
    cancelled: int
    cancelled_mid_forward: int
    cancelled_queued: int
    forwards_completed: int
    layers_run: int
    cache_hit_tokens: int
    computed_tokens: int
    sessions: int
    sessions_dropped: int
    cancelled_compute_s: float
    preempted: int
    cache_fill_tokens: int
    background_held_s: float
    urgent_load: float
    def __init__(self, calls: _Optional[int] = ..., cancelled: _Optional[int] = ..., cancelled_mid_forward: _Optional[int] = ..., cancelled_queued: _Optional[int] = ..., forwards_completed: _Optional[int] = ..., layers_run: _Optional[int] = ..., cache_hit_tokens: _Optional[int] = ..., computed_tokens: _Optional[int] = ..., sessions: _Optional[int] = ..., sessions_dropped: _Optional[int] = ..., cancelled_compute_s: _Optional[float] = ..., preempted: _Optional[int] = ..., cache_fill_tokens: _Optional[int] = ..., background_held_s: _Optional[float] = ..., urgent_load: _Optional[float] = ...) -> None: ...
