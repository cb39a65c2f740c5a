from __future__ import annotations

import pytest

from dsi.services.orchestrator.detokenizer import IncrementalText
from dsi.services.runtime.errors import InvalidArgument
from dsi.services.runtime.validation import GenerateLimits, validate_draft, validate_draft_grant, validate_generate
from dsi.v1 import drafter_pb2, orchestrator_pb2

pytestmark = pytest.mark.unit


class CharTokenizer:
    """Token id = a byte; decoding shows U+FFFD for an incomplete UTF-8 sequence, like HF tokenizers."""

    calls = 0
    eos_token_id = None

    def encode(self, text: str) -> list[int]:
        return list(text.encode())

    def decode(self, ids: list[int]) -> str:
        CharTokenizer.calls += len(ids)
        return bytes(ids).decode("utf-8", errors="replace")

    def __len__(self) -> int:
        return 256


def feed(text: IncrementalText, data: bytes) -> str:
    return "".join(text.push(b) for b in data) + text.finish()


def test_multibyte_characters_are_never_split() -> None:
    t = IncrementalText(CharTokenizer())
    deltas = [t.push(b) for b in "é€".encode()]
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) + t.finish() == "é€"


def test_stop_string_is_cut_and_never_streamed() -> None:
    t = IncrementalText(CharTokenizer(), stop=("STOP",))
    streamed = ""
    for b in b"abc STO":
        streamed += t.push(b)
    assert streamed == "abc "  # "STO" may still become the stop string: held back
    streamed += t.push(ord("P"))
    assert t.stopped_at == 4
    assert streamed + t.finish() == "abc " and t.final_text == "abc "


def test_held_back_text_is_released_when_it_is_not_a_stop() -> None:
    t = IncrementalText(CharTokenizer(), stop=("STOP",))
    assert feed(t, b"ST and more") == "ST and more"
    assert t.stopped_at is None


LIMITS = GenerateLimits(vocab_size=100, max_new_tokens=50, max_prompt_tokens=20, max_lookahead=8,
                        default_lookahead=4)


@pytest.mark.parametrize(
    "fields, field",
    [
        (dict(), "prompt"),
        (dict(prompt="x", prompt_token_ids=[1]), "prompt"),
        (dict(prompt="x", max_new_tokens=0), "max_new_tokens"),
        (dict(prompt="x", max_new_tokens=51), "max_new_tokens"),
        (dict(prompt_token_ids=[1, 100], max_new_tokens=1), "prompt_token_ids"),
        (dict(prompt_token_ids=list(range(21)), max_new_tokens=1), "prompt_token_ids"),
        (dict(prompt="x", max_new_tokens=1, temperature=-1), "temperature"),
        (dict(prompt="x", max_new_tokens=1, temperature=float("nan")), "temperature"),
        (dict(prompt="x", max_new_tokens=1, top_p=0.0), "top_p"),
        (dict(prompt="x", max_new_tokens=1, top_p=1.01), "top_p"),
        (dict(prompt="x", max_new_tokens=1, top_k=-1), "top_k"),
        (dict(prompt="x", max_new_tokens=1, lookahead=9), "lookahead"),
        (dict(prompt="x", max_new_tokens=1, mode=42), "mode"),
        (dict(prompt="x", max_new_tokens=1, sp_degree=-1), "sp_degree"),
        (dict(prompt="x", max_new_tokens=1, stop=[""]), "stop[0]"),
        (dict(prompt="x", max_new_tokens=1, stop=["a", "b" * 257]), "stop[1]"),
        (dict(prompt="x", max_new_tokens=1, stop=["s"] * 33), "stop"),
        (dict(prompt="x" * (1 << 20) + "y", max_new_tokens=1), "prompt"),
        (dict(prompt="é" * (1 << 19) + "y", max_new_tokens=1), "prompt"),  # fewer characters than bytes
        (dict(prompt="x", max_new_tokens=1, request_id="a\nforged log line"), "request_id"),
        (dict(prompt="x", max_new_tokens=1, request_id="r" * 129), "request_id"),
    ],
)
def test_generate_validation_names_the_field(fields: dict, field: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        validate_generate(orchestrator_pb2.GenerateRequest(**fields), LIMITS)
    assert err.value.field == field
    assert str(err.value).startswith(field)


# Limits with values that appear nowhere else in a request, so a message that shows one shows the limit.
ODD_LIMITS = GenerateLimits(vocab_size=100, max_new_tokens=57, max_prompt_tokens=23, max_lookahead=9,
                            default_lookahead=4, max_prompt_bytes=777, max_stop_strings=5, max_stop_length=13)


@pytest.mark.parametrize(
    "fields, field, limit",
    [
        (dict(prompt="x" * 778, max_new_tokens=1), "prompt", "777 bytes"),
        (dict(prompt="é" * 389, max_new_tokens=1), "prompt", "777 bytes"),  # 389 characters, 778 bytes
        (dict(prompt="x", max_new_tokens=1, stop=["s"] * 6), "stop", "5 stop strings"),
        (dict(prompt="x", max_new_tokens=1, stop=["a", "b" * 14]), "stop[1]", "13 characters"),
        (dict(prompt_token_ids=[1] * 24, max_new_tokens=1), "prompt_token_ids", "23 tokens"),
        (dict(prompt="x", max_new_tokens=58), "max_new_tokens", "57"),
        (dict(prompt="x", max_new_tokens=1, lookahead=10), "lookahead", "9"),
        (dict(prompt="x", max_new_tokens=1, request_id="r" * 129), "request_id", "128 characters"),
    ],
)
def test_a_request_over_a_limit_is_told_the_field_and_the_limit(fields: dict, field: str, limit: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        validate_generate(orchestrator_pb2.GenerateRequest(**fields), ODD_LIMITS)
    assert err.value.field == field
    message = str(err.value)
    assert message.startswith(f"{field}: ") and limit in message, message


def test_a_request_at_every_limit_is_accepted() -> None:
    request = orchestrator_pb2.GenerateRequest(prompt="é" * 388 + "x", max_new_tokens=57, lookahead=9,
                                               stop=["a", "b", "c", "d", "e" * 13], request_id="r" * 128)
    params = validate_generate(request, ODD_LIMITS)
    assert len(params.prompt.encode()) == 777 and len(params.stop) == 5


def test_valid_request_gets_defaults_and_a_random_seed() -> None:
    p = validate_generate(orchestrator_pb2.GenerateRequest(prompt="x", max_new_tokens=5, temperature=0.5), LIMITS)
    q = validate_generate(orchestrator_pb2.GenerateRequest(prompt="x", max_new_tokens=5, temperature=0.5), LIMITS)
    assert p.mode == "dsi" and p.lookahead == 4 and p.sampling.top_p == 1.0
    assert p.sampling.seed != q.sampling.seed
    r = validate_generate(orchestrator_pb2.GenerateRequest(prompt="x", max_new_tokens=5, seed=3), LIMITS)
    assert r.sampling.seed == 3


def test_decoding_work_per_token_does_not_grow_with_the_output() -> None:
    t = IncrementalText(CharTokenizer())
    CharTokenizer.calls = 0
    out = feed(t, b"x" * 2000)
    assert out == "x" * 2000
    assert CharTokenizer.calls < 10 * 2000  # a window per push, not the whole output (2000 * 1000)


def test_real_tokenizer_round_trip(tmp_path) -> None:
    from dsi.services.orchestrator.tokenizer import load_tokenizer
    from dsi.tiny_models import build_tokenizer

    build_tokenizer(300, [tmp_path])
    tok = load_tokenizer(str(tmp_path))
    source = "def f(x):\n    return 'héllo → wörld' + x  # ünïcode\n"
    ids = tok.encode(source)
    t = IncrementalText(tok, stop=("# ü",))
    streamed = "".join(t.push(i) for i in ids) + t.finish()
    assert streamed == source[: source.index("# ü")]
    t2 = IncrementalText(tok)
    assert "".join(t2.push(i) for i in ids) + t2.finish() == source


def test_server_default_sp_degree_applies_when_the_request_has_none() -> None:
    from dataclasses import replace

    limits = replace(LIMITS, default_sp_degree=2)
    assert validate_generate(orchestrator_pb2.GenerateRequest(prompt="x", max_new_tokens=5), limits).sp_degree == 2
    req = orchestrator_pb2.GenerateRequest(prompt="x", max_new_tokens=5, sp_degree=3)
    assert validate_generate(req, limits).sp_degree == 3


@pytest.mark.parametrize(
    ("grant", "credit", "length", "ok"),
    [
        (1, 0, 10, True),
        (4, 4, 10, True),  # unused credit reaches max_drafts (8) exactly
        (0, 0, 10, False),
        (-3, 0, 10, False),
        (5, 4, 10, False),  # unused credit would be 9 > 8
        (2, 0, 99, False),  # 99 + 2 > 100 tokens
        (1, 0, 99, True),
    ],
)
def test_draft_flow_grants_are_bounded(grant: int, credit: int, length: int, ok: bool) -> None:
    if ok:
        assert validate_draft_grant(grant, credit, length, max_drafts=8, max_tokens=100) == grant
    else:
        with pytest.raises(InvalidArgument) as err:
            validate_draft_grant(grant, credit, length, max_drafts=8, max_tokens=100)
        assert err.value.field == "grant"


def test_draft_start_may_not_run_past_the_sequence_limit() -> None:
    ok = drafter_pb2.DraftRequest(session_id="s", token_ids=[1] * 90, max_tokens=10)
    validate_draft(ok, vocab_size=50, max_tokens=100, max_drafts=64)
    too_long = drafter_pb2.DraftRequest(session_id="s", token_ids=[1] * 95, max_tokens=10)
    with pytest.raises(InvalidArgument) as err:
        validate_draft(too_long, vocab_size=50, max_tokens=100, max_drafts=64)
    assert err.value.field == "max_tokens"


def _context_request(max_new: int, truncate: bool = False):
    from dsi.services.runtime.validation import new_tokens_within_context

    limits = GenerateLimits(vocab_size=100, max_new_tokens=1000, max_prompt_tokens=1000, max_lookahead=16,
                            default_lookahead=4, max_sequence_length=256)
    params = validate_generate(
        orchestrator_pb2.GenerateRequest(prompt="x", max_new_tokens=max_new, truncate_at_context=truncate), limits
    )
    return lambda prompt_tokens: new_tokens_within_context(prompt_tokens, params, limits)


def test_context_limit_allows_what_plain_decoding_reads() -> None:
    # 240 + 17 tokens: plain decoding reads 256 positions (the last token is never fed back).
    assert _context_request(17)(240) == 17
    assert _context_request(1)(256) == 1


def test_context_limit_refusal_names_the_limit() -> None:
    with pytest.raises(InvalidArgument, match=r"max_new_tokens: .*context is 256 tokens.*at most 17"):
        _context_request(18)(240)
    with pytest.raises(InvalidArgument, match=r"prompt: 257 tokens do not fit the model's context of 256"):
        _context_request(1, truncate=True)(257)


def test_truncate_at_context_generates_until_the_context_is_full() -> None:
    assert _context_request(100, truncate=True)(240) == 17
    assert _context_request(10, truncate=True)(240) == 10


@pytest.mark.parametrize("seed", range(40))
def test_stop_strings_match_a_naive_search(seed: int) -> None:
    """The Aho-Corasick matcher stops where a plain search over every prefix would: at the earliest
    start of any stop string, once one is complete; the streamed text never shows one."""
    import random

    rng = random.Random(seed)
    alphabet = "abc"
    text = "".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 60)))
    stops = tuple({"".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 6)))
                   for _ in range(rng.randrange(1, 8))})
    want = text
    for n in range(1, len(text) + 1):
        found = [text[:n].find(s) for s in stops if s in text[:n]]
        if found:
            want = text[: min(found)]
            break
    t = IncrementalText(CharTokenizer(), stop=stops)
    streamed = [t.push(b) for b in text.encode()]
    assert "".join(streamed) + t.finish() == want
    assert t.final_text == want


def test_many_long_stop_strings_share_one_automaton() -> None:
    """300 stop strings of 200 characters: one pass over the text finds the one that occurs and
    holds back exactly the part that may still become one."""
    from dsi.services.orchestrator.stop_strings import StopMatcher

    stops = tuple(f"{i:05d}" + "x" * 195 for i in range(300))
    m = StopMatcher(stops)
    m.feed("00042" + "x" * 194)
    assert m.match_start is None and m.pending == 199
    m.feed("x")
    assert m.match_start == 0
