"""``dsi bench``: the benchmark command (see :mod:`dsi.bench.runner` for what it measures)."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from dsi.envflags import add_flag

__all__ = ["register"]

# --quick: a 2x2 grid with short outputs (the integration test runs it).
_QUICK: dict[str, Any] = {
    "c_values": [0.1, 0.5],
    "a_values": [0.6, 0.95],
    "prompts": 2,
    "max_new_tokens": 24,
    "cancel_trials": 3,
}


def _floats(text: str) -> list[float]:
    try:
        values = [float(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("must be a non-empty comma-separated list")
    return values


def register(subparsers: Any) -> None:
    """Add ``bench`` to an argparse subparsers object; its handler is ``args.func(args) -> int``."""
    p = subparsers.add_parser(
        "bench",
        help="benchmark non-SI, SI and DSI through the system against the simulator and HF baselines",
        description=(
            "Emulated part: for each drafter latency c (fraction of the target latency) and acceptance a "
            "(oracle drafter: controlled acceptance, benchmark only), start a cluster with emulated "
            "latencies, run non-SI, SI and DSI on the same prompts at the simulator's best lookahead, and "
            "compare with the simulator. Overhead: per-window orchestrator overhead and the target's "
            "cancel-to-free latency. Real part: the default model pair without emulation, next to "
            "HuggingFace generate() and generate(assistant_model=). Prints tables, writes bench.json, "
            "bench.png and overhead.png."
        ),
    )
    add_flag(p, "--targets", env="DSI_BENCH_TARGETS", type=int, default=4, help="target instances (= SP degree)")
    add_flag(
        p,
        "--c-values",
        env="DSI_BENCH_C_VALUES",
        type=_floats,
        default=None,
        help="drafter latencies as fractions of the target latency (default 0.05,0.1,0.2,0.5)",
    )
    add_flag(
        p,
        "--a-values",
        env="DSI_BENCH_A_VALUES",
        type=_floats,
        default=None,
        help="oracle acceptance rates (default 0.3,0.6,0.8,0.95)",
    )
    add_flag(
        p,
        "--target-ms",
        env="DSI_BENCH_TARGET_MS",
        type=float,
        default=40.0,
        help="emulated target decode latency per forward",
    )
    add_flag(
        p,
        "--prefill-ms",
        env="DSI_BENCH_PREFILL_MS",
        type=float,
        default=None,
        help="emulated target prefill latency (default: --target-ms)",
    )
    add_flag(
        p,
        "--prompts",
        env="DSI_BENCH_PROMPTS",
        type=int,
        default=None,
        help="prompts per mode (default 4, max 8)",
    )
    add_flag(
        p,
        "--max-new-tokens",
        env="DSI_BENCH_MAX_NEW_TOKENS",
        type=int,
        default=None,
        help="tokens per generation (default 64)",
    )
    add_flag(
        p,
        "--out-dir",
        env="DSI_BENCH_OUT_DIR",
        default="bench-results",
        help="where bench.json and the PNGs go",
    )
    add_flag(
        p,
        "--address",
        env="DSI_BENCH_ADDRESS",
        default="",
        help="measure this running orchestrator instead of starting clusters (an oracle-drafter cluster is "
        "one emulated cell: pass the --c-values and --target-ms it was started with)",
    )
    add_flag(
        p,
        "--skip-emulated",
        env="DSI_BENCH_SKIP_EMULATED",
        action="store_true",
        help="skip the emulated grid",
    )
    add_flag(
        p,
        "--skip-real",
        env="DSI_BENCH_SKIP_REAL",
        action="store_true",
        help="skip the real models and the HF baselines",
    )
    add_flag(
        p,
        "--skip-overhead",
        env="DSI_BENCH_SKIP_OVERHEAD",
        action="store_true",
        help="skip the cancel-to-free probe",
    )
    add_flag(
        p,
        "--real-lookahead",
        env="DSI_BENCH_REAL_LOOKAHEAD",
        type=int,
        default=5,
        help="lookahead of the real-model run",
    )
    add_flag(
        p,
        "--hf-threads",
        env="DSI_BENCH_HF_THREADS",
        type=int,
        default=1,
        help="torch threads of the HF baselines (the services use 1 each)",
    )
    add_flag(
        p,
        "--quick",
        env="DSI_BENCH_QUICK",
        action="store_true",
        help="2x2 grid (c 0.1,0.5; a 0.6,0.95), 2 prompts, 24 tokens; explicit flags still win",
    )
    add_flag(
        p,
        "--auto-lookahead",
        env="DSI_BENCH_AUTO_LOOKAHEAD",
        action="store_true",
        help="also run DSI with the orchestrator's automatic lookahead (--lookahead auto) in every cell and "
        "compare it with the simulator's best fixed lookahead (criterion: within 5%%)",
    )
    p.set_defaults(func=_run)
    commands = p.add_subparsers(dest="bench_command", metavar="SUBCOMMAND")
    _register_precision(commands)
    _register_load(commands)
    _register_window_cpu(commands)


def _register_window_cpu(subparsers: Any) -> None:
    """``dsi bench window-cpu`` (see :mod:`dsi.bench.window_cpu`)."""
    from dsi.bench.window_cpu import WindowCpuSettings

    d = WindowCpuSettings()
    p = subparsers.add_parser(
        "window-cpu",
        help="CPU per Verify window outside the model against context length: incremental vs full Verify",
        description=(
            "Run the orchestrator's and the target's Verify code paths in-process (no network, the model "
            "forward replaced by zero logits) for prompts of each --lengths, with incremental Verify (the "
            "default: a window sends only what the target does not hold) and with --full-verify, and report "
            "process CPU per window. Prints a table, writes --out-dir/--out-name (JSON) and a markdown table."
        ),
    )
    add_flag(p, "--lengths", env="DSI_BENCH_WINDOW_CPU_LENGTHS", type=_ints, default=d.lengths,
             help="prompt lengths in tokens (default 20,512,4096)")
    add_flag(p, "--windows", env="DSI_BENCH_WINDOW_CPU_WINDOWS", type=int, default=d.windows,
             help="windows per run (requests of 50 windows)")
    add_flag(p, "--repeats", env="DSI_BENCH_WINDOW_CPU_REPEATS", type=int, default=d.repeats,
             help="runs per cell; figures are medians")
    add_flag(p, "--lookahead", env="DSI_BENCH_WINDOW_CPU_LOOKAHEAD", type=int, default=d.lookahead,
             help="drafts per window")
    add_flag(p, "--out-dir", env="DSI_BENCH_WINDOW_CPU_OUT_DIR", default=d.out_dir, help="where the results go")
    add_flag(p, "--out-name", env="DSI_BENCH_WINDOW_CPU_OUT_NAME", default=d.out_name,
             help="JSON file name (the markdown table gets the same stem, .md)")
    p.set_defaults(func=_run_window_cpu)


def _run_window_cpu(ns: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    from dsi.bench.window_cpu import HEADER, MODES, WindowCpuSettings, run_window_cpu, table, write_outputs

    s = WindowCpuSettings(lengths=ns.lengths, windows=ns.windows, repeats=ns.repeats, lookahead=ns.lookahead,
                          out_dir=ns.out_dir, out_name=ns.out_name)
    errors = s.validate()
    if errors:
        for e in errors:
            print(f"dsi bench window-cpu: {e}", file=sys.stderr)
        return 2
    console = Console(width=None if sys.stdout.isatty() else 200)
    err = Console(stderr=True)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=err, transient=True) as progress:
        task = progress.add_task("dsi bench window-cpu", total=len(s.lengths) * len(MODES))

        def step(what: str) -> None:
            progress.update(task, advance=1, description=what)

        result = run_window_cpu(s, step)
    t = Table(*HEADER, title="CPU per Verify window outside the model")
    for row in table(result):
        t.add_row(*row)
    console.print(t)
    paths = write_outputs(result, Path(s.out_dir), s.out_name)
    console.print("wrote " + ", ".join(str(p) for p in paths))
    return 0


def _register_precision(subparsers: Any) -> None:
    """``dsi bench precision`` (see :mod:`dsi.bench.precision`)."""
    from dsi.bench.precision import DTYPES, PrecisionSettings

    d = PrecisionSettings()
    p = subparsers.add_parser(
        "precision",
        help="how often DSI, SI and non-SI disagree in float32, bfloat16 and float16 (tiny architectures)",
        description=(
            "For each tiny architecture pair and dtype, start a cluster (targets and drafter in that dtype), "
            "run non-SI once, SI once and DSI --repeats times per prompt (greedy, and seeded sampling), and "
            "transformers' generate in-process in the same dtype; count the prompts where DSI or SI differ "
            "from non-SI, where DSI runs differ among themselves and where non-SI differs from transformers, "
            "with the median first divergence and ms/token per mode. Prints a table, writes "
            "--out-dir/--out-name (JSON) and a markdown table next to it."
        ),
    )
    add_flag(p, "--archs", env="DSI_BENCH_PRECISION_ARCHS", type=_names, default=[],
             help="comma-separated architecture families (default: all of dsi.tiny_models.ARCHITECTURES)")
    add_flag(p, "--dtypes", env="DSI_BENCH_PRECISION_DTYPES", type=_names, default=list(DTYPES),
             help=f"comma-separated dtypes (default {','.join(DTYPES)})")
    add_flag(p, "--prompts", env="DSI_BENCH_PRECISION_PROMPTS", type=int, default=d.prompts, help="prompts per row")
    add_flag(p, "--new-tokens", env="DSI_BENCH_PRECISION_NEW_TOKENS", type=int, default=d.new_tokens,
             help="tokens per generation (EOS ignored)")
    add_flag(p, "--repeats", env="DSI_BENCH_PRECISION_REPEATS", type=int, default=d.repeats,
             help="DSI runs per prompt")
    add_flag(p, "--targets", env="DSI_BENCH_PRECISION_TARGETS", type=int, default=d.targets,
             help="target instances (= SP degree)")
    add_flag(p, "--lookahead", env="DSI_BENCH_PRECISION_LOOKAHEAD", type=int, default=d.lookahead,
             help="drafts per window")
    add_flag(p, "--emulate-latency-ms", env="DSI_BENCH_PRECISION_EMULATE_LATENCY_MS", default=d.emulate_latency_ms,
             help="targets' PREFILL:DECODE padding (windows overlap and get cancelled); '' = off")
    add_flag(p, "--drafter-latency-ms", env="DSI_BENCH_PRECISION_DRAFTER_LATENCY_MS", default=d.drafter_latency_ms,
             help="drafter's PREFILL:DECODE padding; '' = off")
    add_flag(p, "--temperature", env="DSI_BENCH_PRECISION_TEMPERATURE", type=float, default=d.temperature,
             help="temperature of the seeded-sampling row")
    add_flag(p, "--seed", env="DSI_BENCH_PRECISION_SEED", type=int, default=d.seed,
             help="seed of the seeded-sampling row's first prompt (prompt i: seed + i)")
    add_flag(p, "--no-seeded", env="DSI_BENCH_PRECISION_NO_SEEDED", action="store_true",
             help="greedy row only")
    add_flag(p, "--orchestrator-arg", env="DSI_BENCH_PRECISION_ORCHESTRATOR_ARG", action="append", default=None,
             help="extra flag for 'dsi serve orchestrator' (repeatable; write it as --orchestrator-arg=--flag)")
    add_flag(p, "--threads", env="DSI_BENCH_PRECISION_THREADS", type=int, default=d.threads,
             help="torch threads per model service and of the in-process reference")
    add_flag(p, "--out-dir", env="DSI_BENCH_PRECISION_OUT_DIR", default=d.out_dir, help="where the results go")
    add_flag(p, "--out-name", env="DSI_BENCH_PRECISION_OUT_NAME", default=d.out_name,
             help="JSON file name (the markdown table gets the same stem, .md)")
    p.set_defaults(func=_run_precision)


def _ints(text: str) -> list[int]:
    try:
        values = [int(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    return values


def _register_load(subparsers: Any) -> None:
    """``dsi bench load`` (see :mod:`dsi.bench.load`)."""
    from dsi.bench.load import LoadSettings

    d = LoadSettings()
    p = subparsers.add_parser(
        "load",
        help="non-SI, SI and DSI under concurrent load: a concurrency sweep and open-loop Poisson arrivals",
        description=(
            "For each drafter latency c and acceptance a (oracle drafter: controlled acceptance, benchmark "
            "only), start an emulated cluster as 'dsi bench' does and run every mode at each concurrency C "
            "(C requests at once) and each open-loop rate (Poisson arrivals), modes interleaved, --repeats "
            "times. Per mode and load: aggregate tokens/s, p50/p99 latency and time to first token, target "
            "busy fraction, target forwards and computed tokens per committed token, drafts per window. "
            "Prints a table, writes --out-dir/--out-name (JSON), a markdown table and a PNG next to it."
        ),
    )
    add_flag(p, "--targets", env="DSI_BENCH_LOAD_TARGETS", type=int, default=d.targets,
             help="target instances")
    add_flag(p, "--c-values", env="DSI_BENCH_LOAD_C_VALUES", type=_floats, default=d.c_values,
             help="drafter latencies as fractions of the target latency (default 0.1)")
    add_flag(p, "--a-values", env="DSI_BENCH_LOAD_A_VALUES", type=_floats, default=d.a_values,
             help="oracle acceptance rates (default 0.5,0.8)")
    add_flag(p, "--target-ms", env="DSI_BENCH_LOAD_TARGET_MS", type=float, default=d.target_ms,
             help="emulated target decode latency per forward")
    add_flag(p, "--prefill-ms", env="DSI_BENCH_LOAD_PREFILL_MS", type=float, default=None,
             help="emulated target prefill latency (default: --target-ms)")
    add_flag(p, "--token-ms", env="DSI_BENCH_LOAD_TOKEN_MS", type=float, default=d.token_ms,
             help="emulated target cost per token computed, on top of the above (charges prefills by length)")
    add_flag(p, "--prompt-tokens", env="DSI_BENCH_LOAD_PROMPT_TOKENS", type=int, default=d.prompt_tokens,
             help="prompts of about this many tokens (0 = the built-in short prompts)")
    add_flag(p, "--concurrency", env="DSI_BENCH_LOAD_CONCURRENCY", type=_ints, default=d.concurrency,
             help="closed-loop levels: requests at once (default 1,2,4,8,16; '' = none)")
    add_flag(p, "--rates", env="DSI_BENCH_LOAD_RATES", type=_floats_or_none, default=d.rates,
             help="open-loop levels: Poisson arrival rates in requests/s (default: none)")
    add_flag(p, "--open-requests", env="DSI_BENCH_LOAD_OPEN_REQUESTS", type=int, default=d.open_requests,
             help="requests per open-loop run")
    add_flag(p, "--requests-per-client", env="DSI_BENCH_LOAD_REQUESTS_PER_CLIENT", type=int,
             default=d.requests_per_client, help="closed loop: requests each of the C clients sends in turn")
    add_flag(p, "--repeats", env="DSI_BENCH_LOAD_REPEATS", type=int, default=d.repeats,
             help="repetitions of every (load, mode); figures are medians over them")
    add_flag(p, "--max-new-tokens", env="DSI_BENCH_LOAD_MAX_NEW_TOKENS", type=int, default=d.max_new_tokens,
             help="tokens per request (EOS ignored)")
    add_flag(p, "--lookahead", env="DSI_BENCH_LOAD_LOOKAHEAD", type=int, default=d.lookahead,
             help="drafts per window")
    add_flag(p, "--sp-degree", env="DSI_BENCH_LOAD_SP_DEGREE", type=int, default=d.sp_degree,
             help="windows in flight per request (0 = the orchestrator's default: every healthy target)")
    add_flag(p, "--modes", env="DSI_BENCH_LOAD_MODES", type=_names, default=d.modes,
             help="comma-separated modes (default nonsi,si,dsi)")
    add_flag(p, "--seed", env="DSI_BENCH_LOAD_SEED", type=int, default=d.seed,
             help="request i of repetition r uses seed + 1000 r + i; arrivals of repetition r use seed + r")
    add_flag(p, "--out-dir", env="DSI_BENCH_LOAD_OUT_DIR", default=d.out_dir, help="where the results go")
    add_flag(p, "--out-name", env="DSI_BENCH_LOAD_OUT_NAME", default=d.out_name,
             help="JSON file name (the markdown table and the PNG get the same stem)")
    p.set_defaults(func=_run_load)


def _floats_or_none(text: str) -> list[float]:
    return _floats(text) if text.strip() else []


def _run_load(ns: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from dsi.bench.load import LoadSettings, print_report, run_load, total_steps, write_outputs

    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
    s = LoadSettings(
        targets=ns.targets, c_values=ns.c_values, a_values=ns.a_values, target_ms=ns.target_ms,
        prefill_ms=ns.prefill_ms, token_ms=ns.token_ms, prompt_tokens=ns.prompt_tokens, concurrency=ns.concurrency,
        rates=ns.rates, open_requests=ns.open_requests, requests_per_client=ns.requests_per_client,
        repeats=ns.repeats, max_new_tokens=ns.max_new_tokens,
        lookahead=ns.lookahead, sp_degree=ns.sp_degree, modes=ns.modes, seed=ns.seed, out_dir=ns.out_dir,
        out_name=ns.out_name,
    )
    errors = s.validate()
    if errors:
        for e in errors:
            print(f"dsi bench load: {e}", file=sys.stderr)
        return 2
    console = Console(width=None if sys.stdout.isatty() else 220)
    err = Console(stderr=True)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=err, transient=True) as progress:
        task = progress.add_task("dsi bench load", total=total_steps(s))

        def step(what: str) -> None:
            progress.update(task, advance=1, description=what)
            if not err.is_terminal:  # no live bar: log each step
                print(f"dsi bench load: {what}", file=sys.stderr, flush=True)

        result = run_load(s, step)
    print_report(result, console)
    paths = write_outputs(result, Path(s.out_dir), s.out_name)
    console.print("wrote " + ", ".join(str(p) for p in paths))
    errors_seen = sum(m["errors"] for cell in result["cells"] for lv in cell["levels"] for m in lv["modes"].values())
    return 1 if errors_seen else 0


def _names(text: str) -> list[str]:
    return [n.strip() for n in text.split(",") if n.strip()]


def _run_precision(ns: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from dsi.bench.precision import PrecisionSettings, print_report, run_precision, total_steps, write_outputs

    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
    s = PrecisionSettings(
        archs=ns.archs, dtypes=ns.dtypes, prompts=ns.prompts, new_tokens=ns.new_tokens, repeats=ns.repeats,
        targets=ns.targets, lookahead=ns.lookahead, emulate_latency_ms=ns.emulate_latency_ms,
        drafter_latency_ms=ns.drafter_latency_ms, temperature=ns.temperature, seed=ns.seed,
        seeded=not ns.no_seeded, orchestrator_args=list(ns.orchestrator_arg or []), threads=ns.threads,
        out_dir=ns.out_dir, out_name=ns.out_name,
    )
    errors = s.validate()
    if errors:
        for e in errors:
            print(f"dsi bench precision: {e}", file=sys.stderr)
        return 2
    console = Console(width=None if sys.stdout.isatty() else 200)
    err = Console(stderr=True)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=err, transient=True) as progress:
        task = progress.add_task("dsi bench precision", total=total_steps(s))

        def step(what: str) -> None:
            progress.update(task, advance=1, description=what)
            if not err.is_terminal and "cluster up" in what:  # no live bar: log each cell
                print(f"dsi bench precision: {what}", file=sys.stderr, flush=True)

        result = run_precision(s, step)
    print_report(result, console)
    paths = write_outputs(result, Path(s.out_dir), s.out_name)
    console.print("wrote " + ", ".join(str(p) for p in paths))
    return 1 if any(c["error"] for c in result["cells"]) else 0


def _run(ns: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from dsi.bench.report import print_report, write_figures, write_json
    from dsi.bench.runner import PROMPTS, BenchSettings, run_bench, total_steps

    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
    base = BenchSettings()
    quick = _QUICK if ns.quick else {}

    def pick(name: str, value: Any) -> Any:
        return value if value is not None else quick.get(name, getattr(base, name))

    s = BenchSettings(
        targets=ns.targets,
        c_values=pick("c_values", ns.c_values),
        a_values=pick("a_values", ns.a_values),
        target_ms=ns.target_ms,
        prefill_ms=ns.prefill_ms,
        prompts=pick("prompts", ns.prompts),
        max_new_tokens=pick("max_new_tokens", ns.max_new_tokens),
        out_dir=ns.out_dir,
        address=ns.address,
        skip_emulated=ns.skip_emulated,
        skip_real=ns.skip_real,
        skip_overhead=ns.skip_overhead,
        real_lookahead=ns.real_lookahead,
        hf_threads=ns.hf_threads,
        cancel_trials=quick.get("cancel_trials", base.cancel_trials),
        quick=ns.quick,
        auto_lookahead=ns.auto_lookahead,
    )
    errors = []
    if s.targets < 1:
        errors.append("--targets must be >= 1")
    if not 1 <= s.prompts <= len(PROMPTS):
        errors.append(f"--prompts must be in 1..{len(PROMPTS)}")
    if s.max_new_tokens < 2:
        errors.append("--max-new-tokens must be >= 2")
    if s.target_ms <= 0 or s.prefill < 0:
        errors.append("--target-ms must be > 0 and --prefill-ms >= 0")
    if any(not 0 < c for c in s.c_values):
        errors.append("--c-values must be > 0")
    if any(not 0 < a <= 1 for a in s.a_values):
        errors.append("--a-values must be in (0, 1]")
    if errors:
        for e in errors:
            print(f"dsi bench: {e}", file=sys.stderr)
        return 2
    # Piped or redirected output would otherwise be cut to 80 columns and the wide table truncated.
    console = Console(width=None if sys.stdout.isatty() else 200)
    err = Console(stderr=True)
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err,
        transient=True,
    ) as progress:
        task = progress.add_task("dsi bench", total=total_steps(s))

        def step(what: str) -> None:
            progress.update(task, advance=1, description=what)
            if not err.is_terminal and "starting cluster" in what:  # no live bar: log each cluster
                print(f"dsi bench: {what}", file=sys.stderr, flush=True)

        result = run_bench(s, step)
    print_report(result, console)
    out = Path(s.out_dir)
    paths = [write_json(result, out), *write_figures(result, out)]
    console.print("wrote " + ", ".join(str(p) for p in paths))
    return 0
