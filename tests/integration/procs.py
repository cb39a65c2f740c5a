"""Starting services as real processes on free loopback ports, and in-process references."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from dsi.cluster import check_health, free_port


@dataclass
class Service:
    role: str
    address: str
    process: subprocess.Popen[bytes]
    log: Path

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def kill(self) -> None:
        self.process.kill()
        self.process.wait()


def start_service(role: str, args: list[str], log_dir: Path, timeout_s: float = 120.0) -> Service:
    """Start `dsi serve ROLE ARGS --port P` and wait (polling health) until it is SERVING."""
    port = free_port()
    log = log_dir / f"{role}-{port}.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "dsi.cli", "serve", role, "--host", "127.0.0.1", "--port", str(port), *args],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
        )
    service = Service(role, f"127.0.0.1:{port}", proc, log)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{role} exited with {proc.returncode}:\n{log.read_text(errors='replace')[-3000:]}")
        if check_health(service.address, timeout_s=1.0):
            return service
        time.sleep(0.1)
    service.stop()
    raise RuntimeError(f"{role} not healthy after {timeout_s}s:\n{log.read_text(errors='replace')[-3000:]}")


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
