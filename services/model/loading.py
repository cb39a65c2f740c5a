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


# Files that hold (part of) a tokenizer; a directory with none of them has no fingerprint.
_TOKENIZER_FILES = (
    "tokenizer.json",
    "vocab.json",
    "vocab.txt",
    "tokenizer.model",
    "spiece.model",
    "tokenizer_config.json",
)


def vocab_fingerprint(model_dir: str) -> str:
    """A short hash of the tokenizer next to the checkpoint: which string each token id stands for,
    added and special tokens included ('' when the directory holds no tokenizer).

    The vocabulary is read through transformers' AutoTokenizer (offline: a local directory), so any
    format it loads (tokenizer.json; vocab.json + merges.txt; vocab.txt; a sentencepiece model where
    sentencepiece is installed) gives the same hash for the same (id, token) map: one tokenizer
    saved in two formats matches. Where AutoTokenizer cannot load it (e.g. no tokenizer class for the
    config, or no sentencepiece), tokenizer.json / vocab.json / vocab.txt are read directly into the
    same map; a sentencepiece file is then hashed as bytes, which only matches the same file. Merges
    are not hashed: they decide how text is split, not what an id means, and only the orchestrator
    tokenizes. Never raises: a tokenizer that cannot be read is logged and fingerprinted ''.
    """
    root = Path(model_dir)
    if not any((root / name).is_file() for name in _TOKENIZER_FILES):
        return ""
    pairs: dict[int, str] | bytes | None
    try:
        pairs = _vocab_from_auto_tokenizer(root)
    except Exception as exc:  # noqa: BLE001 - any loader failure falls back to reading the files
        first_line = (str(exc).splitlines() or [type(exc).__name__])[0]
        log.info("AutoTokenizer could not load %s (%s); reading its vocabulary files", root, first_line)
        pairs = None
    if pairs is None:
        try:
            pairs = _vocab_from_files(root)
        except (OSError, ValueError, KeyError, TypeError, AttributeError, IndexError) as exc:
            log.warning("could not read the tokenizer vocabulary in %s (%s); no fingerprint", root, exc)
            return ""
    if isinstance(pairs, bytes):
        return "raw-" + hashlib.sha256(pairs).hexdigest()[:12]
    if not pairs:
        return ""
    payload = json.dumps(sorted(pairs.items()), ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]


def _vocab_from_auto_tokenizer(root: Path) -> dict[int, str]:
    """id -> token of the tokenizer transformers loads from root (the one the orchestrator uses)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(root), local_files_only=True)
    pairs = {int(i): str(t) for t, i in tokenizer.get_vocab().items()}
    for i, token in getattr(tokenizer, "added_tokens_decoder", {}).items():
        pairs[int(i)] = str(token)
    return pairs


def _vocab_from_files(root: Path) -> dict[int, str] | bytes:
    """id -> token read from the vocabulary file itself, or a sentencepiece model's bytes."""
    pairs: dict[int, str] = {}
    added: list[tuple[int, str]] = []
    tokenizer_json = root / "tokenizer.json"
    if tokenizer_json.is_file():
        data = json.loads(tokenizer_json.read_text(encoding="utf-8"))
        vocab = data.get("model", {}).get("vocab", {})
        if isinstance(vocab, dict):  # BPE, WordPiece, WordLevel: token -> id
            pairs = {int(i): str(t) for t, i in vocab.items()}
        else:  # Unigram: [[piece, score], ...] in id order
            pairs = {i: str(entry[0]) for i, entry in enumerate(vocab)}
        added = [(int(t["id"]), str(t["content"])) for t in data.get("added_tokens", [])]
    elif (root / "vocab.json").is_file():
        vocab = json.loads((root / "vocab.json").read_text(encoding="utf-8"))
        pairs = {int(i): str(t) for t, i in vocab.items()}
    elif (root / "vocab.txt").is_file():
        lines = (root / "vocab.txt").read_text(encoding="utf-8").splitlines()
        pairs = {i: line for i, line in enumerate(lines)}
    else:
        for name in ("tokenizer.model", "spiece.model"):
            if (root / name).is_file():
                return (root / name).read_bytes()
        return {}  # tokenizer_config.json alone: no vocabulary to hash
    if not tokenizer_json.is_file():
        added_json = root / "added_tokens.json"
        if added_json.is_file():
            added += [(int(i), str(t)) for t, i in json.loads(added_json.read_text(encoding="utf-8")).items()]
        config = root / "tokenizer_config.json"
        if config.is_file():
            decoder = json.loads(config.read_text(encoding="utf-8")).get("added_tokens_decoder", {})
            added += [(int(i), str(t["content"])) for i, t in decoder.items()]
    pairs.update(added)
    return pairs


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
