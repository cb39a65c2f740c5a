"""`make demo`: start a local cluster on the built-in pair, generate code with DSI and with non-SI
from the same prompt, show which tokens came from accepted drafts, and compare the stats."""

from __future__ import annotations

import argparse
import os
import sys

from dsi.envflags import add_flag

GREEN, DIM, RESET = "\033[32m", "\033[2m", "\033[0m"


def render(tokenizer, tokens, color: bool) -> str:  # type: ignore[no-untyped-def]
    """The text with accepted-draft tokens in green (or [brackets] without a terminal)."""
    out = []
    for t in tokens:
        piece = tokenizer.decode([t.token_id], skip_special_tokens=True)
        if t.from_draft and piece:
            out.append(f"{GREEN}{piece}{RESET}" if color else f"[{piece}]")
        else:
            out.append(piece)
    return "".join(out)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parser = argparse.ArgumentParser(prog="python -m dsi.demo", description=__doc__)
    add_flag(parser, "--prompt", env="DSI_DEMO_PROMPT", default="def fibonacci(n):", help="prompt to continue")
    add_flag(parser, "--max-new-tokens", env="DSI_DEMO_MAX_NEW_TOKENS", type=int, default=64, help="tokens")
    add_flag(parser, "--targets", env="DSI_DEMO_TARGETS", type=int, default=2, help="target instances")
    add_flag(parser, "--lookahead", env="DSI_DEMO_LOOKAHEAD", type=int, default=4, help="drafts per window")
    ns = parser.parse_args(argv)

    from transformers import AutoTokenizer

    from dsi.client import Client
    from dsi.cluster import ClusterSpec, LocalCluster
    from dsi.default_pair import ensure_default_pair

    color = sys.stdout.isatty()
    pair = ensure_default_pair()
    kind = "trained built-in pair" if pair.trained else "tiny RANDOM pair (the trained pair is missing: noise expected)"
    print(f"Starting {ns.targets} targets + 1 drafter + orchestrator on the {kind} ...", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(str(pair.target))
    with LocalCluster(ClusterSpec(port=0, targets=ns.targets, lookahead=ns.lookahead)) as cluster:
        print(f"orchestrator listening on {cluster.address}\n", flush=True)
        with Client(cluster.address, timeout=300) as client:
            client.generate(ns.prompt, max_new_tokens=4, mode="nonsi")  # warm the caches and kernels
            results = {
                m: client.generate(ns.prompt, max_new_tokens=ns.max_new_tokens, mode=m) for m in ("dsi", "nonsi")
            }
    dsi, nonsi = results["dsi"], results["nonsi"]
    legend = f"{GREEN}green{RESET}" if color else "[brackets]"
    print(f"mode=dsi  (tokens from accepted drafts in {legend}):\n")
    print(ns.prompt + render(tokenizer, dsi.tokens, color))
    print()
    print("same text as mode=nonsi:", "yes" if dsi.token_ids == nonsi.token_ids else "NO (bug!)")
    print()
    print(f"{'mode':<7}{'tokens':>8}{'tok/s':>9}{'acceptance':>12}{'windows':>9}{'cancelled':>11}{'in flight':>11}")
    for mode, r in results.items():
        s = r.stats
        print(
            f"{mode:<7}{s['new_tokens']:>8}{s['tokens_per_s']:>9.1f}{s['acceptance_rate']:>12.2f}"
            f"{s['windows_dispatched']:>9}{s['windows_cancelled']:>11}{s['max_windows_in_flight']:>11}"
        )
    speedup = dsi.stats["tokens_per_s"] / max(nonsi.stats["tokens_per_s"], 1e-9)
    print(f"\nDSI/non-SI speed: {speedup:.2f}x on this machine ({os.cpu_count()} CPU cores shared by all services).")
    return 0 if dsi.token_ids == nonsi.token_ids else 1


if __name__ == "__main__":
    sys.exit(main())
