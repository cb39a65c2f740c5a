"""Latency emulation settings (torch-free, so the CLI can parse flags without importing torch)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Emulation:
    """Minimum wall time of a forward pass: prefill (no cached tokens) and later (decode) passes,
    plus ``token_s`` for each token the pass computes (so a long prefill, or a window that must
    first catch up on tokens its cache lacks, costs what it computes)."""

    prefill_s: float = 0.0
    decode_s: float = 0.0
    token_s: float = 0.0

    def pad_s(self, cold: bool, computed: int) -> float:
        """The emulated latency of a pass that computes ``computed`` tokens (``cold``: none cached)."""
        return (self.prefill_s if cold else self.decode_s) + self.token_s * computed

    @classmethod
    def parse(cls, text: str) -> Emulation:
        """'PREFILL:DECODE[:PER_TOKEN]' in milliseconds, e.g. '80:40' or '40:40:0.05'; '' or '0'
        disables."""
        if not text or text == "0":
            return cls()
        parts = text.split(":")
        if len(parts) not in (2, 3):
            raise ValueError(f"expected PREFILL_MS:DECODE_MS[:PER_TOKEN_MS], got {text!r}")
        values = [float(p) for p in parts] + [0.0] * (3 - len(parts))
        if min(values) < 0:
            raise ValueError(f"latencies must be >= 0, got {text!r}")
        prefill, decode, token = values
        return cls(prefill / 1000.0, decode / 1000.0, token / 1000.0)
