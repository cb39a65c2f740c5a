"""The built-in default model pair (dsi/pretrained/{target,drafter}) loads offline and is the pair
its model card describes: same tokenizer, lossless round-trip, and greedy acceptance on the card's
held-out prompts at least the card's figure (dsi/pretrained/card.json, written by
scripts/evaluate_default_pair.py --write-card) minus a small margin."""

from __future__ import annotations

import hashlib
import json
import os
import pathlib

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import dsi  # noqa: E402
from dsi.acceptance import greedy_acceptance  # noqa: E402

pytestmark = pytest.mark.integration

PRETRAINED = pathlib.Path(dsi.__file__).parent / "pretrained"
NAMES = ("target", "drafter")
FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
)
MARGIN = 0.03  # absolute, for numerical differences across CPUs/BLAS builds
SNIPPETS = [
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n",
    'class Foo(Bar):\n\t"""Docstring."""\n\n    x: dict[str, int] = {"a": 1, \'b\': 2.5e-3}  # comment\n',
    "print('héllo wörld ✓ 日本語')\r\n  trailing spaces   \n\n\n",
    "",
    "<|endoftext|>",
]


@pytest.fixture(scope="module")
def card() -> dict:
    return json.loads((PRETRAINED / "card.json").read_text())


@pytest.fixture(scope="module")
def tokenizers():
    return {n: transformers.AutoTokenizer.from_pretrained(str(PRETRAINED / n)) for n in NAMES}


@pytest.fixture(scope="module")
def models():
    out = {}
    for n in NAMES:
        m = transformers.AutoModelForCausalLM.from_pretrained(str(PRETRAINED / n), dtype=torch.float32)
        out[n] = m.eval()
    return out


def test_directories_are_complete_small_and_the_carded_files(card):
    total = 0
    for n in NAMES:
        d = PRETRAINED / n
        for f in FILES:
            assert (d / f).is_file(), f"missing {d / f}"
        total += sum(f.stat().st_size for f in d.iterdir() if f.is_file())
        digest = hashlib.sha256((d / "model.safetensors").read_bytes()).hexdigest()
        assert digest == card["measurements"][n]["safetensors_sha256"], f"{n} weights differ from the card"
        from safetensors import safe_open

        with safe_open(str(d / "model.safetensors"), framework="pt") as fh:
            dtypes = {fh.get_slice(k).get_dtype() for k in fh.keys()}
        assert dtypes <= {"BF16", "F16"}, dtypes
    assert total < 25 * 1024 * 1024


def test_tokenizers_share_vocabulary_and_round_trip(tokenizers, models):
    t, d = tokenizers["target"], tokenizers["drafter"]
    assert t.get_vocab() == d.get_vocab()
    for tok, n in ((t, "target"), (d, "drafter")):
        assert tok.eos_token == "<|endoftext|>"
        assert tok.eos_token_id == models[n].config.eos_token_id
        assert tok.pad_token_id == models[n].config.pad_token_id
        assert len(tok) == models[n].config.vocab_size
        assert models[n].generation_config.eos_token_id == tok.eos_token_id
    for text in SNIPPETS:
        ids = t(text).input_ids
        assert ids == d(text).input_ids
        assert t.decode(ids) == text
    assert t("<|endoftext|>").input_ids == [t.eos_token_id]


def test_models_match_card(models, card):
    for n in NAMES:
        m = models[n]
        assert sum(p.numel() for p in m.parameters()) == card["measurements"][n]["parameters"]
        assert m.config.model_type == "llama"
    assert card["measurements"]["target"]["parameters"] > 10 * card["measurements"]["drafter"]["parameters"]


def test_greedy_acceptance_at_least_the_card_figure(models, card):
    matches, total = greedy_acceptance(models["target"], models["drafter"], card["heldout_prompts"], card["gen_len"])
    acc = matches / total
    assert acc >= card["greedy_acceptance"] - MARGIN, (acc, card["greedy_acceptance"])
    # the target is the better model on the held-out prompts (a swapped pair fails here)
    x = torch.tensor(card["heldout_prompts"], dtype=torch.long)
    with torch.inference_mode():
        losses = {n: models[n](x, labels=x).loss.item() for n in NAMES}
    assert losses["target"] < losses["drafter"], losses


def test_target_continues_python(models, tokenizers):
    tok = tokenizers["target"]
    ids = tok("def fibonacci(n):", return_tensors="pt").input_ids
    with torch.inference_mode():
        out = models["target"].generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                        max_new_tokens=32)
    text = tok.decode(out[0, ids.size(1) :], skip_special_tokens=True)
    assert text.startswith("\n"), repr(text)
    assert any(kw in text for kw in ("return", "if ", "for ", "while ", '"""', "=")), repr(text)
