"""Start-up and shutdown of a model service (target or drafter): bind, report NOT_SERVING, load and
warm up the model off the event loop, report SERVING, serve until SIGTERM, then free the model."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any

import grpc

from dsi.services.model.loading import ModelLoadError, load_causal_lm
from dsi.services.model.metrics import runner_registry
from dsi.services.model.runner import ModelRunner
from dsi.services.model.sampling import Sampling
from dsi.services.model.settings import ModelServerSettings
from dsi.services.runtime.errors import Unavailable
from dsi.services.runtime.serving import GrpcServer, run_service, start_metrics_server
from dsi.v1 import common_pb2

log = logging.getLogger(__name__)


def model_info_pb(runner: ModelRunner) -> common_pb2.ModelInfo:
    loaded = runner.loaded
    return common_pb2.ModelInfo(
        model=loaded.name,
        vocab_size=loaded.vocab_size,
        vocab_fingerprint=loaded.vocab_fingerprint,
        device=str(loaded.device),
        dtype=str(loaded.dtype).removeprefix("torch."),
        num_layers=loaded.num_layers,
        eos_token_ids=loaded.eos_token_ids,
        instance_id=loaded.instance_id,
        max_sequence_length=runner.max_sequence_length,
    )


def counters_pb(runner: ModelRunner) -> common_pb2.ServiceCounters:
    c = runner.counters
    return common_pb2.ServiceCounters(
        calls=c.calls,
        cancelled=c.cancelled,
        cancelled_mid_forward=c.cancelled_mid_forward,
        cancelled_queued=c.cancelled_queued,
        forwards_completed=c.forwards_completed,
        layers_run=c.layers_run,
        cache_hit_tokens=c.cache_hit_tokens,
        computed_tokens=c.computed_tokens,
        sessions=len(runner.sessions),
        sessions_dropped=runner.sessions.dropped,
        cancelled_compute_s=c.cancelled_compute_s,
        preempted=c.preempted,
        cache_fill_tokens=c.cache_fill_tokens,
        background_held_s=runner.background_held_s,
        urgent_load=runner.urgent_load,
    )


async def serve_model_service(
    settings: ModelServerSettings,
    service_name: str,
    add_servicer: Callable[[grpc.aio.Server], Any],
    on_loaded: Callable[[ModelRunner], Any],
) -> None:
    """Run one model service until SIGTERM.

    ``add_servicer`` registers the servicer before the server starts (calls made before the model is
    loaded get UNAVAILABLE); ``on_loaded`` hands it the runner once the model is loaded.
    """
    server = GrpcServer(settings.server, [service_name], settings.role)
    add_servicer(server.server)
    try:
        await server.start()
    except RuntimeError as exc:  # grpc: "Failed to bind to address ..."
        raise ModelLoadError(f"cannot listen on {settings.server.host}:{settings.server.port}: {exc}") from exc
    loop = asyncio.get_running_loop()
    model_path = settings.model  # the CLI resolves the built-in pair when no --model is given
    if not model_path:
        raise ModelLoadError("no model to serve: give --model (a checkpoint directory or hub id)")
    log.info("loading %s model %s on %s", settings.role, model_path, settings.device)
    try:
        loaded = await loop.run_in_executor(
            None, lambda: load_causal_lm(model_path, settings.device, settings.dtype, settings.threads)
        )
    except BaseException:
        # Stop the server while the loop is alive (its finaliser would run on a closed loop).
        await server.server.stop(None)
        raise
    runner = ModelRunner(
        loaded, settings.cache_tokens, settings.session_ttl_s, settings.emulation, settings.max_sequence_tokens,
        settings.background_max_load,
    )
    # Warm up (first forward allocates and compiles kernels) before reporting SERVING.
    await runner.run(lambda job: runner.forward(job, "__warmup__", [0, 0], 1))
    await runner.run(lambda job: Sampling())  # flush the queue
    await runner.release("__warmup__")
    runner.counters.forwards_completed = 0
    runner.counters.computed_tokens = 0
    runner.counters.layers_run = 0
    runner.sessions.dropped = 0
    on_loaded(runner)
    start_metrics_server(settings.server.metrics_port, runner_registry(runner, settings.role), settings.server.host)
    await server.set_serving()
    try:
        await server.wait_and_stop()
    finally:
        runner.close()
        del loaded


def run_model_service(
    settings: ModelServerSettings, serve: Callable[[ModelServerSettings], Coroutine[Any, Any, None]]
) -> int:
    """Run a model service's ``serve`` to the end; a model that cannot be loaded (or a port that
    cannot be bound) is a refusal to start (``run_service``)."""
    return run_service(settings.log_level, lambda: serve(settings), (ModelLoadError,))


def not_loaded(role: str) -> Unavailable:
    return Unavailable(f"the {role} model is still loading; retry when health reports SERVING")
