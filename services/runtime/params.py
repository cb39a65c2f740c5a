"""A request's parameters as the services see them once validated: plain data and enums, shared by
the orchestrator (which validates them) and the model services (which sample with them in
``services.model.sampling``). No torch, no protobuf here."""

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


@dataclass(frozen=True)
class Sampling:
    """Sampling settings of one request (validated at the orchestrator's edge). ``rejection``: drafts
    are verified by rejection sampling (only with temperature > 0); otherwise by the coupled choice."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    rejection: bool = False

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0
