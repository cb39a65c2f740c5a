"""The orchestrator's tokenizer (``tokenizers`` over tokenizer.json, no transformers) encodes and
decodes exactly as transformers' AutoTokenizer, and loading it imports no torch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from dsi.builtin import PRETRAINED
from dsi.services.orchestrator.tokenizer import FastTokenizer, TokenizerError, load_tokenizer

pytestmark = pytest.mark.unit

TEXTS = [
    "def f(x):\n    return 'héllo → wörld' + x  # ünïcode\n",
    "class Stack:\n\tdef push(self, item) -> None: ...",
    "Hello , world ! It 's fine , isn 't it ?",
    "  leading and trailing spaces  ",
    "<|endoftext|>special in text",
    "",
]


def _dirs(tmp_path: Path) -> list[Path]:
    from dsi.tiny_models import build_tokenizer

    tiny = tmp_path / "tiny"
    tiny.mkdir()
    build_tokenizer(300, [tiny])
    dirs = [PRETRAINED / "target", tiny]
    # The same tokenizer asking for transformers' space clean-up (which transformers skips for BPE)
    # and forcing it.
    for name, force in (("cleanup", False), ("cleanup-forced", True)):
        d = tmp_path / name
        d.mkdir()
        build_tokenizer(300, [d])
        config = json.loads((d / "tokenizer_config.json").read_text())
        config["clean_up_tokenization_spaces"] = True
        config["clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output"] = force
        (d / "tokenizer_config.json").write_text(json.dumps(config))
        dirs.append(d)
    return dirs


def test_encode_decode_length_and_eos_equal_transformers(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    for d in _dirs(tmp_path):
        ours, theirs = load_tokenizer(str(d)), AutoTokenizer.from_pretrained(str(d))
        assert isinstance(ours, FastTokenizer)
        assert len(ours) == len(theirs)
        assert ours.eos_token_id == theirs.eos_token_id is not None
        for text in TEXTS:
            ids = ours.encode(text)
            assert ids == theirs(text, add_special_tokens=False)["input_ids"], (d.name, text)
            assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True), (d.name, text)
        ids = ours.encode(TEXTS[2]) + [theirs.eos_token_id]  # a special token is skipped
        assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True)
    assert load_tokenizer(str(tmp_path / "cleanup")).decode(ours.encode("a , b")) == "a , b"
    assert load_tokenizer(str(tmp_path / "cleanup-forced")).decode(ours.encode("a , b")) == "a, b"


def test_a_directory_without_a_tokenizer_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(TokenizerError, match="could not load a tokenizer"):
        load_tokenizer(str(tmp_path))


def test_loading_and_using_the_tokenizer_imports_no_torch() -> None:
    code = (
        "import sys\n"
        "import dsi.services.orchestrator.server\n"
        "from dsi.services.orchestrator.tokenizer import load_tokenizer\n"
        f"t = load_tokenizer({str(PRETRAINED / 'target')!r})\n"
        "assert t.decode(t.encode('def f(x):')) == 'def f(x):'\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]", out.stdout
