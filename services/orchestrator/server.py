"""Entry point of the orchestrator (``dsi serve orchestrator``): discover and health-check the
targets, check that targets and drafter share a vocabulary, load the tokenizer, serve Generate."""

from __future__ import annotations

import argparse
import asyncio
import logging

import grpc

from dsi.v1 import common_pb2, drafter_pb2, drafter_pb2_grpc, orchestrator_pb2, orchestrator_pb2_grpc, target_pb2
from services.orchestrator import settings as settings_mod
from services.orchestrator.discovery import TargetDiscovery
from services.orchestrator.metrics import OrchestratorMetrics
from services.orchestrator.pool import CHANNEL_OPTIONS, TargetPool
from services.orchestrator.service import Orchestrator
from services.orchestrator.servicer import OrchestratorServicer
from services.orchestrator.settings import OrchestratorSettings
from services.runtime.serving import GrpcServer, configure_logging, run_async, start_metrics_server
from services.runtime.validation import GenerateLimits

log = logging.getLogger(__name__)
SERVICE_NAME = orchestrator_pb2.DESCRIPTOR.services_by_name["OrchestratorService"].full_name


class StartupError(RuntimeError):
    """The cluster is not usable as configured; the message says why."""


def check_vocabularies(target: common_pb2.ModelInfo, drafter: common_pb2.ModelInfo, tokenizer_len: int) -> None:
    """Refuse a target/drafter pair that does not share a vocabulary."""
    if target.vocab_size != drafter.vocab_size:
        raise StartupError(
            f"target {target.model!r} ({target.vocab_size} logits) and drafter {drafter.model!r} "
            f"({drafter.vocab_size} logits) do not share a vocabulary; use a drafter trained with the "
            "target's tokenizer"
        )
    if target.vocab_fingerprint and drafter.vocab_fingerprint and target.vocab_fingerprint != drafter.vocab_fingerprint:
        raise StartupError(
            f"target {target.model!r} and drafter {drafter.model!r} have different tokenizers "
            f"(vocabulary hashes {target.vocab_fingerprint} != {drafter.vocab_fingerprint})"
        )
    if tokenizer_len > target.vocab_size:
        raise StartupError(f"the tokenizer has {tokenizer_len} tokens but the target only {target.vocab_size} logits")


async def _target_info(pool: TargetPool) -> common_pb2.ModelInfo:
    infos = []
    for inst in pool.instances.values():
        if inst.healthy:
            resp = await inst.stub.Info(target_pb2.TargetInfoRequest(), timeout=10.0)
            infos.append(resp.model)
    if not infos:
        raise StartupError(pool.unavailable_message())
    first = infos[0]
    for other in infos[1:]:
        if (other.vocab_size, other.vocab_fingerprint) != (first.vocab_size, first.vocab_fingerprint):
            raise StartupError(f"target instances serve different vocabularies: {first.model} vs {other.model}")
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


def load_tokenizer(name: str):  # type: ignore[no-untyped-def]
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as exc:
        raise StartupError(f"could not load a tokenizer from {name!r} (set --tokenizer): {exc}") from exc


async def serve(settings: OrchestratorSettings) -> None:
    server = GrpcServer(settings.server, [SERVICE_NAME], "orchestrator")
    servicer = OrchestratorServicer()
    orchestrator_pb2_grpc.add_OrchestratorServiceServicer_to_server(servicer, server.server)
    await server.start()
    metrics = OrchestratorMetrics()
    start_metrics_server(settings.server.metrics_port, metrics.registry)
    pool = TargetPool([], settings.deadline_s, settings.health_interval_s, metrics=metrics)
    discovery = TargetDiscovery(settings.targets, pool.set_addresses, settings.resolve_interval_s)
    drafter_channel = None
    try:
        await discovery.refresh()
        await pool.start()
        discovery.start()
        if not await pool.wait_healthy(settings.startup_timeout_s):
            raise StartupError(pool.unavailable_message())
        target_model = await _target_info(pool)
        drafter_stub, drafter_model = None, None
        if settings.drafter:
            drafter_channel = grpc.aio.insecure_channel(settings.drafter, options=CHANNEL_OPTIONS)
            drafter_stub = drafter_pb2_grpc.DrafterServiceStub(drafter_channel)
            info = await _drafter_info(drafter_stub, settings.drafter, settings.startup_timeout_s)
            drafter_model = info.model
            if info.oracle_acceptance > 0:
                log.warning("drafter is in BENCHMARK-ONLY oracle mode (acceptance %.2f)", info.oracle_acceptance)
        tokenizer = await asyncio.get_running_loop().run_in_executor(
            None, load_tokenizer, settings.tokenizer or target_model.model
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
        )
        orchestrator = Orchestrator(pool, drafter_stub, tokenizer, limits, eos, settings.deadline_s, metrics)
        servicer.attach(orchestrator, target_model, drafter_model, settings.drafter)
        await server.set_serving()
        await server.wait_and_stop()
    finally:
        discovery.stop()
        await pool.close()
        if drafter_channel is not None:
            await drafter_channel.close()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    settings_mod.add_arguments(parser)


def main(ns: argparse.Namespace) -> int:
    settings = settings_mod.settings_from_args(ns)
    configure_logging(settings.log_level)
    try:
        run_async(lambda: serve(settings))
    except StartupError as exc:
        log.error("%s", exc)
        return 1
    return 0
