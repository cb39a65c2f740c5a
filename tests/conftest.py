"""Test-wide settings: everything offline, on the CPU, with models the tests build."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import torch  # noqa: E402

# Tiny tensors only: one thread avoids OpenMP wake-up stalls when the services share the cores.
torch.set_num_threads(1)
