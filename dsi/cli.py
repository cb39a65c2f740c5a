"""The ``dsi`` command: run a local cluster, generate, serve one service, check health, simulate."""

from __future__ import annotations

import argparse
import json
import signal
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from dsi.envflags import add_flag

if TYPE_CHECKING:
    from dsi.client import Client


def _up(ns: argparse.Namespace) -> int:
    import logging
    import threading

    from dsi.cluster import ClusterError, ClusterSpec, LocalCluster

    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    spec = ClusterSpec(
        target_model=ns.target_model,
        drafter_model=ns.drafter_model,
        targets=ns.targets,
        host=ns.host,
        port=ns.port,
        threads=ns.threads,
        device=ns.device,
        dtype=ns.dtype,
        emulate_target_ms=ns.emulate_target_ms,
        emulate_drafter_ms=ns.emulate_drafter_ms,
        oracle_acceptance=ns.oracle_acceptance,
        lookahead=ns.lookahead,
        log_dir=ns.log_dir,
        keep_logs=True,
        http_port=ns.http_port,
        tls_dir=ns.tls_dir,
        api_key_file=ns.api_key_file,
        expose_internals=True if ns.expose_internals else None,
    )
    if ns.targets < 1:
        print("dsi up: --targets must be >= 1", file=sys.stderr)
        return 2
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    cluster = LocalCluster(spec)
    print(
        f"starting {ns.targets} target(s), 1 drafter and the orchestrator; logs in {cluster.log_dir}",
        file=sys.stderr,
        flush=True,
    )
    try:
        address = cluster.start()
    except ClusterError as exc:
        print(f"dsi up: {exc}", file=sys.stderr)
        return 1
    try:
        print(f"orchestrator listening on {address}", flush=True)
        if cluster.http_address:
            print(f"gateway listening on http://{cluster.http_address}/v1", flush=True)
        if spec.secured:
            needs = ([f"--ca {ns.tls_dir}/ca.crt (or DSI_CA)"] if ns.tls_dir else []) + (
                [f"a key of {ns.api_key_file} (DSI_API_KEY)"] if ns.api_key_file else [])
            print(f"clients need {' and '.join(needs)}", file=sys.stderr, flush=True)
        while not stop.is_set():
            for sp in cluster.processes:
                if sp.process.poll() is not None:
                    print(
                        f"dsi up: {sp.name} exited with code {sp.process.returncode}; log {sp.log_path}:\n"
                        f"{sp.log_tail()}",
                        file=sys.stderr,
                    )
                    return 1
            stop.wait(0.5)
        print("stopping the cluster", file=sys.stderr, flush=True)
        return 0
    finally:
        cluster.stop()


def _add_connection_flags(parser: argparse.ArgumentParser, api_key: bool = True) -> None:
    """TLS (and the API key) of a command that talks to a server."""
    add_flag(parser, "--ca", env="DSI_CA", default="",
             help="connect over TLS, trusting this PEM CA certificate (empty: plaintext unless --tls)")
    add_flag(parser, "--cert", env="DSI_CERT", default="",
             help="mutual TLS: this PEM client certificate (needs --key)")
    add_flag(parser, "--key", env="DSI_KEY", default="", help="the PEM private key of --cert")
    add_flag(parser, "--tls", env="DSI_TLS", action="store_true",
             help="connect over TLS trusting the system's CAs (implied by --ca, --cert)")
    add_flag(parser, "--tls-server-name", env="DSI_TLS_SERVER_NAME", default="",
             help="check the server's certificate against this name instead of the address's host")
    if api_key:
        add_flag(parser, "--api-key", env="DSI_API_KEY", default="",
                 help="send 'authorization: Bearer KEY' with every call (the orchestrator's --api-key-file); prefer "
                      "the environment variable: a command line is visible to other users")


def _client(ns: argparse.Namespace) -> Client:
    """The SDK client of a command, from --address, --timeout-s and the connection flags."""
    from dsi.client import Client

    return Client(ns.address, timeout=ns.timeout_s, ca=ns.ca or None, cert=ns.cert or None, key=ns.key or None,
                  api_key=ns.api_key or None, tls=ns.tls, server_name=ns.tls_server_name)


def _generate(ns: argparse.Namespace) -> int:
    from dsi.client import DSIError
    from dsi.tls import CredentialsError

    prompt = sys.stdin.read() if ns.prompt == "-" else ns.prompt
    kwargs = dict(
        max_new_tokens=ns.max_new_tokens,
        mode=ns.mode,
        temperature=ns.temperature,
        top_k=ns.top_k,
        top_p=ns.top_p,
        seed=ns.seed,
        lookahead=ns.lookahead,
        sp_degree=ns.sp_degree,
        verification=ns.verification,
        stop=ns.stop or (),
        ignore_eos=ns.ignore_eos,
        truncate_at_context=ns.truncate_at_context,
    )
    try:
        with _client(ns) as client:
            if ns.json:
                result = client.generate(prompt, **kwargs)
                print(json.dumps(result.to_dict()))
                return 0
            stats = None
            for delta in client.stream(prompt, **kwargs):
                sys.stdout.write(delta.text)
                sys.stdout.flush()
                stats = delta.stats or stats
            sys.stdout.write("\n")
            if stats is not None and not ns.quiet:
                print(
                    f"[{stats['mode']}] {stats['new_tokens']} tokens in {stats['wall_s']:.2f}s "
                    f"({stats['tokens_per_s']:.1f} tok/s), acceptance {stats['acceptance_rate']:.2f}, "
                    f"windows {stats['windows_dispatched']} (cancelled {stats['windows_cancelled']}, "
                    f"max in flight {stats['max_windows_in_flight']}), seed {stats['seed']}",
                    file=sys.stderr,
                )
            return 0
    except DSIError as exc:
        print(f"dsi generate: {exc.code.name}: {exc.details}", file=sys.stderr)
        return 1
    except CredentialsError as exc:
        print(f"dsi generate: {exc}", file=sys.stderr)
        return 2


def _health(ns: argparse.Namespace) -> int:
    from dsi.cluster import check_health
    from dsi.tls import CredentialsError, client_tls

    try:
        tls = client_tls(ns.ca, ns.cert, ns.key, ns.tls, ns.tls_server_name)
    except CredentialsError as exc:
        print(f"dsi health: {exc}", file=sys.stderr)
        return 2
    ok = check_health(ns.address, ns.service, ns.timeout_s, tls)
    print("SERVING" if ok else "NOT_SERVING")
    return 0 if ok else 1


def _info(ns: argparse.Namespace) -> int:
    from dsi.client import DSIError
    from dsi.tls import CredentialsError

    try:
        with _client(ns) as client:
            print(json.dumps(client.info(), indent=2))
    except (DSIError, CredentialsError) as exc:
        print(f"dsi info: {exc}", file=sys.stderr)
        return 1
    return 0


def _builtin_model(role: str, oracle_acceptance: float) -> str:
    """The built-in pair's checkpoint a model service serves when no --model is given (an oracle
    drafter serves the target model)."""
    from dsi.default_pair import ensure_default_pair

    pair = ensure_default_pair()
    return str(pair.drafter if role == "drafter" and oracle_acceptance <= 0 else pair.target)


def _serve(role: str):  # type: ignore[no-untyped-def]
    def run(ns: argparse.Namespace) -> int:
        if role in ("target", "drafter") and not ns.model:
            ns.model = _builtin_model(role, float(getattr(ns, "oracle_acceptance", 0.0) or 0.0))
        if role == "target":
            from dsi.services.target.server import main
        elif role == "drafter":
            from dsi.services.drafter.server import main
        elif role == "gateway":
            from dsi.services.gateway.server import main
        else:
            from dsi.services.orchestrator.server import main
        return int(main(ns))

    return run


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dsi",
        description="Distributed Speculative Inference: a target pool verifies overlapping drafts in parallel.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    up = sub.add_parser(
        "up",
        help="start a local cluster (targets, drafter, orchestrator) as processes",
        description="Start N targets, one drafter and the orchestrator as separate processes, wait "
        "for their health, print 'orchestrator listening on HOST:PORT', and stop them "
        "all on Ctrl-C or SIGTERM.",
    )
    add_flag(
        up,
        "--target-model",
        env="DSI_UP_TARGET_MODEL",
        default="",
        help="target checkpoint directory or hub id (default: the built-in pair)",
    )
    add_flag(
        up,
        "--drafter-model",
        env="DSI_UP_DRAFTER_MODEL",
        default="",
        help="drafter checkpoint directory or hub id (default: the built-in pair)",
    )
    add_flag(up, "--targets", env="DSI_UP_TARGETS", type=int, default=2, help="number of target instances")
    add_flag(up, "--host", env="DSI_UP_HOST", default="127.0.0.1", help="address every service binds")
    add_flag(up, "--port", env="DSI_UP_PORT", type=int, default=50051, help="orchestrator port (0 = any free)")
    add_flag(up, "--threads", env="DSI_UP_THREADS", type=int, default=1, help="torch threads per model service")
    add_flag(up, "--device", env="DSI_UP_DEVICE", default="auto", help="device of every model service")
    add_flag(up, "--dtype", env="DSI_UP_DTYPE", default="auto", help="weight dtype of every model service")
    add_flag(
        up,
        "--emulate-target-ms",
        env="DSI_UP_EMULATE_TARGET_MS",
        default="",
        help="pad target forward passes to PREFILL:DECODE ms (benchmarks)",
    )
    add_flag(
        up,
        "--emulate-drafter-ms",
        env="DSI_UP_EMULATE_DRAFTER_MS",
        default="",
        help="pad drafter forward passes to PREFILL:DECODE ms (benchmarks)",
    )
    add_flag(
        up,
        "--oracle-acceptance",
        env="DSI_UP_ORACLE_ACCEPTANCE",
        type=float,
        default=0.0,
        help="BENCHMARK ONLY: the drafter proposes the target's greedy token with this probability",
    )
    add_flag(up, "--lookahead", env="DSI_UP_LOOKAHEAD", type=int, default=5, help="default drafts per window")
    add_flag(
        up, "--log-dir", env="DSI_UP_LOG_DIR", default="", help="where the services' logs go (default: a temp dir)"
    )
    add_flag(up, "--http-port", env="DSI_UP_HTTP_PORT", type=int, default=None,
             help="also start the OpenAI-compatible HTTP gateway on this port (0 = any free; unset = no gateway)")
    add_flag(up, "--tls-dir", env="DSI_UP_TLS_DIR", default="",
             help="TLS on every service and mutual TLS between the orchestrator and the model services, with the "
                  "certificates scripts/make-certs.sh made in this directory (clients then need --ca DIR/ca.crt)")
    add_flag(up, "--api-key-file", env="DSI_UP_API_KEY_FILE", default="",
             help="the orchestrator and the gateway require one of this file's keys (one per line; "
                  "'authorization: Bearer KEY'); re-read when it changes")
    add_flag(up, "--expose-internals", env="DSI_UP_EXPOSE_INTERNALS", action="store_true",
             help="the orchestrator's Info names addresses and paths and reflection is on; the default unless "
                  "--tls-dir or --api-key-file is given (a development cluster on loopback)")
    up.set_defaults(func=_up)

    gen = sub.add_parser("generate", help="generate text through an orchestrator")
    add_flag(gen, "--address", env="DSI_ADDRESS", default="127.0.0.1:50051", help="orchestrator HOST:PORT")
    add_flag(gen, "--mode", env="DSI_MODE", default="dsi", choices=["dsi", "si", "nonsi"], help="decoding strategy")
    add_flag(gen, "--max-new-tokens", env="DSI_MAX_NEW_TOKENS", type=int, default=64, help="tokens to generate at most")
    add_flag(gen, "--temperature", env="DSI_TEMPERATURE", type=float, default=0.0, help="0 = greedy")
    add_flag(gen, "--top-k", env="DSI_TOP_K", type=int, default=0, help="0 = off")
    add_flag(gen, "--top-p", env="DSI_TOP_P", type=float, default=None, help="in (0, 1]; unset = 1")
    add_flag(gen, "--seed", env="DSI_SEED", type=int, default=None, help="sampling seed (random when unset)")
    add_flag(
        gen, "--lookahead", env="DSI_LOOKAHEAD", type=int, default=0, help="drafts per window (0 = server default)"
    )
    add_flag(
        gen,
        "--sp-degree",
        env="DSI_SP_DEGREE",
        type=int,
        default=0,
        help="windows in flight at once (0 = the server's --sp-degree, by default every healthy target)",
    )
    add_flag(
        gen,
        "--verification",
        env="DSI_VERIFICATION",
        default="coupled",
        choices=["coupled", "rejection"],
        help="coupled: exact (greedy/Gumbel); rejection: classic rejection sampling",
    )
    add_flag(gen, "--stop", env="DSI_STOP", action="append", help="stop string (repeatable)")
    add_flag(gen, "--ignore-eos", env="DSI_IGNORE_EOS", action="store_true", help="generate past EOS tokens")
    add_flag(gen, "--truncate-at-context", env="DSI_TRUNCATE_AT_CONTEXT", action="store_true",
             help="when prompt + max new tokens exceed the model's context, stop at the context (finish "
                  "reason 'length') instead of refusing the request")
    add_flag(gen, "--timeout-s", env="DSI_TIMEOUT_S", type=float, default=None, help="deadline of the call")
    add_flag(
        gen, "--json", env="DSI_JSON", action="store_true", help="print one JSON object with text, token_ids, stats"
    )
    add_flag(gen, "--quiet", env="DSI_QUIET", action="store_true", help="do not print the stats line")
    _add_connection_flags(gen)
    gen.add_argument("prompt", help="the prompt ('-' reads standard input)")
    gen.set_defaults(func=_generate)

    serve = sub.add_parser("serve", help="run one service (what docker-compose runs)")
    roles = serve.add_subparsers(dest="role", required=True, metavar="ROLE")
    from dsi.services.model.settings import add_model_server_arguments

    for role in ("target", "drafter"):
        p = roles.add_parser(role, help=f"the {role} model service")
        add_model_server_arguments(p, role)
        p.set_defaults(func=_serve(role))
    from dsi.services.orchestrator.settings import add_arguments as add_orchestrator_arguments

    p = roles.add_parser("orchestrator", help="the public Generate API and the DSI scheduler")
    add_orchestrator_arguments(p)
    p.set_defaults(func=_serve("orchestrator"))
    from dsi.services.gateway.settings import add_arguments as add_gateway_arguments

    p = roles.add_parser("gateway", help="the OpenAI-compatible HTTP API in front of an orchestrator",
                         description="Serve /v1/completions, /v1/chat/completions, /v1/models, /health and /metrics "
                         "over HTTP, each completion one Generate call to the orchestrator.")
    add_gateway_arguments(p)
    p.set_defaults(func=_serve("gateway"))

    health = sub.add_parser("health", help="check a server's gRPC health (exit 0 when SERVING)")
    health.add_argument("address", help="HOST:PORT")
    add_flag(health, "--service", env="DSI_HEALTH_SERVICE", default="", help="service name ('' = the server)")
    add_flag(health, "--timeout-s", env="DSI_HEALTH_TIMEOUT_S", type=float, default=3.0, help="deadline")
    _add_connection_flags(health, api_key=False)  # health checks need no key
    health.set_defaults(func=_health)

    info = sub.add_parser("info", help="describe a running cluster (models, targets, limits)")
    add_flag(info, "--address", env="DSI_ADDRESS", default="127.0.0.1:50051", help="orchestrator HOST:PORT")
    add_flag(info, "--timeout-s", env="DSI_TIMEOUT_S", type=float, default=10.0, help="deadline")
    _add_connection_flags(info)
    info.set_defaults(func=_info)

    from dsi.bench.cli import register as register_bench
    from dsi.sim.cli import register as register_simulate

    register_simulate(sub)
    register_bench(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    return int(ns.func(ns) or 0)


if __name__ == "__main__":
    sys.exit(main())
