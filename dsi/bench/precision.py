"""``dsi bench precision``: how often DSI, SI and non-SI disagree with each other (and non-SI with
transformers' ``generate``) when the models run in float32, bfloat16 or float16, on the tiny pair of
every architecture family, greedy and with seeded sampling; prints a table, writes JSON and markdown.

Why they can disagree at all: in a low-precision dtype, a forward pass over L+1 tokens (a verify
window) and a forward pass over 1 token (a non-SI step) may round a position's logits differently,
and when the top two logits are within that rounding, the chosen token flips. Which window decides a
position depends on timing in DSI, so repeated DSI runs of the same request can differ too. In
float32 the margins are far larger than the rounding on these models, so every count must be 0.

Terms: a **cell** is one (architecture, dtype) cluster; a **row** is one decoding rule (greedy, or
seeded sampling) within it. Per row and prompt: non-SI once, SI once, DSI ``repeats`` times
(interleaved per prompt), and transformers' ``generate`` in-process on the CPU in the same dtype
(greedy; for seeded sampling with a logits processor that applies the same Gumbel-coupled choice as
the services, so its output is the exact target-only reference). Counts are of prompts; a *first
divergence* is the index (among the new tokens) of the first token where two outputs differ.
"""

from __future__ import annotations

import logging
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from dsi.bench.report import write_compact_json

log = logging.getLogger(__name__)

DTYPES = ("float32", "bfloat16", "float16")
ROWS = ("greedy", "seeded")
# A fixed text the prompts are cut from (token-id prompts of several lengths, some shorter and some
# longer than the sliding window of mistral-sw and gemma2, so generation crosses it).
TEXT = (
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n\n"
    "class Stack(object):\n    def __init__(self):\n        self.items = []\n\n"
    "    def push(self, item):\n        self.items.append(item)\n\n"
    "The quick brown fox jumps over the lazy dog. Hello, world! 0123456789\n"
    "import os\nimport sys\nfor i in range(10):\n    print(i, os.getcwd(), sys.argv)\n"
    "# Compute the greatest common divisor of a and b.\ndef gcd(a, b):\n    while b:\n        a, b = b, a % b\n"
    "    return a\n"
)
PROMPT_LENGTHS = (8, 14, 20, 26, 32, 38)


@dataclass
class PrecisionSettings:
    """What to run. ``orchestrator_args`` are passed verbatim to ``dsi serve orchestrator``."""

    archs: list[str] = field(default_factory=lambda: [])  # [] = every family in ARCHITECTURES
    dtypes: list[str] = field(default_factory=lambda: list(DTYPES))
    prompts: int = 12
    new_tokens: int = 32
    repeats: int = 3
    targets: int = 3
    lookahead: int = 3
    emulate_latency_ms: str = "5:5"  # targets' PREFILL:DECODE padding: windows overlap and get cancelled
    drafter_latency_ms: str = ""
    temperature: float = 1.0  # of the seeded-sampling row
    seed: int = 1000  # prompt i of the seeded row uses seed + i
    seeded: bool = True
    orchestrator_args: list[str] = field(default_factory=lambda: [])
    threads: int = 1  # torch threads per model service and of the in-process reference
    out_dir: str = "bench-results"
    out_name: str = "precision.json"
    startup_timeout_s: float = 300.0

    def arch_list(self) -> list[str]:
        from dsi.tiny_models import ARCHITECTURES

        return list(self.archs) or list(ARCHITECTURES)

    def rows(self) -> tuple[str, ...]:
        return ROWS if self.seeded else ROWS[:1]

    def validate(self) -> list[str]:
        from dsi.tiny_models import ARCHITECTURES

        errors = []
        bad = [a for a in self.archs if a not in ARCHITECTURES]
        if bad:
            errors.append(f"--archs: unknown {', '.join(bad)}; expected some of {', '.join(ARCHITECTURES)}")
        bad = [d for d in self.dtypes if d not in DTYPES]
        if bad or not self.dtypes:
            errors.append(f"--dtypes: expected some of {', '.join(DTYPES)}")
        if self.prompts < 1:
            errors.append("--prompts must be >= 1")
        if self.new_tokens < 1:
            errors.append("--new-tokens must be >= 1")
        if self.repeats < 1:
            errors.append("--repeats must be >= 1")
        if self.targets < 1:
            errors.append("--targets must be >= 1")
        if self.lookahead < 1:
            errors.append("--lookahead must be >= 1")
        if self.temperature <= 0:
            errors.append("--temperature must be > 0")
        return errors


ProgressFn = Callable[[str], None]


def _noop(_: str) -> None:
    pass


def total_steps(s: PrecisionSettings) -> int:
    """Progress steps: one per cluster start, per Generate call and per reference generation."""
    per_row = s.prompts * (2 + s.repeats + 1)
    return len(s.arch_list()) * len(s.dtypes) * (1 + len(s.rows()) * per_row)


# ---------------------------------------------------------------------------------------- prompts


def make_prompts(tokenizer: Any, n: int) -> list[list[int]]:
    """``n`` token-id prompts cut from TEXT at different offsets, with lengths cycling PROMPT_LENGTHS."""
    ids = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    prompts = []
    for i in range(n):
        length = PROMPT_LENGTHS[i % len(PROMPT_LENGTHS)]
        offset = (i * 7) % max(1, len(ids) - length)
        prompt = ids[offset : offset + length]
        if len(prompt) != length:
            raise ValueError(f"TEXT is too short for a {length}-token prompt at offset {offset}")
        prompts.append(prompt)
    return prompts


# ---------------------------------------------------------------------------------------- cluster


class PairCluster:
    """N targets, one drafter and the orchestrator on one model pair in one dtype, as processes
    started with ``dsi.cluster``'s launch helpers; unlike ``LocalCluster`` it passes extra flags to
    the orchestrator (``--orchestrator-arg``)."""

    def __init__(self, target: Path, drafter: Path, dtype: str, s: PrecisionSettings, log_dir: Path) -> None:
        self.target, self.drafter, self.dtype, self.s, self.log_dir = target, drafter, dtype, s, log_dir
        self.processes: list[Any] = []  # dsi.cluster.ServiceProcess
        self.address = ""

    def start(self) -> str:
        from dsi.cluster import launch, serve_command

        s = self.s
        common = ["--threads", str(s.threads), "--device", "cpu", "--dtype", self.dtype]
        try:
            for i in range(s.targets):
                args = ["--model", str(self.target), *common]
                if s.emulate_latency_ms:
                    args += ["--emulate-latency-ms", s.emulate_latency_ms]
                self.processes.append(launch(f"target-{i}", serve_command("target", args),
                                             self.log_dir / f"target-{i}.log", new_session=True))
            args = ["--model", str(self.drafter), *common]
            if s.drafter_latency_ms:
                args += ["--emulate-latency-ms", s.drafter_latency_ms]
            self.processes.append(launch("drafter", serve_command("drafter", args),
                                         self.log_dir / "drafter.log", new_session=True))
            deadline = time.monotonic() + s.startup_timeout_s
            for sp in self.processes:  # the models load in parallel
                sp.wait_listening(deadline)
            targets = ",".join(sp.address for sp in self.processes[:-1])
            args = ["--targets", targets, "--drafter", self.processes[-1].address,
                    "--lookahead", str(s.lookahead), "--startup-timeout-s", str(int(s.startup_timeout_s)),
                    *s.orchestrator_args]
            orch = launch("orchestrator", serve_command("orchestrator", args),
                          self.log_dir / "orchestrator.log", new_session=True)
            self.processes.append(orch)
            self.address = orch.wait_listening(deadline)
            return self.address
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        from dsi.cluster import stop_process

        for sp in reversed(self.processes):
            stop_process(sp.process)
        self.processes.clear()


# ---------------------------------------------------------------------------------------- compare


def first_divergence(a: Sequence[int], b: Sequence[int]) -> int | None:
    """Index of the first differing token (a length difference counts at the shorter length)."""
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def _runs_divergence(runs: Sequence[Sequence[int]]) -> int | None:
    firsts = [d for r in runs[1:] if (d := first_divergence(runs[0], r)) is not None]
    return min(firsts) if firsts else None


def compare_prompt(nonsi: list[int], si: list[int], dsi: list[list[int]], hf: list[int] | None) -> dict[str, Any]:
    """Where the outputs of one prompt diverge (None: identical)."""
    return {
        "dsi_vs_nonsi": first_divergence(dsi[0], nonsi),
        "si_vs_nonsi": first_divergence(si, nonsi),
        "dsi_runs": _runs_divergence(dsi),
        "nonsi_vs_hf": None if hf is None else first_divergence(nonsi, hf),
    }


COMPARISONS = ("dsi_vs_nonsi", "si_vs_nonsi", "dsi_runs", "nonsi_vs_hf")


def summarize_row(per_prompt: list[dict[str, Any]]) -> dict[str, Any]:
    """Counts of prompts with a divergence, per comparison, and the median first divergence."""
    counts: dict[str, int] = {}
    median_first: dict[str, float | None] = {}
    for key in COMPARISONS:
        firsts = [p["diverge"][key] for p in per_prompt if p["diverge"][key] is not None]
        counts[key] = len(firsts)
        median_first[key] = statistics.median(firsts) if firsts else None
    return {"prompts": len(per_prompt), "differ": counts, "median_first_divergence": median_first}


# ---------------------------------------------------------------------------------------- reference


class _CoupledChoice:
    """A transformers logits processor whose argmax is the services' seeded (Gumbel-coupled) choice
    at the position being generated, so greedy ``generate`` with it is target-only seeded sampling."""

    def __init__(self, temperature: float, seed: int) -> None:
        from dsi.services.model.sampling import Sampling

        self.sampling = Sampling(temperature=temperature, seed=seed)

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        from dsi.services.model.sampling import filter_logits, gumbel_noise

        s = self.sampling
        position = int(input_ids.shape[1])  # the absolute position of the token being chosen
        filtered = filter_logits(scores, s.temperature, s.top_k, s.top_p)  # [1, vocab]
        noise = gumbel_noise(s.seed, position, filtered.shape[-1]).to(filtered.device)  # [vocab] f64
        return filtered.double() + noise


def hf_reference(
    target: Path,
    dtype: str,
    prompts: list[list[int]],
    new_tokens: int,
    rows: Sequence[str],
    s: PrecisionSettings,
    progress: ProgressFn = _noop,
) -> dict[str, list[list[int]]]:
    """transformers' ``generate(do_sample=False)`` on the CPU in ``dtype`` (KV cache, one token per
    step), without an EOS (the services run with ``ignore_eos``); the seeded row adds _CoupledChoice."""
    import torch
    from transformers import AutoModelForCausalLM, LogitsProcessorList
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    torch.set_num_threads(s.threads)
    model = AutoModelForCausalLM.from_pretrained(str(target), dtype=getattr(torch, dtype)).eval()
    model.generation_config.eos_token_id = None  # generate past EOS, as the services' ignore_eos does
    out: dict[str, list[list[int]]] = {}
    for row in rows:
        out[row] = []
        for i, prompt in enumerate(prompts):
            ids = torch.tensor([prompt])  # [1, prompt]
            kwargs: dict[str, Any] = dict(max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
            if row == "seeded":
                kwargs["logits_processor"] = LogitsProcessorList([_CoupledChoice(s.temperature, s.seed + i)])
            with torch.inference_mode():
                seq = model.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)  # [1, prompt + new]
            out[row].append([int(t) for t in seq[0, len(prompt) :].tolist()])
            progress(f"transformers {dtype} {row}")
    return out


# ---------------------------------------------------------------------------------------- cell


def _mode_order(repeats: int) -> list[str]:
    """non-SI, SI and the DSI repeats, interleaved so that drift hits every mode alike."""
    return ["nonsi", "dsi", "si"] + ["dsi"] * (repeats - 1)


def run_row(
    address: str,
    row: str,
    prompts: list[list[int]],
    s: PrecisionSettings,
    progress: ProgressFn = _noop,
) -> list[dict[str, Any]]:
    """Every mode on every prompt of one row; per prompt: token ids and timing of each call."""
    from dsi.client import Client

    results = []
    with Client(address, timeout=600.0) as client:
        for index, prompt in enumerate(prompts):
            kwargs: dict[str, Any] = dict(max_new_tokens=s.new_tokens, lookahead=s.lookahead, sp_degree=s.targets,
                                          ignore_eos=True)
            if row == "seeded":
                kwargs.update(temperature=s.temperature, seed=s.seed + index)
            calls: dict[str, list[dict[str, Any]]] = {"nonsi": [], "si": [], "dsi": []}
            for mode in _mode_order(s.repeats):
                t0 = time.perf_counter()
                res = client.generate(prompt, mode=mode, **kwargs)
                wall = time.perf_counter() - t0
                st = res.stats
                calls[mode].append({
                    "token_ids": list(res.token_ids),
                    "ms_per_token": wall * 1000 / max(1, len(res.token_ids)),
                    "acceptance_rate": float(st.get("acceptance_rate", 0.0)),
                    "windows_cancelled": int(st.get("windows_cancelled", 0)),
                    "max_windows_in_flight": int(st.get("max_windows_in_flight", 0)),
                })
                progress(f"{row} prompt {index + 1}/{len(prompts)} {mode}")
            results.append({"prompt_index": index, "prompt_tokens": len(prompt), **calls})
    return results


def _row_result(row: str, calls: list[dict[str, Any]], hf: list[list[int]], s: PrecisionSettings,
                prompts: list[list[int]]) -> dict[str, Any]:
    per_prompt = []
    for c, ref in zip(calls, hf, strict=True):
        nonsi = c["nonsi"][0]["token_ids"]
        si = c["si"][0]["token_ids"]
        dsi = [r["token_ids"] for r in c["dsi"]]
        per_prompt.append({
            "prompt_index": c["prompt_index"],
            "prompt_token_ids": prompts[c["prompt_index"]],
            "seed": s.seed + c["prompt_index"] if row == "seeded" else None,
            "diverge": compare_prompt(nonsi, si, dsi, ref),
            # Outputs equal to non-SI's are stored as null, to keep the file small.
            "tokens": {
                "nonsi": nonsi,
                "si": None if si == nonsi else si,
                "dsi": [None if d == nonsi else d for d in dsi],
                "hf": None if ref == nonsi else ref,
            },
            "ms_per_token": {m: [r["ms_per_token"] for r in c[m]] for m in ("nonsi", "si", "dsi")},
            "dsi_acceptance_rate": [r["acceptance_rate"] for r in c["dsi"]],
            "dsi_windows_cancelled": [r["windows_cancelled"] for r in c["dsi"]],
            "dsi_max_windows_in_flight": [r["max_windows_in_flight"] for r in c["dsi"]],
        })
    out = summarize_row(per_prompt)

    def flat(key: str, mode: str = "") -> list[float]:
        if mode:
            return [v for p in per_prompt for v in p[key][mode]]
        return [v for p in per_prompt for v in p[key]]

    out["ms_per_token"] = {m: statistics.median(flat("ms_per_token", m)) for m in ("nonsi", "si", "dsi")}
    out["dsi_acceptance_rate"] = statistics.mean(flat("dsi_acceptance_rate"))
    out["dsi_windows_cancelled"] = statistics.mean(flat("dsi_windows_cancelled"))
    out["dsi_max_windows_in_flight"] = max(flat("dsi_max_windows_in_flight"))
    out["per_prompt"] = per_prompt
    return out


def run_cell(arch: str, dtype: str, pair: tuple[Path, Path], s: PrecisionSettings,
             progress: ProgressFn = _noop) -> dict[str, Any]:
    """One cluster on ``pair`` in ``dtype``: every row through the system, then the in-process
    reference (after the cluster stopped, so it has the cores to itself)."""
    from transformers import AutoTokenizer

    from dsi.client import Client

    target, drafter = pair
    prompts = make_prompts(AutoTokenizer.from_pretrained(str(target)), s.prompts)
    cell: dict[str, Any] = {"arch": arch, "dtype": dtype, "rows": {}, "error": None}
    log_dir = Path(tempfile.mkdtemp(prefix=f"dsi-precision-{arch}-{dtype}-"))
    cluster = PairCluster(target, drafter, dtype, s, log_dir)
    calls: dict[str, list[dict[str, Any]]] = {}
    t0 = time.perf_counter()
    try:
        address = cluster.start()
        cell["cluster_startup_s"] = time.perf_counter() - t0
        progress(f"{arch} {dtype}: cluster up")
        with Client(address, timeout=600.0) as client:  # warm-up: connections, sessions, the tokenizer
            for mode in ("nonsi", "si", "dsi"):
                client.generate(prompts[0], max_new_tokens=4, mode=mode, ignore_eos=True)
        for row in s.rows():
            calls[row] = run_row(address, row, prompts, s, progress)
    except Exception as exc:  # a cell that cannot run (e.g. a dtype a family refuses) is reported
        log.warning("%s %s failed: %s (logs in %s)", arch, dtype, exc, log_dir)
        cell["error"] = f"{type(exc).__name__}: {exc}"
        return cell
    finally:
        cluster.stop()
    refs = hf_reference(target, dtype, prompts, s.new_tokens, s.rows(), s, progress)
    for row in s.rows():
        cell["rows"][row] = _row_result(row, calls[row], refs[row], s, prompts)
    cell["wall_s"] = time.perf_counter() - t0
    return cell


# ---------------------------------------------------------------------------------------- run


def run_precision(s: PrecisionSettings, progress: ProgressFn = _noop) -> dict[str, Any]:
    """Every (architecture, dtype) cell; returns the JSON-ready result."""
    from transformers.utils import logging as hf_logging

    from dsi.bench.runner import machine_info
    from dsi.tiny_models import build_tiny_arch_pair

    hf_logging.disable_progress_bar()
    result: dict[str, Any] = {
        "benchmark": "precision",
        "machine": machine_info(),
        "settings": {**asdict(s), "archs": s.arch_list(), "rows": list(s.rows())},
        "comparisons": {
            "dsi_vs_nonsi": "the first DSI run differs from non-SI",
            "si_vs_nonsi": "SI differs from non-SI",
            "dsi_runs": "the DSI runs of the same request differ among themselves",
            "nonsi_vs_hf": "non-SI differs from transformers' generate (same dtype, CPU, in-process)",
        },
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "cells": [],
    }
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="dsi-precision-pairs-") as tmp:
        for arch in s.arch_list():
            pair = build_tiny_arch_pair(Path(tmp) / arch, arch)
            for dtype in s.dtypes:
                result["cells"].append(run_cell(arch, dtype, pair, s, progress))
    result["totals"] = totals(result)
    result["wall_s"] = time.perf_counter() - t0
    result["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return result


def totals(result: dict[str, Any]) -> dict[str, Any]:
    """Per (dtype, row): prompts with a divergence summed over the architectures."""
    out: dict[str, Any] = {}
    for cell in result["cells"]:
        for row, r in cell["rows"].items():
            t = out.setdefault(f"{cell['dtype']}/{row}", {"prompts": 0, "archs": 0,
                                                          "differ": dict.fromkeys(COMPARISONS, 0)})
            t["prompts"] += r["prompts"]
            t["archs"] += 1
            for k in COMPARISONS:
                t["differ"][k] += r["differ"][k]
    return out


# ---------------------------------------------------------------------------------------- report


HEADERS = ("arch", "dtype", "row", "DSI≠nonSI", "SI≠nonSI", "DSI runs differ", "nonSI≠HF",
           "1st div (med) DSI/SI/runs/HF", "ms/tok nonSI/SI/DSI", "DSI acc", "DSI canc")


def table_rows(result: dict[str, Any]) -> list[list[str]]:
    rows: list[list[str]] = []

    def med(v: float | None) -> str:
        return "-" if v is None else f"{v:g}"

    for cell in result["cells"]:
        if cell["error"]:
            rows.append([cell["arch"], cell["dtype"], "-", "error", *["-"] * (len(HEADERS) - 4)])
            continue
        for row, r in cell["rows"].items():
            n, d, m = r["prompts"], r["differ"], r["median_first_divergence"]
            ms = r["ms_per_token"]
            rows.append([
                cell["arch"], cell["dtype"], row,
                *(f"{d[k]}/{n}" for k in COMPARISONS),
                "/".join(med(m[k]) for k in COMPARISONS),
                f"{ms['nonsi']:.1f}/{ms['si']:.1f}/{ms['dsi']:.1f}",
                f"{r['dsi_acceptance_rate']:.2f}",
                f"{r['dsi_windows_cancelled']:.1f}",
            ])
    return rows


def totals_rows(result: dict[str, Any]) -> list[list[str]]:
    out = []
    for key, t in result["totals"].items():
        dtype, row = key.split("/")
        n = t["prompts"]
        out.append([f"all ({t['archs']})", dtype, row, *(f"{t['differ'][k]}/{n}" for k in COMPARISONS)])
    return out


def _title(result: dict[str, Any]) -> str:
    s = result["settings"]
    extra = " ".join(s["orchestrator_args"]) or "none"
    return (f"Precision: {s['prompts']} prompts x {s['new_tokens']} tokens, DSI x{s['repeats']}, "
            f"{s['targets']} targets (emulated {s['emulate_latency_ms'] or 'off'} ms), L={s['lookahead']}, "
            f"seeded T={s['temperature']:g}; orchestrator args: {extra}")


def print_report(result: dict[str, Any], console: Any) -> None:
    from rich.table import Table

    table = Table(title=_title(result), title_justify="left",
                  caption="counts: prompts whose outputs differ; 1st div: median index (among new tokens) of the "
                          "first differing token over the prompts that differ; ms/tok: client wall time per token, "
                          "median; DSI acc / canc: mean acceptance and windows cancelled per request",
                  caption_justify="left")
    for i, h in enumerate(HEADERS):
        table.add_column(h, justify="left" if i < 3 else "right")
    for r in table_rows(result):
        table.add_row(*r)
    console.print(table)
    tot = Table(title="Totals over the architectures", title_justify="left")
    for i, h in enumerate(HEADERS[:7]):
        tot.add_column(h, justify="left" if i < 3 else "right")
    for r in totals_rows(result):
        tot.add_row(*r)
    console.print(tot)


def markdown(result: dict[str, Any]) -> str:
    def md_table(headers: Sequence[str], rows: list[list[str]]) -> list[str]:
        lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
        return lines + ["| " + " | ".join(r) + " |" for r in rows]

    m = result["machine"]
    lines = [
        f"{_title(result)}.",
        "",
        f"Machine: {m.get('cpu_model', m.get('processor'))}, {m.get('cpus_usable')} CPUs, GPU {m.get('gpu')}; "
        f"torch {m.get('torch')}, transformers {m.get('transformers')}, grpc {m.get('grpc')}, "
        f"Python {m.get('python')}. Wall time {result['wall_s'] / 60:.1f} min.",
        "",
        *md_table(HEADERS, table_rows(result)),
        "",
        *md_table(HEADERS[:7], totals_rows(result)),
        "",
    ]
    return "\n".join(lines)


def write_outputs(result: dict[str, Any], out_dir: Path, name: str = "precision.json") -> list[Path]:
    """``name`` (JSON, number arrays on one line) and the markdown table next to it (``.md``)."""
    path = write_compact_json(result, out_dir / name)
    md = path.with_suffix(".md")
    md.write_text(markdown(result))
    return [path, md]
