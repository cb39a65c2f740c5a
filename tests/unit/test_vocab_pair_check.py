"""The target/drafter pair check: a tokenizer fingerprint that does not depend on the files the
tokenizer is saved as, and the orchestrator's rule for which vocabularies pair up."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from dsi.services.model.loading import vocab_fingerprint
from dsi.services.orchestrator.server import StartupError, check_vocabularies
from dsi.v1 import common_pb2

pytestmark = pytest.mark.unit

EOS = "<|endoftext|>"
CODE = [
    "def add(a, b):\n    return a + b\n" * 20,
    "for index in range(10):\n    print(index)\n" * 20,
    "class Stack:\n    def __init__(self):\n        self.items = []\n" * 20,
    "import os\nimport sys\nwhile True:\n    if value is None:\n        break\n" * 20,
]
PROSE = ["The quick brown fox jumps over the lazy dog. " * 20, "Hello, world! How are you today? " * 20]


def bpe(texts: list[str], size: int = 300) -> Any:
    """A byte-level BPE tokenizer (tokenizers library) with EOS at id 0."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=size, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def save_fast(tok: Any, d: Path) -> Path:
    """tokenizer.json + tokenizer_config.json, as save_pretrained writes them."""
    from transformers import PreTrainedTokenizerFast

    d.mkdir(parents=True)
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, unk_token=None).save_pretrained(str(d))
    assert (d / "tokenizer.json").is_file()
    return d


def save_slow_gpt2(tok: Any, d: Path, config: bool = True) -> Path:
    """GPT-2 style slow files only: vocab.json + merges.txt (+ tokenizer_config.json naming the class)."""
    d.mkdir(parents=True)
    tok.model.save(str(d))
    if config:
        (d / "tokenizer_config.json").write_text(json.dumps(
            {"tokenizer_class": "GPT2Tokenizer", "eos_token": EOS, "bos_token": EOS, "unk_token": EOS}))
    assert sorted(p.name for p in d.iterdir() if p.suffix != ".json" or p.name == "vocab.json")[:2] == [
        "merges.txt", "vocab.json"]
    assert not (d / "tokenizer.json").exists()
    return d


def info(vocab_size: int, fingerprint: str, name: str = "m") -> common_pb2.ModelInfo:
    return common_pb2.ModelInfo(model=name, vocab_size=vocab_size, vocab_fingerprint=fingerprint)


# ------------------------------------------------------------------------------------ fingerprints


@pytest.mark.parametrize("with_config", [True, False], ids=["GPT2Tokenizer-config", "files-only"])
def test_different_slow_tokenizers_of_the_same_size_differ(tmp_path: Path, with_config: bool) -> None:
    code, prose = bpe(CODE), bpe(PROSE)
    assert code.get_vocab_size() == prose.get_vocab_size() == 300
    a = vocab_fingerprint(str(save_slow_gpt2(code, tmp_path / "code", with_config)))
    b = vocab_fingerprint(str(save_slow_gpt2(prose, tmp_path / "prose", with_config)))
    assert a and b and a != b
    with pytest.raises(StartupError, match="do not share a vocabulary: their tokenizers differ"):
        check_vocabularies(info(300, a, "target"), info(300, b, "drafter"), 300)


def test_one_tokenizer_has_one_fingerprint_in_every_format(tmp_path: Path) -> None:
    tok = bpe(CODE)
    fast = vocab_fingerprint(str(save_fast(tok, tmp_path / "fast")))
    slow = vocab_fingerprint(str(save_slow_gpt2(tok, tmp_path / "slow")))
    files_only = vocab_fingerprint(str(save_slow_gpt2(tok, tmp_path / "files-only", config=False)))
    assert fast and fast == slow == files_only
    check_vocabularies(info(300, fast), info(300, slow), 300)


def test_a_wordpiece_vocab_txt_matches_its_tokenizer_json(tmp_path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(PROSE, trainer=trainers.WordPieceTrainer(
        vocab_size=120, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"], show_progress=False))
    fast_dir, txt_dir, other_dir = tmp_path / "fast", tmp_path / "txt", tmp_path / "other"
    fast_dir.mkdir()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]").save_pretrained(str(fast_dir))
    txt_dir.mkdir()
    tok.model.save(str(txt_dir))  # vocab.txt
    (txt_dir / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "BertTokenizer"}))
    other_dir.mkdir()
    vocab = (txt_dir / "vocab.txt").read_text(encoding="utf-8").splitlines()
    vocab[-1], vocab[-2] = vocab[-2], vocab[-1]  # the same tokens, two ids swapped
    (other_dir / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    (other_dir / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "BertTokenizer"}))
    fp_fast, fp_txt, fp_other = (vocab_fingerprint(str(d)) for d in (fast_dir, txt_dir, other_dir))
    assert fp_txt and fp_txt == fp_fast
    assert fp_other and fp_other != fp_txt


def test_sentencepiece_files_are_told_apart(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    for d, payload in ((a, b"model one"), (b, b"model two")):
        d.mkdir()
        (d / "tokenizer.model").write_bytes(payload)
    assert vocab_fingerprint(str(a)) and vocab_fingerprint(str(a)) != vocab_fingerprint(str(b))


def test_no_or_unreadable_tokenizer_is_no_fingerprint_never_an_error(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text("{}")
    assert vocab_fingerprint(str(empty)) == ""
    config_only = tmp_path / "config-only"
    config_only.mkdir()
    (config_only / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 8}))
    assert vocab_fingerprint(str(config_only)) == ""
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "tokenizer.json").write_text("{not json")
    assert vocab_fingerprint(str(broken)) == ""


# ------------------------------------------------------------------------------------- pair rule


def test_equal_sizes_pair_up_unless_the_tokenizers_differ() -> None:
    check_vocabularies(info(512, "aa"), info(512, "aa"), 500)
    check_vocabularies(info(512, ""), info(512, "aa"), 500)  # a side without a tokenizer is not compared
    with pytest.raises(StartupError, match="tokenizers differ"):
        check_vocabularies(info(512, "aa"), info(512, "bb"), 500)


def test_a_drafter_padded_beyond_the_target_pairs_up_with_the_same_tokenizer() -> None:
    check_vocabularies(info(512, "aa"), info(576, "aa"), 500)
    check_vocabularies(info(512, "aa"), info(576, "aa"), 512)
    with pytest.raises(StartupError, match="could not be compared"):
        check_vocabularies(info(512, ""), info(576, "aa"), 500)
    with pytest.raises(StartupError, match="could not be compared"):
        check_vocabularies(info(512, ""), info(576, ""), 500)
    with pytest.raises(StartupError, match="tokenizers differ"):
        check_vocabularies(info(512, "aa"), info(576, "bb"), 500)


def test_a_smaller_drafter_pairs_up_when_the_tokenizer_fits_in_it() -> None:
    check_vocabularies(info(576, "aa"), info(512, "aa"), 500)
    with pytest.raises(StartupError, match=r"tokenizer \(520 tokens\) does not fit in the drafter"):
        check_vocabularies(info(576, "aa"), info(512, "aa"), 520)
    with pytest.raises(StartupError, match="do not share a vocabulary"):
        check_vocabularies(info(576, ""), info(512, ""), 500)


def test_the_tokenizer_must_fit_in_the_target() -> None:
    with pytest.raises(StartupError, match="the tokenizer has 600 tokens but the target only 512"):
        check_vocabularies(info(512, "aa"), info(640, "aa"), 600)


# ----------------------------------------------------------------------------- the drafter client


class RecordingChannel:
    """Stands in for a grpc.aio channel: every call records its request (iterator) and returns None."""

    def __init__(self) -> None:
        self.requests: list[Any] = []

    def _method(self, *args: Any, **kwargs: Any) -> Any:
        def call(request: Any, *a: Any, **k: Any) -> None:
            self.requests.append(request)

        return call

    unary_unary = unary_stream = stream_unary = stream_stream = _method


def test_the_drafter_client_asks_for_ids_below_the_targets_vocabulary() -> None:
    import asyncio

    from dsi.services.orchestrator.drafter_client import GrpcDrafterClient
    from dsi.v1 import drafter_pb2_grpc

    async def first_request(client: GrpcDrafterClient, channel: RecordingChannel) -> Any:
        client.open("s", [1, 2, 3], 4, False)
        return (await anext(channel.requests[-1])).start

    channel = RecordingChannel()
    stub = drafter_pb2_grpc.DrafterServiceStub(channel)
    client = GrpcDrafterClient(stub, common_pb2.SamplingParams(), "r", 5.0, vocab_limit=384)
    start = asyncio.run(first_request(client, channel))
    assert start.vocab_limit == 384 and list(start.token_ids) == [1, 2, 3]
    unlimited = GrpcDrafterClient(stub, common_pb2.SamplingParams(), "r", 5.0)
    assert asyncio.run(first_request(unlimited, channel)).vocab_limit == 0
