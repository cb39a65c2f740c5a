"""The benchmark itself: the grid of emulated cells, the overhead probes and the real-model run.

Terms: a **cell** is one (drafter latency c, acceptance a) setting of the emulated grid. Each cell
needs its own cluster, since emulated latencies and the oracle acceptance are fixed at start-up.
Time per token is the client's wall time of one ``Generate`` call divided by its new tokens, so it
includes prefill, gRPC and scheduling; each mode's figure is the median over the prompts and its
noise is half the range over the prompts. Each prompt has its own sampling seed, the same in every
mode, so the oracle drafter accepts the same positions in SI and DSI.
"""

from __future__ import annotations

import logging
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

MODES = ("nonsi", "si", "dsi")
# DSI with the server's automatic lookahead (``dsi bench --auto-lookahead``), and the criterion: its
# ms/token at most AUTO_MAX x DSI's with the simulator's best fixed lookahead for the cell.
AUTO_MODE = "dsi_auto"
AUTO_MAX = 1.05
AUTO_WARMUP = 10
ORACLE_LABEL = "oracle drafter (controlled acceptance, benchmark only)"
CORES_NOTE = (
    "the real-model run puts every target, the drafter and the orchestrator on the same CPU cores, so "
    "parallel targets compete for the cores instead of running on separate devices"
)
# Short prompts; their content hardly matters: emulation dominates timings, and the oracle drafter's
# acceptance does not depend on the text.
PROMPTS = (
    "def fibonacci(n):",
    "import os\nimport sys\n",
    "class Stack:\n    def __init__(self):",
    "The quick brown fox",
    "for i in range(10):",
    "# Compute the greatest common divisor",
    "def parse(text: str) -> list[str]:",
    "Hello, world! Today",
)

# Criteria the emulated cells must reach (checked and reported, never tuned per run).
SIM_RATIO_MIN = 0.9  # measured DSI/SI speedup >= 0.9 x the simulator's


@dataclass
class BenchSettings:
    """What to run. Times in milliseconds; ``c_values`` are fractions of ``target_ms``."""

    targets: int = 4
    c_values: list[float] = field(default_factory=lambda: [0.05, 0.1, 0.2, 0.5])
    a_values: list[float] = field(default_factory=lambda: [0.3, 0.6, 0.8, 0.95])
    target_ms: float = 40.0
    prefill_ms: float | None = None  # None = target_ms
    prompts: int = 4
    max_new_tokens: int = 64
    out_dir: str = "bench-results"
    address: str = ""
    skip_emulated: bool = False
    skip_real: bool = False
    skip_overhead: bool = False
    real_lookahead: int = 5
    hf_threads: int = 1
    cancel_trials: int = 5
    sim_runs: int = 200
    startup_timeout_s: float = 300.0
    quick: bool = False
    # Also run DSI with the orchestrator's automatic lookahead (--lookahead auto) in every cell.
    auto_lookahead: bool = False

    @property
    def prefill(self) -> float:
        return self.target_ms if self.prefill_ms is None else self.prefill_ms


ProgressFn = Callable[[str], None]


def _noop(_: str) -> None:
    pass


# --------------------------------------------------------------------------------------------- stats


@dataclass
class ModeRun:
    """One mode over all prompts."""

    ms_per_token: list[float] = field(default_factory=list)  # client wall time / new tokens, per prompt
    server_ms_per_token: list[float] = field(default_factory=list)  # orchestrator's wall_s / new tokens
    acceptance: list[float] = field(default_factory=list)
    windows_dispatched: list[int] = field(default_factory=list)
    windows_cancelled: list[int] = field(default_factory=list)
    max_windows_in_flight: list[int] = field(default_factory=list)
    wasted_target_s: list[float] = field(default_factory=list)
    ttft_ms: list[float] = field(default_factory=list)
    new_tokens: list[int] = field(default_factory=list)
    epochs: list[int] = field(default_factory=list)
    drafter_streams: list[int] = field(default_factory=list)  # Draft calls the drafter received
    lookahead: list[int] = field(default_factory=list)  # what the request ran with (auto: what was chosen)
    auto_tuned: list[bool] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.ms_per_token)

    @property
    def noise(self) -> float:
        return (max(self.ms_per_token) - min(self.ms_per_token)) / 2

    def summary(self) -> dict[str, Any]:
        return {
            "ms_per_token": self.median,
            "noise_ms": self.noise,
            "server_ms_per_token": statistics.median(self.server_ms_per_token),
            "acceptance_rate": statistics.mean(self.acceptance),
            "windows_dispatched": statistics.mean(self.windows_dispatched),
            "windows_cancelled": statistics.mean(self.windows_cancelled),
            "max_windows_in_flight": max(self.max_windows_in_flight),
            "wasted_target_s": statistics.mean(self.wasted_target_s),
            "ttft_ms": statistics.median(self.ttft_ms),
            "epochs": statistics.mean(self.epochs),
            "drafter_streams": statistics.mean(self.drafter_streams) if self.drafter_streams else None,
            "lookahead": self.lookahead,
            "auto_tuned": self.auto_tuned,
            "per_prompt_ms_per_token": self.ms_per_token,
            "new_tokens": self.new_tokens,
        }


def measure_modes(
    address: str,
    prompts: Sequence[str],
    max_new_tokens: int,
    lookahead: int,
    sp: int,
    progress: ProgressFn = _noop,
    auto: bool = False,
) -> dict[str, ModeRun]:
    """Run every mode on every prompt (modes interleaved per prompt, so drift hits them alike). With
    ``auto`` (the server runs --lookahead auto), also DSI with lookahead 0, the server's choice, as
    the run ``dsi_auto``; the server first measures over ``AUTO_WARMUP`` short requests."""
    from dsi.client import Client

    modes: tuple[str, ...] = (*MODES, AUTO_MODE) if auto else MODES
    runs = {m: ModeRun() for m in modes}
    with Client(address, timeout=600.0) as client:
        drafter_calls = _drafter_call_counter(client.info().get("drafter_address", ""))
        for mode in MODES:  # warm-up: sessions, connections, the tokenizer
            client.generate(prompts[0], max_new_tokens=4, mode=mode, lookahead=lookahead, sp_degree=sp, ignore_eos=True)
        for i in range(AUTO_WARMUP if auto else 0):  # the automatic lookahead's measurements
            client.generate(prompts[i % len(prompts)], max_new_tokens=16, mode="dsi", lookahead=lookahead,
                            sp_degree=sp, ignore_eos=True, seed=i)
        for index, prompt in enumerate(prompts):
            # One seed per prompt, the same in every mode: the oracle drafter's accept/reject draw is
            # a function of (seed, position), so SI and DSI see the same acceptances (common random
            # numbers, as in the simulator) and their ratio is not blurred by acceptance noise.
            seed = 1000 + index
            # The two DSI runs swap places every other prompt, so neither always follows the other.
            order = modes if index % 2 == 0 or not auto else (*MODES[:-1], AUTO_MODE, MODES[-1])
            for mode in order:
                calls_before = drafter_calls()
                t0 = time.perf_counter()
                res = client.generate(
                    prompt,
                    max_new_tokens=max_new_tokens,
                    mode="dsi" if mode == AUTO_MODE else mode,
                    lookahead=0 if mode == AUTO_MODE else lookahead,
                    sp_degree=sp,
                    ignore_eos=True,
                    seed=seed,
                )
                wall = time.perf_counter() - t0
                n = max(1, len(res.token_ids))
                s = res.stats
                r = runs[mode]
                r.ms_per_token.append(wall * 1000 / n)
                r.server_ms_per_token.append(float(s.get("wall_s", wall)) * 1000 / n)
                r.acceptance.append(float(s.get("acceptance_rate", 0.0)))
                r.windows_dispatched.append(int(s.get("windows_dispatched", 0)))
                r.windows_cancelled.append(int(s.get("windows_cancelled", 0)))
                r.max_windows_in_flight.append(int(s.get("max_windows_in_flight", 0)))
                r.wasted_target_s.append(float(s.get("wasted_target_s", 0.0)))
                r.ttft_ms.append(float(s.get("ttft_s", 0.0)) * 1000)
                r.new_tokens.append(len(res.token_ids))
                r.epochs.append(int(s.get("epochs", 0)))
                r.lookahead.append(int(s.get("lookahead", lookahead)))
                r.auto_tuned.append(bool(s.get("auto_tuned", False)))
                calls_after = drafter_calls()
                if calls_before is not None and calls_after is not None:
                    r.drafter_streams.append(calls_after - calls_before)
                progress(f"{mode} {n} tokens")
    return runs


def _drafter_call_counter(address: str) -> Callable[[], int | None]:
    """A function reading the drafter's Draft-call counter (one call = one draft stream), or None."""
    if not address:
        return lambda: None
    import grpc

    from dsi.v1 import drafter_pb2, drafter_pb2_grpc

    channel = grpc.insecure_channel(address)
    stub = drafter_pb2_grpc.DrafterServiceStub(channel)

    def read() -> int | None:
        try:
            return int(stub.Info(drafter_pb2.DrafterInfoRequest(), timeout=5).counters.calls)
        except grpc.RpcError:
            return None

    return read


# ----------------------------------------------------------------------------------------- emulated


def predict(c: float, a: float, sp: int, tokens: int, runs: int) -> tuple[int, Any]:
    """The simulator's best lookahead for the cell and its result (in target latencies)."""
    from dsi.sim.model import best_lookahead

    return best_lookahead(c, a, sp, tokens=tokens, runs=runs)


def evaluate_cell(cell: dict[str, Any], sp: int) -> dict[str, Any]:
    """Speedups, measured/predicted ratio and the two PASS/FAIL criteria of one emulated cell."""
    m = cell["modes"]
    p = cell["predicted"]
    nonsi, si, dsi = (m[k]["ms_per_token"] for k in MODES)
    speed_si = si / dsi
    speed_nonsi = nonsi / dsi
    best_other = "si" if si <= nonsi else "nonsi"
    noise = max(m["dsi"]["noise_ms"], m[best_other]["noise_ms"])
    # The criteria apply where the simulator says DSI wins with this many targets ("enough targets").
    applies = sp >= 2 and p["dsi_ms"] < min(p["si_ms"], p["nonsi_ms"])
    fastest = dsi <= min(si, nonsi) + noise
    vs_sim = speed_si >= SIM_RATIO_MIN * p["speedup_dsi_over_si"]
    return {
        "speedup_dsi_over_si": speed_si,
        "speedup_dsi_over_nonsi": speed_nonsi,
        "speedup_si_over_nonsi": nonsi / si,
        "ratio_speedup_dsi_over_si": speed_si / p["speedup_dsi_over_si"],
        "ratio_speedup_dsi_over_nonsi": speed_nonsi / p["speedup_dsi_over_nonsi"],
        "criteria_apply": applies,
        "dsi_fastest": {
            "pass": fastest,
            "dsi_ms": dsi,
            "best_other": best_other,
            "best_other_ms": min(si, nonsi),
            "noise_ms": noise,
        },
        "dsi_vs_sim": {
            "pass": vs_sim,
            "measured": speed_si,
            "predicted": p["speedup_dsi_over_si"],
            "threshold": SIM_RATIO_MIN,
        },
    }


def window_overhead_ms(nonsi: ModeRun, prefill_ms: float, decode_ms: float) -> list[float]:
    """Per prompt: non-SI wall time beyond the emulated forward passes, per window dispatched.

    Non-SI dispatches one window per token, the first one a prefill; everything beyond the padded
    forward latencies is gRPC, scheduling, sampling, detokenisation and the client.
    """
    out = []
    for ms, n, w in zip(nonsi.ms_per_token, nonsi.new_tokens, nonsi.windows_dispatched, strict=True):
        wall = ms * n
        windows = max(1, w)
        out.append((wall - prefill_ms - (windows - 1) * decode_ms) / windows)
    return out


def run_cell(pair: tuple[Path, Path], c: float, a: float, s: BenchSettings, progress: ProgressFn) -> dict[str, Any]:
    from dsi.cluster import ClusterSpec, LocalCluster

    sp = s.targets
    lookahead, sim = predict(c, a, sp, s.max_new_tokens, s.sim_runs)
    drafter_ms = c * s.target_ms
    spec = ClusterSpec(
        target_model=str(pair[0]),
        drafter_model=str(pair[1]),
        targets=s.targets,
        port=0,
        threads=1,
        emulate_target_ms=f"{s.prefill}:{s.target_ms}",
        emulate_drafter_ms=f"{drafter_ms}:{drafter_ms}",
        oracle_acceptance=a,
        lookahead=0 if s.auto_lookahead else lookahead,  # 0: --lookahead auto (requests give theirs)
        startup_timeout_s=s.startup_timeout_s,
    )
    cluster = LocalCluster(spec)
    progress(f"c={c} a={a}: starting cluster")
    t0 = time.perf_counter()
    try:
        address = cluster.start()
        startup_s = time.perf_counter() - t0
        runs = measure_modes(address, PROMPTS[: s.prompts], s.max_new_tokens, lookahead, sp, progress,
                             auto=s.auto_lookahead)
    finally:
        cluster.stop()
    return _cell_result(c, a, lookahead, sp, sim, runs, s, startup_s)


def _cell_result(
    c: float,
    a: float,
    lookahead: int,
    sp: int,
    sim: Any,
    runs: dict[str, ModeRun],
    s: BenchSettings,
    startup_s: float,
) -> dict[str, Any]:
    t = s.target_ms
    cell: dict[str, Any] = {
        "c": c,
        "a": a,
        "lookahead": lookahead,
        "sp": sp,
        "drafter_ms": c * t,
        "cluster_startup_s": startup_s,
        "modes": {m: runs[m].summary() for m in MODES},
        "predicted": {
            "nonsi_ms": sim.nonsi * t,
            "si_ms": sim.si_analytic * t,
            "dsi_ms": sim.dsi * t,
            "dsi_std_ms": sim.dsi_std * t,
            "required_sp": sim.required_sp,
            "speedup_dsi_over_si": sim.speedup_dsi_over_si,
            "speedup_dsi_over_nonsi": sim.speedup_dsi_over_nonsi,
            "speedup_si_over_nonsi": sim.speedup_si_over_nonsi,
        },
    }
    overhead = window_overhead_ms(runs["nonsi"], s.prefill, t)
    cell["overhead_ms_per_window"] = statistics.median(overhead)
    cell["diagnosis"] = diagnose(c, a, lookahead, sp, t, cell["overhead_ms_per_window"], runs, s)
    cell.update(evaluate_cell(cell, sp))
    if AUTO_MODE in runs:
        auto, fixed = runs[AUTO_MODE], runs["dsi"]
        ratio = auto.median / fixed.median
        cell["auto"] = {
            **auto.summary(),
            "lookahead_chosen": max(set(auto.lookahead), key=auto.lookahead.count),
            "ratio_to_best_fixed": ratio,
            "pass": ratio <= AUTO_MAX + (auto.noise + fixed.noise) / fixed.median,
        }
    return cell


def diagnose(
    c: float,
    a: float,
    lookahead: int,
    sp: int,
    t: float,
    overhead_ms: float,
    runs: dict[str, ModeRun],
    s: BenchSettings,
) -> dict[str, Any]:
    """The simulator with the system's measured overheads put in, to tell overhead from scheduling.

    Every target forward becomes ``t + overhead`` (non-SI's per-window overhead), and the drafter's
    per-draft latency is what SI's rounds imply: an SI round takes ``L d + t + overhead`` and commits
    ``E[n]`` tokens, so ``d = (SI ms/token x E[n] - t - overhead) / L`` (never below the emulated
    ``c t``). If measured DSI/SI matches this prediction, the gap to the ideal one is overhead (of
    the windows and of each streamed draft), not the scheduler. Also: the simulator at the acceptance
    DSI actually saw (few tokens make it noisy).
    """
    from dsi.sim.model import SimSettings, simulate

    t_eff = t + max(0.0, overhead_ms)
    expected_tokens = lookahead + 1.0 if a >= 1.0 else (1.0 - a ** (lookahead + 1)) / (1.0 - a)
    draft_ms = max(c * t, (runs["si"].median * expected_tokens - t_eff) / lookahead)
    common = dict(lookahead=lookahead, sp=sp, tokens=s.max_new_tokens, runs=s.sim_runs)
    with_overhead = simulate(SimSettings(drafter_latency=draft_ms / t_eff, acceptance=a, **common))  # type: ignore[arg-type]
    a_seen = min(1.0, max(0.0, statistics.mean(runs["dsi"].acceptance)))
    at_seen = simulate(SimSettings(drafter_latency=c, acceptance=a_seen, **common))  # type: ignore[arg-type]
    return {
        "effective_target_ms": t_eff,
        "effective_draft_ms": draft_ms,
        "with_overhead": {
            "nonsi_ms": t_eff,
            "si_ms": with_overhead.si_analytic * t_eff,
            "dsi_ms": with_overhead.dsi * t_eff,
            "speedup_dsi_over_si": with_overhead.speedup_dsi_over_si,
        },
        "dsi_acceptance_seen": a_seen,
        "at_seen_acceptance": {"speedup_dsi_over_si": at_seen.speedup_dsi_over_si, "dsi_ms": at_seen.dsi * t},
    }


def tiny_pair(root: Path) -> tuple[Path, Path]:
    """A very small random pair: emulation pads every forward, so the model only has to be quick."""
    from dsi.tiny_models import TinyPairSpec, build_tiny_pair

    if not all((root / n / "config.json").is_file() for n in ("target", "drafter")):
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        build_tiny_pair(root, TinyPairSpec(hidden_size=64, target_layers=2, drafter_layers=2))
    return root / "target", root / "drafter"


# ------------------------------------------------------------------------------------- cancel probe


def cancel_to_free(
    model: Path,
    s: BenchSettings,
    decode_ms: float = 200.0,
    cancel_after_ms: float = 50.0,
    progress: ProgressFn = _noop,
) -> dict[str, Any]:
    """How long after a cancel a target takes the next Verify.

    A target with ``decode_ms`` emulated decode latency gets a Verify, which is cancelled after
    ``cancel_after_ms``; another Verify is issued at once. Its latency minus the latency of an
    uncontended Verify is the time the target needed to become free (0 would be ideal).
    """
    import grpc

    from dsi.cluster import launch_and_wait, serve_command, stop_process
    from dsi.v1 import common_pb2, target_pb2, target_pb2_grpc

    log_path = Path(tempfile.mkdtemp(prefix="dsi-bench-target-")) / "target.log"
    args = ["--model", str(model), "--threads", "1", "--emulate-latency-ms", f"{decode_ms}:{decode_ms}"]
    probe = launch_and_wait(
        "probe target", serve_command("target", args), log_path, s.startup_timeout_s, new_session=True
    )
    proc, address = probe.process, probe.address
    try:
        sampling = common_pb2.SamplingParams(temperature=0.0, verification=common_pb2.VERIFICATION_COUPLED)
        prefix = list(range(1, 17))

        def req(extra: list[int]) -> target_pb2.VerifyRequest:
            return target_pb2.VerifyRequest(
                request_id="bench-cancel",
                session_id="probe",
                token_ids=prefix + extra,
                first_position=len(prefix),
                sampling=sampling,
            )

        with grpc.insecure_channel(address) as channel:
            stub = target_pb2_grpc.TargetServiceStub(channel)
            stub.Verify(
                target_pb2.VerifyRequest(
                    session_id="probe", token_ids=prefix, first_position=len(prefix), sampling=sampling
                ),
                timeout=30,
            )  # prefill
            own = []
            for i in range(3):
                t0 = time.perf_counter()
                stub.Verify(req([5 + i]), timeout=30)
                own.append((time.perf_counter() - t0) * 1000)
            own_ms = statistics.median(own)
            extra = []
            for i in range(s.cancel_trials):
                fut = stub.Verify.future(req([7, 8 + i]), timeout=30)
                time.sleep(cancel_after_ms / 1000)
                fut.cancel()
                t0 = time.perf_counter()
                stub.Verify(req([9 + i]), timeout=30)
                extra.append((time.perf_counter() - t0) * 1000 - own_ms)
                progress(f"cancel trial {i + 1}")
    finally:
        stop_process(proc)
    return {
        "decode_ms": decode_ms,
        "cancel_after_ms": cancel_after_ms,
        "own_latency_ms": own_ms,
        "cancel_to_free_ms": statistics.median(extra),
        "cancel_to_free_max_ms": max(extra),
        "samples_ms": extra,
    }


# ---------------------------------------------------------------------------------------------- real


def run_real(s: BenchSettings, progress: ProgressFn = _noop, address: str = "") -> dict[str, Any]:
    """The real models, no emulation, through the system; then the HuggingFace baselines in-process."""
    from dsi.cluster import ClusterSpec, LocalCluster
    from dsi.default_pair import ensure_default_pair

    pair = ensure_default_pair()
    target_path, drafter_path = pair.target, pair.drafter
    prompts = PROMPTS[: s.prompts]
    cluster = None
    try:
        if not address:
            cluster = LocalCluster(
                ClusterSpec(
                    targets=s.targets,
                    port=0,
                    threads=1,
                    lookahead=s.real_lookahead,
                    startup_timeout_s=s.startup_timeout_s,
                )
            )
            progress("real: starting cluster")
            address = cluster.start()
        else:
            target_path, drafter_path = _models_of(address, target_path, drafter_path)
        runs = measure_modes(address, prompts, s.max_new_tokens, s.real_lookahead, s.targets, progress)
    finally:
        if cluster is not None:
            cluster.stop()  # before the baselines, so that they have the cores to themselves
    hf = hf_baselines(target_path, drafter_path, prompts, s.max_new_tokens, s.hf_threads, progress)
    modes = {m: runs[m].summary() for m in MODES}
    return {
        "target_model": str(target_path),
        "drafter_model": str(drafter_path),
        "trained_pair": pair.trained,
        "lookahead": s.real_lookahead,
        "sp": s.targets,
        "note": CORES_NOTE,
        "modes": modes,
        "hf": hf,
        "system_overhead_ms_per_token": modes["nonsi"]["ms_per_token"] - hf["generate"]["ms_per_token"],
    }


def _models_of(address: str, target: Path, drafter: Path) -> tuple[Path, Path]:
    """The checkpoints an existing orchestrator reports, when they are local directories."""
    from dsi.client import Client

    with Client(address, timeout=10.0) as client:
        info = client.info()
    t = Path(info.get("target_model", {}).get("model", ""))
    d = Path(info.get("drafter_model", {}).get("model", ""))
    return (t if t.is_dir() else target), (d if d.is_dir() else drafter)


def hf_baselines(
    target: Path,
    drafter: Path,
    prompts: Sequence[str],
    max_new_tokens: int,
    threads: int,
    progress: ProgressFn = _noop,
) -> dict[str, Any]:
    from dsi.bench.hf_baseline import run_hf_baselines

    return run_hf_baselines(target, drafter, prompts, max_new_tokens, threads, progress)


# ------------------------------------------------------------------------------------------ machine


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "python": platform.python_version(),
        "gpu": None,
    }
    for name in ("torch", "transformers", "grpc", "numpy"):
        try:
            module = __import__(name)
            info[name] = getattr(module, "__version__", "?")
        except ImportError:
            info[name] = None
    try:
        import torch

        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu_model"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return info


# ----------------------------------------------------------------------------------------------- run


def total_steps(s: BenchSettings) -> int:
    """Progress steps: one per generate call, one per cluster start, one per cancel trial."""
    per_cluster = 1 + (len(MODES) + int(s.auto_lookahead)) * s.prompts
    steps = 0
    if not s.skip_emulated:
        steps += len(s.c_values) * len(s.a_values) * per_cluster if not s.address else len(MODES) * s.prompts
    if not s.skip_overhead and not s.address:
        steps += s.cancel_trials
    if not s.skip_real:
        steps += per_cluster + 2 * s.prompts
    return steps


def run_bench(s: BenchSettings, progress: ProgressFn = _noop) -> dict[str, Any]:
    """Run everything the settings ask for and return the JSON-ready result."""
    result: dict[str, Any] = {
        "machine": machine_info(),
        "settings": asdict(s),
        "oracle_label": ORACLE_LABEL,
        "criteria": {
            "dsi_fastest": "DSI ms/token <= min(SI, non-SI) ms/token + noise (half-range over prompts)",
            "dsi_vs_sim": f"measured DSI/SI speedup >= {SIM_RATIO_MIN} x the simulator's prediction",
            "apply_when": "SP >= 2 and the simulator predicts DSI faster than SI and non-SI at this SP",
        },
        "emulated": [],
        "overhead": {},
        "real": None,
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    existing_is_oracle = False
    if s.address:
        existing_is_oracle = _oracle_acceptance(s.address) > 0
    with tempfile.TemporaryDirectory(prefix="dsi-bench-pair-") as tmp:
        pair = None
        if not s.skip_emulated and not s.address:
            pair = tiny_pair(Path(tmp))
            for c in s.c_values:
                for a in s.a_values:
                    result["emulated"].append(run_cell(pair, c, a, s, progress))
        elif not s.skip_emulated and existing_is_oracle:
            result["emulated"].append(_existing_cell(s, progress))
        if result["emulated"]:
            overheads = [cell["overhead_ms_per_window"] for cell in result["emulated"]]
            result["overhead"]["ms_per_window_median"] = statistics.median(overheads)
            result["overhead"]["ms_per_window_by_cell"] = overheads
        if not s.skip_overhead and not s.address:
            pair = pair or tiny_pair(Path(tmp))
            result["overhead"]["cancel"] = cancel_to_free(pair[0], s, progress=progress)
    if not s.skip_real and not (s.address and existing_is_oracle):
        result["real"] = run_real(s, progress, address=s.address)
    cells = [c for c in result["emulated"] if c["criteria_apply"]]
    result["summary"] = {
        "cells": len(result["emulated"]),
        "cells_checked": len(cells),
        "dsi_fastest_pass": sum(c["dsi_fastest"]["pass"] for c in cells),
        "dsi_vs_sim_pass": sum(c["dsi_vs_sim"]["pass"] for c in cells),
        "all_pass": all(c["dsi_fastest"]["pass"] and c["dsi_vs_sim"]["pass"] for c in cells),
    }
    auto_cells = [c for c in result["emulated"] if "auto" in c]
    if auto_cells:
        result["summary"]["auto_lookahead_pass"] = sum(c["auto"]["pass"] for c in auto_cells)
        result["summary"]["auto_lookahead_cells"] = len(auto_cells)
        result["criteria"]["auto_lookahead"] = (
            f"DSI with --lookahead auto: ms/token <= {AUTO_MAX} x DSI at the simulator's best fixed lookahead "
            "+ noise (half-ranges), every cell")
    result["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return result


def _oracle_acceptance(address: str) -> float:
    import grpc

    from dsi.client import Client
    from dsi.v1 import drafter_pb2, drafter_pb2_grpc

    with Client(address, timeout=10.0) as client:
        drafter = client.info().get("drafter_address", "")
    if not drafter:
        return 0.0
    with grpc.insecure_channel(drafter) as channel:
        try:
            info = drafter_pb2_grpc.DrafterServiceStub(channel).Info(drafter_pb2.DrafterInfoRequest(), timeout=10)
        except grpc.RpcError:
            return 0.0
    return float(info.oracle_acceptance)


def _existing_cell(s: BenchSettings, progress: ProgressFn) -> dict[str, Any]:
    """One cell on an existing emulated cluster: c and the target latency are what the caller says it
    was started with (the first --c-values value and --target-ms); a comes from the drafter."""
    from dsi.client import Client

    a = round(_oracle_acceptance(s.address), 4)
    with Client(s.address, timeout=10.0) as client:
        sp = sum(1 for t in client.info().get("targets", []) if t.get("healthy"))
    c = s.c_values[0]
    lookahead, sim = predict(c, a, max(1, sp), s.max_new_tokens, s.sim_runs)
    runs = measure_modes(s.address, PROMPTS[: s.prompts], s.max_new_tokens, lookahead, sp, progress)
    return _cell_result(c, a, lookahead, max(1, sp), sim, runs, s, 0.0)
