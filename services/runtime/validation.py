"""Validation of every request at the edge of every service; failures raise InvalidArgument naming
the field, which the servicers' error mapping turns into INVALID_ARGUMENT."""

from __future__ import annotations

import math
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from dsi.services.runtime.errors import InvalidArgument
from dsi.services.runtime.params import Mode, Sampling, Verification
from dsi.v1 import common_pb2, orchestrator_pb2

MODES = {
    orchestrator_pb2.MODE_UNSPECIFIED: Mode.DSI,
    orchestrator_pb2.MODE_DSI: Mode.DSI,
    orchestrator_pb2.MODE_SI: Mode.SI,
    orchestrator_pb2.MODE_NONSI: Mode.NONSI,
}
# GenerateParams.sp_degree when the server chooses it per request (--sp-degree auto); lookahead 0 = auto.
AUTO_SP = -1
# Fixed-shape forwards (VerifyRequest.chunk_size) pad a forward to this many tokens at most.
MAX_CHUNK_SIZE = 1024
VERIFICATIONS = (
    common_pb2.VERIFICATION_UNSPECIFIED,
    common_pb2.VERIFICATION_COUPLED,
    common_pb2.VERIFICATION_REJECTION,
)


def check_token_ids(field: str, ids: Sequence[int], vocab_size: int, *, allow_empty: bool = False) -> None:
    if not ids and not allow_empty:
        raise InvalidArgument(field, "must not be empty")
    if not ids or (min(ids) >= 0 and max(ids) < vocab_size):  # C-speed scans; the list below only on error
        return
    bad = [t for t in ids if t < 0 or t >= vocab_size]
    if bad:
        raise InvalidArgument(field, f"token ids must be in [0, {vocab_size}); got {bad[:5]}")


def sampling_from_fields(
    temperature: float, top_k: int, top_p: float | None, seed: int, verification: int, prefix: str = ""
) -> Sampling:
    if not math.isfinite(temperature) or temperature < 0:
        raise InvalidArgument(f"{prefix}temperature", f"must be >= 0, got {temperature}")
    if top_k < 0:
        raise InvalidArgument(f"{prefix}top_k", f"must be >= 0 (0 disables it), got {top_k}")
    p = 1.0 if top_p is None else float(top_p)
    if not (0.0 < p <= 1.0) or math.isnan(p):
        raise InvalidArgument(f"{prefix}top_p", f"must be in (0, 1], got {p}")
    if verification not in VERIFICATIONS:
        raise InvalidArgument(f"{prefix}verification", f"unknown value {verification}")
    return Sampling(
        temperature=float(temperature),
        top_k=int(top_k),
        top_p=p,
        seed=int(seed),
        verification=Verification.REJECTION if verification == common_pb2.VERIFICATION_REJECTION
        else Verification.COUPLED,
    )


def sampling_from_pb(msg: common_pb2.SamplingParams) -> Sampling:
    top_p = msg.top_p if msg.HasField("top_p") else None
    return sampling_from_fields(msg.temperature, msg.top_k, top_p, msg.seed, msg.verification, "sampling.")


def sampling_to_pb(s: Sampling) -> common_pb2.SamplingParams:
    return common_pb2.SamplingParams(
        temperature=s.temperature,
        top_k=s.top_k,
        top_p=s.top_p,
        seed=s.seed,
        verification=common_pb2.VERIFICATION_REJECTION if s.rejection else common_pb2.VERIFICATION_COUPLED,
    )


def check_session(session_id: str) -> None:
    if not session_id:
        raise InvalidArgument("session_id", "must not be empty")
    if len(session_id) > 256:
        raise InvalidArgument("session_id", "must be at most 256 characters")


def validate_verify(request: Any, vocab_size: int, max_tokens: int) -> Sampling:
    """A Verify request; only the tokens sent are checked (a referenced prefix was checked when it
    was sent), so the cost does not grow with the part of the sequence the target already holds."""
    check_session(request.session_id)
    ids = list(request.token_ids)
    check_token_ids("token_ids", ids, vocab_size, allow_empty=request.prefix_length > 0)
    k = request.prefix_length
    n = k + len(ids)
    if n > max_tokens:
        raise InvalidArgument(
            "token_ids", f"at most {max_tokens} tokens (the model's context or --max-sequence-tokens), got {n}"
        )
    if not 1 <= request.first_position <= n:
        raise InvalidArgument("first_position", f"must be in [1, {n}], got {request.first_position}")
    if not 0 <= k <= request.first_position:
        raise InvalidArgument("prefix_length", f"must be in [0, first_position={request.first_position}], got {k}")
    sampling = sampling_from_pb(request.sampling)
    if sampling.rejection and len(request.draft_probs) != n - request.first_position:
        raise InvalidArgument(
            "draft_probs",
            f"rejection sampling needs one distribution per draft ({n - request.first_position}), "
            f"got {len(request.draft_probs)}",
        )
    for i, dist in enumerate(request.draft_probs):
        if len(dist.token_ids) != len(dist.probs):
            raise InvalidArgument(f"draft_probs[{i}]", "token_ids and probs differ in length")
        check_token_ids(f"draft_probs[{i}].token_ids", list(dist.token_ids), vocab_size, allow_empty=True)
    if request.chunk_size:
        if not 1 <= request.chunk_size <= MAX_CHUNK_SIZE:
            raise InvalidArgument("chunk_size", f"must be in [1, {MAX_CHUNK_SIZE}] (0 = off), got {request.chunk_size}")
        if not 1 <= request.chunk_origin <= request.first_position:
            raise InvalidArgument(
                "chunk_origin", f"must be in [1, first_position={request.first_position}], got {request.chunk_origin}"
            )
    return sampling


def validate_draft(request: Any, vocab_size: int, max_tokens: int, max_drafts: int) -> Sampling:
    check_session(request.session_id)
    ids = list(request.token_ids)
    check_token_ids("token_ids", ids, vocab_size)
    if len(ids) > max_tokens:
        raise InvalidArgument(
            "token_ids", f"at most {max_tokens} tokens (the model's context or --max-sequence-tokens), got {len(ids)}"
        )
    if not 1 <= request.max_tokens <= max_drafts:
        raise InvalidArgument("max_tokens", f"must be in [1, {max_drafts}], got {request.max_tokens}")
    if len(ids) + request.max_tokens > max_tokens:
        raise InvalidArgument("max_tokens", f"the sequence would exceed {max_tokens} tokens")
    return sampling_from_pb(request.sampling)


def validate_draft_grant(grant: int, credit: int, length: int, max_drafts: int, max_tokens: int) -> int:
    """A DraftFlow grant: >= 1, the unused credit stays <= max_drafts and the sequence can still
    grow by all of it within max_tokens (``length`` = prefix + drafts produced so far)."""
    if grant < 1:
        raise InvalidArgument("grant", f"must be >= 1, got {grant}")
    if credit + grant > max_drafts:
        raise InvalidArgument("grant", f"unused credit would be {credit + grant}, at most {max_drafts}")
    if length + credit + grant > max_tokens:
        raise InvalidArgument("grant", f"the sequence would exceed {max_tokens} tokens")
    return grant


def validate_urgent_until(until: int) -> int:
    """A DraftFlow urgency mark: a sequence length, >= 0 (0 = every draft urgent)."""
    if until < 0:
        raise InvalidArgument("urgent_until", f"must be >= 0, got {until}")
    return until


@dataclass(frozen=True)
class GenerateLimits:
    vocab_size: int
    max_new_tokens: int
    max_prompt_tokens: int
    max_lookahead: int
    default_lookahead: int  # 0 = auto (chosen per request by the orchestrator)
    default_sp_degree: int = 0  # 0 = every healthy target; AUTO_SP = chosen per request
    # Most tokens a sequence may hold on the targets, and on the drafter (0 = no limit known).
    max_sequence_length: int = 0
    draft_sequence_length: int = 0
    # Work per request bounded before any is done: prompt bytes (checked before tokenizing), and the
    # number and length (characters) of stop strings.
    max_prompt_bytes: int = 1 << 20
    max_stop_strings: int = 32
    max_stop_length: int = 256
    max_request_id_length: int = 128


@dataclass(frozen=True)
class GenerateParams:
    """A validated Generate request."""

    request_id: str
    prompt: str
    prompt_token_ids: list[int] | None
    max_new_tokens: int
    mode: Mode
    lookahead: int
    sp_degree: int
    sampling: Sampling
    stop: tuple[str, ...]
    ignore_eos: bool
    truncate_at_context: bool = False


# A request id goes into logs and is used as the session id on every model service.
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]*")


def validate_generate(request: orchestrator_pb2.GenerateRequest, limits: GenerateLimits) -> GenerateParams:
    if len(request.request_id) > limits.max_request_id_length or not _REQUEST_ID.fullmatch(request.request_id):
        raise InvalidArgument(
            "request_id", f"at most {limits.max_request_id_length} characters from A-Z, a-z, 0-9 and . _ : - "
            "(empty = a random id)"
        )
    # Characters first: a string has at least as many UTF-8 bytes as characters.
    if len(request.prompt) > limits.max_prompt_bytes or len(request.prompt.encode("utf-8")) > limits.max_prompt_bytes:
        raise InvalidArgument("prompt", f"at most {limits.max_prompt_bytes} bytes of UTF-8")
    if len(request.stop) > limits.max_stop_strings:
        raise InvalidArgument("stop", f"at most {limits.max_stop_strings} stop strings, got {len(request.stop)}")
    if request.prompt and request.prompt_token_ids:
        raise InvalidArgument("prompt", "set either prompt or prompt_token_ids, not both")
    if not request.prompt and not request.prompt_token_ids:
        raise InvalidArgument("prompt", "must not be empty")
    ids = list(request.prompt_token_ids) or None
    if ids is not None:
        check_token_ids("prompt_token_ids", ids, limits.vocab_size)
        if len(ids) > limits.max_prompt_tokens:
            raise InvalidArgument(
                "prompt_token_ids", f"at most {limits.max_prompt_tokens} tokens, got {len(ids)}"
            )
    if not 1 <= request.max_new_tokens <= limits.max_new_tokens:
        raise InvalidArgument(
            "max_new_tokens", f"must be in [1, {limits.max_new_tokens}], got {request.max_new_tokens}"
        )
    if request.mode not in MODES:
        raise InvalidArgument("mode", f"unknown mode {request.mode}; expected dsi, si or nonsi")
    if not 0 <= request.lookahead <= limits.max_lookahead:
        raise InvalidArgument(
            "lookahead", f"must be in [1, {limits.max_lookahead}] (0 = default), got {request.lookahead}"
        )
    if request.sp_degree < 0:
        raise InvalidArgument("sp_degree", f"must be >= 0 (0 = all healthy targets), got {request.sp_degree}")
    seed = request.seed if request.HasField("seed") else random.getrandbits(63)
    top_p = request.top_p if request.HasField("top_p") else None
    sampling = sampling_from_fields(request.temperature, request.top_k, top_p, seed, request.verification)
    for i, s in enumerate(request.stop):
        if not s:
            raise InvalidArgument(f"stop[{i}]", "stop strings must not be empty")
        if len(s) > limits.max_stop_length:
            raise InvalidArgument(f"stop[{i}]", f"at most {limits.max_stop_length} characters, got {len(s)}")
    return GenerateParams(
        request_id=request.request_id,
        prompt=request.prompt,
        prompt_token_ids=ids,
        max_new_tokens=request.max_new_tokens,
        mode=MODES[request.mode],
        lookahead=request.lookahead or limits.default_lookahead,
        sp_degree=request.sp_degree or limits.default_sp_degree,
        sampling=sampling,
        stop=tuple(request.stop),
        ignore_eos=request.ignore_eos,
        truncate_at_context=request.truncate_at_context,
    )


def new_tokens_within_context(prompt_tokens: int, params: GenerateParams, limits: GenerateLimits) -> int:
    """How many tokens the request may generate. Plain decoding of n tokens reads prompt + n - 1
    positions (the last token is never fed back), so that must fit the targets' context. Past it the
    request is refused, or, with truncate_at_context, generates until the context is full."""
    context = limits.max_sequence_length
    if context <= 0 or prompt_tokens + params.max_new_tokens - 1 <= context:
        return params.max_new_tokens
    if prompt_tokens > context:
        raise InvalidArgument(
            "prompt", f"{prompt_tokens} tokens do not fit the model's context of {context} tokens"
        )
    room = context - prompt_tokens + 1
    if params.truncate_at_context:
        return room
    raise InvalidArgument(
        "max_new_tokens",
        f"the prompt has {prompt_tokens} tokens and the model's context is {context} tokens, so at most {room} "
        f"new tokens fit, got {params.max_new_tokens} (set truncate_at_context to stop at the context instead)",
    )


def check_prompt_length(n_tokens: int, limits: GenerateLimits) -> None:
    if n_tokens == 0:
        raise InvalidArgument("prompt", "must not be empty (it encodes to zero tokens)")
    if n_tokens > limits.max_prompt_tokens:
        raise InvalidArgument("prompt", f"at most {limits.max_prompt_tokens} tokens, got {n_tokens}")


def validate_vocab_limit(vocab_limit: int) -> int:
    """DraftRequest.vocab_limit: drafts are ids below it; 0 = every id of the drafter's model (a limit
    at or beyond the model's size changes nothing)."""
    if vocab_limit < 0:
        raise InvalidArgument("vocab_limit", f"must be >= 0 (0 = every id), got {vocab_limit}")
    return int(vocab_limit)
