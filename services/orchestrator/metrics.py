"""Prometheus metrics of the orchestrator (one registry per orchestrator, no module globals).

Useful PromQL:
- acceptance rate:   rate(dsi_drafts_accepted_total[5m]) / rate(dsi_drafts_verified_total[5m])
- tokens per second: sum(rate(dsi_generated_tokens_total[1m])) by (mode)
- speculation waste: rate(dsi_wasted_target_seconds_total[5m]) / sum(rate(dsi_target_busy_seconds_total[5m]))
- preemption rate:   rate(dsi_windows_cancelled_total[5m]) / rate(dsi_windows_dispatched_total[5m])
- target cost:       rate(dsi_target_forwards_total[5m]) / sum(rate(dsi_generated_tokens_total[5m])) by (mode)
  (forward passes per committed token: 1 for non-SI, lower when drafts are accepted)
- critical-path wait: rate(dsi_critical_queue_wait_seconds_total[5m]) / rate(dsi_generated_tokens_total[5m])
"""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from dsi.services.orchestrator.scheduler import RequestStats


@dataclass
class OrchestratorMetrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        self.requests = Counter("dsi_requests", "Generate requests finished", ["mode", "outcome"], registry=r)
        self.generated_tokens = Counter("dsi_generated_tokens", "Tokens committed", ["mode", "source"], registry=r)
        self.windows_dispatched = Counter("dsi_windows_dispatched", "Verify windows sent", ["mode"], registry=r)
        self.windows_cancelled = Counter("dsi_windows_cancelled", "Windows cancelled in flight", ["mode"], registry=r)
        self.windows_applied = Counter(
            "dsi_windows_applied", "Windows whose results were applied", ["mode"], registry=r
        )
        self.drafts_proposed = Counter("dsi_drafts_proposed", "Drafts received from the drafter", ["mode"], registry=r)
        self.drafts_verified = Counter("dsi_drafts_verified", "Drafts compared with the target", ["mode"], registry=r)
        self.drafts_accepted = Counter("dsi_drafts_accepted", "Drafts the target accepted", ["mode"], registry=r)
        self.epochs = Counter("dsi_epochs", "Epochs (rejections and resyncs + first)", ["mode"], registry=r)
        self.wasted_target_s = Counter(
            "dsi_wasted_target_seconds", "Target time on cancelled or discarded windows", ["mode"], registry=r
        )
        self.target_forwards = Counter(
            "dsi_target_forwards", "Windows that held a target (completed or cancelled after starting)", ["mode"],
            registry=r,
        )
        self.critical_queue_wait_s = Counter(
            "dsi_critical_queue_wait_seconds", "Seconds critical-path windows waited for a free target", ["mode"],
            registry=r,
        )
        self.windows_preempted = Counter(
            "dsi_windows_preempted", "Speculative or yielding windows stopped on a target for a critical window",
            ["mode"], registry=r,
        )
        self.windows_yielding = Counter(
            "dsi_windows_yielding", "Short critical windows sent onto idle targets as yielding windows", ["mode"],
            registry=r,
        )
        self.windows_dropped = Counter(
            "dsi_windows_dropped", "Yielding windows dropped (preempted, no idle target, or withdrawn)", ["mode"],
            registry=r,
        )
        self.prefix_misses = Counter(
            "dsi_verify_prefix_misses", "Windows sent again in full: the target no longer held the referenced prefix",
            registry=r,
        )
        self.retries = Counter("dsi_window_retries", "Windows retried on another target", registry=r)
        self.target_busy = Counter(
            "dsi_target_busy_seconds", "Seconds each target instance spent on windows", ["target"], registry=r
        )
        self.queue_depth = Gauge("dsi_target_queue_depth", "Windows waiting for a free target", registry=r)
        self.healthy_targets = Gauge("dsi_healthy_targets", "Target instances passing health checks", registry=r)
        self.request_seconds = Histogram("dsi_request_seconds", "Wall time of Generate", ["mode"], registry=r)
        self.ttft_seconds = Histogram("dsi_ttft_seconds", "Time to the first committed token", ["mode"], registry=r)

    def observe(self, stats: RequestStats, outcome: str) -> None:
        m = stats.mode.value
        self.requests.labels(m, outcome).inc()
        self.generated_tokens.labels(m, "draft").inc(stats.tokens_from_drafts)
        self.generated_tokens.labels(m, "target").inc(stats.new_tokens - stats.tokens_from_drafts)
        self.windows_dispatched.labels(m).inc(stats.windows_dispatched)
        self.windows_cancelled.labels(m).inc(stats.windows_cancelled)
        self.windows_applied.labels(m).inc(stats.windows_applied)
        self.drafts_proposed.labels(m).inc(stats.drafts_proposed)
        self.drafts_verified.labels(m).inc(stats.drafts_verified)
        self.drafts_accepted.labels(m).inc(stats.drafts_accepted)
        self.epochs.labels(m).inc(stats.epochs)
        self.wasted_target_s.labels(m).inc(stats.wasted_target_s)
        self.target_forwards.labels(m).inc(stats.target_forwards)
        self.critical_queue_wait_s.labels(m).inc(stats.critical_queue_wait_s)
        self.windows_preempted.labels(m).inc(stats.windows_preempted)
        self.windows_yielding.labels(m).inc(stats.windows_yielding)
        self.windows_dropped.labels(m).inc(stats.windows_dropped)
        self.request_seconds.labels(m).observe(stats.wall_s)
        if stats.new_tokens:
            self.ttft_seconds.labels(m).observe(stats.ttft_s)
