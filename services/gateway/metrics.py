"""Prometheus metrics of the gateway (one registry per app). The decoding metrics (acceptance,
windows, wasted target time) are the orchestrator's, on its own --metrics-port.

Useful PromQL:
- error ratio:   sum(rate(dsi_gateway_requests_total{status!~"2.."}[5m])) / sum(rate(dsi_gateway_requests_total[5m]))
- disconnects:   rate(dsi_gateway_client_disconnects_total[5m])
"""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


@dataclass
class GatewayMetrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        self.requests = Counter("dsi_gateway_requests", "HTTP requests answered", ["endpoint", "status"], registry=r)
        self.seconds = Histogram("dsi_gateway_request_seconds", "Time to the end of the response",
                                 ["endpoint", "stream"], registry=r)
        self.disconnects = Counter("dsi_gateway_client_disconnects",
                                   "Requests whose client went away before the end (the Generate call is cancelled)",
                                   ["endpoint"], registry=r)
        self.running = Gauge("dsi_gateway_running_requests", "Completions running now", registry=r)
