from dsi.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DraftRequest(_message.Message):
    __slots__ = ("request_id", "session_id", "token_ids", "max_tokens", "sampling", "return_probs", "vocab_limit", "order")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    RETURN_PROBS_FIELD_NUMBER: _ClassVar[int]
    VOCAB_LIMIT_FIELD_NUMBER: _ClassVar[int]
    ORDER_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    session_id: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    max_tokens: int
    sampling: _common_pb2.SamplingParams
    return_probs: bool
    vocab_limit: int
    order: int
    def __init__(self, request_id: _Optional[str] = ..., session_id: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., max_tokens: _Optional[int] = ..., sampling: _Optional[_Union[_common_pb2.SamplingParams, _Mapping]] = ..., return_probs: _Optional[bool] = ..., vocab_limit: _Optional[int] = ..., order: _Optional[int] = ...) -> None: ...

class DraftFlowRequest(_message.Message):
    __slots__ = ("start", "grant", "urgent_until")
    START_FIELD_NUMBER: _ClassVar[int]
    GRANT_FIELD_NUMBER: _ClassVar[int]
    URGENT_UNTIL_FIELD_NUMBER: _ClassVar[int]
    start: DraftRequest
    grant: int
    urgent_until: int
    def __init__(self, start: _Optional[_Union[DraftRequest, _Mapping]] = ..., grant: _Optional[int] = ..., urgent_until: _Optional[int] = ...) -> None: ...

class DraftResponse(_message.Message):
    __slots__ = ("token_id", "position", "probs")
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    POSITION_FIELD_NUMBER: _ClassVar[int]
    PROBS_FIELD_NUMBER: _ClassVar[int]
    token_id: int
    position: int
    probs: _common_pb2.SparseDistribution
    def __init__(self, token_id: _Optional[int] = ..., position: _Optional[int] = ..., probs: _Optional[_Union[_common_pb2.SparseDistribution, _Mapping]] = ...) -> None: ...

class DrafterInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class DrafterInfoResponse(_message.Message):
    __slots__ = ("model", "counters", "oracle_acceptance")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    COUNTERS_FIELD_NUMBER: _ClassVar[int]
    ORACLE_ACCEPTANCE_FIELD_NUMBER: _ClassVar[int]
    model: _common_pb2.ModelInfo
    counters: _common_pb2.ServiceCounters
    oracle_acceptance: float
    def __init__(self, model: _Optional[_Union[_common_pb2.ModelInfo, _Mapping]] = ..., counters: _Optional[_Union[_common_pb2.ServiceCounters, _Mapping]] = ..., oracle_acceptance: _Optional[float] = ...) -> None: ...

class DrafterReleaseRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class DrafterReleaseResponse(_message.Message):
    __slots__ = ("released",)
    RELEASED_FIELD_NUMBER: _ClassVar[int]
    released: bool
    def __init__(self, released: _Optional[bool] = ...) -> None: ...
