"""Starting services as real processes (``--port 0``, the bound port read back from their output),
and in-process references."""

from __future__ import annotations

import os
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from dsi.cluster import launch_and_wait, serve_command, stop_process


@dataclass
class Service:
    role: str
    address: str
    process: subprocess.Popen[bytes]
    log: Path

    def stop(self) -> None:
        stop_process(self.process, grace_s=15.0)

    def kill(self) -> None:
        self.process.kill()
        self.process.wait()


def start_service(role: str, args: list[str], log_dir: Path, timeout_s: float = 120.0) -> Service:
    """Start `dsi serve ROLE --port 0 ARGS` and wait until it reports the port it is SERVING on."""
    fd, name = tempfile.mkstemp(prefix=f"{role}-", suffix=".log", dir=log_dir)  # unique across threads
    os.close(fd)
    log = Path(name)
    sp = launch_and_wait(role, serve_command(role, args), log, timeout_s)
    return Service(role, sp.address, sp.process, log)


@dataclass
class ServiceCluster:
    """Targets, a drafter and an orchestrator started by ``start_cluster``; services ``add``ed later
    (gateways, say) are stopped with them."""

    targets: list[Service]
    drafter: Service
    orchestrator: Service
    started: list[Service]  # in start order; stopped in reverse

    def add(self, service: Service) -> Service:
        self.started.append(service)
        return service


@contextmanager
def start_cluster(
    target_model: Path | str,
    drafter_model: Path | str,
    log_dir: Path,
    targets: int = 2,
    target_args: Sequence[str] = (),
    drafter_args: Sequence[str] = (),
    orchestrator_args: Sequence[str] = (),
) -> Iterator[ServiceCluster]:
    """``targets`` targets and a drafter (one thread each) and an orchestrator over them; everything
    started is stopped on exit, last started first."""
    started: list[Service] = []
    try:
        ts = [start_service("target", ["--model", str(target_model), "--threads", "1", *target_args], log_dir)
              for _ in range(targets)]
        started += ts
        drafter = start_service("drafter", ["--model", str(drafter_model), "--threads", "1", *drafter_args], log_dir)
        started.append(drafter)
        orch = start_service("orchestrator", ["--targets", ",".join(t.address for t in ts),
                                              "--drafter", drafter.address, *orchestrator_args], log_dir)
        started.append(orch)
        yield ServiceCluster(ts, drafter, orch, started)
    finally:
        for s in reversed(started):
            s.stop()


def greedy_reference(model_dir: Path | str, prompt_ids: list[int], n: int) -> list[int]:
    """Greedy decoding with transformers in-process (full recompute each step)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    seq = list(prompt_ids)
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([seq])).logits[0, -1]
            seq.append(int(torch.argmax(logits)))
    return seq[len(prompt_ids):]
