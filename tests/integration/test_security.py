"""Security as a client and an operator see it, through real processes: TLS on every service with
certificates made by scripts/make-certs.sh, mutual TLS between the orchestrator and the model services
(and, here, for the orchestrator's clients), API keys (rotated while serving), health checks without a
key, Info without internal addresses or paths, no reflection on the public port, escaped log fields,
and `dsi up --tls-dir --api-key-file` with the HTTP gateway."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from dsi.client import Client, DSIError
from dsi.cluster import check_health
from dsi.tls import ClientTLS, sync_channel
from dsi.v1 import target_pb2, target_pb2_grpc
from tests.integration.procs import Service, start_service

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(shutil.which("openssl") is None, reason="scripts/make-certs.sh needs the openssl command"),
]

ROOT = Path(__file__).resolve().parents[2]
PROMPT = "def fibonacci(n):"
N = 8


def make_certs(directory: Path) -> Path:
    done = subprocess.run(["bash", str(ROOT / "scripts" / "make-certs.sh"), str(directory)], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return directory


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_certs(tmp_path_factory.mktemp("tls") / "certs")


@pytest.fixture(scope="module")
def secured(tiny_pair: tuple[Path, Path], certs: Path, tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[dict[str, Any]]:
    """A target and a drafter that require the orchestrator's certificate (internal CA), and an
    orchestrator that serves TLS, requires a client certificate of the public CA and an API key."""
    target_dir, drafter_dir = tiny_pair
    logs = tmp_path_factory.mktemp("security-logs")
    keys = logs / "api-keys"
    keys.write_text("# rotated by the tests\nold-key\n\nnew-key\n")
    c = {name: str(certs / name) for name in os.listdir(certs)}
    started: list[Service] = []
    try:
        for role, model in (("target", target_dir), ("drafter", drafter_dir)):
            started.append(start_service(role, [
                "--model", str(model), "--threads", "1", "--tls-cert", c[f"{role}.crt"], "--tls-key", c[f"{role}.key"],
                "--tls-client-ca", c["internal-ca.crt"]], logs))
        target, drafter = started
        orch = start_service("orchestrator", [
            "--targets", target.address, "--drafter", drafter.address,
            "--tls-cert", c["orchestrator.crt"], "--tls-key", c["orchestrator.key"], "--tls-client-ca", c["ca.crt"],
            "--upstream-tls-ca", c["internal-ca.crt"], "--upstream-tls-cert", c["orchestrator-client.crt"],
            "--upstream-tls-key", c["orchestrator-client.key"], "--api-key-file", str(keys)], logs)
        started.append(orch)
        yield {"target": target, "drafter": drafter, "orchestrator": orch, "certs": c, "keys": keys,
               "target_dir": target_dir}
    finally:
        for s in reversed(started):
            s.stop()


def client(s: dict[str, Any], **overrides: Any) -> Client:
    c = s["certs"]
    kwargs: dict[str, Any] = dict(ca=c["ca.crt"], cert=c["client.crt"], key=c["client.key"], api_key="new-key")
    kwargs.update(overrides)
    return Client(s["orchestrator"].address, timeout=60, **kwargs)


def test_generate_over_mutual_tls_with_a_key(secured: dict[str, Any]) -> None:
    with client(secured) as c:
        dsi = c.generate(PROMPT, max_new_tokens=N, mode="dsi", ignore_eos=True)
        nonsi = c.generate(PROMPT, max_new_tokens=N, mode="nonsi", ignore_eos=True)
    assert len(dsi.token_ids) == N and dsi.token_ids == nonsi.token_ids
    assert dsi.stats["windows_dispatched"] > 0  # verified by the target over mutual TLS


@pytest.mark.parametrize("case", ["plaintext", "no client certificate", "wrong CA", "internal CA's certificate"])
def test_a_client_without_the_right_certificates_is_refused(secured: dict[str, Any], case: str) -> None:
    c = secured["certs"]
    overrides: dict[str, Any] = {
        "plaintext": dict(ca=None, cert=None, key=None),
        "no client certificate": dict(cert=None, key=None),
        "wrong CA": dict(ca=c["internal-ca.crt"]),
        "internal CA's certificate": dict(cert=c["orchestrator-client.crt"], key=c["orchestrator-client.key"]),
    }[case]
    with client(secured, **overrides) as refused, pytest.raises(DSIError) as err:
        refused.generate(PROMPT, max_new_tokens=2)
    assert err.value.code == grpc.StatusCode.UNAVAILABLE, err.value  # the handshake fails: no method ran


def _target_info(address: str, tls: ClientTLS | None) -> Any:
    with sync_channel(address, tls) as channel:
        return target_pb2_grpc.TargetServiceStub(channel).Info(target_pb2.TargetInfoRequest(), timeout=10)


def test_model_services_accept_only_certificates_of_the_internal_ca(secured: dict[str, Any]) -> None:
    c, address = secured["certs"], secured["target"].address
    assert _target_info(address, ClientTLS.load(c["internal-ca.crt"], c["orchestrator-client.crt"],
                                                c["orchestrator-client.key"])).model.vocab_size > 0
    for tls in (None, ClientTLS.load(c["internal-ca.crt"]),  # plaintext; TLS without a client certificate
                ClientTLS.load(c["internal-ca.crt"], c["client.crt"], c["client.key"])):  # the public CA's client
        with pytest.raises(grpc.RpcError) as err:
            _target_info(address, tls)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]
    # What the container health checks run: `dsi health` with the service's own certificate.
    own = ["--ca", c["internal-ca.crt"], "--cert", c["target.crt"], "--key", c["target.key"]]
    probe = [sys.executable, "-m", "dsi.cli", "health", address, "--timeout-s", "10"]
    assert subprocess.run([*probe, *own], capture_output=True, text=True, timeout=60).stdout.strip() == "SERVING"
    assert subprocess.run(probe, capture_output=True, text=True, timeout=60).returncode == 1


def test_api_keys_are_required_rotate_and_health_stays_open(secured: dict[str, Any]) -> None:
    for key in (None, "wrong-key", "new-ke", "new-key-and-more"):
        with client(secured, api_key=key) as c:
            for call in (lambda: c.info(), lambda: c.generate(PROMPT, max_new_tokens=2)):
                with pytest.raises(DSIError) as err:
                    call()
                assert err.value.code == grpc.StatusCode.UNAUTHENTICATED, err.value
                assert "old-key" not in err.value.details and "new-key" not in err.value.details
    for key in ("old-key", "new-key"):
        with client(secured, api_key=key) as c:
            assert c.generate(PROMPT, max_new_tokens=2).token_ids
    # Health checks need no key (probes, load balancers); TLS still applies.
    c = secured["certs"]
    tls = ClientTLS.load(c["ca.crt"], c["client.crt"], c["client.key"])
    assert check_health(secured["orchestrator"].address, timeout_s=10, tls=tls)
    # Rotation: the file is re-read while serving; a removed key stops working, a new one starts.
    secured["keys"].write_text("new-key\nnewest-key\n")
    deadline = time.monotonic() + 15
    while True:
        try:
            with client(secured, api_key="old-key") as old:
                old.info()
        except DSIError as exc:
            assert exc.code == grpc.StatusCode.UNAUTHENTICATED
            break
        assert time.monotonic() < deadline, "the removed key is still accepted"
        time.sleep(0.2)
    with client(secured, api_key="newest-key") as newest:
        assert newest.info()["max_new_tokens_limit"]


def test_info_and_tokens_name_no_internal_endpoint_and_reflection_is_off(secured: dict[str, Any]) -> None:
    internal = [secured["target"].address, secured["drafter"].address, str(secured["target_dir"])]
    with client(secured) as c:
        info = c.info()
        tokens = c.generate(PROMPT, max_new_tokens=N, ignore_eos=True).tokens
    text = json.dumps(info)
    assert not [x for x in internal if x in text], text
    assert [t["address"] for t in info["targets"]] == ["target-1"] and info["targets"][0]["healthy"]
    assert info["target_model"]["model"] == secured["target_dir"].name  # the public name, not the path
    assert not info.get("drafter_address")
    assert {t.target for t in tokens} == {"target-1"}
    certs = secured["certs"]
    tls = ClientTLS.load(certs["ca.crt"], certs["client.crt"], certs["client.key"])
    with sync_channel(secured["orchestrator"].address, tls) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        with pytest.raises(grpc.RpcError) as err:
            list(stub.ServerReflectionInfo(iter([request]), timeout=10,
                                           metadata=(("authorization", "Bearer new-key"),)))
        assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED  # type: ignore[attr-defined]


def test_a_request_id_with_a_newline_is_logged_escaped(secured: dict[str, Any]) -> None:
    c = secured["certs"]
    tls = ClientTLS.load(c["internal-ca.crt"], c["orchestrator-client.crt"], c["orchestrator-client.key"])
    forged = "evil\nFORGED WARNING dsi.services.runtime.errors: request ok"
    with sync_channel(secured["target"].address, tls) as channel:
        stub = target_pb2_grpc.TargetServiceStub(channel)
        with pytest.raises(grpc.RpcError) as err:  # a prefix this target does not hold: refused and logged
            stub.Verify(target_pb2.VerifyRequest(request_id=forged, session_id="nobody\r\x1b[2J", token_ids=[1, 2],
                                                 first_position=5, prefix_length=5), timeout=10)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION  # type: ignore[attr-defined]
    log = secured["target"].log
    deadline = time.monotonic() + 10
    while "evil\\nFORGED" not in log.read_text(errors="replace"):
        assert time.monotonic() < deadline, log.read_text(errors="replace")[-2000:]
        time.sleep(0.1)
    lines = log.read_text(errors="replace").splitlines()
    assert not [line for line in lines if line.startswith("FORGED")]
    assert not [line for line in lines if "\x1b" in line or "\r" in line]


def _http(url: str, key: str | None = None, body: dict[str, Any] | None = None) -> tuple[int, dict[str, Any]]:
    headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {key}"} if key else {})
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_dsi_up_with_a_certificate_directory_and_a_key_file(tiny_pair: tuple[Path, Path], certs: Path,
                                                             tmp_path: Path) -> None:
    target_dir, drafter_dir = tiny_pair
    keys = tmp_path / "keys"
    keys.write_text("up-key\n")
    proc = subprocess.Popen(
        [sys.executable, "-m", "dsi.cli", "up", "--target-model", str(target_dir), "--drafter-model", str(drafter_dir),
         "--targets", "1", "--port", "0", "--http-port", "0", "--tls-dir", str(certs), "--api-key-file", str(keys),
         "--log-dir", str(tmp_path / "logs")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        assert proc.stdout is not None
        lines = [proc.stdout.readline(), proc.stdout.readline()]
        assert lines[0].startswith("orchestrator listening on "), (lines, proc.stderr.read() if proc.stderr else "")
        address, url = lines[0].split()[-1], lines[1].split()[-1]
        with Client(address, timeout=60, ca=certs / "ca.crt", api_key="up-key") as c:
            expected = c.generate(PROMPT, max_new_tokens=N, ignore_eos=True).text
            assert [t["address"] for t in c.info()["targets"]] == ["target-1"]  # a secured cluster hides them
        with Client(address, timeout=10) as plain, pytest.raises(DSIError):
            plain.info()
        assert _http(url.removesuffix("/v1") + "/health")[0] == 200  # open, for probes
        status, body = _http(url + "/models")
        assert status == 401 and body["error"]["type"] == "authentication_error"
        status, body = _http(url + "/models", key="up-key")
        assert status == 200, body
        status, body = _http(url + "/completions", key="up-key", body={
            "model": body["data"][0]["id"], "prompt": PROMPT, "max_tokens": N, "temperature": 0, "ignore_eos": True})
        assert status == 200 and body["choices"][0]["text"] == expected  # gateway -> orchestrator: TLS + key
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
