"""Prometheus metrics of a model service (target or drafter), read from its runner's counters when
scraped, so the hot path keeps plain integer counters.

Useful PromQL:
- preemption:       rate(dsi_model_cancelled_mid_forward_total[5m]) / rate(dsi_model_calls_total[5m])
- cache reuse:      rate(dsi_model_cache_hit_tokens_total[5m])
                      / (rate(dsi_model_cache_hit_tokens_total[5m]) + rate(dsi_model_computed_tokens_total[5m]))
- wasted compute:   rate(dsi_model_cancelled_compute_seconds_total[5m])
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

# Counter name -> (RunnerCounters field, help).
_COUNTERS = {
    "dsi_model_calls": ("calls", "Calls received (Verify on a target, Draft/DraftFlow on a drafter)"),
    "dsi_model_cancelled": ("cancelled", "Calls cancelled by the client before they finished"),
    "dsi_model_cancelled_mid_forward": ("cancelled_mid_forward", "Forward passes stopped between decoder layers"),
    "dsi_model_cancelled_queued": ("cancelled_queued", "Calls cancelled before their forward started"),
    "dsi_model_forwards": ("forwards_completed", "Forward passes run to completion"),
    "dsi_model_layers_run": ("layers_run", "Decoder layers run"),
    "dsi_model_cache_hit_tokens": ("cache_hit_tokens", "Tokens reused from a session's KV cache"),
    "dsi_model_computed_tokens": ("computed_tokens", "Tokens computed by forward passes"),
    "dsi_model_cancelled_compute_seconds": ("cancelled_compute_s", "Seconds of compute thrown away by cancels"),
    "dsi_model_cache_fill_tokens": ("cache_fill_tokens", "Tokens computed only to fill a cache (prefill, catch-up)"),
    "dsi_model_preempted": ("preempted", "Background forward passes stopped for urgent ones (run again later)"),
}


class RunnerCollector:
    """Exposes a ModelRunner's counters and session cache size."""

    def __init__(self, runner: Any, role: str) -> None:
        self.runner = runner
        self.role = role

    def collect(self) -> Iterator[Metric]:
        counters = self.runner.counters
        for name, (attr, doc) in _COUNTERS.items():
            family = CounterMetricFamily(name, doc, labels=["role"])
            family.add_metric([self.role], float(getattr(counters, attr)))
            yield family
        sessions = GaugeMetricFamily("dsi_model_sessions", "Sessions with a cached KV state", labels=["role"])
        sessions.add_metric([self.role], float(len(self.runner.sessions)))
        yield sessions
        held = CounterMetricFamily("dsi_model_background_held_seconds",
                                   "Seconds the worker stayed idle holding background work back under load",
                                   labels=["role"])
        held.add_metric([self.role], float(self.runner.background_held_s))
        yield held
        load = GaugeMetricFamily("dsi_model_urgent_load", "Share of the recent time spent on urgent work",
                                 labels=["role"])
        load.add_metric([self.role], float(self.runner.urgent_load))
        yield load
        tokens = GaugeMetricFamily("dsi_model_cached_tokens", "Tokens held by all session caches", labels=["role"])
        tokens.add_metric([self.role], float(self.runner.sessions.total_tokens))
        yield tokens


def runner_registry(runner: Any, role: str) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(RunnerCollector(runner, role))  # type: ignore[arg-type]
    return registry
