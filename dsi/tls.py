"""The client side of TLS and API keys for every gRPC channel the project opens (SDK, CLI, gateway, and
the orchestrator's channels to the model services): which CA to trust, which certificate to present
(mutual TLS), which name to check the server's certificate against, and the bearer key to send."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

# A PEM value as callers have it: a file path, or the PEM bytes themselves.
PemSource = str | Path | bytes
ChannelOptions = Sequence[tuple[str, Any]]


class CredentialsError(ValueError):
    """A TLS or API key setting that cannot be used (a missing file, a certificate without its key);
    the message names the setting."""


def read_pem(value: PemSource | None, what: str) -> bytes | None:
    """PEM bytes from a path or from bytes; ``None``/empty stays ``None``. ``what`` names the setting in
    the error message."""
    if value is None or value == "" or value == b"":
        return None
    if isinstance(value, bytes):
        return value
    try:
        data = Path(value).expanduser().read_bytes()
    except OSError as exc:
        raise CredentialsError(f"{what}: cannot read {value}: {exc.strerror or exc}") from None
    if b"-----BEGIN" not in data:
        raise CredentialsError(f"{what}: {value} is not a PEM file")
    return data


@dataclass(frozen=True)
class ClientTLS:
    """TLS settings of a client channel.

    ``ca``: the CA certificates that may sign the server's certificate (None = the system's roots);
    ``cert`` + ``key``: the client's own certificate chain and key, presented when the server asks
    (mutual TLS); ``server_name``: the name checked against the server's certificate instead of the
    host in the address; ``names_by_address``: that name per address, for servers dialled by IP address
    (targets found through ``dns:///NAME:PORT`` are checked against NAME)."""

    ca: bytes | None = None
    cert: bytes | None = None
    key: bytes | None = None
    server_name: str = ""
    names_by_address: dict[str, str] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        if (self.cert is None) != (self.key is None):
            raise CredentialsError("a client certificate needs its key, and a key its certificate")

    @classmethod
    def load(
        cls,
        ca: PemSource | None = None,
        cert: PemSource | None = None,
        key: PemSource | None = None,
        server_name: str = "",
        what: str = "",
    ) -> ClientTLS:
        """From paths or PEM bytes; ``what`` prefixes the names in error messages (e.g. '--upstream-tls-')."""
        cert_pem, key_pem = read_pem(cert, f"{what}cert"), read_pem(key, f"{what}key")
        if (cert_pem is None) != (key_pem is None):
            raise CredentialsError(f"{what}cert and {what}key go together (a client certificate and its key)")
        return cls(read_pem(ca, f"{what}ca"), cert_pem, key_pem, server_name)

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(root_certificates=self.ca, private_key=self.key,
                                            certificate_chain=self.cert)

    def options(self, address: str) -> list[tuple[str, Any]]:
        name = self.names_by_address.get(address) or self.server_name
        return [("grpc.ssl_target_name_override", name)] if name else []


def aio_channel(address: str, tls: ClientTLS | None, options: ChannelOptions = ()) -> grpc.aio.Channel:
    """An asyncio channel to address: TLS with ``tls``, plaintext when it is None."""
    if tls is None:
        return grpc.aio.insecure_channel(address, options=list(options))
    return grpc.aio.secure_channel(address, tls.credentials(), options=[*options, *tls.options(address)])


def sync_channel(address: str, tls: ClientTLS | None, options: ChannelOptions = ()) -> grpc.Channel:
    """A blocking channel to address: TLS with ``tls``, plaintext when it is None."""
    if tls is None:
        return grpc.insecure_channel(address, options=list(options))
    return grpc.secure_channel(address, tls.credentials(), options=[*options, *tls.options(address)])


def bearer_metadata(api_key: str | None) -> tuple[tuple[str, str], ...]:
    """The ``authorization: Bearer KEY`` metadata sent with every call when there is a key."""
    if not api_key:
        return ()
    if not api_key.isprintable() or not api_key.isascii() or " " in api_key.strip():
        raise CredentialsError("api_key: printable ASCII without spaces expected")
    return (("authorization", f"Bearer {api_key.strip()}"),)


def first_key(path: str | Path) -> str:
    """The first key of an API key file (one key per line; blank lines and '#' comments skipped)."""
    try:
        lines = Path(path).expanduser().read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise CredentialsError(f"cannot read the API key file {path}: {exc.strerror or exc}") from None
    for line in lines:
        key = line.strip()
        if key and not key.startswith("#"):
            return key
    raise CredentialsError(f"the API key file {path} holds no key")


def client_tls(
    ca: PemSource | None = None,
    cert: PemSource | None = None,
    key: PemSource | None = None,
    tls: bool = False,
    server_name: str = "",
) -> ClientTLS | None:
    """The TLS settings a client asked for: any of ca/cert/key (or ``tls=True``: the system's roots)
    means TLS; none of them means plaintext (None)."""
    if not (tls or ca or cert or key or server_name):
        return None
    return ClientTLS.load(ca, cert, key, server_name)

