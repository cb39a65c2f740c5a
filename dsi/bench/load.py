"""``dsi bench load``: non-SI, SI and DSI under concurrent load on one emulated cluster per (c, a): a
concurrency sweep and open-loop Poisson arrivals, modes interleaved, repeated; prints a table,
writes JSON, markdown and a PNG (throughput and p99 latency against concurrency, one line per mode).

Terms: a **cell** is one (drafter latency c, acceptance a) cluster, as in ``dsi bench`` (emulated
latencies and the oracle drafter are fixed at start-up). A **level** is one load: ``closed`` with
concurrency C (C clients at once, each sending ``requests_per_client`` requests back to back) or
``open`` at a rate (requests/s, exponential gaps, ``open_requests`` requests; the same arrival times
in every mode of a repetition). A **run** is one (repetition, level, mode). Per run: aggregate
tokens/s is all committed tokens over the time from the first send to the last answer; latency and
TTFT are each request's client wall time to its last and first token. Target counters (``Info`` of
every target, read before and after the run) give forwards and computed tokens per committed token;
the orchestrator's ``dsi_target_busy_seconds`` (its Prometheus endpoint) gives the busy fraction
(time windows held a target / (targets x run time)). Each figure is the median over the repetitions.
Request i of repetition r uses seed ``seed + 1000 r + i`` in every mode, so SI and DSI see the same
oracle acceptances.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import socket
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from dsi.bench.report import write_compact_json
from dsi.bench.runner import MODES, ORACLE_LABEL, PROMPTS, machine_info, tiny_pair

log = logging.getLogger(__name__)

ProgressFn = Callable[[str], None]

# The "done means" under load (issue 11): checked and reported, never tuned per run.
TOKENS_MIN = 0.97  # DSI tokens/s >= 0.97 x max(SI, non-SI)
P50_MAX = 1.05  # DSI p50 latency <= 1.05 x min(SI, non-SI)

# Target counters (protos/dsi/v1/common.proto ServiceCounters) read before and after every run.
COUNTERS = (
    "forwards_completed", "computed_tokens", "cache_hit_tokens", "cancelled_mid_forward", "cancelled_queued",
    "cache_fill_tokens",
)
# The drafter's, likewise.
DRAFTER_COUNTERS = ("forwards_completed", "preempted", "background_held_s")


def _noop(_: str) -> None:
    pass


@dataclass
class LoadSettings:
    """What to run. Times in milliseconds; ``c_values`` are fractions of ``target_ms``."""

    targets: int = 4
    c_values: list[float] = field(default_factory=lambda: [0.1])
    a_values: list[float] = field(default_factory=lambda: [0.5, 0.8])
    target_ms: float = 40.0
    prefill_ms: float | None = None  # None = target_ms
    token_ms: float = 0.0  # emulated target cost per token computed (charges prefills by their length)
    prompt_tokens: int = 0  # 0 = the built-in short prompts; N = prompts of about N tokens
    concurrency: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16])
    rates: list[float] = field(default_factory=lambda: [])  # open-loop requests/s; [] = none
    open_requests: int = 16
    requests_per_client: int = 1
    repeats: int = 3
    max_new_tokens: int = 128
    lookahead: int = 4
    sp_degree: int = 0  # 0 = the orchestrator's default (every healthy target)
    modes: list[str] = field(default_factory=lambda: list(MODES))
    seed: int = 1000
    out_dir: str = "bench-results"
    out_name: str = "load.json"
    startup_timeout_s: float = 300.0
    request_timeout_s: float = 600.0

    @property
    def prefill(self) -> float:
        return self.target_ms if self.prefill_ms is None else self.prefill_ms

    def levels(self) -> list[tuple[str, float]]:
        return [("closed", float(c)) for c in self.concurrency] + [("open", r) for r in self.rates]

    def validate(self) -> list[str]:
        errors = []
        if self.targets < 1:
            errors.append("--targets must be >= 1")
        if self.target_ms <= 0 or self.prefill < 0 or self.token_ms < 0:
            errors.append("--target-ms must be > 0, --prefill-ms and --token-ms >= 0")
        if not 0 <= self.prompt_tokens <= 3000:
            errors.append("--prompt-tokens must be in [0, 3000] (the tiny models hold 4096 positions)")
        if any(c <= 0 for c in self.c_values) or not self.c_values:
            errors.append("--c-values must be > 0")
        if any(not 0 < a <= 1 for a in self.a_values) or not self.a_values:
            errors.append("--a-values must be in (0, 1]")
        if any(c < 1 for c in self.concurrency):
            errors.append("--concurrency values must be >= 1")
        if any(r <= 0 for r in self.rates):
            errors.append("--rates must be > 0")
        if not self.concurrency and not self.rates:
            errors.append("nothing to run: give --concurrency or --rates")
        if self.open_requests < 1 or self.requests_per_client < 1 or self.repeats < 1:
            errors.append("--open-requests, --requests-per-client and --repeats must be >= 1")
        if self.max_new_tokens < 1:
            errors.append("--max-new-tokens must be >= 1")
        if self.lookahead < 1 or self.sp_degree < 0:
            errors.append("--lookahead must be >= 1 and --sp-degree >= 0")
        bad = [m for m in self.modes if m not in MODES]
        if bad or not self.modes:
            errors.append(f"--modes: expected some of {', '.join(MODES)}")
        return errors


def total_steps(s: LoadSettings) -> int:
    """Progress steps: one per cluster start and one per run."""
    return len(s.c_values) * len(s.a_values) * (1 + s.repeats * len(s.levels()) * len(s.modes))


# -------------------------------------------------------------------------------------------- stats


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100), linear between the closest ranks (numpy's default)."""
    xs = sorted(values)
    if not xs:
        return float("nan")
    k = (len(xs) - 1) * q / 100.0
    lo = int(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


@dataclass
class RequestRecord:
    start_s: float  # since the run began
    latency_s: float
    ttft_s: float
    new_tokens: int
    stats: dict[str, Any]
    error: str = ""


def drafts_verified(stats: dict[str, Any]) -> int:
    """Drafts compared with the target: GenerateStats has accepted drafts and accepted / verified."""
    rate = float(stats.get("acceptance_rate", 0.0))
    accepted = int(stats.get("drafts_accepted", 0))
    return round(accepted / rate) if rate > 0 else 0


def run_summary(
    records: list[RequestRecord],
    elapsed_s: float,
    counters: dict[str, int],
    busy_s: float | None,
    targets: int,
    drafter: dict[str, float] | None = None,
    drafter_ms: float = 0.0,
) -> dict[str, Any]:
    """One run's figures from its requests, the targets' counter deltas, the busy-seconds delta and
    the drafter's counter deltas (``drafter``; its emulated ``drafter_ms`` per draft)."""
    ok = [r for r in records if not r.error]
    tokens = sum(r.new_tokens for r in ok)
    per_token = max(1, tokens)
    stats = [r.stats for r in ok]

    def total(key: str) -> int:
        return sum(int(st.get(key, 0)) for st in stats)

    verified = sum(drafts_verified(st) for st in stats)
    applied = total("windows_applied")
    lat = [r.latency_s for r in ok]
    ttft = [r.ttft_s for r in ok]
    return {
        "requests": len(records),
        "errors": len(records) - len(ok),
        "error_messages": sorted({r.error for r in records if r.error})[:5],
        "new_tokens": tokens,
        "elapsed_s": elapsed_s,
        "tokens_per_s": tokens / elapsed_s if elapsed_s > 0 else 0.0,
        "latency_p50_s": percentile(lat, 50),
        "latency_p99_s": percentile(lat, 99),
        "ttft_p50_s": percentile(ttft, 50),
        "ttft_p99_s": percentile(ttft, 99),
        "target_busy_fraction": busy_s / (targets * elapsed_s) if busy_s is not None and elapsed_s > 0 else None,
        "target_forwards_per_token": counters["forwards_completed"] / per_token,
        "target_aborted_forwards_per_token": counters["cancelled_mid_forward"] / per_token,
        "target_computed_tokens_per_token": counters["computed_tokens"] / per_token,
        "target_cache_hit_tokens_per_token": counters["cache_hit_tokens"] / per_token,
        "target_cancelled_queued": counters["cancelled_queued"],
        # Tokens the targets computed only to fill caches (prompt prefills, catch-ups), per request.
        "target_fill_tokens_per_request": counters["cache_fill_tokens"] / max(1, len(ok)),
        "windows_per_token": total("windows_dispatched") / per_token,
        "windows_cancelled_per_request": total("windows_cancelled") / max(1, len(ok)),
        "drafts_per_window": verified / applied if applied else 0.0,
        "acceptance_rate": total("drafts_accepted") / verified if verified else 0.0,
        "wasted_target_s": sum(float(st.get("wasted_target_s", 0.0)) for st in stats),
        # Seconds a request's critical windows waited for a free target (GenerateStats), per request.
        "critical_wait_s_per_request": sum(float(st.get("critical_queue_wait_s", 0.0)) for st in stats)
        / max(1, len(ok)),
        "max_windows_in_flight": max((int(st.get("max_windows_in_flight", 0)) for st in stats), default=0),
        # The drafter (one process, one draft at a time): drafts it completed and background drafts it
        # stopped for urgent ones, per committed token, and the share of the run it spent on completed
        # drafts (each takes at least the emulated latency: a lower bound of its busy time).
        "drafter_drafts_per_token": drafter["forwards_completed"] / per_token if drafter else None,
        "drafter_preempted_per_token": drafter["preempted"] / per_token if drafter else None,
        "drafter_busy_fraction": (drafter["forwards_completed"] * drafter_ms / 1000.0 / elapsed_s
                                  if drafter and elapsed_s > 0 and drafter_ms > 0 else None),
        # Share of the run the drafter stayed idle holding speculative drafts back (--background-max-load).
        "drafter_held_fraction": drafter["background_held_s"] / elapsed_s if drafter and elapsed_s > 0 else None,
        "latency_s": lat,
        "ttft_s": ttft,
        "start_s": [r.start_s for r in ok],
    }


# Figures reported as the median over repetitions (the per-request lists stay per repetition).
MEDIAN_KEYS = (
    "tokens_per_s", "latency_p50_s", "latency_p99_s", "ttft_p50_s", "ttft_p99_s", "target_busy_fraction",
    "target_forwards_per_token", "target_aborted_forwards_per_token", "target_computed_tokens_per_token",
    "target_cache_hit_tokens_per_token", "target_fill_tokens_per_request", "windows_per_token",
    "windows_cancelled_per_request", "drafts_per_window",
    "acceptance_rate", "wasted_target_s", "critical_wait_s_per_request", "drafter_drafts_per_token",
    "drafter_preempted_per_token", "drafter_busy_fraction", "drafter_held_fraction",
)


def mode_summary(reps: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over the repetitions of one (level, mode), the tokens/s noise, and the repetitions."""
    out: dict[str, Any] = {}
    for key in MEDIAN_KEYS:
        values = [r[key] for r in reps if r[key] is not None]
        out[key] = statistics.median(values) if values else None
    tps = [r["tokens_per_s"] for r in reps]
    out["tokens_per_s_noise"] = (max(tps) - min(tps)) / 2
    out["errors"] = sum(r["errors"] for r in reps)
    out["new_tokens"] = sum(r["new_tokens"] for r in reps)
    out["reps"] = reps
    return out


def evaluate_level(modes: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """DSI against SI and non-SI at one level (the issue's criteria where all three modes ran)."""
    out: dict[str, Any] = {}
    if "dsi" not in modes:
        return out
    dsi = modes["dsi"]
    for other in ("si", "nonsi"):
        if other in modes:
            o = modes[other]
            for key, name in (("tokens_per_s", "tokens_per_s"), ("latency_p50_s", "p50"), ("latency_p99_s", "p99")):
                out[f"dsi_over_{other}_{name}"] = dsi[key] / o[key] if o[key] else None
            # Paired: the ratio within each repetition (the modes ran back to back), then the median;
            # steadier than the ratio of medians when the machine's load drifts between repetitions.
            pairs = [d["tokens_per_s"] / r["tokens_per_s"] for d, r in zip(dsi["reps"], o["reps"], strict=True)
                     if r["tokens_per_s"]]
            out[f"dsi_over_{other}_tokens_per_s_paired"] = statistics.median(pairs) if pairs else None
    if "si" in modes and "nonsi" in modes:
        best_tps = max(modes["si"]["tokens_per_s"], modes["nonsi"]["tokens_per_s"])
        best_p50 = min(modes["si"]["latency_p50_s"], modes["nonsi"]["latency_p50_s"])
        out["tokens_pass"] = bool(dsi["tokens_per_s"] >= TOKENS_MIN * best_tps)
        out["p50_pass"] = bool(dsi["latency_p50_s"] <= P50_MAX * best_p50)
    return out


# ---------------------------------------------------------------------------------------- the probes


def _free_port() -> int:
    # The orchestrator's metrics server takes a fixed port (0 = off); the race with another process
    # taking it between here and the orchestrator's bind is retried by run_cell.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _busy_seconds(metrics_port: int) -> float | None:
    """Sum of the orchestrator's dsi_target_busy_seconds over targets (None when unreadable)."""
    from urllib.error import URLError
    from urllib.request import urlopen

    from prometheus_client.parser import text_string_to_metric_families

    try:
        with urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as resp:
            text = resp.read().decode()
    except (URLError, OSError):
        return None
    total = 0.0
    for family in text_string_to_metric_families(text):
        if family.name == "dsi_target_busy_seconds":
            total += sum(s.value for s in family.samples if s.name.endswith("_total"))
    return total


class _Drafter:
    """The drafter's Info counters."""

    def __init__(self, address: str) -> None:
        import grpc

        from dsi.v1 import drafter_pb2_grpc

        self._channel = grpc.aio.insecure_channel(address)
        self._stub = drafter_pb2_grpc.DrafterServiceStub(self._channel)

    async def counters(self) -> dict[str, float]:
        from dsi.v1 import drafter_pb2

        info = await self._stub.Info(drafter_pb2.DrafterInfoRequest(), timeout=10)
        return {k: float(getattr(info.counters, k)) for k in DRAFTER_COUNTERS}

    async def close(self) -> None:
        await self._channel.close()


class _Targets:
    """The targets' Info counters, summed over instances."""

    def __init__(self, addresses: Sequence[str]) -> None:
        import grpc

        from dsi.v1 import target_pb2_grpc

        self._channels = [grpc.aio.insecure_channel(a) for a in addresses]
        self._stubs = [target_pb2_grpc.TargetServiceStub(c) for c in self._channels]

    async def counters(self) -> dict[str, int]:
        from dsi.v1 import target_pb2

        infos = await asyncio.gather(*(s.Info(target_pb2.TargetInfoRequest(), timeout=10) for s in self._stubs))
        return {k: sum(int(getattr(i.counters, k)) for i in infos) for k in COUNTERS}

    async def close(self) -> None:
        for c in self._channels:
            await c.close()


# ------------------------------------------------------------------------------------------- running


def make_prompts(s: LoadSettings, tokenizer_dir: Path) -> list[str]:
    """The built-in prompts, or (``prompt_tokens``) each repeated to about that many tokens."""
    if not s.prompt_tokens:
        return list(PROMPTS)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    out = []
    for base in PROMPTS:
        ids: list[int] = []
        while len(ids) < s.prompt_tokens:
            ids += tok.encode(base + " ", add_special_tokens=False)
        out.append(str(tok.decode(ids[: s.prompt_tokens])))
    return out


async def _one_request(
    client: Any, index: int, mode: str, s: LoadSettings, rep: int, t_origin: float, prompts: Sequence[str] = PROMPTS
) -> RequestRecord:
    from dsi.client import DSIError

    t0 = time.perf_counter()
    ttft = None
    tokens = 0
    stats: dict[str, Any] = {}
    try:
        async for delta in client.stream(
            prompts[index % len(prompts)],
            max_new_tokens=s.max_new_tokens,
            mode=mode,
            lookahead=s.lookahead,
            sp_degree=s.sp_degree,
            ignore_eos=True,
            seed=s.seed + 1000 * rep + index,
        ):
            if delta.tokens and ttft is None:
                ttft = time.perf_counter() - t0
            tokens += len(delta.tokens)
            if delta.stats is not None:
                stats = delta.stats
    except DSIError as exc:
        return RequestRecord(t0 - t_origin, time.perf_counter() - t0, 0.0, 0, {}, str(exc))
    latency = time.perf_counter() - t0
    return RequestRecord(t0 - t_origin, latency, latency if ttft is None else ttft, tokens, stats)


async def _closed(
    client: Any, mode: str, clients: int, s: LoadSettings, rep: int, prompts: Sequence[str] = PROMPTS
) -> tuple[list[RequestRecord], float]:
    t_origin = time.perf_counter()

    async def worker(w: int) -> list[RequestRecord]:
        return [
            await _one_request(client, w * s.requests_per_client + k, mode, s, rep, t_origin, prompts)
            for k in range(s.requests_per_client)
        ]

    per_worker = await asyncio.gather(*(worker(w) for w in range(clients)))
    return [r for rs in per_worker for r in rs], time.perf_counter() - t_origin


def arrival_times(rate: float, n: int, seed: int) -> list[float]:
    """Poisson arrivals: n send times (seconds from 0) with exponential gaps of mean 1/rate; the
    first at 0, so every run starts at once."""
    rng = random.Random(seed)
    times = [0.0]
    for _ in range(n - 1):
        times.append(times[-1] + rng.expovariate(rate))
    return times


async def _open(
    client: Any, mode: str, rate: float, s: LoadSettings, rep: int, prompts: Sequence[str] = PROMPTS
) -> tuple[list[RequestRecord], float]:
    t_origin = time.perf_counter()

    async def send(index: int, at: float) -> RequestRecord:
        await asyncio.sleep(max(0.0, at - (time.perf_counter() - t_origin)))
        return await _one_request(client, index, mode, s, rep, t_origin, prompts)

    times = arrival_times(rate, s.open_requests, s.seed + rep)
    records = await asyncio.gather(*(send(i, at) for i, at in enumerate(times)))
    return list(records), time.perf_counter() - t_origin


def mode_order(rep: int, modes: Sequence[str]) -> list[str]:
    """Modes interleaved at every level, the order rotated per repetition (drift hits all alike)."""
    k = rep % len(modes)
    return [*modes[k:], *modes[:k]]


async def measure_cell(
    address: str,
    target_addresses: Sequence[str],
    metrics_port: int,
    s: LoadSettings,
    progress: ProgressFn = _noop,
    prompts: Sequence[str] = PROMPTS,
    drafter_address: str | None = None,
    drafter_ms: float = 0.0,
) -> list[dict[str, Any]]:
    """Every level and mode, repeated, on one running cluster; returns the levels' results."""
    from dsi.client import AsyncClient

    targets = _Targets(target_addresses)
    drafter = _Drafter(drafter_address) if drafter_address else None
    runs: dict[tuple[str, float], dict[str, list[dict[str, Any]]]] = {
        lv: {m: [] for m in s.modes} for lv in s.levels()
    }
    try:
        async with AsyncClient(address, timeout=s.request_timeout_s) as client:
            for mode in s.modes:  # warm-up: connections, sessions, the tokenizer
                await client.generate(prompts[0], max_new_tokens=4, mode=mode, lookahead=s.lookahead,
                                      sp_degree=s.sp_degree, ignore_eos=True)
            for rep in range(s.repeats):
                for kind, value in s.levels():
                    for mode in mode_order(rep, s.modes):
                        before = await targets.counters()
                        drafter_before = await drafter.counters() if drafter else None
                        busy_before = await asyncio.to_thread(_busy_seconds, metrics_port)
                        if kind == "closed":
                            records, elapsed = await _closed(client, mode, int(value), s, rep, prompts)
                        else:
                            records, elapsed = await _open(client, mode, value, s, rep, prompts)
                        after = await targets.counters()
                        drafter_after = await drafter.counters() if drafter else None
                        busy_after = await asyncio.to_thread(_busy_seconds, metrics_port)
                        busy = None if busy_before is None or busy_after is None else busy_after - busy_before
                        delta = {k: after[k] - before[k] for k in COUNTERS}
                        drafted = None
                        if drafter_before is not None and drafter_after is not None:
                            drafted = {k: drafter_after[k] - drafter_before[k] for k in DRAFTER_COUNTERS}
                        summary = run_summary(records, elapsed, delta, busy, len(target_addresses), drafted,
                                              drafter_ms)
                        runs[(kind, value)][mode].append(summary)
                        label = f"C={int(value)}" if kind == "closed" else f"rate={value:g}/s"
                        progress(f"rep {rep + 1}/{s.repeats} {label} {mode}: {summary['tokens_per_s']:.0f} tok/s")
    finally:
        await targets.close()
        if drafter is not None:
            await drafter.close()
    levels = []
    for (kind, value), by_mode in runs.items():
        modes = {m: mode_summary(reps) for m, reps in by_mode.items()}
        level: dict[str, Any] = {"kind": kind}
        if kind == "closed":
            level["concurrency"] = int(value)
        else:
            level["rate"] = value
        level["modes"] = modes
        level.update(evaluate_level(modes))
        levels.append(level)
    return levels


def run_cell(
    pair: tuple[Path, Path], c: float, a: float, s: LoadSettings, progress: ProgressFn = _noop
) -> dict[str, Any]:
    """Start the cell's cluster (as ``dsi bench`` does, plus the orchestrator's metrics port), measure,
    stop it."""
    from dsi.cluster import ClusterError, ClusterSpec, LocalCluster

    drafter_ms = c * s.target_ms
    progress(f"c={c:g} a={a:g}: starting cluster")
    for attempt in range(2):
        metrics_port = _free_port()
        cluster = LocalCluster(
            ClusterSpec(
                target_model=str(pair[0]),
                drafter_model=str(pair[1]),
                targets=s.targets,
                port=0,
                threads=1,
                emulate_target_ms=f"{s.prefill}:{s.target_ms}:{s.token_ms}",
                emulate_drafter_ms=f"{drafter_ms}:{drafter_ms}",
                oracle_acceptance=a,
                lookahead=s.lookahead,
                startup_timeout_s=s.startup_timeout_s,
                extra_env={"DSI_ORCHESTRATOR_METRICS_PORT": str(metrics_port)},
            )
        )
        t0 = time.perf_counter()
        try:
            address = cluster.start()
        except ClusterError:
            if attempt == 1:
                raise
            log.warning("cluster start failed (metrics port %d taken?); retrying once", metrics_port)
            continue
        try:
            startup_s = time.perf_counter() - t0
            load_before = os.getloadavg()
            prompts = make_prompts(s, pair[0])
            levels = asyncio.run(
                measure_cell(address, [t.address for t in cluster.targets], metrics_port, s, progress, prompts,
                             cluster.service("drafter").address, drafter_ms)
            )
            load_after = os.getloadavg()
        finally:
            cluster.stop()
        return {
            "c": c,
            "a": a,
            "drafter_ms": drafter_ms,
            "lookahead": s.lookahead,
            "sp_degree": s.sp_degree or s.targets,
            "cluster_startup_s": startup_s,
            "load_average_before": list(load_before),
            "load_average_after": list(load_after),
            "levels": levels,
        }
    raise AssertionError("unreachable")


def run_load(s: LoadSettings, progress: ProgressFn = _noop) -> dict[str, Any]:
    """Every cell the settings ask for; the JSON-ready result."""
    t0 = time.perf_counter()
    result: dict[str, Any] = {
        "machine": machine_info(),
        "settings": asdict(s),
        "oracle_label": ORACLE_LABEL,
        "criteria": {
            "tokens": f"DSI tokens/s >= {TOKENS_MIN} x max(SI, non-SI) tokens/s (medians over repetitions)",
            "p50": f"DSI p50 latency <= {P50_MAX} x min(SI, non-SI) p50 latency",
        },
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "load_average_start": list(os.getloadavg()),
        "cells": [],
    }
    with tempfile.TemporaryDirectory(prefix="dsi-bench-pair-") as tmp:
        pair = tiny_pair(Path(tmp))
        for c in s.c_values:
            for a in s.a_values:
                result["cells"].append(run_cell(pair, c, a, s, progress))
    result["load_average_end"] = list(os.getloadavg())
    result["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    result["wall_s"] = time.perf_counter() - t0
    return result


# -------------------------------------------------------------------------------------------- report

HEADERS = (
    "c/a", "load", "mode", "tok/s", "p50 s", "p99 s", "TTFT p50", "TTFT p99", "busy", "fwd/tok",
    "comp tok/tok", "fill tok/req", "drafts/win", "drafter busy", "drafts/tok", "DSI/SI tok/s",
    "DSI/nonSI tok/s", "pass",
)


def _level_label(level: dict[str, Any]) -> str:
    return f"C={level['concurrency']}" if level["kind"] == "closed" else f"{level['rate']:g}/s"


def _f(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def table_rows(result: dict[str, Any]) -> list[list[str]]:
    rows = []
    for cell in result["cells"]:
        for level in cell["levels"]:
            for mode, m in level["modes"].items():
                last = mode == "dsi"
                passed = ""
                if last and "tokens_pass" in level:
                    passed = ("tok " + ("ok" if level["tokens_pass"] else "FAIL") + ", p50 "
                              + ("ok" if level["p50_pass"] else "FAIL"))
                rows.append([
                    f"{cell['c']:g}/{cell['a']:g}", _level_label(level), mode,
                    f"{m['tokens_per_s']:.1f}", f"{m['latency_p50_s']:.2f}", f"{m['latency_p99_s']:.2f}",
                    f"{m['ttft_p50_s'] * 1000:.0f} ms", f"{m['ttft_p99_s'] * 1000:.0f} ms",
                    _f(m["target_busy_fraction"], ".2f"), f"{m['target_forwards_per_token']:.2f}",
                    f"{m['target_computed_tokens_per_token']:.2f}",
                    f"{m.get('target_fill_tokens_per_request', 0.0):.0f}", f"{m['drafts_per_window']:.2f}",
                    _f(m.get("drafter_busy_fraction"), ".2f"), _f(m.get("drafter_drafts_per_token"), ".2f"),
                    _f(level.get("dsi_over_si_tokens_per_s"), ".2f") if last else "",
                    _f(level.get("dsi_over_nonsi_tokens_per_s"), ".2f") if last else "",
                    passed,
                ])
    return rows


RATIO_HEADERS = (
    "load", "a", "DSI/SI tok/s", "paired", "DSI/nonSI tok/s", "paired", "DSI/SI p50", "DSI/SI p99", "DSI/best p50",
)


RATIO_CAPTION = (
    "ratios of the medians over repetitions; paired: median over repetitions of the ratio within each "
    "repetition; DSI/best p50: DSI p50 latency / min(SI, non-SI) p50 latency"
)


def ratio_rows(result: dict[str, Any]) -> list[list[str]]:
    """DSI against SI and non-SI per level and acceptance (the issue's table)."""
    rows = []
    for cell in result["cells"]:
        for level in cell["levels"]:
            if "dsi_over_si_tokens_per_s" not in level:
                continue
            best_p50 = None
            if "si" in level["modes"] and "nonsi" in level["modes"]:
                best = min(level["modes"]["si"]["latency_p50_s"], level["modes"]["nonsi"]["latency_p50_s"])
                best_p50 = level["modes"]["dsi"]["latency_p50_s"] / best if best else None
            rows.append([
                _level_label(level), f"{cell['a']:g}", _f(level["dsi_over_si_tokens_per_s"], ".2f"),
                _f(level["dsi_over_si_tokens_per_s_paired"], ".2f"),
                _f(level.get("dsi_over_nonsi_tokens_per_s"), ".2f"),
                _f(level.get("dsi_over_nonsi_tokens_per_s_paired"), ".2f"), _f(level["dsi_over_si_p50"], ".2f"),
                _f(level["dsi_over_si_p99"], ".2f"), _f(best_p50, ".2f"),
            ])
    return rows


def _title(result: dict[str, Any]) -> str:
    s = result["settings"]
    cs = ",".join(f"{c:g}" for c in s["c_values"])
    sp = s["sp_degree"] or s["targets"]
    per_token = f" + {s['token_ms']:g} ms per token computed" if s.get("token_ms") else ""
    prompt = f", prompts of ~{s['prompt_tokens']} tokens" if s.get("prompt_tokens") else ""
    return (f"Load: {s['targets']} targets emulated at {s['target_ms']:g} ms (prefill "
            f"{s['prefill_ms'] if s['prefill_ms'] is not None else s['target_ms']:g} ms){per_token}{prompt}, "
            f"drafter c={cs}, "
            f"L={s['lookahead']}, SP={sp}, {s['max_new_tokens']} new tokens per request, medians over "
            f"{s['repeats']} repetitions; {ORACLE_LABEL}")


CAPTION = (
    "tok/s: committed tokens of all requests / (first send to last answer); p50/p99: request latency; TTFT: "
    "client time to first token; busy: orchestrator's target-busy seconds / (targets x run time); fwd/tok: "
    "completed target forwards per committed token; comp tok/tok: prompt + window tokens the targets computed per "
    "committed token; fill tok/req: tokens computed only to fill caches (prompt prefills, catch-ups) per request; "
    "drafts/win: drafts verified per applied window; drafter busy: drafts the drafter completed x its emulated "
    "latency / run time (a lower bound); drafts/tok: drafts it completed per committed token; pass: DSI tok/s >= "
    f"{TOKENS_MIN} x best and p50 <= {P50_MAX} x best"
)


def print_report(result: dict[str, Any], console: Any) -> None:
    from rich.table import Table

    table = Table(title=_title(result), title_justify="left", caption=CAPTION, caption_justify="left")
    for i, h in enumerate(HEADERS):
        table.add_column(h, justify="left" if i < 3 else "right")
    for r in table_rows(result):
        table.add_row(*r)
    console.print(table)
    ratios = Table(title="DSI against SI and non-SI", title_justify="left", caption=RATIO_CAPTION,
                   caption_justify="left")
    for i, h in enumerate(RATIO_HEADERS):
        ratios.add_column(h, justify="left" if i < 2 else "right")
    for r in ratio_rows(result):
        ratios.add_row(*r)
    console.print(ratios)
    console.print(_load_line(result))


def _load_line(result: dict[str, Any]) -> str:
    before = ", ".join(f"{x:.2f}" for x in result["load_average_start"])
    after = ", ".join(f"{x:.2f}" for x in result["load_average_end"])
    return (f"Load average (1, 5, 15 min) at start: {before}; at end: {after}; "
            f"{result['machine'].get('cpus_usable')} usable CPUs; wall time {result['wall_s'] / 60:.1f} min.")


def markdown(result: dict[str, Any]) -> str:
    def md_table(headers: Sequence[str], rows: list[list[str]]) -> list[str]:
        lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
        return lines + ["| " + " | ".join(r) + " |" for r in rows]

    m = result["machine"]
    return "\n".join([
        f"{_title(result)}.",
        "",
        f"Machine: {m.get('cpu_model', m.get('processor'))}, {m.get('cpus_usable')} CPUs, GPU {m.get('gpu')}; "
        f"torch {m.get('torch')}, transformers {m.get('transformers')}, grpc {m.get('grpc')}, "
        f"Python {m.get('python')}. {_load_line(result)}",
        "",
        *md_table(RATIO_HEADERS, ratio_rows(result)),
        "",
        RATIO_CAPTION[0].upper() + RATIO_CAPTION[1:] + ".",
        "",
        *md_table(HEADERS, table_rows(result)),
        "",
        CAPTION + ".",
        "",
    ])


def write_figure(result: dict[str, Any], path: Path) -> Path:
    """Per cell: tokens/s and p99 latency against concurrency, one line per mode (closed loop)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = result["cells"]
    fig, axes = plt.subplots(len(cells), 2, figsize=(11, 3.6 * len(cells)), squeeze=False)
    colors = {"nonsi": "tab:gray", "si": "tab:blue", "dsi": "tab:orange"}
    for row, cell in zip(axes, cells, strict=True):
        closed = [lv for lv in cell["levels"] if lv["kind"] == "closed"]
        xs = [lv["concurrency"] for lv in closed]
        for mode in result["settings"]["modes"]:
            tps = [lv["modes"][mode]["tokens_per_s"] for lv in closed]
            noise = [lv["modes"][mode]["tokens_per_s_noise"] for lv in closed]
            row[0].errorbar(xs, tps, yerr=noise, marker="o", color=colors.get(mode), label=mode, capsize=3)
            row[1].plot(xs, [lv["modes"][mode]["latency_p99_s"] for lv in closed], marker="o",
                        color=colors.get(mode), label=mode)
        for ax, what in ((row[0], "aggregate tokens/s"), (row[1], "p99 latency (s)")):
            ax.set_xscale("log", base=2)
            ax.set_xticks(xs, [str(x) for x in xs])
            ax.set_xlabel("concurrent requests C")
            ax.set_ylabel(what)
            ax.set_title(f"{what}, c={cell['c']:g} a={cell['a']:g}", fontsize=9)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    s = result["settings"]
    fig.suptitle(f"dsi bench load: {s['targets']} targets at {s['target_ms']:g} ms, L={s['lookahead']}, "
                 f"{s['max_new_tokens']} tokens/request ({ORACLE_LABEL})", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def write_outputs(result: dict[str, Any], out_dir: Path, name: str = "load.json") -> list[Path]:
    """``name`` (JSON), the markdown tables (``.md``) and the figure (``.png``) next to it."""
    path = write_compact_json(result, out_dir / name)
    md = path.with_suffix(".md")
    md.write_text(markdown(result))
    paths = [path, md]
    if any(lv["kind"] == "closed" for cell in result["cells"] for lv in cell["levels"]):
        paths.append(write_figure(result, path.with_suffix(".png")))
    return paths
