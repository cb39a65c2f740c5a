"""The whole system as real processes: `dsi up`, the SDK, DSI == SI == non-SI == transformers,
real preemption observed on the targets, bad input, faults, concurrency."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
from transformers import AutoTokenizer

from dsi.client import AsyncClient, Client, DSIError
from dsi.cluster import check_health
from dsi.tiny_models import TinyPairSpec, build_tiny_pair
from dsi.v1 import orchestrator_pb2, orchestrator_pb2_grpc, target_pb2, target_pb2_grpc
from tests.integration.procs import Service, greedy_reference, start_service

pytestmark = pytest.mark.integration

PROMPTS = [
    "def fibonacci(n):", "import os\n", "class Foo:", "for i in range(10):", "return x + y",
    "The quick brown", "while True:", "if __name__ ==", "print('hello')", "x = [1, 2, 3]",
    "def __init__(self):", "try:\n    pass", "lambda x:", "import sys", "with open(path) as f:",
    "raise ValueError(", "self.assertEqual(", "# comment", "from typing import", "yield from",
]
N_TOKENS = 12


@pytest.fixture(scope="module")
def services(tiny_pair: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory):
    """Three targets and one drafter, and three orchestrators over 1, 2 and 3 of the targets."""
    target_dir, drafter_dir = tiny_pair
    logs = tmp_path_factory.mktemp("cluster-logs")
    started: list[Service] = []
    try:
        targets = [start_service("target", ["--model", str(target_dir), "--threads", "1"], logs) for _ in range(3)]
        started += targets
        drafter = start_service("drafter", ["--model", str(drafter_dir), "--threads", "1"], logs)
        started.append(drafter)
        orchestrators = {}
        for n in (1, 2, 3):  # exposing internals: tokens name the target (address) that verified them
            orch = start_service("orchestrator", ["--targets", ",".join(t.address for t in targets[:n]),
                                                  "--drafter", drafter.address, "--expose-internals"], logs)
            started.append(orch)
            orchestrators[n] = orch.address
        busy = start_service("orchestrator", ["--targets", targets[0].address, "--drafter", drafter.address,
                                              "--max-active-requests", "1", "--max-queued-requests", "0"], logs)
        started.append(busy)
        orchestrators["one-slot"] = busy.address
        yield {"targets": targets, "drafter": drafter, "orchestrators": orchestrators}
    finally:
        for s in reversed(started):
            s.stop()


@pytest.mark.slow
@pytest.mark.parametrize("n_targets", [1, 2, 3])
def test_greedy_dsi_equals_si_nonsi_and_transformers(services, tiny_pair, n_targets: int) -> None:
    target_dir, _ = tiny_pair
    tok = AutoTokenizer.from_pretrained(str(target_dir))
    accepted = rejected = 0
    with Client(services["orchestrators"][n_targets], timeout=120) as client:
        for prompt in PROMPTS:
            ids = tok(prompt, add_special_tokens=False)["input_ids"]
            out = {m: client.generate(prompt, max_new_tokens=N_TOKENS, mode=m, ignore_eos=True, lookahead=3)
                   for m in ("dsi", "si", "nonsi")}
            if n_targets == 3:  # the reference is the same for every cluster; compute it once
                assert out["nonsi"].token_ids == greedy_reference(target_dir, ids, N_TOKENS), prompt
            assert out["dsi"].token_ids == out["si"].token_ids == out["nonsi"].token_ids, prompt
            assert out["dsi"].text == out["nonsi"].text
            accepted += out["dsi"].stats["drafts_accepted"]
            rejected += out["dsi"].stats["epochs"] - 1
            assert out["dsi"].stats["mode"] == "dsi" and out["dsi"].stats["new_tokens"] == N_TOKENS
    assert accepted > 0 and rejected > 0  # the drafter agrees only partly: both paths were exercised


@pytest.mark.slow
@pytest.mark.parametrize("n_targets", [1, 2, 3])
def test_seeded_sampling_dsi_equals_si_and_nonsi(services, n_targets: int) -> None:
    with Client(services["orchestrators"][n_targets], timeout=120) as client:
        texts = set()
        for i, prompt in enumerate(PROMPTS):
            kw = dict(max_new_tokens=N_TOKENS, temperature=0.9, top_k=40, top_p=0.95, seed=1000 + i,
                      ignore_eos=True, lookahead=3)
            out = {m: client.generate(prompt, mode=m, **kw) for m in ("dsi", "si", "nonsi")}
            assert out["dsi"].token_ids == out["si"].token_ids == out["nonsi"].token_ids, prompt
            assert out["dsi"].stats["seed"] == 1000 + i
            texts.add(tuple(out["dsi"].token_ids))
        # Different seeds give different samples (the noise is really seeded).
        again = client.generate(PROMPTS[0], max_new_tokens=N_TOKENS, temperature=0.9, seed=7, ignore_eos=True)
        other = client.generate(PROMPTS[0], max_new_tokens=N_TOKENS, temperature=0.9, seed=8, ignore_eos=True)
        assert again.token_ids != other.token_ids
        assert len(texts) > 1


def test_bad_input_is_invalid_argument_naming_the_field(services) -> None:
    address = services["orchestrators"][2]
    with Client(address, timeout=30) as client:
        limit = int(client.info()["max_new_tokens_limit"])
        cases = [
            (dict(prompt=""), "prompt"),
            (dict(prompt="x", max_new_tokens=0), "max_new_tokens"),
            (dict(prompt="x", max_new_tokens=limit + 1), "max_new_tokens"),
            (dict(prompt=[1, 2, 10**6]), "prompt_token_ids"),
            (dict(prompt="x", temperature=-0.5), "temperature"),
            (dict(prompt="x", top_p=0.0), "top_p"),
            (dict(prompt="x", top_p=1.5), "top_p"),
            (dict(prompt="x", lookahead=10**4), "lookahead"),
            (dict(prompt="x", mode="fast"), "mode"),
        ]
        for kwargs, field in cases:
            prompt = kwargs.pop("prompt")
            with pytest.raises(DSIError) as err:
                client.generate(prompt, **kwargs)
            assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT, (kwargs, err.value)
            assert err.value.details.startswith(field), (field, err.value.details)
    # An unknown mode sent by another client (not the SDK) is refused by the server itself.
    with grpc.insecure_channel(address) as ch:
        stub = orchestrator_pb2_grpc.OrchestratorServiceStub(ch)
        with pytest.raises(grpc.RpcError) as err:
            list(stub.Generate(orchestrator_pb2.GenerateRequest(prompt="x", max_new_tokens=4, mode=99), timeout=30))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "mode" in err.value.details()


def test_concurrent_requests_share_the_pool(services) -> None:
    address = services["orchestrators"][3]

    async def main():
        async with AsyncClient(address, timeout=120) as client:
            jobs = [client.generate(p, max_new_tokens=N_TOKENS, mode="dsi", ignore_eos=True) for p in PROMPTS[:6]]
            return await asyncio.gather(*jobs)

    concurrent = asyncio.run(main())
    with Client(address, timeout=120) as client:
        for prompt, result in zip(PROMPTS[:6], concurrent, strict=True):
            assert result.token_ids == client.generate(prompt, max_new_tokens=N_TOKENS, mode="nonsi",
                                                       ignore_eos=True).token_ids


def test_stream_yields_tokens_as_committed_with_provenance(services) -> None:
    with Client(services["orchestrators"][3], timeout=60) as client:
        deltas = list(client.stream("def fibonacci(n):", max_new_tokens=N_TOKENS, mode="dsi", ignore_eos=True))
        whole = client.generate("def fibonacci(n):", max_new_tokens=N_TOKENS, mode="dsi", ignore_eos=True)
    assert deltas[-1].stats is not None and deltas[-1].finish_reason == "length"
    tokens = [t for d in deltas for t in d.tokens]
    assert [t.token_id for t in tokens] == whole.token_ids
    assert "".join(d.text for d in deltas) == whole.text
    assert all(t.target in {s.address for s in services["targets"]} for t in tokens)
    assert sum(t.from_draft for t in tokens) == deltas[-1].stats["tokens_from_drafts"]


@pytest.mark.slow
def test_real_preemption_is_observed_on_the_targets(tiny_pair, log_dir: Path) -> None:
    """With rejections and slow (emulated) target forwards, stale windows are cancelled mid-forward."""
    target_dir, drafter_dir = tiny_pair
    started: list[Service] = []
    try:
        targets = [start_service("target", ["--model", str(target_dir), "--threads", "1",
                                            "--emulate-latency-ms", "120:120"], log_dir) for _ in range(3)]
        started += targets
        drafter = start_service("drafter", ["--model", str(drafter_dir), "--threads", "1",
                                            "--emulate-latency-ms", "5:5"], log_dir)
        started.append(drafter)
        orch = start_service("orchestrator", ["--targets", ",".join(t.address for t in targets),
                                              "--drafter", drafter.address], log_dir)
        started.append(orch)
        cancelled = 0
        with Client(orch.address, timeout=120) as client:
            for prompt in PROMPTS[:4]:
                dsi = client.generate(prompt, max_new_tokens=16, mode="dsi", ignore_eos=True, lookahead=2)
                nonsi = client.generate(prompt, max_new_tokens=16, mode="nonsi", ignore_eos=True)
                assert dsi.token_ids == nonsi.token_ids
                assert dsi.stats["max_windows_in_flight"] > 1  # windows really ran in parallel
                cancelled += dsi.stats["windows_cancelled"]
        assert cancelled > 0
        time.sleep(0.5)
        mid_forward = 0
        for t in targets:
            with grpc.insecure_channel(t.address) as ch:
                counters = target_pb2_grpc.TargetServiceStub(ch).Info(target_pb2.TargetInfoRequest(),
                                                                      timeout=10).counters
            assert counters.cancelled_mid_forward + counters.cancelled_queued <= counters.cancelled
            mid_forward += counters.cancelled_mid_forward
        assert mid_forward > 0  # forwards stopped between decoder layers, on the target side

        # A client that goes away mid-stream stops the whole request: no target keeps computing.
        def forwards() -> int:
            total = 0
            for t in targets:
                with grpc.insecure_channel(t.address) as ch:
                    stub = target_pb2_grpc.TargetServiceStub(ch)
                    total += stub.Info(target_pb2.TargetInfoRequest(), timeout=10).counters.forwards_completed
            return total

        with Client(orch.address, timeout=120) as client:
            stream = client.stream(PROMPTS[0], max_new_tokens=400, mode="dsi", ignore_eos=True, lookahead=2)
            next(stream)
            stream.close()  # cancels the call
        time.sleep(0.5)
        before = forwards()
        time.sleep(1.0)
        assert forwards() == before
    finally:
        for s in reversed(started):
            s.stop()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _metric(port: int, name: str) -> float:
    """A sample of the orchestrator's Prometheus metrics (0 when absent)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0


@pytest.mark.slow
def test_faults_target_dies_and_drafter_dies(tiny_pair, log_dir: Path) -> None:
    target_dir, drafter_dir = tiny_pair
    started: list[Service] = []
    try:
        targets = [start_service("target", ["--model", str(target_dir), "--threads", "1",
                                            "--emulate-latency-ms", "30:30"], log_dir) for _ in range(2)]
        started += targets
        drafter = start_service("drafter", ["--model", str(drafter_dir), "--threads", "1"], log_dir)
        started.append(drafter)
        metrics_port = _free_port()
        # Health checks every second: a killed target is found by the windows sent to it (and retried)
        # well before a health check would find it.
        orch = start_service("orchestrator", ["--targets", ",".join(t.address for t in targets),
                                              "--drafter", drafter.address, "--health-interval-s", "1.0",
                                              "--metrics-port", str(metrics_port)], log_dir)
        started.append(orch)
        with Client(orch.address, timeout=120) as client:
            expected = client.generate(PROMPTS[0], max_new_tokens=30, mode="nonsi", ignore_eos=True).token_ids
            assert _metric(metrics_port, "dsi_window_retries_total") == 0
            # Kill a target while a request runs: its windows are retried on the other one.
            stream = client.stream(PROMPTS[0], max_new_tokens=30, mode="dsi", ignore_eos=True)
            first = next(stream)
            targets[0].kill()
            rest = list(stream)
            got = [t.token_id for d in [first, *rest] for t in d.tokens]
            assert got == expected
            # Windows did fail on the killed target and were sent again (the request's own stats count
            # the retries of the windows it applied; the counter counts every retry).
            assert _metric(metrics_port, "dsi_window_retries_total") >= 1
            assert rest[-1].stats is not None and rest[-1].stats["retries"] <= _metric(
                metrics_port, "dsi_window_retries_total")
            assert _metric(metrics_port, "dsi_healthy_targets") == 1
            # The drafter dies: requests continue target-only and say so.
            drafter.kill()
            out = client.generate(PROMPTS[0], max_new_tokens=30, mode="dsi", ignore_eos=True)
            assert out.token_ids == expected
            assert out.stats["drafter_failed"] is True
            # No target left: UNAVAILABLE. The client is told how many targets are healthy, not where
            # they are; the orchestrator's log names the endpoints tried.
            targets[1].kill()
            with pytest.raises(DSIError) as err:
                client.generate(PROMPTS[0], max_new_tokens=5, mode="nonsi")
            assert err.value.code == grpc.StatusCode.UNAVAILABLE
            assert err.value.details.startswith("no target instance reachable (0 of 2 healthy)"), err.value.details
            assert "127.0.0.1" not in err.value.details
            assert targets[1].address in orch.log.read_text(errors="replace")
    finally:
        for s in reversed(started):
            s.stop()


def test_mismatched_vocabularies_are_refused(tiny_pair, tmp_path: Path, log_dir: Path) -> None:
    target_dir, _ = tiny_pair
    _, other_drafter = build_tiny_pair(tmp_path / "other", TinyPairSpec(seed=3, vocab_size=300))
    started: list[Service] = []
    try:
        target = start_service("target", ["--model", str(target_dir), "--threads", "1"], log_dir)
        drafter = start_service("drafter", ["--model", str(other_drafter), "--threads", "1"], log_dir)
        started += [target, drafter]
        proc = subprocess.run(
            [sys.executable, "-m", "dsi.cli", "serve", "orchestrator", "--port", "0", "--targets", target.address,
             "--drafter", drafter.address, "--startup-timeout-s", "30"],
            capture_output=True, text=True, timeout=120,
        )
        assert proc.returncode == 1
        assert "do not share a vocabulary" in proc.stderr
    finally:
        for s in started:
            s.stop()


def test_dsi_up_serves_and_stops_everything(tiny_pair, tmp_path: Path) -> None:
    target_dir, drafter_dir = tiny_pair
    proc = subprocess.Popen(
        [sys.executable, "-m", "dsi.cli", "up", "--target-model", str(target_dir), "--drafter-model",
         str(drafter_dir), "--targets", "2", "--port", "0", "--log-dir", str(tmp_path / "logs")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        line = proc.stdout.readline() if proc.stdout else ""
        assert line.startswith("orchestrator listening on "), (line, proc.stderr.read() if proc.stderr else "")
        address = line.split()[-1]
        tok = AutoTokenizer.from_pretrained(str(target_dir))
        with Client(address, timeout=60) as client:
            info = client.info()
            assert len(info["targets"]) == 2 and all(t["healthy"] for t in info["targets"])
            result = client.generate(PROMPTS[0], max_new_tokens=N_TOKENS, mode="nonsi", ignore_eos=True)
        ids = tok(PROMPTS[0], add_special_tokens=False)["input_ids"]
        assert result.token_ids == greedy_reference(target_dir, ids, N_TOKENS)
        assert result.stats["tokens_per_s"] > 0
        service_addresses = [t["address"] for t in info["targets"]] + [info["drafter_address"], address]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        assert not any(check_health(a, timeout_s=1.0) for a in service_addresses)  # every process stopped
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.slow
def test_rejection_sampling_through_the_system_follows_the_target(services, tiny_pair) -> None:
    """SI with verification='rejection': the first token is decided by rejection sampling of the
    drafter's proposal; over many seeds it must follow the target's softmax (chi-square)."""
    import torch
    from transformers import AutoModelForCausalLM

    target_dir, _ = tiny_pair
    tok = AutoTokenizer.from_pretrained(str(target_dir))
    prompt = "import os\n"
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(str(target_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        p = torch.softmax(model(torch.tensor([ids])).logits[0, -1].float() / 1.2, dim=-1)
    trials = 400
    counts = torch.zeros_like(p)
    accepted = 0
    with Client(services["orchestrators"][2], timeout=120) as client:
        for seed in range(trials):
            r = client.generate(ids, max_new_tokens=2, mode="si", temperature=1.2, seed=seed,
                                verification="rejection", lookahead=3, ignore_eos=True)
            counts[r.token_ids[0]] += 1
            accepted += r.tokens[0].from_draft
    # Buckets with enough expected mass, the rest pooled.
    expected = p * trials
    big = expected >= 5
    obs = torch.cat([counts[big], counts[~big].sum().unsqueeze(0)])
    exp = torch.cat([expected[big], expected[~big].sum().unsqueeze(0)])
    keep = exp > 0
    stat = float(((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum())
    df = int(keep.sum()) - 1
    # Wilson-Hilferty approximation of the chi-square 0.999 quantile.
    z = 3.09
    critical = df * (1 - 2 / (9 * df) + z * (2 / (9 * df)) ** 0.5) ** 3
    assert df >= 2
    assert stat < critical, (stat, critical, df)
    assert 0 < accepted < trials  # both accepted drafts and recovered tokens happened


def test_a_request_beyond_the_admission_limits_is_refused_with_a_retry_hint(services) -> None:
    with Client(services["orchestrators"]["one-slot"], timeout=60) as client:
        first = client.stream("def fibonacci(n):", max_new_tokens=400, ignore_eos=True)
        next(first)  # the first request holds the only slot
        with pytest.raises(DSIError) as err:
            client.generate("import os", max_new_tokens=4)
        assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "server busy" in err.value.details and "retry in about" in err.value.details
        with grpc.insecure_channel(services["orchestrators"]["one-slot"]) as channel:
            call = orchestrator_pb2_grpc.OrchestratorServiceStub(channel).Generate(
                orchestrator_pb2.GenerateRequest(prompt="import os", max_new_tokens=4), timeout=30)
            with pytest.raises(grpc.RpcError) as raw:
                list(call)
            assert int(dict(raw.value.trailing_metadata())["retry-after-ms"]) >= 100
        first.close()
        deadline = time.monotonic() + 30
        while True:  # the slot comes back once the first request is cancelled
            try:
                assert len(client.generate("import os", max_new_tokens=4, ignore_eos=True).token_ids) == 4
                break
            except DSIError as exc:
                assert exc.code == grpc.StatusCode.RESOURCE_EXHAUSTED and time.monotonic() < deadline
                time.sleep(0.1)
