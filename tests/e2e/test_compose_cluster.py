"""The docker-compose cluster (CPU override) built from this checkout, across real containers: two
targets found through their shared DNS alias, the drafter and the orchestrator, driven through the
SDK on its published port. Checked: every service healthy, non-root, only the public APIs
published; DSI == SI == non-SI == the built-in pair decoded in-process, greedy and seeded; a target
killed mid-stream, the drafter stopped, a target cut off the network, a target service scaled up
without a restart; `docker compose down` leaves nothing behind. Tests run in file order on one
cluster: each restores what it broke.

Skipped, with the reason, where no Docker engine (or no compose v2 plugin) answers: `make e2e` runs
them with an engine it finds or starts (scripts/docker-engine.sh)."""

from __future__ import annotations

import os
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from unittest import mock

import pytest

from tests.e2e.cluster import (
    COMPOSE_FILES,
    ROOT,
    ComposeCluster,
    compose_cli_unavailable,
    docker_unavailable,
    poll,
    record_timing,
    results_dir,
)
from tests.e2e.conftest import ACTIVE_CLUSTER

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(1800)]

PRETRAINED = ROOT / "dsi" / "pretrained"
PROMPTS = ["def fibonacci(n):", "import os\nimport sys\n", "The quick brown fox"]
SEEDED: dict[str, Any] = {"temperature": 0.8, "top_k": 50, "top_p": 0.95, "seed": 1234}
N_EQUIV = 32  # tokens per equivalence check
N_LONG = 400  # tokens of the requests that something is broken in the middle of
# The only ports a host may reach, per service: the public APIs. The model services publish none.
PUBLISHED = {"orchestrator": "50051/tcp", "gateway": "8000/tcp"}
ORCHESTRATOR_DEADLINE_S = 15.0  # a window stuck on a partitioned target is retried after this


@pytest.fixture(scope="module")
def cluster(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ComposeCluster]:
    reason = docker_unavailable()
    if reason:
        pytest.skip(f"e2e compose cluster needs Docker: {reason} (`make e2e` finds or starts an engine)")
    from testcontainers.compose import DockerCompose

    project = f"dsi-e2e-{os.getpid()}"  # never touch a user's own `dsi` project
    env = {
        "COMPOSE_PROJECT_NAME": project,
        "DSI_PORT": "0",  # Docker picks a free host port, read back below: no port picked here and raced for
        "DSI_HTTP_PORT": "0",  # the gateway's, likewise (where the compose file has one)
        "DSI_MODELS_DIR": str(tmp_path_factory.mktemp("models")),  # the built-in pair; keep ./ clean
        "DSI_THREADS": "1",
        # Re-resolve the targets' alias every 5 s (a scaled replica is found well within 15 s, and a
        # killed target stays listed, as down, until then); health-check containers every 5 s.
        "DSI_RESOLVE_INTERVAL_S": "5",
        "DSI_HEALTH_INTERVAL": "5s",
        # Targets pad each forward pass to 20 ms, so that a request lasts long enough to break
        # something in its middle on a fast machine too.
        "DSI_TARGET_EMULATE_LATENCY_MS": "20:20",
        "DSI_ORCHESTRATOR_DEADLINE_S": str(ORCHESTRATOR_DEADLINE_S),
        # The tests read the targets' addresses and the checkpoints' paths from Info and the tokens.
        "DSI_EXPOSE_INTERNALS": "1",
    }
    with mock.patch.dict(os.environ, env):
        compose = DockerCompose(ROOT, compose_file_name=COMPOSE_FILES, build=True, wait=True)
        started = time.monotonic()
        try:
            compose.start()
        except subprocess.CalledProcessError as exc:
            out, err = _logs(compose)
            compose.stop()
            pytest.fail(f"`docker compose up` failed: {exc.stderr.decode(errors='replace')[-3000:]}\n"
                        f"service logs:\n{out[-6000:]}\n{err[-3000:]}")
        record_timing("docker compose up --build --wait (2 targets, drafter, orchestrator)", time.monotonic() - started)
        c = ComposeCluster(project, env)
        request.config.stash[ACTIVE_CLUSTER] = c
        try:
            port = compose.get_service_port("orchestrator", 50051)
            if not port:
                pytest.fail("docker compose published no host port for the orchestrator's 50051")
            c.address = f"127.0.0.1:{port}"
            yield c
        finally:
            del request.config.stash[ACTIVE_CLUSTER]
            compose.stop()


def _logs(compose: object) -> tuple[str, str]:
    try:
        return compose.get_logs()  # type: ignore[attr-defined, no-any-return]
    except Exception as exc:  # noqa: BLE001 - best effort, for the failure message only
        return "", f"(no logs: {exc})"


# --- in-process reference: the built-in pair's target, decoded on the host ---------------------------


@dataclass
class Reference:
    """The built-in target loaded in-process, and the prompts tokenized with its tokenizer."""

    model: Any
    prompts: list[list[int]]
    cache: dict[tuple[int, int, bool], list[int]] = field(default_factory=dict)

    def decode(self, prompt_index: int, n: int, seeded: bool) -> list[int]:
        """Target-only decoding, the whole sequence recomputed at every step (no KV cache), each token
        chosen by the shared greedy / Gumbel-coupled rule at its absolute position."""
        key = (prompt_index, n, seeded)
        if key not in self.cache:
            import torch

            from dsi.services.model.sampling import Sampling, coupled_choice

            sampling = Sampling(**SEEDED) if seeded else Sampling()
            seq = list(self.prompts[prompt_index])
            with torch.no_grad():
                for _ in range(n):
                    logits = self.model(torch.tensor([seq])).logits[0, -1:].float()  # [1, vocab]
                    seq.append(coupled_choice(logits, [len(seq)], sampling)[0])
            self.cache[key] = seq[len(self.prompts[prompt_index]) :]
        return self.cache[key]


@pytest.fixture(scope="module")
def reference() -> Reference:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(1)
    tokenizer = AutoTokenizer.from_pretrained(str(PRETRAINED / "target"))
    model = AutoModelForCausalLM.from_pretrained(str(PRETRAINED / "target"), dtype=torch.float32).eval()
    prompts = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
    return Reference(model, prompts)


def generate(cluster: ComposeCluster, prompt: list[int], mode: str, n: int, seeded: bool = False) -> Any:
    from dsi.client import Client

    with Client(cluster.address, timeout=300) as client:
        return client.generate(prompt, max_new_tokens=n, mode=mode, ignore_eos=True, **(SEEDED if seeded else {}))


def stream_and_break(cluster: ComposeCluster, prompt: list[int], n: int, after_tokens: int,
                     act: Any) -> tuple[list[int], dict[str, Any], float]:
    """Stream a DSI request; once ``after_tokens`` tokens are in, call ``act()`` (in a thread, so the
    stream keeps being read). Returns the tokens, the final stats and when ``act`` started."""
    from dsi.client import Client

    tokens: list[int] = []
    stats: dict[str, Any] = {}
    acted_at = 0.0
    worker: threading.Thread | None = None
    errors: list[BaseException] = []

    def run_act() -> None:
        try:
            act()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test's thread below
            errors.append(exc)

    with Client(cluster.address, timeout=300) as client:
        for delta in client.stream(prompt, max_new_tokens=n, mode="dsi", ignore_eos=True):
            tokens += [t.token_id for t in delta.tokens]
            if worker is None and len(tokens) >= after_tokens:
                acted_at = time.monotonic()
                worker = threading.Thread(target=run_act)
                worker.start()
            if delta.stats is not None:
                stats = delta.stats
    assert worker is not None, f"the request ended after {len(tokens)} tokens, before anything was broken"
    worker.join(timeout=300)
    if errors:
        raise errors[0]
    assert stats, f"the stream ended after {len(tokens)} tokens without its final stats"
    return tokens, stats, acted_at


def busy_target(cluster: ComposeCluster) -> str:
    """A target that has a window in flight right now (any healthy one if none is seen within 5 s)."""
    def probe() -> str | None:
        busy = [t["address"] for t in cluster.targets() if t.get("healthy") and t.get("in_flight", 0) > 0]
        return busy[0] if busy else None

    try:
        return poll("a target with a window in flight", probe, timeout_s=5, interval_s=0.02)
    except AssertionError:
        return cluster.healthy_targets()[0]


# --- the cluster as deployed ------------------------------------------------------------------------


SECURE = "docker-compose.secure.yml"


@pytest.mark.parametrize("files", [COMPOSE_FILES[:1], COMPOSE_FILES, [*COMPOSE_FILES[:1], SECURE],
                                   [*COMPOSE_FILES, SECURE]], ids=["gpu", "cpu", "gpu-secure", "cpu-secure"])
def test_compose_itself_accepts_the_files(files: list[str], tmp_path: Path) -> None:
    """Compose's own validation (no engine needed): schema, !reset, interpolation, secrets."""
    reason = compose_cli_unavailable()
    if reason:
        pytest.skip(reason)
    from dsi.cluster import CERT_FILES

    for name in (*CERT_FILES, "api-keys"):  # what scripts/make-certs.sh writes (contents do not matter here)
        (tmp_path / name).write_text("x\n")
    args = [a for f in files for a in ("-f", f)]
    done = subprocess.run(["docker", "compose", *args, "config", "--quiet"], cwd=ROOT, capture_output=True,
                          text=True, timeout=60, env={**os.environ, "DSI_TLS_DIR": str(tmp_path),
                                                      "DSI_API_KEY_FILE": str(tmp_path / "api-keys")})
    assert done.returncode == 0, done.stderr


def test_every_service_is_healthy_non_root_and_only_the_public_ports_are_published(cluster: ComposeCluster) -> None:
    containers = cluster.containers()
    services = sorted(c.labels["com.docker.compose.service"] for c in containers)
    assert services == sorted(cluster.compose("config", "--services").stdout.split())
    assert {"target-0", "target-1", "drafter", "orchestrator"} <= set(services)
    ps = cluster.compose("ps").stdout
    (results_dir() / "compose-ps.txt").write_text(ps)
    print(ps)
    for c in containers:
        assert cluster.health(c) == "healthy", f"{c.name}: {c.attrs['State'].get('Health')}"
        assert c.attrs["Config"]["User"].split(":")[0] not in ("", "0", "root"), c.attrs["Config"]["User"]
        uid = c.exec_run(["id", "-u"]).output.decode().strip()
        assert uid == "10001", f"{c.name} runs as uid {uid}"
        # Every process of the container, PID 1 (the init) included, runs as that user.
        top = c.top(ps_args="-o pid,uid,args")
        uids = {row[top["Titles"].index("UID")] for row in top["Processes"]}
        assert uids == {"10001"}, f"{c.name}: processes run as {uids}: {top['Processes']}"
        # The orchestrator's gRPC port (and the gateway's HTTP port, where the file has a gateway) on
        # loopback; no model service, nor anything else, is reachable from the host.
        published = {port: bound for port, bound in (c.attrs["NetworkSettings"]["Ports"] or {}).items() if bound}
        public = PUBLISHED.get(c.labels["com.docker.compose.service"])
        if public is None:
            assert not published, f"{c.name} publishes {published}"
        else:
            assert list(published) == [public], published
            assert {b["HostIp"] for b in published[public]} == {"127.0.0.1"}, published
    port = cluster.compose("port", "orchestrator", "50051").stdout.strip()
    assert port == cluster.address, (port, cluster.address)
    for service, internal in (("target-0", 50061), ("target-1", 50061), ("drafter", 50071)):
        done = cluster.compose("port", service, str(internal), check=False)
        assert done.returncode != 0 or done.stdout.strip() in ("", ":0"), f"{service} publishes {done.stdout}"


def test_both_targets_are_discovered_through_the_alias(cluster: ComposeCluster) -> None:
    expected = {cluster.target_address(c) for s in ("target-0", "target-1") for c in cluster.containers(s)}
    assert set(cluster.wait_for_healthy_targets(2, timeout_s=60)) == expected


@pytest.mark.parametrize("seeded", [False, True], ids=["greedy", "seeded"])
def test_dsi_equals_si_equals_non_si_equals_the_pair_in_process(
    cluster: ComposeCluster, reference: Reference, seeded: bool
) -> None:
    info = cluster.info()
    assert info["target_model"]["model"].endswith("pretrained/target"), "the cluster serves the built-in pair"
    assert info["drafter_model"]["model"].endswith("pretrained/drafter")
    accepted = 0
    for i, prompt in enumerate(reference.prompts):
        expected = reference.decode(i, N_EQUIV, seeded)
        for mode in ("nonsi", "si", "dsi"):
            got = generate(cluster, prompt, mode, N_EQUIV, seeded)
            assert got.token_ids == expected, f"{mode} differs from in-process decoding for {PROMPTS[i]!r}"
            assert got.stats["mode"] == mode and not got.stats["drafter_failed"]
            if mode != "nonsi":
                accepted += got.stats["drafts_accepted"]
    assert accepted > 0, "the drafter never got a draft accepted: DSI ran as non-SI"


# --- faults -----------------------------------------------------------------------------------------


def test_the_gateway_streams_an_openai_completion_equal_to_the_grpc_api(cluster: ComposeCluster) -> None:
    """The README's few lines of `openai` client code against the compose cluster's gateway."""
    from openai import OpenAI

    from dsi.client import Client

    address = cluster.compose("port", "gateway", "8000").stdout.strip()
    client = OpenAI(base_url=f"http://{address}/v1", api_key="unused", timeout=300)
    pieces = [chunk.choices[0].text for chunk in client.completions.create(
        model="dsi-default", prompt=PROMPTS[0], max_tokens=24, temperature=0, stream=True)]
    with Client(cluster.address, timeout=300) as grpc_client:
        want = grpc_client.generate(PROMPTS[0], max_new_tokens=24).text
    assert "".join(pieces) == want and want
    assert len([p for p in pieces if p]) > 1  # streamed as it was generated, not in one piece


def test_killing_a_target_mid_stream_retries_and_keeps_the_output(
    cluster: ComposeCluster, reference: Reference
) -> None:
    prompt = reference.prompts[0]
    expected = generate(cluster, prompt, "nonsi", N_LONG).token_ids
    container = cluster.container("target-0")
    address = cluster.target_address(container)

    def crash() -> None:
        # Frozen first, so that the window it is sent next is still in flight when it dies (a kill
        # between two windows would be noticed by a health check before any window failed), then
        # SIGKILL: a crash, not a graceful stop. Both within the health check's 2 s timeout.
        container.pause()
        try:
            poll(f"a window in flight on {address}", lambda: any(
                t["address"] == address and t.get("in_flight", 0) > 0 for t in cluster.targets()),
                timeout_s=1.5, interval_s=0.01)
        finally:
            container.kill()

    tokens, stats, _ = stream_and_break(cluster, prompt, N_LONG, after_tokens=20, act=crash)
    assert tokens == expected, "the output changed when a target was killed mid-stream"
    assert stats["retries"] > 0, f"no window was retried after the kill: {stats}"
    # The orchestrator lists it down: unhealthy at once, then dropped once its name stops resolving.
    listed = poll(f"{address} to be listed down", lambda: cluster.targets()
                  if address not in cluster.healthy_targets() else None, timeout_s=15)
    assert len([t for t in listed if t.get("healthy")]) == 1, listed

    container.start()
    restarted = cluster.target_address(container)
    cluster.wait_for_healthy_targets(2, timeout_s=180, including=[restarted])
    assert generate(cluster, prompt, "dsi", N_EQUIV).token_ids == expected[:N_EQUIV]


def test_scaling_a_target_service_adds_verifiers_without_a_restart(
    cluster: ComposeCluster, reference: Reference
) -> None:
    orchestrator = cluster.container("orchestrator")
    before = (orchestrator.id, orchestrator.attrs["State"]["StartedAt"], orchestrator.attrs["RestartCount"])
    started = time.monotonic()
    cluster.compose("up", "--build", "--detach", "--wait", "--scale", "target-1=3", timeout_s=900)
    up_done = time.monotonic()
    record_timing("docker compose up --build --wait --scale target-1=3", up_done - started)
    try:
        replicas = cluster.containers("target-1")
        assert len(replicas) == 3
        new = {cluster.target_address(c) for c in replicas[1:]}
        found = cluster.wait_for_healthy_targets(4, timeout_s=15, including=new)
        listed_after = time.monotonic() - up_done
        record_timing("Info lists 4 healthy targets, after compose returned", listed_after)
        orchestrator.reload()
        after = (orchestrator.id, orchestrator.attrs["State"]["StartedAt"], orchestrator.attrs["RestartCount"])
        assert after == before, "the orchestrator was recreated or restarted by the scale-up"
        assert cluster.compose("port", "orchestrator", "50051").stdout.strip() == cluster.address

        # The new replicas verify windows: concurrent requests spread over every free target, and
        # each committed token names the target whose Verify decided it.
        expected = [reference.decode(i, N_EQUIV, False) for i in range(len(reference.prompts))]
        seen: set[str] = set()
        for _ in range(10):
            with ThreadPoolExecutor(max_workers=len(reference.prompts)) as pool:
                results = list(pool.map(lambda p: generate(cluster, p, "dsi", N_EQUIV), reference.prompts))
            for got, want in zip(results, expected, strict=True):
                assert got.token_ids == want
                seen |= {t.target for t in got.tokens}
            if new <= seen:
                break
        assert new <= seen, f"the new replicas {sorted(new)} verified no window; provenance: {sorted(seen)}"
        assert seen <= set(found)
    finally:
        cluster.compose("up", "--build", "--detach", "--wait", "--scale", "target-1=1", timeout_s=900)
    cluster.wait_for_healthy_targets(2, timeout_s=60)


def test_stopping_the_drafter_finishes_target_only_with_the_same_output(
    cluster: ComposeCluster, reference: Reference
) -> None:
    prompt = reference.prompts[1]
    expected = generate(cluster, prompt, "nonsi", N_LONG).token_ids
    drafter = cluster.container("drafter")
    tokens, stats, _ = stream_and_break(cluster, prompt, N_LONG, after_tokens=20, act=lambda: drafter.stop(timeout=10))
    assert tokens == expected, "the output changed when the drafter stopped"
    assert stats["drafter_failed"], f"the request did not report the drafter's failure: {stats}"

    # Back again: DSI uses drafts once more.
    drafter.start()
    cluster.wait_for_container_health(drafter, timeout_s=180)

    def drafts_used() -> bool:
        got = generate(cluster, prompt, "dsi", N_EQUIV)
        assert got.token_ids == expected[:N_EQUIV]
        return not got.stats["drafter_failed"] and got.stats["drafts_accepted"] > 0

    poll("DSI to use the restarted drafter", drafts_used, timeout_s=60, interval_s=1.0)


def test_a_network_partition_of_a_target_does_not_fail_the_request(
    cluster: ComposeCluster, reference: Reference
) -> None:
    prompt = reference.prompts[2]
    expected = generate(cluster, prompt, "nonsi", N_LONG).token_ids
    network = cluster.docker.networks.get(cluster.network)
    cut: dict[str, Any] = {}

    def disconnect() -> None:
        cut["address"] = busy_target(cluster)
        cut["container"] = cluster.container_of(cut["address"])
        network.disconnect(cut["container"])  # the container keeps running, unreachable

    started = time.monotonic()
    tokens, stats, _ = stream_and_break(cluster, prompt, N_LONG, after_tokens=20, act=disconnect)
    took = time.monotonic() - started
    assert tokens == expected, "the output changed when a target was cut off the network"
    # A window in flight on the cut-off target waits out the orchestrator's per-call deadline.
    assert took < ORCHESTRATOR_DEADLINE_S + 120, f"the request took {took:.0f} s"
    container = cut["container"]
    container.reload()
    assert container.status == "running", "a partition, not a crash"

    # Reconnect it with the aliases compose gave it; the orchestrator finds it again.
    service = container.labels["com.docker.compose.service"]
    network.connect(container, aliases=[service, "targets"])
    cluster.wait_for_healthy_targets(2, timeout_s=120, including=[cluster.target_address(container)])


# --- teardown ---------------------------------------------------------------------------------------


def test_compose_down_leaves_nothing_behind(cluster: ComposeCluster) -> None:
    started = time.monotonic()
    cluster.compose("down", "--volumes", "--remove-orphans", timeout_s=300)
    record_timing("docker compose down --volumes", time.monotonic() - started)
    label = f"com.docker.compose.project={cluster.project}"
    assert cluster.docker.containers.list(all=True, filters={"label": label}) == []
    assert cluster.docker.networks.list(filters={"label": label}) == []
    assert cluster.docker.volumes.list(filters={"label": label}) == []
