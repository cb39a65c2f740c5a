"""Typed settings of the HTTP gateway, from CLI flags with DSI_GATEWAY_* environment fallbacks."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from dsi.envflags import add_flag


@dataclass(frozen=True)
class HttpServerOptions:
    host: str = "127.0.0.1"
    port: int = 8000  # 0 = any free port (reported on stdout)
    grace_s: float = 5.0  # on SIGTERM, how long open responses may still finish


@dataclass(frozen=True)
class GatewaySettings:
    server: HttpServerOptions
    orchestrator: str
    served_model_name: str  # "" = derived from the model the orchestrator serves
    tokenizer: str  # "" = the checkpoint the orchestrator's Info reports
    chat_template: str | None  # the template's text (from --chat-template), None = the tokenizer's own
    api_key: str  # "" = no authentication
    request_timeout_s: float
    max_concurrent_requests: int
    max_request_bytes: int
    log_level: str


def add_arguments(parser: argparse.ArgumentParser) -> None:
    env = "DSI_GATEWAY"
    add_flag(parser, "--orchestrator", env=f"{env}_ORCHESTRATOR", default="127.0.0.1:50051",
             help="the orchestrator's gRPC address HOST:PORT")
    add_flag(parser, "--host", env=f"{env}_HOST", default="127.0.0.1", help="address to bind")
    add_flag(parser, "--port", env=f"{env}_PORT", type=int, default=8000, help="HTTP port to bind (0 = any free)")
    add_flag(parser, "--served-model-name", env=f"{env}_SERVED_MODEL_NAME", default="",
             help="the name clients pass as `model` (default: 'dsi-default' for the built-in pair, else the "
                  "target checkpoint's directory name or hub id)")
    add_flag(parser, "--tokenizer", env=f"{env}_TOKENIZER", default="",
             help="tokenizer directory or hub id for chat templates (default: the checkpoint the orchestrator "
                  "reports)")
    add_flag(parser, "--chat-template", env=f"{env}_CHAT_TEMPLATE", default="",
             help="a Jinja chat template file used instead of the tokenizer's own (needed when it has none)")
    add_flag(parser, "--api-key", env=f"{env}_API_KEY", default="",
             help="require 'Authorization: Bearer KEY' on /v1/* (empty: no authentication)")
    add_flag(parser, "--request-timeout-s", env=f"{env}_REQUEST_TIMEOUT_S", type=float, default=600.0,
             help="deadline of each Generate call to the orchestrator (HTTP 504 when it passes)")
    add_flag(parser, "--max-concurrent-requests", env=f"{env}_MAX_CONCURRENT_REQUESTS", type=int, default=256,
             help="completions running at once; more are refused with HTTP 429")
    add_flag(parser, "--max-request-bytes", env=f"{env}_MAX_REQUEST_BYTES", type=int, default=4 * 1024 * 1024,
             help="largest request body accepted (HTTP 413 above)")
    add_flag(parser, "--grace-s", env=f"{env}_GRACE_S", type=float, default=5.0,
             help="on SIGTERM, how long open responses may still finish")
    add_flag(parser, "--log-level", env=f"{env}_LOG_LEVEL", default="info", help="debug, info, warning, error")


def settings_from_args(ns: argparse.Namespace) -> GatewaySettings:
    if not ns.orchestrator:
        raise SystemExit("--orchestrator is required (or DSI_GATEWAY_ORCHESTRATOR): the orchestrator's HOST:PORT")
    for flag, value in (("--max-concurrent-requests", ns.max_concurrent_requests),
                        ("--max-request-bytes", ns.max_request_bytes)):
        if value < 1:
            raise SystemExit(f"{flag} must be >= 1, got {value}")
    template = None
    if ns.chat_template:
        try:
            template = Path(ns.chat_template).read_text(encoding="utf-8")
        except OSError as exc:
            raise SystemExit(f"--chat-template: cannot read {ns.chat_template}: {exc}") from exc
    return GatewaySettings(
        server=HttpServerOptions(host=ns.host, port=ns.port, grace_s=ns.grace_s),
        orchestrator=ns.orchestrator,
        served_model_name=ns.served_model_name,
        tokenizer=ns.tokenizer,
        chat_template=template,
        api_key=ns.api_key,
        request_timeout_s=ns.request_timeout_s,
        max_concurrent_requests=ns.max_concurrent_requests,
        max_request_bytes=ns.max_request_bytes,
        log_level=ns.log_level,
    )
