"""Typed settings of the orchestrator, from CLI flags with DSI_ORCHESTRATOR_* environment fallbacks."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass

from dsi.envflags import add_flag
from dsi.services.runtime.serving import MAX_MESSAGE_BYTES, ServerOptions
from dsi.services.runtime.tls import (
    ClientTLS,
    add_server_tls_arguments,
    add_upstream_tls_arguments,
    server_tls_from_args,
    upstream_tls_from_args,
)
from dsi.services.runtime.validation import AUTO_SP


@dataclass(frozen=True)
class OrchestratorSettings:
    server: ServerOptions
    targets: tuple[str, ...]
    drafter: str
    tokenizer: str
    max_new_tokens: int
    max_prompt_tokens: int
    default_lookahead: int
    max_lookahead: int
    default_sp_degree: int
    deadline_s: float
    health_interval_s: float
    startup_timeout_s: float
    resolve_interval_s: float
    log_level: str
    reproducible: bool = False
    max_prompt_bytes: int = 1 << 20
    max_stop_strings: int = 32
    max_stop_length: int = 256
    max_request_id_length: int = 128
    drafter_stall_s: float = 10.0
    max_active_requests: int = 64
    max_queued_requests: int = 256
    max_queue_wait_s: float = 30.0
    full_verify: bool = False
    upstream_tls: ClientTLS | None = None  # to the targets and the drafter; None = plaintext
    api_key_file: str = ""  # "" = the public API needs no key
    expose_internals: bool = False  # Info names addresses and paths, errors name endpoints, reflection on
    cold_prefill_tokens: int = 256
    prefill_budget: float = 1.5
    speculation_headroom: int = 1
    yielding_windows: bool = True


def _split(values: list[str] | str | None) -> tuple[str, ...]:
    if not values:
        return ()
    items = values if isinstance(values, list) else [values]
    return tuple(a.strip() for v in items for a in v.split(",") if a.strip())


def add_arguments(parser: argparse.ArgumentParser) -> None:
    env = "DSI_ORCHESTRATOR"
    add_flag(parser, "--targets", env=f"{env}_TARGETS", default="",
             help="target endpoints, comma-separated host:port; 'dns:///NAME:PORT' uses every address NAME "
                  "resolves to, re-resolved periodically (docker compose --scale, Kubernetes headless Service)")
    add_flag(parser, "--drafter", env=f"{env}_DRAFTER", default="",
             help="drafter endpoint host:port (empty: target-only, every mode runs as non-SI)")
    add_flag(parser, "--tokenizer", env=f"{env}_TOKENIZER", default="",
             help="tokenizer directory or hub id (default: the checkpoint the targets report)")
    add_flag(parser, "--host", env=f"{env}_HOST", default="127.0.0.1", help="address to bind")
    add_flag(parser, "--port", env=f"{env}_PORT", type=int, default=50051, help="port to bind (0 = any free)")
    add_flag(parser, "--max-new-tokens", env=f"{env}_MAX_NEW_TOKENS", type=int, default=2048,
             help="largest max_new_tokens a request may ask for")
    add_flag(parser, "--max-prompt-tokens", env=f"{env}_MAX_PROMPT_TOKENS", type=int, default=4096,
             help="longest prompt accepted, in tokens")
    add_flag(parser, "--max-active-requests", env=f"{env}_MAX_ACTIVE_REQUESTS", type=int, default=64,
             help="Generate requests run at once; more wait in a first-come first-served queue")
    add_flag(parser, "--max-queued-requests", env=f"{env}_MAX_QUEUED_REQUESTS", type=int, default=256,
             help="requests that may wait for a slot; beyond that a request is refused at once "
                  "(RESOURCE_EXHAUSTED with a retry-after hint)")
    add_flag(parser, "--max-queue-wait-s", env=f"{env}_MAX_QUEUE_WAIT_S", type=float, default=30.0,
             help="longest wait for a slot before a request is refused with RESOURCE_EXHAUSTED")
    add_flag(parser, "--max-prompt-bytes", env=f"{env}_MAX_PROMPT_BYTES", type=int, default=1 << 20,
             help="largest prompt accepted, in UTF-8 bytes (checked before tokenizing)")
    add_flag(parser, "--max-stop-strings", env=f"{env}_MAX_STOP_STRINGS", type=int, default=32,
             help="most stop strings one request may give")
    add_flag(parser, "--max-stop-length", env=f"{env}_MAX_STOP_LENGTH", type=int, default=256,
             help="longest stop string accepted, in characters")
    add_flag(parser, "--max-request-id-length", env=f"{env}_MAX_REQUEST_ID_LENGTH", type=int, default=128,
             help="longest request_id accepted (characters from A-Z, a-z, 0-9 and . _ : -); at most 256, the "
                  "model services' session id limit")
    add_flag(parser, "--max-request-bytes", env=f"{env}_MAX_REQUEST_BYTES", type=int, default=MAX_MESSAGE_BYTES,
             help="largest request message accepted, in bytes (larger ones are refused with RESOURCE_EXHAUSTED "
                  "before they are decoded)")
    add_flag(parser, "--lookahead", env=f"{env}_LOOKAHEAD", type=_auto_or_int(0), default=5,
             help="drafts per verification window when the request does not say; 'auto' = chosen per request "
                  "from the measured target and drafter latencies and acceptance rate (as `dsi simulate suggest`)")
    add_flag(parser, "--sp-degree", env=f"{env}_SP_DEGREE", type=_auto_or_int(AUTO_SP), default=0,
             help="windows in flight per request when the request does not say (0 = every healthy target; "
                  "'auto' = chosen per request like --lookahead auto)")
    add_flag(parser, "--max-lookahead", env=f"{env}_MAX_LOOKAHEAD", type=int, default=64,
             help="largest lookahead a request may ask for")
    add_flag(parser, "--deadline-s", env=f"{env}_DEADLINE_S", type=float, default=60.0,
             help="deadline of every call to a target or the drafter (a drafter stream that reaches it is "
             "replaced by a new one, not treated as a failure)")
    add_flag(parser, "--drafter-stall-s", env=f"{env}_DRAFTER_STALL_S", type=float, default=10.0,
             help="give up on the drafter for a request when it sends no draft for this long while it may "
                  "(a hung drafter); the request goes on target-only (0 = wait for --deadline-s)")
    add_flag(parser, "--health-interval-s", env=f"{env}_HEALTH_INTERVAL_S", type=float, default=1.0,
             help="seconds between health checks of the targets")
    add_flag(parser, "--startup-timeout-s", env=f"{env}_STARTUP_TIMEOUT_S", type=float, default=300.0,
             help="how long to wait for the targets and the drafter at start-up")
    add_flag(parser, "--resolve-interval-s", env=f"{env}_RESOLVE_INTERVAL_S", type=float, default=10.0,
             help="seconds between DNS re-resolutions of dns:/// target names")
    add_flag(parser, "--max-concurrent-rpcs", env=f"{env}_MAX_CONCURRENT_RPCS", type=int, default=256,
             help="Generate calls accepted at once")
    add_flag(parser, "--metrics-port", env=f"{env}_METRICS_PORT", type=int, default=0,
             help="serve Prometheus metrics on this port (0 = off)")
    add_flag(parser, "--reproducible", env=f"{env}_REPRODUCIBLE", action="store_true",
             help="fixed-shape target forwards (the prompt, then lookahead + 1 tokens at a time): output identical "
                  "across modes, runs and instances in bfloat16/float16 too, at the cost of recomputing and "
                  "padding each forward to lookahead + 1 tokens (see README, losslessness)")
    add_flag(parser, "--full-verify", env=f"{env}_FULL_VERIFY", action="store_true",
             help="send the whole sequence with every Verify window instead of only what the target does not "
                  "already hold (for comparison: incremental Verify costs the same at any context length)")
    add_flag(parser, "--cold-prefill-tokens", env=f"{env}_COLD_PREFILL_TOKENS", type=int, default=256,
             help="a window that would first compute more than this many tokens on a target instance (a long "
                  "prompt's prefill) goes there only on capacity nobody else needs; a huge value turns this off")
    add_flag(parser, "--prefill-budget", env=f"{env}_PREFILL_BUDGET", type=float, default=1.5,
             help="committed tokens a request's cold prefills may start, as a multiple of its committed length "
                  "(what plain decoding computes; the first prefill included): alone on the pool, DSI prefills a "
                  "long sequence on another idle instance for its speculation only within this budget; 1.5 = a "
                  "long prompt is prefilled once, 'inf' = on every idle instance (faster alone on the pool, at "
                  "the cost of target time); prefills no instance could avoid are never limited")
    add_flag(parser, "--speculation-headroom", env=f"{env}_SPECULATION_HEADROOM", type=int, default=1,
             help="idle target instances DSI's speculation leaves to other requests' critical windows while "
                  "other requests run (0 = speculate on every idle instance)")
    add_flag(parser, "--no-yielding-windows", env=f"{env}_NO_YIELDING_WINDOWS", action="store_true",
             help="while other requests run, a DSI request waits for a full window of drafts, as SI does; by "
                  "default its shorter critical window (the target's next token, say) goes out anyway onto a "
                  "target instance idle now, as a yielding window: another request's critical window that has to "
                  "wait preempts it, and it is dropped then (target time nobody needs, turned into tokens while "
                  "the drafter is the bottleneck)")
    add_server_tls_arguments(parser, env, "clients (SDK, CLI, gateway)")
    add_upstream_tls_arguments(parser, env)
    add_flag(parser, "--api-key-file", env=f"{env}_API_KEY_FILE", default="",
             help="require 'authorization: Bearer KEY' metadata on every call but health checks, KEY one of this "
                  "file's lines (blank lines and # comments skipped; re-read when it changes, so keys rotate "
                  "without a restart); empty: no key needed")
    add_flag(parser, "--expose-internals", env=f"{env}_EXPOSE_INTERNALS", action="store_true",
             help="let clients see internal details: target and drafter addresses and checkpoint paths in Info and "
                  "the token stream, the targets' own error messages, and gRPC reflection (off: labels, public "
                  "model names, generic errors, no reflection)")
    add_flag(parser, "--log-level", env=f"{env}_LOG_LEVEL", default="info", help="debug, info, warning, error")


def _auto_or_int(auto: int) -> Callable[[str], int]:
    """A flag value: a whole number, or 'auto' (stored as ``auto``)."""

    def parse(text: str) -> int:
        if str(text).strip().lower() == "auto":
            return auto
        try:
            return int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number or 'auto', got {text!r}") from None

    return parse


def settings_from_args(ns: argparse.Namespace) -> OrchestratorSettings:
    if ns.sp_degree < 0 and ns.sp_degree != AUTO_SP:
        raise SystemExit(f"--sp-degree must be >= 0 or 'auto', got {ns.sp_degree}")
    if not 1 <= ns.max_request_id_length <= 256:
        raise SystemExit(f"--max-request-id-length must be in [1, 256], got {ns.max_request_id_length}")
    if not 1024 <= ns.max_request_bytes <= MAX_MESSAGE_BYTES:
        raise SystemExit(f"--max-request-bytes must be in [1024, {MAX_MESSAGE_BYTES}], got {ns.max_request_bytes}")
    if ns.lookahead < 0:
        raise SystemExit(f"--lookahead must be >= 1 or 'auto', got {ns.lookahead}")
    if ns.max_active_requests < 1 or ns.max_queued_requests < 0 or ns.max_queue_wait_s < 0:
        raise SystemExit("--max-active-requests must be >= 1, --max-queued-requests and --max-queue-wait-s >= 0")
    if ns.speculation_headroom < 0:
        raise SystemExit(f"--speculation-headroom must be >= 0, got {ns.speculation_headroom}")
    if not ns.prefill_budget >= 1.0:  # also rejects nan
        raise SystemExit(f"--prefill-budget must be >= 1 (1: only the prefill plain decoding needs), "
                         f"got {ns.prefill_budget}")
    if ns.cold_prefill_tokens < 0:
        raise SystemExit(f"--cold-prefill-tokens must be >= 0, got {ns.cold_prefill_tokens}")
    targets = _split(ns.targets)
    if not targets:
        raise SystemExit("--targets is required (or DSI_ORCHESTRATOR_TARGETS): at least one target host:port")
    return OrchestratorSettings(
        server=ServerOptions(host=ns.host, port=ns.port, max_concurrent_rpcs=ns.max_concurrent_rpcs,
                             metrics_port=ns.metrics_port, tls=server_tls_from_args(ns),
                             reflection=ns.expose_internals, max_request_bytes=ns.max_request_bytes),
        targets=targets,
        drafter=ns.drafter,
        tokenizer=ns.tokenizer,
        max_new_tokens=ns.max_new_tokens,
        max_prompt_tokens=ns.max_prompt_tokens,
        default_lookahead=ns.lookahead,
        max_lookahead=ns.max_lookahead,
        default_sp_degree=ns.sp_degree,
        deadline_s=ns.deadline_s,
        health_interval_s=ns.health_interval_s,
        startup_timeout_s=ns.startup_timeout_s,
        resolve_interval_s=ns.resolve_interval_s,
        log_level=ns.log_level,
        reproducible=ns.reproducible,
        max_prompt_bytes=ns.max_prompt_bytes,
        max_stop_strings=ns.max_stop_strings,
        max_stop_length=ns.max_stop_length,
        max_request_id_length=ns.max_request_id_length,
        drafter_stall_s=ns.drafter_stall_s,
        max_active_requests=ns.max_active_requests,
        max_queued_requests=ns.max_queued_requests,
        max_queue_wait_s=ns.max_queue_wait_s,
        full_verify=ns.full_verify,
        upstream_tls=upstream_tls_from_args(ns),
        api_key_file=ns.api_key_file,
        expose_internals=ns.expose_internals,
        cold_prefill_tokens=ns.cold_prefill_tokens,
        prefill_budget=ns.prefill_budget,
        speculation_headroom=ns.speculation_headroom,
        yielding_windows=not ns.no_yielding_windows,
    )
