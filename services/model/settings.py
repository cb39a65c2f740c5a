"""Typed settings of the model services (target, drafter), built from CLI flags with environment
fallbacks (DSI_TARGET_*, DSI_DRAFTER_*)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from dsi.envflags import add_flag
from dsi.services.model.emulation import Emulation
from dsi.services.runtime.serving import ServerOptions
from dsi.services.runtime.tls import add_server_tls_arguments, server_tls_from_args


@dataclass(frozen=True)
class ModelServerSettings:
    role: str  # "target" or "drafter"
    model: str  # checkpoint directory or hub id; "" = the built-in default pair
    server: ServerOptions
    device: str
    dtype: str
    threads: int
    cache_tokens: int
    session_ttl_s: float
    max_sequence_tokens: int
    max_drafts: int
    background_max_load: float
    emulation: Emulation
    oracle_acceptance: float
    log_level: str


def _emulation(text: str) -> Emulation:
    try:
        return Emulation.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def add_model_server_arguments(parser: argparse.ArgumentParser, role: str) -> None:
    env = f"DSI_{role.upper()}"
    add_flag(parser, "--model", env=f"{env}_MODEL", default="",
             help="checkpoint directory (config.json + weights) or hub id; empty = the built-in default pair")
    add_flag(parser, "--host", env=f"{env}_HOST", default="127.0.0.1", help="address to bind")
    add_flag(parser, "--port", env=f"{env}_PORT", type=int, default=0, help="port to bind (0 = any free port)")
    add_flag(parser, "--device", env=f"{env}_DEVICE", default="auto", help="torch device: auto, cpu, cuda:N")
    add_flag(parser, "--dtype", env=f"{env}_DTYPE", default="auto",
             help="weight dtype: auto (bfloat16 on GPU, float32 on CPU), float32, float16, bfloat16")
    add_flag(parser, "--threads", env=f"{env}_THREADS", type=int, default=0,
             help="torch CPU threads (0 = torch's default)")
    add_flag(parser, "--cache-tokens", env=f"{env}_CACHE_TOKENS", type=int, default=1 << 18,
             help="KV cache budget in tokens over all sessions (least recently used sessions are evicted)")
    add_flag(parser, "--session-ttl-s", env=f"{env}_SESSION_TTL_S", type=float, default=600.0,
             help="drop a session's cache after this many idle seconds")
    add_flag(parser, "--max-sequence-tokens", env=f"{env}_MAX_SEQUENCE_TOKENS", type=int, default=8192,
             help="longest token sequence a call may carry")
    add_flag(parser, "--max-concurrent-rpcs", env=f"{env}_MAX_CONCURRENT_RPCS", type=int, default=256,
             help="calls accepted at once (more are rejected with RESOURCE_EXHAUSTED)")
    add_flag(parser, "--emulate-latency-ms", env=f"{env}_EMULATE_LATENCY_MS", type=_emulation, default="",
             help="pad forward passes to at least PREFILL:DECODE milliseconds by sleeping (benchmarks); an "
                  "optional third part, PREFILL:DECODE:PER_TOKEN, adds that much per token computed")
    add_flag(parser, "--prefill-latency-ms", env=f"{env}_PREFILL_LATENCY_MS", type=float, default=None,
             help="same as the PREFILL part of --emulate-latency-ms")
    add_flag(parser, "--decode-latency-ms", env=f"{env}_DECODE_LATENCY_MS", type=float, default=None,
             help="same as the DECODE part of --emulate-latency-ms")
    add_flag(parser, "--metrics-port", env=f"{env}_METRICS_PORT", type=int, default=0,
             help="serve Prometheus metrics on this port (0 = off)")
    add_server_tls_arguments(parser, env, "the orchestrator")
    add_flag(parser, "--log-level", env=f"{env}_LOG_LEVEL", default="info", help="debug, info, warning, error")
    if role == "drafter":
        add_flag(parser, "--max-drafts", env=f"{env}_MAX_DRAFTS", type=int, default=1024,
                 help="most drafts one Draft call may ask for")
        add_flag(parser, "--background-max-load", env=f"{env}_BACKGROUND_MAX_LOAD", type=float, default=0.6,
                 help="make speculative drafts (past the next window, made while no urgent draft waits) only "
                      "while urgent drafts kept the drafter busy less than this share of the recent time (a "
                      "0.25 s moving average); under heavier load they cost more than they save. 1 = whenever "
                      "it is idle, 0 = never")
        add_flag(parser, "--oracle-acceptance", env=f"{env}_ORACLE_ACCEPTANCE", type=float, default=0.0,
                 help="BENCHMARK ONLY: serve the target model and propose its greedy token with this "
                      "probability (its second choice otherwise); 0 = off")


def model_server_settings(ns: argparse.Namespace, role: str) -> ModelServerSettings:
    emulation = ns.emulate_latency_ms if isinstance(ns.emulate_latency_ms, Emulation) else _emulation(
        ns.emulate_latency_ms or "")
    if ns.prefill_latency_ms is not None or ns.decode_latency_ms is not None:
        emulation = Emulation(
            (ns.prefill_latency_ms if ns.prefill_latency_ms is not None else emulation.prefill_s * 1000) / 1000,
            (ns.decode_latency_ms if ns.decode_latency_ms is not None else emulation.decode_s * 1000) / 1000,
            emulation.token_s,
        )
    oracle = float(getattr(ns, "oracle_acceptance", 0.0) or 0.0)
    if not 0.0 <= float(getattr(ns, "background_max_load", 1.0)) <= 1.0:
        raise SystemExit(f"--background-max-load must be in [0, 1], got {ns.background_max_load}")
    if not 0.0 <= oracle <= 1.0:
        raise SystemExit(f"--oracle-acceptance must be in [0, 1], got {oracle}")
    return ModelServerSettings(
        role=role,
        model=ns.model,
        server=ServerOptions(host=ns.host, port=ns.port, max_concurrent_rpcs=ns.max_concurrent_rpcs,
                             metrics_port=ns.metrics_port, tls=server_tls_from_args(ns)),
        device=ns.device,
        dtype=ns.dtype,
        threads=ns.threads,
        cache_tokens=ns.cache_tokens,
        session_ttl_s=ns.session_ttl_s,
        max_sequence_tokens=ns.max_sequence_tokens,
        max_drafts=getattr(ns, "max_drafts", 1024),
        background_max_load=float(getattr(ns, "background_max_load", 1.0)),
        emulation=emulation,
        oracle_acceptance=oracle,
        log_level=ns.log_level,
    )
