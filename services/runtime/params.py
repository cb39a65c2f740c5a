"""A request's parameters as the services see them once validated: plain data and enums, shared by
the orchestrator (which validates them) and the model services (which sample with them in
``dsi.services.model.sampling``). No torch, no protobuf here."""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Mode(str, enum.Enum):
    """How a request is decoded: DSI, classic speculative inference, or plain (non-SI) decoding."""

    DSI = "dsi"
    SI = "si"
    NONSI = "nonsi"


class FinishReason(str, enum.Enum):
    """Why generation ended."""

    LENGTH = "length"  # max_new_tokens, or the context when truncating at it
    EOS = "eos"  # an end-of-sequence token (not with ignore_eos)
    STOP = "stop"  # a stop string; the text ends before it


class Verification(str, enum.Enum):
    """How a draft is verified: the coupled choice (target and drafter share the noise, so a draft is
    accepted exactly when it equals the target's token: identical output in every mode), or classic
    rejection sampling (lossless in distribution)."""

    COUPLED = "coupled"
    REJECTION = "rejection"


@dataclass(frozen=True)
class Sampling:
    """Sampling settings of one request (validated at the orchestrator's edge). Rejection sampling
    applies only with temperature > 0 (greedy decoding verifies by equality either way)."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    verification: Verification = Verification.COUPLED

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0

    @property
    def rejection(self) -> bool:
        return self.verification is Verification.REJECTION and not self.greedy
