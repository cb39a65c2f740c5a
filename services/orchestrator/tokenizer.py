"""The orchestrator's tokenizer, loaded without transformers so that the orchestrator process never
imports torch (it runs no model).

A checkpoint's ``tokenizer.json`` is read with HuggingFace ``tokenizers`` (the library transformers'
fast tokenizers wrap), its ``tokenizer_config.json`` for the EOS token and the space clean-up rule;
encoding and decoding then equal transformers' ``AutoTokenizer`` (``tests/unit/test_tokenizer.py``).
Only a checkpoint without ``tokenizer.json`` (a slow, e.g. sentencepiece-only, tokenizer) falls back
to transformers, which loads torch; the log says so.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

log = logging.getLogger("dsi.orchestrator")


class TokenizerError(RuntimeError):
    """No tokenizer could be loaded from the name given."""


class TextTokenizer(Protocol):
    """What the orchestrator needs of a tokenizer."""

    eos_token_id: int | None

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def __len__(self) -> int: ...


def clean_up_tokenization(text: str) -> str:
    """transformers' ``clean_up_tokenization_spaces`` rule (spaces before punctuation and English
    contractions removed), for tokenizers whose config asks for it."""
    for before, after in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                          (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(before, after)
    return text


class FastTokenizer:
    """A ``tokenizers.Tokenizer`` with the settings transformers would apply to it."""

    def __init__(self, backend: Any, eos_token_id: int | None, clean_up_spaces: bool) -> None:
        self.backend = backend
        self.eos_token_id = eos_token_id
        self.clean_up_spaces = clean_up_spaces

    def encode(self, text: str) -> list[int]:
        return list(self.backend.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Sequence[int]) -> str:
        text = str(self.backend.decode(list(ids), skip_special_tokens=True))
        return clean_up_tokenization(text) if self.clean_up_spaces else text

    def __len__(self) -> int:
        return int(self.backend.get_vocab_size(with_added_tokens=True))


class _TransformersTokenizer:
    """The fallback for checkpoints without tokenizer.json (imports transformers and torch)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.eos_token_id = tokenizer.eos_token_id

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def decode(self, ids: Sequence[int]) -> str:
        return str(self.tokenizer.decode(list(ids), skip_special_tokens=True))

    def __len__(self) -> int:
        return len(self.tokenizer)


def _file(name: str, filename: str) -> Path | None:
    """``filename`` of a checkpoint directory, or of a hub id from the local cache (offline) or hub."""
    root = Path(name)
    if root.is_dir():
        path = root / filename
        return path if path.is_file() else None
    try:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(name, filename))
    except Exception:  # noqa: BLE001 - any hub failure: the file is not available
        return None


def _token_content(token: Any) -> str | None:
    if isinstance(token, dict):
        token = token.get("content")
    return token if isinstance(token, str) else None


def load_tokenizer(name: str) -> TextTokenizer:
    """The tokenizer of a checkpoint directory or hub id."""
    path = _file(name, "tokenizer.json")
    if path is None:
        return _load_with_transformers(name)
    from tokenizers import Tokenizer

    try:
        backend = Tokenizer.from_file(str(path))
    except Exception as exc:  # noqa: BLE001 - tokenizers raises its own exception type
        raise TokenizerError(f"could not read {path}: {exc}") from exc
    config: dict[str, Any] = {}
    config_path = _file(name, "tokenizer_config.json")
    if config_path is not None:
        try:
            config = json.loads(config_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise TokenizerError(f"could not read {config_path}: {exc}") from exc
    eos = _token_content(config.get("eos_token"))
    eos_id = backend.token_to_id(eos) if eos is not None else None
    # transformers 5 applies the clean-up to non-BPE models only, unless the config forces it.
    clean_up = bool(config.get("clean_up_tokenization_spaces", False)) and (
        type(backend.model).__name__ != "BPE"
        or bool(config.get("clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output", False)))
    return FastTokenizer(backend, eos_id, clean_up)


def _load_with_transformers(name: str) -> TextTokenizer:
    log.warning("%s has no tokenizer.json: loading its tokenizer with transformers (this imports torch "
                "into the orchestrator; save the tokenizer with a fast tokenizer to avoid it)", name)
    try:
        from transformers import AutoTokenizer

        return _TransformersTokenizer(AutoTokenizer.from_pretrained(name))
    except (OSError, ValueError) as exc:
        raise TokenizerError(f"could not load a tokenizer from {name!r}: {exc}") from exc
