"""Entry point of the drafter service (``dsi serve drafter``)."""

from __future__ import annotations

import argparse

from dsi.services.drafter.engine import DrafterEngine
from dsi.services.drafter.servicer import DrafterServicer
from dsi.services.model.runner import ModelRunner
from dsi.services.model.server import run_model_service, serve_model_service
from dsi.services.model.settings import ModelServerSettings, add_model_server_arguments, model_server_settings
from dsi.v1 import drafter_pb2, drafter_pb2_grpc

SERVICE_NAME = drafter_pb2.DESCRIPTOR.services_by_name["DrafterService"].full_name


async def serve(settings: ModelServerSettings) -> None:
    servicer = DrafterServicer(None, settings.max_drafts)

    def loaded(runner: ModelRunner) -> None:
        servicer.engine = DrafterEngine(runner, settings.oracle_acceptance)

    await serve_model_service(
        settings, SERVICE_NAME, lambda s: drafter_pb2_grpc.add_DrafterServiceServicer_to_server(servicer, s), loaded
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_server_arguments(parser, "drafter")


def main(ns: argparse.Namespace) -> int:
    return run_model_service(model_server_settings(ns, "drafter"), serve)
