from dsi.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Mode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MODE_UNSPECIFIED: _ClassVar[Mode]
    MODE_DSI: _ClassVar[Mode]
    MODE_SI: _ClassVar[Mode]
    MODE_NONSI: _ClassVar[Mode]

class FinishReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FINISH_REASON_UNSPECIFIED: _ClassVar[FinishReason]
    FINISH_REASON_LENGTH: _ClassVar[FinishReason]
    FINISH_REASON_EOS: _ClassVar[FinishReason]
    FINISH_REASON_STOP: _ClassVar[FinishReason]

class TokenSource(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TOKEN_SOURCE_UNSPECIFIED: _ClassVar[TokenSource]
    TOKEN_SOURCE_DRAFT: _ClassVar[TokenSource]
    TOKEN_SOURCE_TARGET: _ClassVar[TokenSource]
MODE_UNSPECIFIED: Mode
MODE_DSI: Mode
MODE_SI: Mode
MODE_NONSI: Mode
FINISH_REASON_UNSPECIFIED: FinishReason
FINISH_REASON_LENGTH: FinishReason
FINISH_REASON_EOS: FinishReason
FINISH_REASON_STOP: FinishReason
TOKEN_SOURCE_UNSPECIFIED: TokenSource
TOKEN_SOURCE_DRAFT: TokenSource
TOKEN_SOURCE_TARGET: TokenSource

class GenerateRequest(_message.Message):
    __slots__ = ("request_id", "prompt", "prompt_token_ids", "max_new_tokens", "mode", "lookahead", "sp_degree", "temperature", "top_k", "top_p", "seed", "verification", "stop", "ignore_eos", "truncate_at_context")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    LOOKAHEAD_FIELD_NUMBER: _ClassVar[int]
    SP_DEGREE_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    VERIFICATION_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    IGNORE_EOS_FIELD_NUMBER: _ClassVar[int]
    TRUNCATE_AT_CONTEXT_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    prompt: str
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    max_new_tokens: int
    mode: Mode
    lookahead: int
    sp_degree: int
    temperature: float
    top_k: int
    top_p: float
    seed: int
    verification: _common_pb2.Verification
    stop: _containers.RepeatedScalarFieldContainer[str]
    ignore_eos: bool
    truncate_at_context: bool
    def __init__(self, request_id: _Optional[str] = ..., prompt: _Optional[str] = ..., prompt_token_ids: _Optional[_Iterable[int]] = ..., max_new_tokens: _Optional[int] = ..., mode: _Optional[_Union[Mode, str]] = ..., lookahead: _Optional[int] = ..., sp_degree: _Optional[int] = ..., temperature: _Optional[float] = ..., top_k: _Optional[int] = ..., top_p: _Optional[float] = ..., seed: _Optional[int] = ..., verification: _Optional[_Union[_common_pb2.Verification, str]] = ..., stop: _Optional[_Iterable[str]] = ..., ignore_eos: _Optional[bool] = ..., truncate_at_context: _Optional[bool] = ...) -> None: ...

class Token(_message.Message):
    __slots__ = ("token_id", "position", "source", "target")
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    POSITION_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    token_id: int
    position: int
    source: TokenSource
    target: str
    def __init__(self, token_id: _Optional[int] = ..., position: _Optional[int] = ..., source: _Optional[_Union[TokenSource, str]] = ..., target: _Optional[str] = ...) -> None: ...

class GenerateStats(_message.Message):
    __slots__ = ("mode", "prompt_tokens", "new_tokens", "windows_dispatched", "windows_applied", "windows_cancelled", "drafts_proposed", "drafts_accepted", "acceptance_rate", "epochs", "max_windows_in_flight", "ttft_s", "wall_s", "tokens_per_s", "wasted_target_s", "seed", "lookahead", "sp_degree", "retries", "drafter_failed", "tokens_from_drafts", "request_id", "target_forwards", "critical_queue_wait_s", "windows_preempted", "auto_tuned", "windows_yielding", "windows_dropped")
    MODE_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    WINDOWS_DISPATCHED_FIELD_NUMBER: _ClassVar[int]
    WINDOWS_APPLIED_FIELD_NUMBER: _ClassVar[int]
    WINDOWS_CANCELLED_FIELD_NUMBER: _ClassVar[int]
    DRAFTS_PROPOSED_FIELD_NUMBER: _ClassVar[int]
    DRAFTS_ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    ACCEPTANCE_RATE_FIELD_NUMBER: _ClassVar[int]
    EPOCHS_FIELD_NUMBER: _ClassVar[int]
    MAX_WINDOWS_IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    TTFT_S_FIELD_NUMBER: _ClassVar[int]
    WALL_S_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_S_FIELD_NUMBER: _ClassVar[int]
    WASTED_TARGET_S_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    LOOKAHEAD_FIELD_NUMBER: _ClassVar[int]
    SP_DEGREE_FIELD_NUMBER: _ClassVar[int]
    RETRIES_FIELD_NUMBER: _ClassVar[int]
    DRAFTER_FAILED_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FROM_DRAFTS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TARGET_FORWARDS_FIELD_NUMBER: _ClassVar[int]
    CRITICAL_QUEUE_WAIT_S_FIELD_NUMBER: _ClassVar[int]
    WINDOWS_PREEMPTED_FIELD_NUMBER: _ClassVar[int]
    AUTO_TUNED_FIELD_NUMBER: _ClassVar[int]
    WINDOWS_YIELDING_FIELD_NUMBER: _ClassVar[int]
    WINDOWS_DROPPED_FIELD_NUMBER: _ClassVar[int]
    mode: str
    prompt_tokens: int
    new_tokens: int
    windows_dispatched: int
    windows_applied: int
    windows_cancelled: int
    drafts_proposed: int
    drafts_accepted: int
    acceptance_rate: float
    epochs: int
    max_windows_in_flight: int
    ttft_s: float
    wall_s: float
    tokens_per_s: float
    wasted_target_s: float
    seed: int
    lookahead: int
    sp_degree: int
    retries: int
    drafter_failed: bool
    tokens_from_drafts: int
    request_id: str
    target_forwards: int
    critical_queue_wait_s: float
    windows_preempted: int
    auto_tuned: bool
    windows_yielding: int
    windows_dropped: int
    def __init__(self, mode: _Optional[str] = ..., prompt_tokens: _Optional[int] = ..., new_tokens: _Optional[int] = ..., windows_dispatched: _Optional[int] = ..., windows_applied: _Optional[int] = ..., windows_cancelled: _Optional[int] = ..., drafts_proposed: _Optional[int] = ..., drafts_accepted: _Optional[int] = ..., acceptance_rate: _Optional[float] = ..., epochs: _Optional[int] = ..., max_windows_in_flight: _Optional[int] = ..., ttft_s: _Optional[float] = ..., wall_s: _Optional[float] = ..., tokens_per_s: _Optional[float] = ..., wasted_target_s: _Optional[float] = ..., seed: _Optional[int] = ..., lookahead: _Optional[int] = ..., sp_degree: _Optional[int] = ..., retries: _Optional[int] = ..., drafter_failed: _Optional[bool] = ..., tokens_from_drafts: _Optional[int] = ..., request_id: _Optional[str] = ..., target_forwards: _Optional[int] = ..., critical_queue_wait_s: _Optional[float] = ..., windows_preempted: _Optional[int] = ..., auto_tuned: _Optional[bool] = ..., windows_yielding: _Optional[int] = ..., windows_dropped: _Optional[int] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("tokens", "text", "finish_reason", "stats")
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    tokens: _containers.RepeatedCompositeFieldContainer[Token]
    text: str
    finish_reason: FinishReason
    stats: GenerateStats
    def __init__(self, tokens: _Optional[_Iterable[_Union[Token, _Mapping]]] = ..., text: _Optional[str] = ..., finish_reason: _Optional[_Union[FinishReason, str]] = ..., stats: _Optional[_Union[GenerateStats, _Mapping]] = ...) -> None: ...

class OrchestratorInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class TargetEndpoint(_message.Message):
    __slots__ = ("address", "healthy", "in_flight")
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    HEALTHY_FIELD_NUMBER: _ClassVar[int]
    IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    address: str
    healthy: bool
    in_flight: int
    def __init__(self, address: _Optional[str] = ..., healthy: _Optional[bool] = ..., in_flight: _Optional[int] = ...) -> None: ...

class OrchestratorInfoResponse(_message.Message):
    __slots__ = ("target_model", "drafter_model", "targets", "drafter_address", "max_new_tokens_limit", "max_prompt_tokens", "default_lookahead", "max_lookahead", "max_sequence_length", "max_prompt_bytes", "max_stop_strings", "max_stop_length", "max_request_id_length", "max_request_bytes")
    TARGET_MODEL_FIELD_NUMBER: _ClassVar[int]
    DRAFTER_MODEL_FIELD_NUMBER: _ClassVar[int]
    TARGETS_FIELD_NUMBER: _ClassVar[int]
    DRAFTER_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_LIMIT_FIELD_NUMBER: _ClassVar[int]
    MAX_PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_LOOKAHEAD_FIELD_NUMBER: _ClassVar[int]
    MAX_LOOKAHEAD_FIELD_NUMBER: _ClassVar[int]
    MAX_SEQUENCE_LENGTH_FIELD_NUMBER: _ClassVar[int]
    MAX_PROMPT_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_STOP_STRINGS_FIELD_NUMBER: _ClassVar[int]
    MAX_STOP_LENGTH_FIELD_NUMBER: _ClassVar[int]
    MAX_REQUEST_ID_LENGTH_FIELD_NUMBER: _ClassVar[int]
    MAX_REQUEST_BYTES_FIELD_NUMBER: _ClassVar[int]
    target_model: _common_pb2.ModelInfo
    drafter_model: _common_pb2.ModelInfo
    targets: _containers.RepeatedCompositeFieldContainer[TargetEndpoint]
    drafter_address: str
    max_new_tokens_limit: int
    max_prompt_tokens: int
    default_lookahead: int
    max_lookahead: int
    max_sequence_length: int
    max_prompt_bytes: int
    max_stop_strings: int
    max_stop_length: int
    max_request_id_length: int
    max_request_bytes: int
    def __init__(self, target_model: _Optional[_Union[_common_pb2.ModelInfo, _Mapping]] = ..., drafter_model: _Optional[_Union[_common_pb2.ModelInfo, _Mapping]] = ..., targets: _Optional[_Iterable[_Union[TargetEndpoint, _Mapping]]] = ..., drafter_address: _Optional[str] = ..., max_new_tokens_limit: _Optional[int] = ..., max_prompt_tokens: _Optional[int] = ..., default_lookahead: _Optional[int] = ..., max_lookahead: _Optional[int] = ..., max_sequence_length: _Optional[int] = ..., max_prompt_bytes: _Optional[int] = ..., max_stop_strings: _Optional[int] = ..., max_stop_length: _Optional[int] = ..., max_request_id_length: _Optional[int] = ..., max_request_bytes: _Optional[int] = ...) -> None: ...
