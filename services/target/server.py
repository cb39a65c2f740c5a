"""Entry point of the target service (``dsi serve target``)."""

from __future__ import annotations

import argparse

from dsi.services.model.runner import ModelRunner
from dsi.services.model.server import run_model_service, serve_model_service
from dsi.services.model.settings import ModelServerSettings, add_model_server_arguments, model_server_settings
from dsi.services.target.engine import TargetEngine
from dsi.services.target.servicer import TargetServicer
from dsi.v1 import target_pb2, target_pb2_grpc

SERVICE_NAME = target_pb2.DESCRIPTOR.services_by_name["TargetService"].full_name


async def serve(settings: ModelServerSettings) -> None:
    servicer = TargetServicer(None)

    def loaded(runner: ModelRunner) -> None:
        servicer.engine = TargetEngine(runner)

    await serve_model_service(
        settings, SERVICE_NAME, lambda s: target_pb2_grpc.add_TargetServiceServicer_to_server(servicer, s), loaded
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_server_arguments(parser, "target")


def main(ns: argparse.Namespace) -> int:
    return run_model_service(model_server_settings(ns, "target"), serve)
