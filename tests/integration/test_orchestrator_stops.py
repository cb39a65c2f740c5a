"""Where generation ends, through a real cluster (two targets, a drafter, an orchestrator) of tiny
models: at the target's EOS token (finish reason ``eos``) unless ``ignore_eos``, at a stop string
(finish reason ``stop``, the text cut before it), at ``max_new_tokens`` otherwise; the same tokens
and text in DSI, SI and non-SI. The target's EOS id is set to a token its greedy continuation of the
prompt reaches after a few tokens (the drafter does not know it, so its drafts run past it)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from dsi.client import Client
from tests.integration.procs import greedy_reference, start_cluster

pytestmark = pytest.mark.integration

MODES = ("dsi", "si", "nonsi")
PROMPT = "def fibonacci(n):"
N = 20


def _with_eos(model_dir: Path, out: Path, eos: int) -> Path:
    """A copy of the checkpoint whose config and generation config name ``eos`` as EOS."""
    shutil.copytree(model_dir, out)
    for name in ("config.json", "generation_config.json"):
        path = out / name
        if path.is_file():
            config = json.loads(path.read_text())
            config["eos_token_id"] = eos
            path.write_text(json.dumps(config))
    return out


@pytest.fixture(scope="module")
def cluster(tiny_pair: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory):
    target_dir, drafter_dir = tiny_pair
    tok = AutoTokenizer.from_pretrained(str(target_dir))
    prompt_ids = tok(PROMPT, add_special_tokens=False)["input_ids"]
    reference = greedy_reference(target_dir, prompt_ids, N)
    # EOS: the first token that the greedy continuation reaches for the first time at index >= 4.
    k = next(i for i in range(4, N - 4) if reference[i] not in reference[:i])
    eos_target = _with_eos(target_dir, tmp_path_factory.mktemp("eos-target") / "target", reference[k])
    with start_cluster(eos_target, drafter_dir, tmp_path_factory.mktemp("stops-logs")) as c:
        yield {"address": c.orchestrator.address, "reference": reference, "eos_index": k, "tokenizer": tok,
               "target_dir": target_dir}


def test_generation_ends_at_eos_unless_ignore_eos(cluster) -> None:
    reference, k = cluster["reference"], cluster["eos_index"]
    with Client(cluster["address"], timeout=120) as client:
        assert client.info()["target_model"]["eos_token_ids"] == [reference[k]]
        for mode in MODES:
            out = client.generate(PROMPT, max_new_tokens=N, mode=mode, lookahead=3)
            assert out.token_ids == reference[: k + 1], mode  # the EOS token is the last one
            assert out.finish_reason == "eos", mode
            assert out.stats["new_tokens"] == k + 1
            streamed = list(client.stream(PROMPT, max_new_tokens=N, mode=mode, lookahead=3))
            assert [t.token_id for d in streamed for t in d.tokens] == reference[: k + 1]
            assert streamed[-1].finish_reason == "eos" and "".join(d.text for d in streamed) == out.text
            whole = client.generate(PROMPT, max_new_tokens=N, mode=mode, lookahead=3, ignore_eos=True)
            assert whole.token_ids == reference, mode  # generation goes on past the EOS token
            assert whole.finish_reason == "length", mode
            assert whole.text.startswith(out.text) and len(whole.text) > len(out.text)


def _stop_string(text: str, prefixes: list[str]) -> tuple[str, int, int]:
    """A 2-character printable ASCII stop string found first after the first third of the text, where
    it starts, and how many tokens generation takes to complete it: the first j whose text
    (``prefixes[j]``) contains it, taken where that text ends on a whole character (a random tiny
    model emits byte fragments; text ending in an incomplete character is held back)."""
    for a in range(len(text) // 3, len(text) - 2):
        stop = text[a:a + 2]
        if not (stop.isascii() and stop.isprintable() and stop.strip()) or text.find(stop) != a:
            continue
        j = next(j for j, prefix in enumerate(prefixes) if stop in prefix)
        if not prefixes[j].endswith("\ufffd"):
            return stop, a, j
    raise AssertionError(f"no usable stop string in {text!r}")


def test_generation_ends_at_a_stop_string_with_the_text_cut_before_it(cluster) -> None:
    reference, tok = cluster["reference"], cluster["tokenizer"]
    with Client(cluster["address"], timeout=120) as client:
        full = client.generate(PROMPT, max_new_tokens=N, mode="nonsi", ignore_eos=True)
        assert full.token_ids == reference
        text = full.text
        assert text == tok.decode(reference)
        stop, at, ends = _stop_string(text, [tok.decode(reference[:j]) for j in range(N + 1)])
        for mode in MODES:
            out = client.generate(PROMPT, max_new_tokens=N, mode=mode, lookahead=3, ignore_eos=True,
                                  stop=[stop, "never-generated-stop-string"])
            assert out.finish_reason == "stop", mode
            assert out.text == text[:at], mode
            assert out.token_ids == reference[:ends], mode
            # Streamed, no delta shows any of the stop string (nor a prefix of it that later completes it).
            streamed = list(client.stream(PROMPT, max_new_tokens=N, mode=mode, lookahead=3, ignore_eos=True,
                                          stop=[stop]))
            assert "".join(d.text for d in streamed) == text[:at]
            assert streamed[-1].finish_reason == "stop"
        # A stop string that never appears changes nothing.
        same = client.generate(PROMPT, max_new_tokens=N, mode="dsi", ignore_eos=True, stop=["never-generated"])
        assert same.token_ids == reference and same.finish_reason == "length"
