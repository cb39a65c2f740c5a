"""Loading a HuggingFace causal LM (any local checkpoint directory, or a hub id where a network
exists) onto a device, and describing it."""

from __future__ import annotations

import hashlib
import json
import logging
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class ModelLoadError(RuntimeError):
    """The checkpoint could not be loaded; the message says why and what was tried."""


@dataclass
class LoadedModel:
    model: Any  # transformers PreTrainedModel
    name: str
    device: torch.device
    dtype: torch.dtype
    vocab_size: int
    vocab_fingerprint: str
    eos_token_ids: list[int]
    num_layers: int
    instance_id: str
    # Most positions the model can address (max_position_embeddings, n_positions, ...); 0 = no limit.
    max_positions: int = 0


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"--device {device}: CUDA is not available on this machine")
    return dev


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ModelLoadError(f"--dtype {dtype}: expected one of auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def vocab_fingerprint(model_dir: str) -> str:
    """sha256 of the tokenizer vocabulary next to the checkpoint ('' when there is none)."""
    path = Path(model_dir) / "tokenizer.json"
    if not path.is_file():
        return ""
    data = json.loads(path.read_text(encoding="utf-8"))
    vocab = data.get("model", {}).get("vocab", {})
    added = sorted((t["id"], t["content"]) for t in data.get("added_tokens", []))
    payload = json.dumps([sorted(vocab.items(), key=lambda kv: kv[1]), added], ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]


def _as_ids(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(e) for e in (value if isinstance(value, (list, tuple)) else [value])]


def eos_token_ids(model: Any) -> list[int]:
    """End-of-sequence ids as transformers' ``generate()`` uses them: the generation config's (loaded
    from generation_config.json, which often lists several), else the model config's."""
    generation_config = getattr(model, "generation_config", None)
    ids = _as_ids(getattr(generation_config, "eos_token_id", None))
    return ids or _as_ids(getattr(model.config, "eos_token_id", None))


# Config fields that bound the positions a model can embed, by architecture family.
_POSITION_LIMIT_FIELDS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")


def max_positions(config: Any) -> int:
    """The most positions the model can address (0 when its config names no limit)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for name in _POSITION_LIMIT_FIELDS:
        value = getattr(text, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return 0


def load_causal_lm(name: str, device: str = "auto", dtype: str = "auto", threads: int = 0) -> LoadedModel:
    """Load ``name`` with AutoModelForCausalLM in eval mode on ``device``."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one line per service in the logs, not a bar per load
    if threads > 0:
        torch.set_num_threads(threads)
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    try:
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dt)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(
            f"could not load a causal LM from {name!r}: {exc}. Pass a local checkpoint directory "
            "(config.json + weights), or a hub id on a machine that can reach the hub."
        ) from exc
    model.to(dev)  # type: ignore[arg-type]
    model.eval()
    vocab = int(model.get_output_embeddings().weight.shape[0])
    num_layers = int(getattr(model.config.get_text_config(), "num_hidden_layers", 0) or 0)
    return LoadedModel(
        model=model,
        name=name,
        device=dev,
        dtype=dt,
        vocab_size=vocab,
        vocab_fingerprint=vocab_fingerprint(name) if Path(name).is_dir() else "",
        eos_token_ids=eos_token_ids(model),
        num_layers=num_layers,
        instance_id=uuid.uuid4().hex[:12],
        max_positions=max_positions(model.config),
    )
