"""Presents a benchmark result: rich tables on the terminal, ``bench.json``, and two figures
(``bench.png``: measured vs predicted speedups and ms/token per cell; ``overhead.png``: the
orchestrator's per-window overhead and the target's cancel-to-free latency)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from dsi.bench.runner import MODES, ORACLE_LABEL


def _pf(ok: bool, applies: bool) -> str:
    if not applies:
        return "[dim]n/a[/dim]"
    return "[green]PASS[/green]" if ok else "[red]FAIL[/red]"


def emulated_table(result: dict[str, Any]) -> Table:
    s = result["settings"]
    table = Table(
        title=f"Emulated: target {s['target_ms']:g} ms/forward, {s['targets']} targets, "
        f"{s['prompts']} prompts x {s['max_new_tokens']} tokens; {ORACLE_LABEL}",
        title_justify="left",
        caption="ms/tok: median over prompts ± half-range; acc, win/canc: DSI's measured acceptance and "
        "windows dispatched/cancelled per prompt; "
        "ep/strm: DSI's epochs and drafter streams per prompt; sim: simulator at the same c, a, L, SP; "
        "ratio: measured/sim DSI/SI speedup; "
        "sim+ovh: simulator with the measured overheads put in (each target forward + the per-window overhead, "
        "each draft = 'draft ms', the per-draft latency implied by SI's measured rounds)",
        caption_justify="left",
    )
    for col in (
        "c",
        "a",
        "L",
        "non-SI ms/tok",
        "SI ms/tok",
        "DSI ms/tok",
        "acc",
        "win/canc",
        "ep/strm",
        "DSI/SI meas",
        "DSI/SI sim",
        "ratio",
        "sim+ovh",
        "draft ms",
        "DSI/nonSI meas",
        "DSI/nonSI sim",
        "DSI fastest",
        "vs sim",
    ):
        table.add_column(col, justify="right")
    for cell in result["emulated"]:
        m = cell["modes"]
        table.add_row(
            f"{cell['c']:g}",
            f"{cell['a']:g}",
            str(cell["lookahead"]),
            *(f"{m[k]['ms_per_token']:.1f}±{m[k]['noise_ms']:.1f}" for k in MODES),
            f"{m['dsi']['acceptance_rate']:.2f}",
            f"{m['dsi']['windows_dispatched']:.0f}/{m['dsi']['windows_cancelled']:.0f}",
            f"{m['dsi'].get('epochs', 0):.0f}/{m['dsi'].get('drafter_streams') or 0:.0f}",
            f"{cell['speedup_dsi_over_si']:.2f}",
            f"{cell['predicted']['speedup_dsi_over_si']:.2f}",
            f"{cell['ratio_speedup_dsi_over_si']:.2f}",
            f"{cell['diagnosis']['with_overhead']['speedup_dsi_over_si']:.2f}" if "diagnosis" in cell else "-",
            f"{cell['diagnosis']['effective_draft_ms']:.1f}" if "diagnosis" in cell else "-",
            f"{cell['speedup_dsi_over_nonsi']:.2f}",
            f"{cell['predicted']['speedup_dsi_over_nonsi']:.2f}",
            _pf(cell["dsi_fastest"]["pass"], cell["criteria_apply"]),
            _pf(cell["dsi_vs_sim"]["pass"], cell["criteria_apply"]),
        )
    return table


def auto_table(result: dict[str, Any]) -> Table | None:
    cells = [c for c in result["emulated"] if "auto" in c]
    if not cells:
        return None
    table = Table(title="Automatic lookahead (--lookahead auto) vs the simulator's best fixed lookahead",
                  title_justify="left", caption="auto/fixed: DSI ms/token with the server's choice over DSI's with "
                  "the fixed lookahead; pass: <= 1.05 + noise", caption_justify="left")
    for col in ("c", "a", "L fixed", "L auto", "auto tuned", "DSI fixed ms/tok", "DSI auto ms/tok", "auto/fixed",
                "pass"):
        table.add_column(col, justify="right")
    for cell in cells:
        auto = cell["auto"]
        table.add_row(
            f"{cell['c']:g}", f"{cell['a']:g}", str(cell["lookahead"]), str(auto["lookahead_chosen"]),
            f"{sum(auto['auto_tuned'])}/{len(auto['auto_tuned'])}",
            f"{cell['modes']['dsi']['ms_per_token']:.1f}", f"{auto['ms_per_token']:.1f}",
            f"{auto['ratio_to_best_fixed']:.3f}", _pf(auto["pass"], True),
        )
    return table


def overhead_table(result: dict[str, Any]) -> Table:
    o = result["overhead"]
    table = Table(title="Overhead", title_justify="left")
    table.add_column("what")
    table.add_column("ms", justify="right")
    table.add_column("how", style="dim")
    if "ms_per_window_median" in o:
        by_cell = o["ms_per_window_by_cell"]
        table.add_row(
            "orchestrator + gRPC per window",
            f"{o['ms_per_window_median']:.2f}",
            f"(non-SI wall - emulated forwards) / windows; median of {len(by_cell)} cells, "
            f"range {min(by_cell):.2f}..{max(by_cell):.2f}",
        )
    if "cancel" in o:
        c = o["cancel"]
        table.add_row(
            "target cancel-to-free",
            f"{c['cancel_to_free_ms']:.2f}",
            f"Verify ({c['decode_ms']:g} ms emulated) cancelled after {c['cancel_after_ms']:g} ms; "
            f"next Verify's extra wait, median (max {c['cancel_to_free_max_ms']:.2f})",
        )
    real = result.get("real")
    if real:
        table.add_row(
            "system vs in-process, per token",
            f"{real['system_overhead_ms_per_token']:.2f}",
            "real models: non-SI through the system - HF generate()",
        )
    return table


def real_table(result: dict[str, Any]) -> Table:
    real = result["real"]
    table = Table(
        title=f"Real models (no emulation): {Path(real['target_model']).name}/"
        f"{Path(real['drafter_model']).name} "
        f"({'trained' if real['trained_pair'] else 'random fallback'} pair), L={real['lookahead']}, "
        f"SP={real['sp']}",
        title_justify="left",
        caption=f"Note: {real['note']}.",
        caption_justify="left",
    )
    for col in ("run", "ms/token", "noise", "acceptance"):
        table.add_column(col, justify="right")
    for k, label in (("nonsi", "non-SI (system)"), ("si", "SI (system)"), ("dsi", "DSI (system)")):
        m = real["modes"][k]
        table.add_row(
            label,
            f"{m['ms_per_token']:.2f}",
            f"±{m['noise_ms']:.2f}",
            "-" if k == "nonsi" else f"{m['acceptance_rate']:.2f}",
        )
    for k, label in (("generate", "HF generate()"), ("assisted", "HF generate(assistant_model=)")):
        m = real["hf"][k]
        table.add_row(label, f"{m['ms_per_token']:.2f}", f"±{m['noise_ms']:.2f}", "-")
    return table


def summary_lines(result: dict[str, Any]) -> list[str]:
    s = result["summary"]
    lines = []
    if s["cells"]:
        lines.append(
            f"criteria checked on {s['cells_checked']}/{s['cells']} cells: "
            f"DSI fastest {s['dsi_fastest_pass']}/{s['cells_checked']} PASS, "
            f"DSI/SI >= 0.9 x simulator {s['dsi_vs_sim_pass']}/{s['cells_checked']} PASS"
            f" -> {'ALL PASS' if s['all_pass'] else 'SOME FAIL'}"
        )
        if "auto_lookahead_cells" in s:
            lines.append(f"automatic lookahead within 5% of the best fixed one: {s['auto_lookahead_pass']}/"
                         f"{s['auto_lookahead_cells']} cells")
        for cell in result["emulated"]:
            if not cell["criteria_apply"]:
                continue
            if not cell["dsi_fastest"]["pass"]:
                f = cell["dsi_fastest"]
                lines.append(
                    f"  FAIL dsi_fastest c={cell['c']:g} a={cell['a']:g}: DSI {f['dsi_ms']:.1f} ms > "
                    f"{f['best_other']} {f['best_other_ms']:.1f} + noise {f['noise_ms']:.1f}"
                )
            if not cell["dsi_vs_sim"]["pass"]:
                v = cell["dsi_vs_sim"]
                lines.append(
                    f"  FAIL dsi_vs_sim c={cell['c']:g} a={cell['a']:g}: DSI/SI {v['measured']:.2f} < 0.9 x "
                    f"{v['predicted']:.2f} (ratio {cell['ratio_speedup_dsi_over_si']:.2f})"
                )
    return lines


def print_report(result: dict[str, Any], console: Console | None = None) -> None:
    console = console or Console()
    m = result["machine"]
    console.print(
        f"machine: {m.get('cpu_model', m['processor'])}, {m['cpus_usable']} usable CPU(s), "
        f"GPU {m['gpu'] or 'none'}; python {m['python']}, torch {m['torch']}, "
        f"transformers {m['transformers']}"
    )
    if result["emulated"]:
        console.print(emulated_table(result))
        auto = auto_table(result)
        if auto is not None:
            console.print(auto)
    if result["overhead"]:
        console.print(overhead_table(result))
    if result.get("real"):
        console.print(real_table(result))
    for line in summary_lines(result):
        console.print(line, markup=False, highlight=False)


# A JSON array of numbers only (token ids, timings), which json.dumps(indent=...) spreads one per line.
_NUMBER_ARRAY = re.compile(r"\[\s*(-?[\d.eE+-]+(?:,\s*-?[\d.eE+-]+)*)\s*\]")


def write_compact_json(result: dict[str, Any], path: Path) -> Path:
    """Indented JSON with every array of plain numbers kept on one line (results stay readable and
    small)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = _NUMBER_ARRAY.sub(lambda m: "[" + ", ".join(x.strip() for x in m[1].split(",")) + "]",
                             json.dumps(result, indent=1))
    path.write_text(text + "\n")
    return path


def write_json(result: dict[str, Any], out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "bench.json"
    path.write_text(json.dumps(result, indent=1, sort_keys=False) + "\n")
    return path


def write_figures(result: dict[str, Any], out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    cells = result["emulated"]
    if cells:
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5), gridspec_kw={"width_ratios": [1, 2]})
        pred = [c["predicted"]["speedup_dsi_over_si"] for c in cells]
        meas = [c["speedup_dsi_over_si"] for c in cells]
        colors = ["tab:green" if c["dsi_vs_sim"]["pass"] else "tab:red" for c in cells]
        ax1.scatter(pred, meas, c=colors)
        for c, x, y in zip(cells, pred, meas, strict=True):
            ax1.annotate(f"c={c['c']:g},a={c['a']:g}", (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        hi = max(pred + meas) * 1.1
        ax1.plot([0, hi], [0, hi], "k-", lw=0.8, label="measured = predicted")
        ax1.plot([0, hi], [0, 0.9 * hi], "k--", lw=0.8, label="0.9 x predicted")
        ax1.set_xlim(0.8, hi)
        ax1.set_ylim(0.5, hi)
        ax1.set_xlabel("simulator DSI/SI speedup")
        ax1.set_ylabel("measured DSI/SI speedup")
        ax1.set_title("DSI/SI speedup (green: >= 0.9 x predicted)")
        ax1.legend(fontsize=8)
        x = range(len(cells))
        w = 0.27
        for i, (mode, color) in enumerate((("nonsi", "tab:gray"), ("si", "tab:blue"), ("dsi", "tab:orange"))):
            xs = [j + (i - 1) * w for j in x]
            ax2.bar(
                xs,
                [c["modes"][mode]["ms_per_token"] for c in cells],
                w,
                yerr=[c["modes"][mode]["noise_ms"] for c in cells],
                color=color,
                label=f"{mode} measured",
            )
            ax2.scatter(
                xs,
                [c["predicted"][f"{mode}_ms"] for c in cells],
                marker="D",
                s=14,
                color="k",
                zorder=3,
                label="simulator" if i == 0 else None,
            )
        ax2.set_xticks(list(x))
        ax2.set_xticklabels([f"c={c['c']:g}\na={c['a']:g}\nL={c['lookahead']}" for c in cells], fontsize=7)
        ax2.set_ylabel("ms / token")
        ax2.set_title(
            f"ms/token, target {result['settings']['target_ms']:g} ms, "
            f"{result['settings']['targets']} targets"
            f" ({ORACLE_LABEL})",
            fontsize=9,
        )
        ax2.legend(fontsize=8)
        fig.tight_layout()
        path = out_dir / "bench.png"
        fig.savefig(path, dpi=80)
        plt.close(fig)
        paths.append(path)
    o = result["overhead"]
    if o:
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
        if cells:
            ax1.bar(range(len(cells)), o["ms_per_window_by_cell"], color="tab:purple")
            ax1.set_xticks(range(len(cells)))
            ax1.set_xticklabels([f"{c['c']:g}/{c['a']:g}" for c in cells], fontsize=7, rotation=60)
            ax1.set_xlabel("cell (c/a)")
        ax1.set_ylabel("ms per window")
        ax1.set_title("orchestrator + gRPC overhead per window (non-SI)", fontsize=9)
        if "cancel" in o:
            c = o["cancel"]
            ax2.plot(range(1, len(c["samples_ms"]) + 1), c["samples_ms"], "o-", color="tab:red")
            ax2.axhline(0, color="k", lw=0.8)
            ax2.set_xlabel("trial")
            ax2.set_ylabel("extra wait of the next Verify (ms)")
            ax2.set_title(
                f"target cancel-to-free (Verify {c['decode_ms']:g} ms, cancelled at {c['cancel_after_ms']:g} ms)",
                fontsize=9,
            )
        fig.tight_layout()
        path = out_dir / "overhead.png"
        fig.savefig(path, dpi=80)
        plt.close(fig)
        paths.append(path)
    return paths
