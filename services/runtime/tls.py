"""TLS for the services: a server's certificate and, for mutual TLS, the CA its clients' certificates
must chain to (``ServerTLS``); the channels the orchestrator opens to the model services (``channel``);
and the flags that configure both, with environment fallbacks."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import grpc

from dsi.envflags import add_flag
from dsi.tls import ChannelOptions, ClientTLS, CredentialsError, aio_channel, read_pem

__all__ = ["ClientTLS", "ServerTLS", "add_server_tls_arguments", "add_upstream_tls_arguments", "channel",
           "server_tls_from_args", "upstream_tls_from_args"]


@dataclass(frozen=True)
class ServerTLS:
    """A server's certificate chain and key (PEM); with ``client_ca``, every client must present a
    certificate signed by that CA (mutual TLS), or the handshake fails before any method runs."""

    cert: bytes
    key: bytes
    client_ca: bytes | None = None

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials(
            [(self.key, self.cert)], root_certificates=self.client_ca, require_client_auth=self.client_ca is not None
        )

    @property
    def mutual(self) -> bool:
        return self.client_ca is not None


def channel(address: str, tls: ClientTLS | None, options: ChannelOptions) -> grpc.aio.Channel:
    """The orchestrator's channel to a model service: TLS (mutual when ``tls`` has a certificate) or,
    with ``tls`` None, plaintext."""
    return aio_channel(address, tls, options)


def add_server_tls_arguments(parser: argparse.ArgumentParser, env: str, clients: str) -> None:
    """--tls-cert, --tls-key, --tls-client-ca with ``{env}_TLS_*`` fallbacks; ``clients`` says who
    connects (for the help text)."""
    add_flag(parser, "--tls-cert", env=f"{env}_TLS_CERT", default="",
             help="serve TLS with this PEM certificate (chain); needs --tls-key (empty: plaintext)")
    add_flag(parser, "--tls-key", env=f"{env}_TLS_KEY", default="", help="the PEM private key of --tls-cert")
    add_flag(parser, "--tls-client-ca", env=f"{env}_TLS_CLIENT_CA", default="",
             help=f"mutual TLS: require {clients} to present a certificate signed by this PEM CA "
                  "(empty: no client certificate asked)")


def server_tls_from_args(ns: argparse.Namespace) -> ServerTLS | None:
    """The server's TLS from --tls-cert/--tls-key/--tls-client-ca, read now (a bad setting stops the
    service before it binds, naming the flag); None = plaintext."""
    try:
        cert, key = read_pem(ns.tls_cert, "--tls-cert"), read_pem(ns.tls_key, "--tls-key")
        client_ca = read_pem(ns.tls_client_ca, "--tls-client-ca")
    except CredentialsError as exc:
        raise SystemExit(str(exc)) from None
    if cert is None and key is None:
        if client_ca is not None:
            raise SystemExit("--tls-client-ca needs --tls-cert and --tls-key (mutual TLS is TLS first)")
        return None
    if cert is None or key is None:
        raise SystemExit("--tls-cert and --tls-key go together")
    return ServerTLS(cert, key, client_ca)


def add_upstream_tls_arguments(parser: argparse.ArgumentParser, env: str) -> None:
    """The orchestrator's TLS towards the targets and the drafter (``{env}_UPSTREAM_TLS_*``)."""
    add_flag(parser, "--upstream-tls-ca", env=f"{env}_UPSTREAM_TLS_CA", default="",
             help="connect to the targets and the drafter over TLS, trusting this PEM CA (empty: plaintext, "
                  "unless --upstream-tls-cert is set: then the system's roots)")
    add_flag(parser, "--upstream-tls-cert", env=f"{env}_UPSTREAM_TLS_CERT", default="",
             help="mutual TLS: the PEM client certificate presented to the targets and the drafter (their "
                  "--tls-client-ca must have signed it); needs --upstream-tls-key")
    add_flag(parser, "--upstream-tls-key", env=f"{env}_UPSTREAM_TLS_KEY", default="",
             help="the PEM private key of --upstream-tls-cert")
    add_flag(parser, "--upstream-tls-server-name", env=f"{env}_UPSTREAM_TLS_SERVER_NAME", default="",
             help="check every model service's certificate against this name instead of the host it is dialled "
                  "at (default: the address's host; for targets found through dns:///NAME:PORT, NAME)")


def upstream_tls_from_args(ns: argparse.Namespace) -> ClientTLS | None:
    """The orchestrator's client TLS towards the model services; None = plaintext."""
    if not (ns.upstream_tls_ca or ns.upstream_tls_cert or ns.upstream_tls_key):
        if ns.upstream_tls_server_name:
            raise SystemExit("--upstream-tls-server-name needs --upstream-tls-ca (or a client certificate)")
        return None
    try:
        return ClientTLS.load(ns.upstream_tls_ca, ns.upstream_tls_cert, ns.upstream_tls_key,
                              ns.upstream_tls_server_name, what="--upstream-tls-")
    except CredentialsError as exc:
        raise SystemExit(str(exc)) from None
