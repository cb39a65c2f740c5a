"""Typed settings of the HTTP gateway, from CLI flags with DSI_GATEWAY_* environment fallbacks."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from dsi.envflags import add_flag
from dsi.services.runtime.auth import ApiKeyError, ApiKeys
from dsi.tls import ClientTLS, CredentialsError, first_key


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
    api_key: str  # "" = no authentication (unless api_key_file)
    request_timeout_s: float
    max_concurrent_requests: int
    max_request_bytes: int
    log_level: str
    api_key_file: str = ""  # keys HTTP clients may send, one per line, re-read when it changes
    orchestrator_ca: str = ""  # TLS to the orchestrator: the CA of its certificate ("" = plaintext)
    orchestrator_cert: str = ""  # mutual TLS: the gateway's client certificate and key
    orchestrator_key: str = ""
    orchestrator_api_key: str = ""  # sent to the orchestrator as 'authorization: Bearer KEY'


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
             help="require 'Authorization: Bearer KEY' on /v1/* (empty: no authentication unless --api-key-file)")
    add_flag(parser, "--api-key-file", env=f"{env}_API_KEY_FILE", default="",
             help="require 'Authorization: Bearer KEY' on /v1/* with KEY one of this file's lines (blank lines and "
                  "# comments skipped; re-read when it changes, so keys rotate without a restart); /health and "
                  "/metrics stay open")
    add_flag(parser, "--orchestrator-ca", env=f"{env}_ORCHESTRATOR_CA", default="",
             help="connect to the orchestrator over TLS, trusting this PEM CA (empty: plaintext)")
    add_flag(parser, "--orchestrator-cert", env=f"{env}_ORCHESTRATOR_CERT", default="",
             help="mutual TLS: the PEM client certificate shown to the orchestrator; needs --orchestrator-key")
    add_flag(parser, "--orchestrator-key", env=f"{env}_ORCHESTRATOR_KEY", default="",
             help="the PEM private key of --orchestrator-cert")
    add_flag(parser, "--orchestrator-api-key-file", env=f"{env}_ORCHESTRATOR_API_KEY_FILE", default="",
             help="send the first key of this file to the orchestrator ('authorization: Bearer KEY'; its "
                  "--api-key-file must list it)")
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
    try:
        ApiKeys.optional([ns.api_key], ns.api_key_file or None)  # readable and not empty, checked now
        ClientTLS.load(ns.orchestrator_ca, ns.orchestrator_cert, ns.orchestrator_key, what="--orchestrator-")
        orchestrator_api_key = first_key(ns.orchestrator_api_key_file) if ns.orchestrator_api_key_file else ""
    except (ApiKeyError, CredentialsError) as exc:
        raise SystemExit(str(exc)) from None
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
        api_key_file=ns.api_key_file,
        orchestrator_ca=ns.orchestrator_ca,
        orchestrator_cert=ns.orchestrator_cert,
        orchestrator_key=ns.orchestrator_key,
        orchestrator_api_key=orchestrator_api_key,
    )
