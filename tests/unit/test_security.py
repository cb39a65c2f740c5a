"""Security pieces on their own: escaped log fields, API key files (constant-time comparison against
every key, rotation), the API key interceptor and the orchestrator's public face (labels, public names,
generic errors) on an in-process server, TLS and key settings with their environment fallbacks, and
loopback as every listener's default."""

from __future__ import annotations

import argparse
import asyncio
import hmac
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from unittest import mock

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from dsi.cluster import ClusterError, ClusterSpec, ClusterTLS
from dsi.services.orchestrator.scheduler import CommittedToken, Source
from dsi.services.orchestrator.server import naming_resolver
from dsi.services.orchestrator.service import Chunk
from dsi.services.orchestrator.servicer import OrchestratorServicer
from dsi.services.orchestrator.targets import TargetSnapshot
from dsi.services.runtime import auth
from dsi.services.runtime.auth import UNAUTHENTICATED_MESSAGE, ApiKeyError, ApiKeyInterceptor, ApiKeys, bearer_token
from dsi.services.runtime.disclosure import BUILTIN_NAME, EndpointLabels, public_model_name
from dsi.services.runtime.errors import InvalidArgument, Unavailable
from dsi.services.runtime.log_fields import escaped
from dsi.services.runtime.serving import GrpcServer, ServerOptions
from dsi.services.runtime.validation import GenerateLimits
from dsi.tls import ClientTLS, CredentialsError, bearer_metadata, client_tls, first_key, read_pem
from dsi.v1 import common_pb2, orchestrator_pb2, orchestrator_pb2_grpc

pytestmark = pytest.mark.unit

SERVICE = orchestrator_pb2.DESCRIPTOR.services_by_name["OrchestratorService"].full_name
PEM = b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"


# --- log fields ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("raw", "logged"), [
    ("req-1", "req-1"),
    ("a\nb", "a\\nb"),
    ("a\r\nINFO forged", "a\\r\\nINFO forged"),
    ("\x1b[2Jcleared", "\\x1b[2Jcleared"),
    ("line\u2028separator", "line\\u2028separator"),
    ("back\\slash", "back\\\\slash"),
    ("tab\there", "tab\\there"),
    ("ünïcode ok", "ünïcode ok"),
])
def test_logged_fields_cannot_start_a_line_or_drive_a_terminal(raw: str, logged: str) -> None:
    out = escaped(raw)
    assert out == logged
    assert out.isprintable()


def test_logged_fields_are_bounded() -> None:
    assert escaped("x" * 1000, limit=10) == "x" * 10 + "..."
    assert escaped(None) == "None"


# --- API keys -----------------------------------------------------------------------------------------


def test_a_key_file_holds_one_key_per_line(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    path.write_text("# comment\n  first  \n\nsecond\n#not-a-key\n")
    keys = ApiKeys(path=path)
    assert keys.keys == ("first", "second")
    assert keys.accepts("first") and keys.accepts("second")
    assert not keys.accepts("#not-a-key") and not keys.accepts("") and not keys.accepts(None)
    assert not keys.accepts("firs") and not keys.accepts("first2") and not keys.accepts("FIRST")
    assert bearer_token("Bearer abc") == "abc" and bearer_token("bearer  abc ") == "abc"
    assert bearer_token("Basic abc") is None and bearer_token("Bearer") is None and bearer_token("abc") is None


def test_every_key_is_compared_in_constant_time(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    path.write_text("alpha\nbeta\ngamma\n")
    keys = ApiKeys(path=path)
    with mock.patch.object(auth.hmac, "compare_digest", wraps=hmac.compare_digest) as compare:
        assert keys.accepts("alpha")
        # No early exit on a match: every key is compared, whichever one matches.
        assert [c.args[1] for c in compare.call_args_list] == [b"alpha", b"beta", b"gamma"]
        compare.reset_mock()
        assert not keys.accepts("delta")
        assert compare.call_count == 3
    assert auth.hmac is hmac  # the module the patch replaced is the one compared with


def test_a_key_file_is_re_read_when_it_changes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(auth, "RELOAD_CHECK_S", 0.0)
    path = tmp_path / "keys"
    path.write_text("old\n")
    keys = ApiKeys(path=path)
    assert keys.accepts("old")
    path.write_text("old\nnew-one\n")
    assert keys.accepts("new-one")
    path.write_text("new-one\n")
    assert not keys.accepts("old") and keys.accepts("new-one")
    path.unlink()  # a secret being swapped: the last keys stay
    with caplog.at_level(logging.WARNING):
        assert keys.accepts("new-one")
    assert "keeping its last 1 keys" in caplog.text
    path.write_text("# every key revoked\n")
    assert not keys.accepts("new-one")  # a file without keys accepts none


def test_a_key_file_that_cannot_be_used_stops_the_start(tmp_path: Path) -> None:
    with pytest.raises(ApiKeyError, match="cannot read"):
        ApiKeys(path=tmp_path / "missing")
    (tmp_path / "empty").write_text("# nothing\n")
    with pytest.raises(ApiKeyError, match="holds no key"):
        ApiKeys(path=tmp_path / "empty")
    assert ApiKeys.optional() is None and ApiKeys.optional([""]) is None
    assert ApiKeys.optional(["k"]) is not None


def test_client_side_keys_and_credentials(tmp_path: Path) -> None:
    assert bearer_metadata(None) == () and bearer_metadata("") == ()
    assert bearer_metadata("k1") == (("authorization", "Bearer k1"),)
    for bad in ("a\nb", "a b", "ké"):
        with pytest.raises(CredentialsError):
            bearer_metadata(bad)
    (tmp_path / "keys").write_text("# first line\n\nfirst-key\nsecond\n")
    assert first_key(tmp_path / "keys") == "first-key"
    (tmp_path / "ca.crt").write_bytes(PEM)
    (tmp_path / "not-pem").write_text("hello")
    assert read_pem(tmp_path / "ca.crt", "ca") == PEM and read_pem(PEM, "ca") == PEM and read_pem("", "ca") is None
    with pytest.raises(CredentialsError, match="ca: .* is not a PEM file"):
        read_pem(tmp_path / "not-pem", "ca")
    with pytest.raises(CredentialsError, match="--x-ca: cannot read"):
        ClientTLS.load(tmp_path / "missing", what="--x-")
    with pytest.raises(CredentialsError, match="cert and key go together"):
        ClientTLS.load(cert=PEM)
    assert client_tls() is None
    assert client_tls(tls=True) == ClientTLS()  # the system's roots
    tls = ClientTLS.load(PEM, server_name="fallback")
    tls.names_by_address["10.0.0.5:50061"] = "targets"
    assert tls.options("10.0.0.5:50061") == [("grpc.ssl_target_name_override", "targets")]
    assert tls.options("drafter:50071") == [("grpc.ssl_target_name_override", "fallback")]
    assert ClientTLS(PEM).options("drafter:50071") == []


def test_targets_found_by_name_are_checked_against_that_name() -> None:
    async def resolve(host: str, port: int) -> list[str]:
        return [f"10.0.0.{i}:{port}" for i in (1, 2)]

    tls = ClientTLS(PEM)
    assert naming_resolver(None, resolve) is resolve  # plaintext: nothing to record
    async def resolve_through() -> list[str]:
        return await naming_resolver(tls, resolve)("dsi-target", 50061)

    found = asyncio.run(resolve_through())
    assert found == ["10.0.0.1:50061", "10.0.0.2:50061"]
    assert tls.names_by_address == {"10.0.0.1:50061": "dsi-target", "10.0.0.2:50061": "dsi-target"}


# --- the interceptor and the orchestrator's public face, on an in-process server -----------------------


class FakeOrchestratorService(orchestrator_pb2_grpc.OrchestratorServiceServicer):
    async def Generate(self, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        yield orchestrator_pb2.GenerateResponse(text="ok")

    async def Info(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return orchestrator_pb2.OrchestratorInfoResponse(max_new_tokens_limit=7)


def run_with_server(servicer: Any, check: Callable[[grpc.aio.Channel], Awaitable[None]],
                    interceptors: list[grpc.aio.ServerInterceptor] | None = None, reflection: bool = True) -> None:
    async def main() -> None:
        server = GrpcServer(ServerOptions(reflection=reflection), [SERVICE], "test", interceptors or [])
        orchestrator_pb2_grpc.add_OrchestratorServiceServicer_to_server(servicer, server.server)
        port = await server.start()
        await server.set_serving()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                await check(channel)
        finally:
            await server.server.stop(None)

    asyncio.run(main())


async def _code(call: Any) -> tuple[grpc.StatusCode, str]:
    try:
        if hasattr(call, "__aiter__"):
            async for _ in call:
                pass
        else:
            await call
    except grpc.aio.AioRpcError as exc:
        return exc.code(), exc.details() or ""
    return grpc.StatusCode.OK, ""


def test_every_method_but_health_needs_a_valid_key(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    path.write_text("sesame\n")
    interceptor = ApiKeyInterceptor(ApiKeys(path=path))

    async def check(channel: grpc.aio.Channel) -> None:
        stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
        generate = orchestrator_pb2.GenerateRequest(prompt="x")
        for metadata in ((), (("authorization", "Bearer wrong"),), (("authorization", "sesame"),),
                         (("authorization", "Basic sesame"),), (("x-api-key", "sesame"),)):
            for call in (stub.Generate(generate, metadata=metadata, timeout=10),
                         stub.Info(orchestrator_pb2.OrchestratorInfoRequest(), metadata=metadata, timeout=10)):
                code, details = await _code(call)
                assert code == grpc.StatusCode.UNAUTHENTICATED, metadata
                assert details == UNAUTHENTICATED_MESSAGE  # nothing about the keys
        # An unauthenticated caller's bytes are never parsed: UNAUTHENTICATED, not INVALID_ARGUMENT.
        raw = channel.unary_unary(f"/{SERVICE}/Info")
        assert (await _code(raw(b"\xff" * 6, timeout=10)))[0] == grpc.StatusCode.UNAUTHENTICATED
        reflect = channel.stream_stream("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo")
        assert (await _code(reflect(iter([b""]), timeout=10)))[0] == grpc.StatusCode.UNAUTHENTICATED
        good = (("authorization", "Bearer sesame"),)
        assert [m.text async for m in stub.Generate(generate, metadata=good, timeout=10)] == ["ok"]
        assert (await stub.Info(orchestrator_pb2.OrchestratorInfoRequest(), metadata=good)).max_new_tokens_limit == 7
        assert (await raw(b"\xff" * 6, metadata=good, timeout=10).code()) == grpc.StatusCode.INVALID_ARGUMENT
        # Health checks stay open for probes and load balancers.
        health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.SERVING

    run_with_server(FakeOrchestratorService(), check, [interceptor])


TARGET_ADDRESSES = ["10.1.2.3:50061", "10.1.2.4:50061"]


def _attached(expose_internals: bool, failure: Exception | None) -> OrchestratorServicer:
    snapshot = [TargetSnapshot(a, healthy=i == 0, busy=False, busy_s=0.0, last_error="", sessions=0)
                for i, a in enumerate(TARGET_ADDRESSES)]

    async def generate(params: Any) -> AsyncIterator[Chunk]:
        if failure is not None:
            raise failure
        yield Chunk(tokens=[CommittedToken(5, 3, Source.TARGET, TARGET_ADDRESSES[1])], text="hi")

    fake = SimpleNamespace(limits=GenerateLimits(vocab_size=100, max_new_tokens=8, max_prompt_tokens=64,
                                                 max_lookahead=8, default_lookahead=3),
                           pool=SimpleNamespace(addresses=list(TARGET_ADDRESSES), snapshot=lambda: snapshot),
                           generate=generate)
    servicer = OrchestratorServicer(expose_internals)
    model = common_pb2.ModelInfo(model="/srv/models/secret-target", vocab_size=100)
    drafter = common_pb2.ModelInfo(model="/srv/models/secret-drafter", vocab_size=100)
    servicer.attach(fake, model, drafter, "10.9.9.9:50071")  # type: ignore[arg-type]
    return servicer


def _run_orchestrator(servicer: OrchestratorServicer) -> tuple[Any, list[Any], tuple[grpc.StatusCode, str]]:
    out: dict[str, Any] = {}

    async def check(channel: grpc.aio.Channel) -> None:
        stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
        out["info"] = await stub.Info(orchestrator_pb2.OrchestratorInfoRequest(), timeout=10)
        request = orchestrator_pb2.GenerateRequest(prompt="x", max_new_tokens=2)
        try:
            out["messages"] = [m async for m in stub.Generate(request, timeout=10)]
            out["status"] = (grpc.StatusCode.OK, "")
        except grpc.aio.AioRpcError as exc:
            out["messages"], out["status"] = [], (exc.code(), exc.details() or "")

    run_with_server(servicer, check, reflection=False)
    return out["info"], out["messages"], out["status"]


def test_info_and_tokens_name_no_internal_endpoint_by_default() -> None:
    info, messages, status = _run_orchestrator(_attached(False, None))
    text = str(info)
    assert "10." not in text and "/srv/models" not in text, text
    assert [t.address for t in info.targets] == ["target-1", "target-2"]  # in the order configured
    assert [t.healthy for t in info.targets] == [True, False]
    assert info.target_model.model == "secret-target" and info.drafter_model.model == "secret-drafter"
    assert info.target_model.vocab_size == 100 and info.drafter_address == ""
    assert status[0] == grpc.StatusCode.OK and [t.target for t in messages[0].tokens] == ["target-2"]
    info, messages, _ = _run_orchestrator(_attached(True, None))
    assert [t.address for t in info.targets] == TARGET_ADDRESSES and info.drafter_address == "10.9.9.9:50071"
    assert info.target_model.model == "/srv/models/secret-target"
    assert [t.target for t in messages[0].tokens] == [TARGET_ADDRESSES[1]]


def test_failures_of_the_targets_reach_clients_without_their_addresses(caplog: pytest.LogCaptureFixture) -> None:
    internal = f"no target instance reachable; endpoints tried: {TARGET_ADDRESSES[0]} (UNAVAILABLE)"
    with caplog.at_level(logging.WARNING):
        _, _, (code, details) = _run_orchestrator(_attached(False, Unavailable(internal)))
    assert code == grpc.StatusCode.UNAVAILABLE
    assert details == "no target instance reachable (1 of 2 healthy); retry later"
    assert TARGET_ADDRESSES[0] in caplog.text  # the operator's log keeps the whole story
    _, _, (code, details) = _run_orchestrator(_attached(False, RuntimeError(f"bug near {TARGET_ADDRESSES[0]}")))
    assert code == grpc.StatusCode.INTERNAL and "10." not in details
    # The orchestrator's own refusals are the caller's business: as they are.
    _, _, (code, details) = _run_orchestrator(_attached(False, InvalidArgument("prompt", "too long")))
    assert (code, details) == (grpc.StatusCode.INVALID_ARGUMENT, "prompt: too long")
    _, _, (code, details) = _run_orchestrator(_attached(True, Unavailable(internal)))
    assert details == internal  # --expose-internals


def test_a_request_id_is_escaped_where_a_failure_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    """A request that fails before validation (the orchestrator still starting) logs its raw id."""
    servicer = OrchestratorServicer()  # not attached: UNAVAILABLE, logged with the request id

    async def check(channel: grpc.aio.Channel) -> None:
        stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
        request = orchestrator_pb2.GenerateRequest(request_id="r1\nERROR forged line", prompt="x")
        assert (await _code(stub.Generate(request, timeout=10)))[0] == grpc.StatusCode.UNAVAILABLE

    with caplog.at_level(logging.WARNING):
        run_with_server(servicer, check)
    assert "request r1\\nERROR forged line:" in caplog.text
    assert not [r for r in caplog.records if "\n" in r.getMessage()]


def test_public_names_and_labels() -> None:
    from dsi.default_pair import PRETRAINED

    assert public_model_name(str(PRETRAINED / "target")) == BUILTIN_NAME
    assert public_model_name("/data/models/llama-7b") == "llama-7b"
    assert public_model_name("./models/x/") == "x"
    assert public_model_name("meta-llama/Llama-3.2-1B") == "meta-llama/Llama-3.2-1B"
    labels = EndpointLabels("target")
    assert [labels(a) for a in ("b:1", "a:1", "b:1", "")] == ["target-1", "target-2", "target-1", ""]


# --- settings and defaults ------------------------------------------------------------------------------


def _parse(args: list[str], env: dict[str, str] | None = None) -> argparse.Namespace:
    from dsi.cli import build_parser

    clean = {k: v for k, v in os.environ.items() if not k.startswith("DSI_")}
    with mock.patch.dict(os.environ, {**clean, **(env or {})}, clear=True):
        return build_parser().parse_args(args)


@pytest.fixture()
def pem_files(tmp_path: Path) -> dict[str, str]:
    files = {}
    for name in ("ca.crt", "srv.crt", "srv.key", "cli.crt", "cli.key", "keys"):
        (tmp_path / name).write_bytes(b"k1\n" if name == "keys" else PEM)
        files[name] = str(tmp_path / name)
    return files


def test_tls_and_key_flags_with_environment_fallbacks(pem_files: dict[str, str]) -> None:
    from dsi.services.model.settings import model_server_settings
    from dsi.services.orchestrator.settings import settings_from_args

    f = pem_files
    target = model_server_settings(_parse(["serve", "target"], {
        "DSI_TARGET_TLS_CERT": f["srv.crt"], "DSI_TARGET_TLS_KEY": f["srv.key"],
        "DSI_TARGET_TLS_CLIENT_CA": f["ca.crt"]}), "target")
    assert target.server.tls is not None and target.server.tls.mutual and target.server.reflection
    plain = model_server_settings(_parse(["serve", "drafter"]), "drafter")
    assert plain.server.tls is None and plain.server.reflection  # internal: reflection kept
    orch = settings_from_args(_parse(["serve", "orchestrator", "--targets", "t:1", "--tls-cert", f["srv.crt"],
                                      "--tls-key", f["srv.key"]], {
        "DSI_ORCHESTRATOR_UPSTREAM_TLS_CA": f["ca.crt"], "DSI_ORCHESTRATOR_UPSTREAM_TLS_CERT": f["cli.crt"],
        "DSI_ORCHESTRATOR_UPSTREAM_TLS_KEY": f["cli.key"], "DSI_ORCHESTRATOR_API_KEY_FILE": f["keys"]}))
    assert orch.server.tls is not None and not orch.server.tls.mutual
    assert orch.upstream_tls == ClientTLS(PEM, PEM, PEM) and orch.api_key_file == f["keys"]
    assert not orch.expose_internals and not orch.server.reflection  # the public port's defaults
    exposed = settings_from_args(_parse(["serve", "orchestrator", "--targets", "t:1"],
                                        {"DSI_ORCHESTRATOR_EXPOSE_INTERNALS": "1"}))
    assert exposed.expose_internals and exposed.server.reflection and exposed.upstream_tls is None
    gen = _parse(["generate", "hi"], {"DSI_CA": f["ca.crt"], "DSI_API_KEY": "k1"})
    assert (gen.ca, gen.api_key, gen.cert, gen.tls) == (f["ca.crt"], "k1", "", False)
    health = _parse(["health", "127.0.0.1:1", "--cert", f["cli.crt"], "--key", f["cli.key"]])
    assert health.cert == f["cli.crt"] and not hasattr(health, "api_key")  # health needs no key


@pytest.mark.parametrize(("args", "message"), [
    (["--tls-cert", "{srv.crt}"], "--tls-cert and --tls-key go together"),
    (["--tls-client-ca", "{ca.crt}"], "--tls-client-ca needs --tls-cert"),
    (["--tls-cert", "{missing}", "--tls-key", "{srv.key}"], "--tls-cert: cannot read"),
    (["--upstream-tls-cert", "{cli.crt}"], "--upstream-tls-cert and --upstream-tls-key go together"),
    (["--upstream-tls-server-name", "x"], "--upstream-tls-server-name needs"),
])
def test_bad_tls_settings_stop_the_start_naming_the_flag(pem_files: dict[str, str], args: list[str],
                                                         message: str) -> None:
    from dsi.services.orchestrator.settings import settings_from_args

    files = {**pem_files, "missing": "/nonexistent/x.crt"}
    ns = _parse(["serve", "orchestrator", "--targets", "t:1",
                 *(files[a[1:-1]] if a.startswith("{") else a for a in args)])
    with pytest.raises(SystemExit, match=message):
        settings_from_args(ns)


def test_the_gateway_reads_its_keys_and_orchestrator_credentials(pem_files: dict[str, str]) -> None:
    from dsi.services.gateway.settings import settings_from_args

    f = pem_files
    s = settings_from_args(_parse(["serve", "gateway"], {
        "DSI_GATEWAY_API_KEY_FILE": f["keys"], "DSI_GATEWAY_ORCHESTRATOR_CA": f["ca.crt"],
        "DSI_GATEWAY_ORCHESTRATOR_API_KEY_FILE": f["keys"]}))
    assert (s.api_key_file, s.orchestrator_ca, s.orchestrator_api_key) == (f["keys"], f["ca.crt"], "k1")
    for env, message in (({"DSI_GATEWAY_API_KEY_FILE": "/nonexistent"}, "cannot read"),
                         ({"DSI_GATEWAY_ORCHESTRATOR_CERT": f["cli.crt"]}, "--orchestrator-cert and")):
        with pytest.raises(SystemExit, match=message):
            settings_from_args(_parse(["serve", "gateway"], env))


def test_every_listener_binds_loopback_unless_told_otherwise() -> None:
    from dsi.services.gateway.settings import settings_from_args as gateway_settings
    from dsi.services.model.settings import model_server_settings
    from dsi.services.orchestrator.settings import settings_from_args

    assert ServerOptions().host == "127.0.0.1"
    for role in ("target", "drafter"):
        assert model_server_settings(_parse(["serve", role]), role).server.host == "127.0.0.1"
    assert settings_from_args(_parse(["serve", "orchestrator", "--targets", "t:1"])).server.host == "127.0.0.1"
    assert gateway_settings(_parse(["serve", "gateway"])).server.host == "127.0.0.1"
    assert _parse(["up"]).host == "127.0.0.1"
    with mock.patch("prometheus_client.start_http_server") as start:  # metrics bind the service's own host
        from dsi.services.runtime.serving import start_metrics_server

        start_metrics_server(9999, object())
    assert start.call_args.kwargs["addr"] == "127.0.0.1"


def test_a_local_cluster_hides_internals_once_secured(tmp_path: Path) -> None:
    assert ClusterSpec().exposes_internals  # a development cluster on loopback, as the benchmarks read it
    assert not ClusterSpec(api_key_file="k").exposes_internals
    assert not ClusterSpec(tls_dir="d").exposes_internals
    assert ClusterSpec(tls_dir="d", expose_internals=True).exposes_internals
    with pytest.raises(ClusterError, match="make-certs.sh"):
        ClusterTLS(tmp_path)


def test_the_orchestrator_refusing_the_gateways_own_key_is_a_server_error() -> None:
    from dsi.client import DSIError
    from dsi.services.gateway.errors import from_dsi_error

    for code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
        error = from_dsi_error(DSIError(code, "a valid API key is required"), {}, "req")
        assert error.status == 500 and error.type == "server_error"  # not the HTTP client's key
