"""Entry point of the orchestrator (``dsi serve orchestrator``): discover and health-check the
targets, check that targets and drafter share a vocabulary, load the tokenizer, serve Generate (over
TLS and with API keys where configured)."""

from __future__ import annotations

import argparse
import asyncio
import logging
from collections.abc import Callable

import grpc

from dsi.services.orchestrator import settings as settings_mod
from dsi.services.orchestrator.admission import Admission
from dsi.services.orchestrator.discovery import Resolver, TargetDiscovery, system_resolver
from dsi.services.orchestrator.drafter_client import Drafter
from dsi.services.orchestrator.metrics import OrchestratorMetrics
from dsi.services.orchestrator.pool import CHANNEL_OPTIONS, TargetPool, model_mismatch
from dsi.services.orchestrator.service import Orchestrator
from dsi.services.orchestrator.servicer import OrchestratorServicer
from dsi.services.orchestrator.settings import OrchestratorSettings
from dsi.services.orchestrator.tokenizer import TextTokenizer, TokenizerError, load_tokenizer
from dsi.services.orchestrator.tuning import Tuner
from dsi.services.runtime import tls
from dsi.services.runtime.auth import ApiKeyError, ApiKeyInterceptor, ApiKeys
from dsi.services.runtime.serving import GrpcServer, run_service, start_metrics_server
from dsi.services.runtime.validation import GenerateLimits
from dsi.v1 import common_pb2, drafter_pb2, drafter_pb2_grpc, orchestrator_pb2, orchestrator_pb2_grpc, target_pb2

log = logging.getLogger(__name__)
SERVICE_NAME = orchestrator_pb2.DESCRIPTOR.services_by_name["OrchestratorService"].full_name


class StartupError(RuntimeError):
    """The cluster is not usable as configured; the message says why."""


def check_vocabularies(target: common_pb2.ModelInfo, drafter: common_pb2.ModelInfo, tokenizer_len: int) -> None:
    """Refuse a target/drafter pair that does not share a vocabulary.

    Checkpoints often pad their embedding beyond the tokenizer (to a multiple of 64, say), so the
    number of logits alone says little. A pair is accepted when

    - both have as many logits and their tokenizers do not differ (a side without a tokenizer
      fingerprint is not compared), or
    - the drafter has MORE logits and both tokenizers are known and identical: the extra rows are
      padding. The orchestrator sends the target's size as ``DraftRequest.vocab_limit`` so the
      drafter never proposes an id the target cannot score; or
    - the drafter has FEWER logits, both tokenizers are known and identical and the tokenizer fits in
      the drafter's logits: its drafts are a subset of the target's ids. Only if the target itself
      commits one of its padding ids (which no tokenizer produces and a trained model practically
      never samples) would the drafter refuse that prefix; the request then continues target-only,
      still lossless.

    In every case the tokenizer must fit in the target's logits.
    """
    if tokenizer_len > target.vocab_size:
        raise StartupError(f"the tokenizer has {tokenizer_len} tokens but the target only {target.vocab_size} logits")
    target_fp, drafter_fp = target.vocab_fingerprint, drafter.vocab_fingerprint
    if target_fp and drafter_fp and target_fp != drafter_fp:
        raise StartupError(
            f"target {target.model!r} and drafter {drafter.model!r} do not share a vocabulary: their "
            f"tokenizers differ (vocabulary hashes {target_fp} != {drafter_fp}); use a drafter trained with "
            "the target's tokenizer"
        )
    if target.vocab_size == drafter.vocab_size:
        return
    same_tokenizer = bool(target_fp) and target_fp == drafter_fp
    sizes = f"drafter {drafter.vocab_size} logits, target {target.vocab_size}, same tokenizer"
    if same_tokenizer and drafter.vocab_size > target.vocab_size:
        log.info("%s: drafts are limited to ids below %d", sizes, target.vocab_size)
        return
    if same_tokenizer and tokenizer_len <= drafter.vocab_size:
        log.info("%s: the drafter proposes a subset of the target's ids", sizes)
        return
    why = (
        "the tokenizers could not be compared (ship the tokenizer files next to both checkpoints)"
        if not same_tokenizer
        else f"the tokenizer ({tokenizer_len} tokens) does not fit in the drafter's logits"
    )
    raise StartupError(
        f"target {target.model!r} ({target.vocab_size} logits) and drafter {drafter.model!r} "
        f"({drafter.vocab_size} logits) do not share a vocabulary: {why}; use a drafter trained with the "
        "target's tokenizer"
    )


async def _target_info(pool: TargetPool) -> common_pb2.ModelInfo:
    infos = []
    for inst in pool.targets.all():
        if inst.healthy:
            resp = await inst.stub.Info(target_pb2.TargetInfoRequest(), timeout=10.0)
            infos.append(resp.model)
    if not infos:
        raise StartupError(pool.unavailable_message())
    first = infos[0]
    for other in infos[1:]:
        mismatch = model_mismatch(first, other)
        if mismatch:
            raise StartupError(f"target instances serve different vocabularies: {other.model} has {mismatch}")
    pool.require_model(first)  # targets that come up later must match it too
    return first


async def _drafter_info(
    stub: drafter_pb2_grpc.DrafterServiceStub, address: str, timeout_s: float
) -> drafter_pb2.DrafterInfoResponse:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        try:
            return await stub.Info(drafter_pb2.DrafterInfoRequest(), timeout=5.0, wait_for_ready=True)
        except grpc.aio.AioRpcError as exc:
            if loop.time() > deadline:
                raise StartupError(f"drafter {address} unreachable: {exc.code().name}: {exc.details()}") from exc
            await asyncio.sleep(0.5)


def _load_tokenizer(name: str) -> TextTokenizer:
    try:
        return load_tokenizer(name)
    except TokenizerError as exc:
        raise StartupError(f"{exc} (set --tokenizer)") from exc


def _health_follows_targets(server: GrpcServer) -> Callable[[int], None]:
    """The orchestrator reports NOT_SERVING while no target is healthy (load balancers and probes
    then send requests elsewhere) and SERVING again once one is back."""
    pending: set[asyncio.Task[None]] = set()
    serving = True

    def changed(healthy: int) -> None:
        nonlocal serving
        if (healthy > 0) == serving:
            return
        serving = healthy > 0
        log.warning("%s target healthy: reporting %s", healthy, "SERVING" if serving else "NOT_SERVING")
        task = asyncio.create_task(server.set_status(serving))
        pending.add(task)
        task.add_done_callback(pending.discard)

    return changed


def naming_resolver(upstream: tls.ClientTLS | None, resolve: Resolver = system_resolver) -> Resolver:
    """The resolver of ``dns:///NAME:PORT`` targets; with TLS it records NAME for every address it
    returns, so that the target dialled at that IP address is checked against NAME (the name its
    certificate carries, e.g. the headless Service's or the compose alias)."""
    if upstream is None:
        return resolve

    async def resolver(host: str, port: int) -> list[str]:
        found = await resolve(host, port)
        for address in found:
            upstream.names_by_address[address] = host
        return found

    return resolver


def _warn_if_open(settings: OrchestratorSettings, keys: ApiKeys | None) -> None:
    host = settings.server.host
    if host in ("127.0.0.1", "::1", "localhost"):
        return
    has = (("TLS", settings.server.tls is not None), ("API key", keys is not None))
    missing = [what for what, ok in has if not ok]
    if missing:
        log.warning("the public API on %s has no %s: anyone who reaches the port can use it (see docs/security.md)",
                    host, " and no ".join(missing))


async def serve(settings: OrchestratorSettings) -> None:
    try:
        keys = ApiKeys.optional(path=settings.api_key_file or None)
    except ApiKeyError as exc:
        raise StartupError(str(exc)) from None
    _warn_if_open(settings, keys)
    interceptors = [ApiKeyInterceptor(keys)] if keys is not None else []
    server = GrpcServer(settings.server, [SERVICE_NAME], "orchestrator", interceptors)
    servicer = OrchestratorServicer(settings.expose_internals, settings.server.max_request_bytes)
    orchestrator_pb2_grpc.add_OrchestratorServiceServicer_to_server(servicer, server.server)
    try:
        await server.start()
    except RuntimeError as exc:  # grpc: "Failed to bind to address ..."
        raise StartupError(f"cannot listen on {settings.server.host}:{settings.server.port}: {exc}") from exc
    metrics = OrchestratorMetrics()
    start_metrics_server(settings.server.metrics_port, metrics.registry, settings.server.host)
    pool = TargetPool(
        [], settings.deadline_s, settings.health_interval_s, metrics=metrics, incremental=not settings.full_verify,
        cold_tokens=settings.cold_prefill_tokens, headroom=settings.speculation_headroom,
        prefill_budget=settings.prefill_budget,
        upstream_tls=settings.upstream_tls,
    )
    discovery = TargetDiscovery(settings.targets, pool.set_addresses, settings.resolve_interval_s,
                                naming_resolver(settings.upstream_tls))
    drafter_channel = None
    orchestrator: Orchestrator | None = None
    try:
        await discovery.refresh()
        await pool.start()
        discovery.start()
        if not await pool.wait_healthy(settings.startup_timeout_s):
            raise StartupError(pool.unavailable_message())
        target_model = await _target_info(pool)
        drafter_stub, drafter_model = None, None
        if settings.drafter:
            drafter_channel = tls.channel(settings.drafter, settings.upstream_tls, CHANNEL_OPTIONS)
            drafter_stub = drafter_pb2_grpc.DrafterServiceStub(drafter_channel)
            info = await _drafter_info(drafter_stub, settings.drafter, settings.startup_timeout_s)
            drafter_model = info.model
            if info.oracle_acceptance > 0:
                log.warning("drafter is in BENCHMARK-ONLY oracle mode (acceptance %.2f)", info.oracle_acceptance)
        tokenizer = await asyncio.get_running_loop().run_in_executor(
            None, _load_tokenizer, settings.tokenizer or target_model.model
        )
        if drafter_model is not None:
            check_vocabularies(target_model, drafter_model, len(tokenizer))
        eos = list(target_model.eos_token_ids) or (
            [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        )
        limits = GenerateLimits(
            vocab_size=target_model.vocab_size,
            max_new_tokens=settings.max_new_tokens,
            max_prompt_tokens=settings.max_prompt_tokens,
            max_lookahead=settings.max_lookahead,
            default_lookahead=settings.default_lookahead,
            default_sp_degree=settings.default_sp_degree,
            max_sequence_length=target_model.max_sequence_length,
            max_prompt_bytes=settings.max_prompt_bytes,
            max_stop_strings=settings.max_stop_strings,
            max_stop_length=settings.max_stop_length,
            max_request_id_length=settings.max_request_id_length,
            draft_sequence_length=drafter_model.max_sequence_length if drafter_model is not None else 0,
        )
        tuner = Tuner(settings.max_lookahead)
        pool.estimates = tuner.estimates  # decode windows' latencies
        drafter = None
        if drafter_stub is not None:
            drafter = Drafter(drafter_stub, settings.deadline_s, vocab_limit=limits.vocab_size,
                              stall_s=settings.drafter_stall_s, on_gap=tuner.estimates.draft_gap)
        orchestrator = Orchestrator(
            pool,
            drafter,
            tokenizer,
            limits,
            eos,
            metrics,
            settings.reproducible,
            Admission(settings.max_active_requests, settings.max_queued_requests, settings.max_queue_wait_s),
            tuner,
            yielding=settings.yielding_windows,
        )
        servicer.attach(orchestrator, target_model, drafter_model, settings.drafter)
        await server.set_serving()
        pool.on_change = _health_follows_targets(server)
        await server.wait_and_stop()
    finally:
        # A refusal ends serve() with the gRPC server still running: stop it while the event loop is
        # alive, or its finaliser later schedules the stop on a closed loop ("Event loop is closed").
        await server.server.stop(None)
        if orchestrator is not None:
            await orchestrator.close()
        await discovery.stop()
        await pool.close()
        if drafter_channel is not None:
            await drafter_channel.close()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    settings_mod.add_arguments(parser)


def main(ns: argparse.Namespace) -> int:
    settings = settings_mod.settings_from_args(ns)
    return run_service(settings.log_level, lambda: serve(settings), (StartupError,))
