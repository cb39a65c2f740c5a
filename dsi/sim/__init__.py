"""Simulator of non-SI, SI and DSI time per token (no models), and the paper-style heatmaps."""

from dsi.sim.model import (
    SimResult,
    SimSettings,
    Suggestion,
    best_lookahead,
    dsi_pipeline_bound,
    si_analytic_time_per_token,
    simulate,
    suggest,
)

__all__ = [
    "SimResult",
    "SimSettings",
    "Suggestion",
    "best_lookahead",
    "dsi_pipeline_bound",
    "si_analytic_time_per_token",
    "simulate",
    "suggest",
]
