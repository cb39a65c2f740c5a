"""``dsi simulate``: expected time per token of non-SI, SI and DSI, heatmaps, and a suggested
lookahead and SP degree, from the simulator (no models)."""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable
from functools import partial
from typing import Any

from dsi.envflags import add_flag
from dsi.sim.model import SimResult, SimSettings, simulate, suggest

__all__ = ["register"]

_DEFAULT_LOOKAHEADS = "1,2,3,4,5,6,7,8,9,10"


def _positive_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text!r}")
    return value


def _probability(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text!r}")
    return value


def _int_at_least(low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {text!r}")
        return value

    parse.__name__ = f"integer >= {low}"
    return parse


def _list_of(item: Callable[[str], Any]) -> Callable[[str], list[Any]]:
    def parse(text: str) -> list[Any]:
        parts = [part.strip() for part in text.split(",") if part.strip()]
        if not parts:
            raise argparse.ArgumentTypeError("must be a non-empty comma-separated list")
        return [item(part) for part in parts]

    parse.__name__ = "comma-separated list"
    return parse


def _add_common(parser: argparse.ArgumentParser, prefix: str = "", latency: bool = True) -> None:
    """Monte Carlo flags shared by every form; ``prefix`` keeps sub-command dests apart from the
    parent's (argparse lets a sub-command's defaults overwrite the parent's parsed values)."""
    if latency:
        add_flag(
            parser,
            "--target-latency-ms",
            env="DSI_SIM_TARGET_LATENCY_MS",
            type=_positive_float,
            dest=f"{prefix}target_latency_ms",
            metavar="MS",
            help="target forward latency in ms; results in ms/token (default: in target latencies)",
        )
    add_flag(
        parser,
        "--tokens",
        env="DSI_SIM_TOKENS",
        type=_int_at_least(1),
        default=200,
        dest=f"{prefix}tokens",
        metavar="T",
        help="tokens committed per Monte Carlo run",
    )
    add_flag(
        parser,
        "--seed",
        env="DSI_SIM_SEED",
        type=_int_at_least(0),
        default=0,
        dest=f"{prefix}seed",
        metavar="S",
        help="seed of the Monte Carlo draws",
    )
    add_flag(
        parser,
        "--json",
        env="DSI_SIM_JSON",
        action="store_true",
        dest=f"{prefix}json",
        help="print one JSON object instead of a table",
    )


def register(subparsers: Any) -> None:
    """Add ``simulate`` (with its ``heatmap`` and ``suggest`` forms) to an argparse subparsers
    object; the chosen handler is ``args.func(args) -> int``."""
    parser = subparsers.add_parser(
        "simulate",
        help="simulate time per token of non-SI, SI and DSI (no models)",
        description=(
            "Expected time per token of non-SI, SI and DSI under the paper's model: target latency "
            "t per forward pass, drafter latency c*t per draft token, i.i.d. acceptance a. "
            "Forms: 'dsi simulate --drafter-latency C --acceptance A --lookahead L --sp N', "
            "'dsi simulate heatmap --out FILE.png', 'dsi simulate suggest --drafter-latency C "
            "--acceptance A --max-sp N'."
        ),
    )
    add_flag(
        parser,
        "--drafter-latency",
        env="DSI_SIM_DRAFTER_LATENCY",
        type=_positive_float,
        metavar="C",
        help="drafter latency per token as a fraction of the target latency",
    )
    add_flag(
        parser,
        "--acceptance",
        env="DSI_SIM_ACCEPTANCE",
        type=_probability,
        metavar="A",
        help="acceptance rate of one draft, in [0, 1]",
    )
    add_flag(
        parser,
        "--lookahead",
        env="DSI_SIM_LOOKAHEAD",
        type=_int_at_least(1),
        metavar="L",
        help="drafts per SI round and per DSI window",
    )
    add_flag(
        parser,
        "--sp",
        env="DSI_SIM_SP",
        type=_int_at_least(1),
        metavar="N",
        help="SP degree: target instances (windows in flight) for DSI",
    )
    add_flag(
        parser,
        "--runs",
        env="DSI_SIM_RUNS",
        type=_int_at_least(1),
        default=50,
        metavar="R",
        help="Monte Carlo runs",
    )
    _add_common(parser)
    parser.set_defaults(func=partial(_run_simulate, parser=parser))

    forms = parser.add_subparsers(dest="sim_form", metavar="{heatmap,suggest,load}")

    heatmap = forms.add_parser(
        "heatmap",
        help="draw the paper-style time-ratio heatmaps",
        description="SI/non-SI, DSI/SI and DSI/non-SI time ratios over c (x) and a (y), each "
        "method at its best lookahead; cells where DSI would use more than --sp targets are hatched.",
    )
    add_flag(
        heatmap,
        "--out",
        env="DSI_SIM_HEATMAP_OUT",
        metavar="FILE.png",
        dest="hm_out",
        help="where to write the PNG (required)",
    )
    add_flag(
        heatmap,
        "--sp",
        env="DSI_SIM_HEATMAP_SP",
        type=_int_at_least(1),
        default=7,
        dest="hm_sp",
        metavar="N",
        help="most target instances DSI may use",
    )
    add_flag(
        heatmap,
        "--runs",
        env="DSI_SIM_HEATMAP_RUNS",
        type=_int_at_least(1),
        default=10,
        dest="hm_runs",
        metavar="R",
        help="Monte Carlo runs per cell and lookahead",
    )
    add_flag(
        heatmap,
        "--c-values",
        env="DSI_SIM_HEATMAP_C_VALUES",
        type=_list_of(_positive_float),
        default="0.02,0.05,0.1,0.2,0.3,0.5,0.7,0.9",
        dest="hm_c_values",
        metavar="C,C,...",
        help="drafter latencies (x axis)",
    )
    add_flag(
        heatmap,
        "--a-values",
        env="DSI_SIM_HEATMAP_A_VALUES",
        type=_list_of(_probability),
        default="0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,0.95",
        dest="hm_a_values",
        metavar="A,A,...",
        help="acceptance rates (y axis)",
    )
    add_flag(
        heatmap,
        "--lookaheads",
        env="DSI_SIM_HEATMAP_LOOKAHEADS",
        type=_list_of(_int_at_least(1)),
        default=_DEFAULT_LOOKAHEADS,
        dest="hm_lookaheads",
        metavar="L,L,...",
        help="lookaheads to choose from",
    )
    add_flag(
        heatmap,
        "--json-out",
        env="DSI_SIM_HEATMAP_JSON_OUT",
        metavar="FILE.json",
        dest="hm_json_out",
        help="also write the numbers drawn to this JSON file",
    )
    _add_common(heatmap, prefix="hm_", latency=False)
    heatmap.set_defaults(func=partial(_run_heatmap, parser=heatmap))

    advice = forms.add_parser(
        "suggest",
        help="suggest a lookahead and SP degree",
        description="The smallest SP degree whose best DSI time per token is within 2% of the best "
        "up to --max-sp, and the lookahead to use with it.",
    )
    add_flag(
        advice,
        "--drafter-latency",
        env="DSI_SIM_DRAFTER_LATENCY",
        type=_positive_float,
        metavar="C",
        dest="sg_drafter_latency",
        help="drafter latency per token as a fraction of the target latency (required)",
    )
    add_flag(
        advice,
        "--acceptance",
        env="DSI_SIM_ACCEPTANCE",
        type=_probability,
        metavar="A",
        dest="sg_acceptance",
        help="acceptance rate of one draft, in [0, 1] (required)",
    )
    add_flag(
        advice,
        "--max-sp",
        env="DSI_SIM_MAX_SP",
        type=_int_at_least(1),
        metavar="N",
        dest="sg_max_sp",
        help="most target instances available (required)",
    )
    add_flag(
        advice,
        "--runs",
        env="DSI_SIM_SUGGEST_RUNS",
        type=_int_at_least(1),
        default=20,
        dest="sg_runs",
        metavar="R",
        help="Monte Carlo runs per candidate",
    )
    add_flag(
        advice,
        "--lookaheads",
        env="DSI_SIM_LOOKAHEADS",
        type=_list_of(_int_at_least(1)),
        default=_DEFAULT_LOOKAHEADS,
        dest="sg_lookaheads",
        metavar="L,L,...",
        help="lookaheads to choose from",
    )
    _add_common(advice, prefix="sg_")
    advice.set_defaults(func=partial(_run_suggest, parser=advice))

    load = forms.add_parser(
        "load",
        help="several requests sharing the targets: non-SI, SI and DSI by concurrency",
        description="The multi-request simulator (dsi/sim/cluster.py), which runs the orchestrator's own "
        "rules (services/orchestrator/policy.py): C requests sent at once share --targets instances "
        "(each request with its own drafter); per acceptance rate and C, each mode's committed tokens "
        "per target latency, median and p99 request latency and target forwards per token (medians "
        "over --runs), and whether DSI meets issue 11's criteria (tokens >= 0.97 x the best "
        "baseline's, p50 <= 1.05 x the best baseline's).",
    )
    add_flag(load, "--drafter-latency", env="DSI_SIM_LOAD_DRAFTER_LATENCY", type=_positive_float, default=0.1,
             metavar="C", dest="ld_drafter_latency", help="drafter latency per token, a fraction of the target's")
    add_flag(load, "--a-values", env="DSI_SIM_LOAD_A_VALUES", type=_list_of(_probability), default="0.5,0.8",
             metavar="A,A,...", dest="ld_a_values", help="acceptance rates")
    add_flag(load, "--concurrency", env="DSI_SIM_LOAD_CONCURRENCY", type=_list_of(_int_at_least(1)),
             default="1,2,4,8,16", metavar="C,C,...", dest="ld_concurrency", help="requests sent at once")
    add_flag(load, "--targets", env="DSI_SIM_LOAD_TARGETS", type=_int_at_least(1), default=4, metavar="N",
             dest="ld_targets", help="target instances")
    add_flag(load, "--lookahead", env="DSI_SIM_LOAD_LOOKAHEAD", type=_int_at_least(1), default=4, metavar="L",
             dest="ld_lookahead", help="drafts per SI round and per DSI window")
    add_flag(load, "--sp", env="DSI_SIM_LOAD_SP", type=_int_at_least(0), default=0, metavar="N", dest="ld_sp",
             help="DSI windows in flight per request (0: every target)")
    add_flag(load, "--headroom", env="DSI_SIM_LOAD_HEADROOM", type=_int_at_least(0), default=1, metavar="H",
             dest="ld_headroom", help="idle targets speculation leaves to other requests (the orchestrator's "
             "--speculation-headroom)")
    add_flag(load, "--drafter", env="DSI_SIM_LOAD_DRAFTER", choices=("own", "shared-age", "shared-fifo"),
             default="own", dest="ld_drafter",
             help="each request's own drafter, or one shared drafter serving the oldest request's urgent drafts "
             "first (as the orchestrator asks of the drafter service) or first come first served")
    add_flag(load, "--no-yielding", env="DSI_SIM_LOAD_NO_YIELDING", action="store_true", dest="ld_no_yielding",
             help="no yielding windows: under load a DSI request waits for a full window of drafts (the "
             "orchestrator's --no-yielding-windows)")
    add_flag(load, "--new-tokens", env="DSI_SIM_LOAD_NEW_TOKENS", type=_int_at_least(1), default=128, metavar="T",
             dest="ld_new_tokens", help="tokens each request generates")
    add_flag(load, "--runs", env="DSI_SIM_LOAD_RUNS", type=_int_at_least(1), default=5, metavar="R",
             dest="ld_runs", help="runs per level (figures are medians)")
    _add_common(load, prefix="ld_")
    load.set_defaults(func=partial(_run_load, parser=load))


def _require(parser: argparse.ArgumentParser, args: argparse.Namespace, pairs: dict[str, str]) -> None:
    missing = [flag for dest, flag in pairs.items() if getattr(args, dest) is None]
    if missing:
        parser.error("missing " + ", ".join(missing) + " (or the environment variable shown in --help)")


def _unit(target_latency_ms: float | None) -> tuple[float, str]:
    return (1.0, "t/token") if target_latency_ms is None else (target_latency_ms, "ms/token")


def _result_lines(result: SimResult, unit: str) -> list[str]:
    width = 8 + len(unit)
    rows = [
        ("non-SI", result.nonsi, ""),
        ("SI (Monte Carlo)", result.si, ""),
        ("SI (analytic)", result.si_analytic, f"{result.speedup_si_over_nonsi:.2f}x vs non-SI"),
        (
            "DSI (Monte Carlo)",
            result.dsi,
            f"{result.speedup_dsi_over_si:.2f}x vs SI, {result.speedup_dsi_over_nonsi:.2f}x vs non-SI",
        ),
    ]
    lines = [f"{'method':<18} {'time per token':>{width}}  speedup"]
    for name, value, note in rows:
        lines.append(f"{name:<18} {value:>{width - len(unit) - 1}.4f} {unit}  {note}".rstrip())
    lines.append(f"{'DSI std (runs)':<18} {result.dsi_std:>{width - len(unit) - 1}.4f} {unit}")
    lines.append(f"DSI windows in flight with unlimited targets (required SP): {result.required_sp}")
    return lines


def _settings_or_error(parser: argparse.ArgumentParser, **kw: Any) -> SimSettings:
    try:
        return SimSettings(**kw)
    except ValueError as exc:
        parser.error(str(exc))


def _run_simulate(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    _require(
        parser,
        args,
        {
            "drafter_latency": "--drafter-latency",
            "acceptance": "--acceptance",
            "lookahead": "--lookahead",
            "sp": "--sp",
        },
    )
    scale, unit = _unit(args.target_latency_ms)
    settings = _settings_or_error(
        parser,
        drafter_latency=args.drafter_latency,
        acceptance=args.acceptance,
        lookahead=args.lookahead,
        sp=args.sp,
        target_latency=scale,
        tokens=args.tokens,
        runs=args.runs,
        seed=args.seed,
    )
    result = simulate(settings)
    if args.json:
        print(json.dumps({"settings": _settings_dict(settings), "unit": unit, "result": result.to_dict()}))
        return 0
    print(
        f"c={settings.drafter_latency:g} a={settings.acceptance:g} L={settings.lookahead} "
        f"N={settings.sp} ({settings.runs} runs x {settings.tokens} tokens, seed {settings.seed})"
    )
    print("\n".join(_result_lines(result, unit)))
    return 0


def _run_heatmap(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from dsi.sim.heatmap import draw_heatmaps  # matplotlib only when drawing

    _require(parser, args, {"hm_out": "--out"})
    if not str(args.hm_out).lower().endswith(".png"):
        parser.error(f"--out must name a .png file, got {args.hm_out!r}")
    try:
        grid = draw_heatmaps(
            args.hm_out,
            c_values=args.hm_c_values,
            a_values=args.hm_a_values,
            sp=args.hm_sp,
            lookaheads=args.hm_lookaheads,
            runs=args.hm_runs,
            seed=args.hm_seed,
            tokens=args.hm_tokens,
        )
        if args.hm_json_out:
            with open(args.hm_json_out, "w", encoding="utf-8") as handle:
                json.dump(grid, handle, indent=1)
    except ValueError as exc:
        parser.error(str(exc))
    except OSError as exc:
        parser.error(f"cannot write output: {exc}")
    if args.hm_json:
        print(json.dumps(grid))
    else:
        print(f"wrote {grid['out_png']}")
        if args.hm_json_out:
            print(f"wrote {args.hm_json_out}")
    return 0


def _run_suggest(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    _require(
        parser,
        args,
        {
            "sg_drafter_latency": "--drafter-latency",
            "sg_acceptance": "--acceptance",
            "sg_max_sp": "--max-sp",
        },
    )
    scale, unit = _unit(args.sg_target_latency_ms)
    try:
        advice = suggest(
            args.sg_drafter_latency,
            args.sg_acceptance,
            args.sg_max_sp,
            lookaheads=args.sg_lookaheads,
            target_latency=scale,
            tokens=args.sg_tokens,
            runs=args.sg_runs,
            seed=args.sg_seed,
        )
    except ValueError as exc:
        parser.error(str(exc))
    if args.sg_json:
        print(json.dumps({"unit": unit, **advice.to_dict()}))
        return 0
    print(
        f"suggested: lookahead {advice.lookahead}, SP degree {advice.sp} "
        f"(best {advice.best_dsi:.4f} {unit} at SP {advice.best_sp}; within {advice.tolerance:.0%})"
    )
    print("\n".join(_result_lines(advice.result, unit)))
    return 0


def _run_load(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from rich.progress import Progress  # only for this form

    from dsi.sim.cluster import ClusterSettings, load_sweep  # the multi-request simulator runs the orchestrator's rules

    scale = 1.0 if args.ld_target_latency_ms is None else args.ld_target_latency_ms
    unit = "t" if args.ld_target_latency_ms is None else "ms"
    try:
        settings = ClusterSettings(targets=args.ld_targets, target_latency=scale, lookahead=args.ld_lookahead,
                                   sp=args.ld_sp, headroom=args.ld_headroom, drafter=args.ld_drafter,
                                   yielding=not args.ld_no_yielding)
    except ValueError as exc:
        parser.error(str(exc))
    levels = len(args.ld_a_values) * len(args.ld_concurrency) * args.ld_runs * 3
    with Progress(transient=True, disable=args.ld_json) as progress:
        task = progress.add_task("simulating", total=levels)
        points = load_sweep(settings, args.ld_a_values, args.ld_concurrency, args.ld_drafter_latency * scale,
                            args.ld_new_tokens, args.ld_runs, args.ld_seed, lambda: progress.advance(task))
    rows = []
    for a in args.ld_a_values:
        for conc in args.ld_concurrency:
            by_mode = {p.mode: p for p in points if p.acceptance == a and p.concurrency == conc}
            dsi, best_rate = by_mode["dsi"], max(by_mode["si"].tokens_per_time, by_mode["nonsi"].tokens_per_time)
            best_p50 = min(by_mode["si"].p50_latency, by_mode["nonsi"].p50_latency)
            rate, p50 = dsi.tokens_per_time / best_rate, dsi.p50_latency / best_p50
            rows.append({"acceptance": a, "concurrency": conc, "dsi_over_best_rate": rate, "dsi_over_best_p50": p50,
                         "pass": rate >= 0.97 and p50 <= 1.05,
                         "modes": {m: vars(p) for m, p in by_mode.items()}})
    if args.ld_json:
        print(json.dumps({"unit": unit, "settings": {"targets": settings.targets, "lookahead": settings.lookahead,
                                                     "sp": settings.sp, "headroom": settings.headroom,
                                                     "drafter": settings.drafter,
                                                     "yielding": settings.yielding,
                                                     "drafter_latency": args.ld_drafter_latency,
                                                     "new_tokens": args.ld_new_tokens, "runs": args.ld_runs},
                          "rows": rows}))
        return 0
    print(f"{settings.targets} targets, {settings.drafter} drafter, c={args.ld_drafter_latency:g}, "
          f"L={settings.lookahead}, SP={settings.sp or settings.targets}, headroom {settings.headroom}, "
          f"yielding windows {'on' if settings.yielding else 'off'}, "
          f"{args.ld_new_tokens} tokens per "
          f"request, medians of {args.ld_runs} runs; tokens per {unit}, latency in {unit}")
    print(f"{'a':>4} {'C':>3} | {'nonSI tok':>9} {'SI tok':>7} {'DSI tok':>7} | {'nonSI p50':>9} {'SI p50':>7} "
          f"{'DSI p50':>7} | {'SI fwd/tok':>10} {'DSI fwd/tok':>11} | {'DSI/best tok':>12} {'DSI/best p50':>12}  pass")
    for row in rows:
        m = row["modes"]
        print(f"{row['acceptance']:>4g} {row['concurrency']:>3} | {m['nonsi']['tokens_per_time']:>9.3f} "
              f"{m['si']['tokens_per_time']:>7.3f} {m['dsi']['tokens_per_time']:>7.3f} | "
              f"{m['nonsi']['p50_latency']:>9.1f} {m['si']['p50_latency']:>7.1f} {m['dsi']['p50_latency']:>7.1f} | "
              f"{m['si']['forwards_per_token']:>10.2f} {m['dsi']['forwards_per_token']:>11.2f} | "
              f"{row['dsi_over_best_rate']:>12.3f} {row['dsi_over_best_p50']:>12.3f}  "
              f"{'PASS' if row['pass'] else 'fail'}")
    return 0


def _settings_dict(settings: SimSettings) -> dict[str, Any]:
    return {
        "drafter_latency": settings.drafter_latency,
        "acceptance": settings.acceptance,
        "lookahead": settings.lookahead,
        "sp": settings.sp,
        "target_latency": settings.target_latency,
        "tokens": settings.tokens,
        "runs": settings.runs,
        "seed": settings.seed,
    }
