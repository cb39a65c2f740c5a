"""Paper-style heatmaps (Timor et al., Figure 2): SI/non-SI, DSI/SI and DSI/non-SI time ratios over
drafter latency c (x) and acceptance rate a (y), each method at its best lookahead."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; must precede pyplot

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import TwoSlopeNorm  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

from dsi.sim.model import best_lookahead, si_analytic_time_per_token  # noqa: E402

__all__ = ["DEFAULT_A_VALUES", "DEFAULT_C_VALUES", "compute_grid", "draw_heatmaps"]

DEFAULT_C_VALUES: tuple[float, ...] = (0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9)
DEFAULT_A_VALUES: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)


def compute_grid(
    c_values: Sequence[float],
    a_values: Sequence[float],
    sp: int,
    lookaheads: Sequence[int],
    runs: int,
    seed: int,
    tokens: int = 200,
) -> dict[str, Any]:
    """Time ratios for every (a, c) cell; grids are indexed ``[a_index][c_index]``.

    SI uses its closed form at its best lookahead; DSI its Monte Carlo at its best lookahead with
    ``sp`` targets. ``required_sp`` is what DSI at that lookahead would use with unlimited targets.
    """
    shape = (len(a_values), len(c_values))
    si_best = np.empty(shape)  # [a, c] SI time per token / target latency
    dsi_best = np.empty(shape)  # [a, c]
    si_l = np.empty(shape, dtype=int)
    dsi_l = np.empty(shape, dtype=int)
    required = np.empty(shape, dtype=int)
    for i, a in enumerate(a_values):
        for j, c in enumerate(c_values):
            si_times = [(si_analytic_time_per_token(c, a, L), L) for L in lookaheads]
            si_best[i, j], si_l[i, j] = min(si_times)
            dsi_l[i, j], result = best_lookahead(c, a, sp, lookaheads, tokens=tokens, runs=runs, seed=seed)
            dsi_best[i, j] = result.dsi
            required[i, j] = result.required_sp
    return {
        "c_values": [float(c) for c in c_values],
        "a_values": [float(a) for a in a_values],
        "sp": sp,
        "lookaheads": [int(L) for L in lookaheads],
        "runs": runs,
        "seed": seed,
        "tokens": tokens,
        "si_over_nonsi": si_best.tolist(),
        "dsi_over_si": (dsi_best / si_best).tolist(),
        "dsi_over_nonsi": dsi_best.tolist(),
        "si_best_lookahead": si_l.tolist(),
        "dsi_best_lookahead": dsi_l.tolist(),
        "required_sp": required.tolist(),
        "exceeds_sp": (required > sp).tolist(),
    }


def _panel(ax: Any, values: np.ndarray, title: str, grid: dict[str, Any], mark: np.ndarray | None) -> Any:
    low = min(float(values.min()), 0.99)
    high = max(float(values.max()), 1.01)
    image = ax.imshow(
        values,
        origin="lower",
        aspect="auto",
        cmap="RdYlGn_r",  # green: faster than the baseline (ratio < 1)
        norm=TwoSlopeNorm(vmin=low, vcenter=1.0, vmax=high),
    )
    for i in range(values.shape[0]):
        for j in range(values.shape[1]):
            if mark is not None and mark[i, j]:
                ax.add_patch(
                    Rectangle(
                        (j - 0.5, i - 0.5), 1, 1, fill=False, hatch="//", edgecolor=(0, 0, 0, 0.3), lw=0
                    )
                )
            ax.text(j, i, f"{values[i, j]:.2f}", ha="center", va="center", fontsize=7, zorder=3)
    ax.set_xticks(range(len(grid["c_values"])), [f"{c:g}" for c in grid["c_values"]])
    ax.set_yticks(range(len(grid["a_values"])), [f"{a:g}" for a in grid["a_values"]])
    ax.set_xlabel("drafter latency c (fraction of target latency)")
    ax.set_ylabel("acceptance rate a")
    ax.set_title(title)
    return image


def draw_heatmaps(
    out_png: str | Path,
    c_values: Sequence[float],
    a_values: Sequence[float],
    sp: int,
    lookaheads: Sequence[int],
    runs: int,
    seed: int,
    tokens: int = 200,
) -> dict[str, Any]:
    """Draw the three time-ratio panels to ``out_png`` and return the numbers drawn.

    Ratios are of time per token, so below 1 means faster. Cells where DSI at its best lookahead
    would keep more than ``sp`` windows in flight with unlimited targets are hatched.
    """
    if not c_values or not a_values:
        raise ValueError("c_values and a_values must not be empty")
    grid = compute_grid(c_values, a_values, sp, lookaheads, runs, seed, tokens)
    mark = np.array(grid["exceeds_sp"], dtype=bool)
    panels = [
        ("SI / non-SI", np.array(grid["si_over_nonsi"]), None),
        ("DSI / SI", np.array(grid["dsi_over_si"]), mark),
        ("DSI / non-SI", np.array(grid["dsi_over_nonsi"]), mark),
    ]
    width = max(5.0, 0.75 * len(c_values) + 1.5)
    height = max(3.5, 0.45 * len(a_values) + 1.5)
    fig, axes = plt.subplots(1, 3, figsize=(3 * width, height), constrained_layout=True)
    try:
        for ax, (title, values, hatch) in zip(axes, panels, strict=True):
            image = _panel(ax, values, f"time ratio {title}", grid, hatch)
            fig.colorbar(image, ax=ax, shrink=0.85)
        looks = f"{min(lookaheads)}..{max(lookaheads)}" if lookaheads else "-"
        fig.suptitle(
            f"Best lookahead per cell (L in {looks}), DSI with SP <= {sp}, {runs} runs x {tokens} "
            f"tokens, seed {seed}; hatched: DSI would use more than {sp} targets"
        )
        out = Path(out_png)
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=110)
    finally:
        plt.close(fig)
    grid["out_png"] = str(out)
    return grid
