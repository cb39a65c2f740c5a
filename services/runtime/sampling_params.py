"""A request's sampling settings: plain data, shared by the orchestrator (which validates them) and
the model services (which sample with them in ``services.model.sampling``). No torch here."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Sampling:
    """Sampling settings of one request (validated at the orchestrator's edge)."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    rejection: bool = False

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0
