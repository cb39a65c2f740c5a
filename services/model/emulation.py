"""Latency emulation settings (torch-free, so the CLI can parse flags without importing torch)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Emulation:
    """Minimum wall time of a forward pass: prefill (no cached tokens) and later (decode) passes."""

    prefill_s: float = 0.0
    decode_s: float = 0.0

    @classmethod
    def parse(cls, text: str) -> Emulation:
        """'PREFILL:DECODE' in milliseconds, e.g. '80:40'; '' or '0' disables."""
        if not text or text == "0":
            return cls()
        parts = text.split(":")
        if len(parts) != 2:
            raise ValueError(f"expected PREFILL_MS:DECODE_MS, got {text!r}")
        prefill, decode = (float(p) for p in parts)
        if prefill < 0 or decode < 0:
            raise ValueError(f"latencies must be >= 0, got {text!r}")
        return cls(prefill / 1000.0, decode / 1000.0)
