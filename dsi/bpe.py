"""Byte-level BPE tokenizers for the built-in model pairs (trained with the `tokenizers` library,
saved in HuggingFace format so that AutoTokenizer.from_pretrained loads them)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

EOS_TOKEN = "<|endoftext|>"


def train_bpe_tokenizer(texts: Sequence[str], vocab_size: int) -> Any:
    """A PreTrainedTokenizerFast with `<|endoftext|>` (id 0) as EOS, BOS and PAD."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS_TOKEN,
        bos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        unk_token=None,
        clean_up_tokenization_spaces=False,
        model_max_length=2048,
    )
