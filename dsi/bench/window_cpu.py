"""``dsi bench window-cpu``: CPU time per Verify window spent outside the model, on the orchestrator
and on the target, against the context length, with incremental Verify (the default) and with
``--full-verify`` (the whole sequence in every window).

Both sides run in this process on the real code paths, with the network and the model forward
taken out (so only what grows with the context is left to see):

- orchestrator: the scheduler's window list, ``TargetPool.verify`` (instance choice, what the
  instance holds, prefix hashes, the request message, serializing it as gRPC does, bookkeeping)
  against a stub that answers at once;
- target: parsing the serialized request, ``validate_verify``, ``TargetEngine.verify`` (prefix
  resolution, the session cache's bookkeeping, choosing tokens) with the model forward replaced by
  zero logits.

Each request has a prompt of the given length and then windows of ``lookahead`` drafts, 2 tokens
committed per window (DSI-like), on one instance; figures are process CPU seconds per window
(``time.process_time``), the median of ``--repeats`` runs.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

SIDES = ("orchestrator", "target")
MODES = ("incremental", "full")


@dataclass(frozen=True)
class WindowCpuSettings:
    lengths: list[int] = field(default_factory=lambda: [20, 512, 4096])
    windows: int = 1000  # per run: requests of 50 windows each
    repeats: int = 3
    lookahead: int = 4
    out_dir: str = "benchmarks/results"
    out_name: str = "window_cpu.json"

    def validate(self) -> list[str]:
        errors = []
        if not self.lengths or min(self.lengths) < 1:
            errors.append("--lengths must be positive integers")
        if self.windows < 50 or self.repeats < 1 or self.lookahead < 1:
            errors.append("--windows must be >= 50, --repeats and --lookahead >= 1")
        return errors


WINDOWS_PER_REQUEST = 50


def _windows(n: int, count: int, lookahead: int) -> list[tuple[str, list[int], int]]:
    """(session, token ids, committed) of each window, as the scheduler builds them."""
    out = []
    for r in range(count // WINDOWS_PER_REQUEST):
        seq = [(7 * r + i) % 250 + 1 for i in range(n)]
        for _ in range(WINDOWS_PER_REQUEST):
            drafts = [3, 1, 4, 1, 5, 9, 2, 6][:lookahead]
            out.append((f"r{r}", seq[: len(seq)] + drafts, len(seq)))
            seq = seq + drafts[:2]  # two tokens committed
    return out


async def _orchestrator(n: int, s: WindowCpuSettings, incremental: bool) -> float:
    from dsi.services.orchestrator.pool import TargetPool
    from dsi.services.orchestrator.scheduler import WindowRequest
    from dsi.v1 import common_pb2, target_pb2

    answer = target_pb2.VerifyResponse(token_ids=[1] * (s.lookahead + 1))

    class Stub:
        def Verify(self, request: Any, timeout: float | None = None) -> Any:  # noqa: N802 - gRPC's name
            request.SerializeToString()  # what grpc does with it

            async def done() -> Any:
                return answer

            return done()

        async def Release(self, request: Any, timeout: float | None = None) -> None:  # noqa: N802
            return None

    pool = TargetPool(["bench:1"], health_interval_s=3600, incremental=incremental)
    inst = pool.targets.get("bench:1")
    assert inst is not None
    inst.healthy = True
    inst.stub = Stub()  # type: ignore[assignment]
    sampling = common_pb2.SamplingParams()
    windows = _windows(n, s.windows, s.lookahead)
    t0 = time.process_time()
    for i, (session, ids, committed) in enumerate(windows):
        tokens = ids[:committed] + ids[committed:]  # the scheduler's list: committed prefix + drafts
        await pool.verify(WindowRequest(session, tokens, committed, 0, 0, committed=committed), sampling, "r")
        if (i + 1) % WINDOWS_PER_REQUEST == 0:
            await pool.release_session(session)
    spent = time.process_time() - t0
    await pool.close()
    return spent / len(windows)


def _target(n: int, s: WindowCpuSettings, incremental: bool, model_dir: Path) -> float:
    import torch

    from dsi.services.model.loading import load_causal_lm
    from dsi.services.model.runner import ModelRunner
    from dsi.services.runtime.prefixes import PrefixHashes
    from dsi.services.runtime.validation import validate_verify
    from dsi.services.target.engine import TargetEngine, VerifyCall
    from dsi.v1 import target_pb2

    loaded = load_causal_lm(str(model_dir), "cpu", "float32", 1)
    runner = ModelRunner(loaded, max_sequence_tokens=1 << 20)
    runner.max_sequence_length = 1 << 20
    vocab = loaded.vocab_size

    def no_model(new: list[int], kv: Any, keep: int) -> Any:
        return SimpleNamespace(logits=torch.zeros(1, keep, vocab))

    runner._model_forward = no_model  # type: ignore[method-assign]
    engine = TargetEngine(runner)
    messages = []
    held: dict[str, int] = {}
    for session, ids, committed in _windows(n, s.windows, s.lookahead):
        k = held.get(session, 0) if incremental else 0
        messages.append(target_pb2.VerifyRequest(
            session_id=session, token_ids=ids[k:], first_position=committed, prefix_length=k,
            prefix_hash=PrefixHashes(ids[:k]).at(k) if k else 0).SerializeToString())
        held[session] = committed  # the committed part of what it verified

    async def run() -> float:
        t0 = time.process_time()
        for data in messages:
            request = target_pb2.VerifyRequest.FromString(data)
            sampling = validate_verify(request, vocab, runner.max_sequence_length)
            await engine.verify(VerifyCall(
                session_id=request.session_id, token_ids=list(request.token_ids),
                first_position=request.first_position, sampling=sampling,
                prefix_length=request.prefix_length, prefix_hash=request.prefix_hash))
        return (time.process_time() - t0) / len(messages)

    try:
        return asyncio.run(run())
    finally:
        runner.close()


def run_window_cpu(s: WindowCpuSettings, progress: Any = None) -> dict[str, Any]:
    from dsi.bench.runner import machine_info, tiny_pair

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        target_dir, _ = tiny_pair(Path(tmp))
        for n in s.lengths:
            for mode in MODES:
                incremental = mode == "incremental"
                orch = [asyncio.run(_orchestrator(n, s, incremental)) for _ in range(s.repeats)]
                targ = [_target(n, s, incremental, target_dir) for _ in range(s.repeats)]
                row: dict[str, Any] = {"length": n, "mode": mode, "orchestrator_ms": statistics.median(orch) * 1e3,
                                       "target_ms": statistics.median(targ) * 1e3}
                rows.append(row)
                if progress is not None:
                    progress(f"{n} tokens, {mode}: orchestrator {row['orchestrator_ms']:.3f} ms, "
                             f"target {row['target_ms']:.3f} ms per window")
    shortest = min(s.lengths)
    base = {(r["mode"]): r for r in rows if r["length"] == shortest}
    for r in rows:
        for side in SIDES:
            r[f"{side}_over_shortest_ms"] = r[f"{side}_ms"] - base[r["mode"]][f"{side}_ms"]
    return {"machine": machine_info(), "settings": asdict(s), "rows": rows}


def table(result: dict[str, Any]) -> list[list[str]]:
    out = []
    for r in result["rows"]:
        out.append([
            str(r["length"]), r["mode"],
            f"{r['orchestrator_ms']:.3f}", f"{r['orchestrator_over_shortest_ms']:+.3f}",
            f"{r['target_ms']:.3f}", f"{r['target_over_shortest_ms']:+.3f}",
        ])
    return out


HEADER = ["tokens", "mode", "orchestrator ms/window", "vs shortest", "target ms/window", "vs shortest"]


def markdown(result: dict[str, Any]) -> str:
    s = result["settings"]
    lines = [
        f"CPU per Verify window outside the model (process CPU time; {s['windows']} windows of "
        f"{s['lookahead']} drafts per run, 2 tokens committed per window, median of {s['repeats']} runs).",
        "",
        "| " + " | ".join(HEADER) + " |",
        "|" + "---|" * len(HEADER),
    ]
    lines += ["| " + " | ".join(row) + " |" for row in table(result)]
    return "\n".join(lines) + "\n"


def write_outputs(result: dict[str, Any], out_dir: Path, name: str) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / name
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    md_path = json_path.with_suffix(".md")
    md_path.write_text(markdown(result))
    return [json_path, md_path]
