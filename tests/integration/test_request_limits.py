"""Every per-request limit is an orchestrator flag, reported by Info, and a request over it is refused
with INVALID_ARGUMENT naming the field and the limit, before any work is done for it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from dsi.client import Client, DSIError
from tests.integration.procs import Service, start_service

pytestmark = pytest.mark.integration

LIMITS = {"max_prompt_bytes": 1000, "max_stop_strings": 3, "max_stop_length": 10, "max_prompt_tokens": 16,
          "max_new_tokens_limit": 40, "max_request_id_length": 20, "max_request_bytes": "4096"}  # int64: a string


ORCHESTRATOR_PID: list[int] = []


@pytest.fixture(scope="module")
def orchestrator(tiny_pair: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    logs = tmp_path_factory.mktemp("limits-logs")
    started: list[Service] = []
    try:
        target = start_service("target", ["--model", str(tiny_pair[0]), "--threads", "1"], logs)
        started.append(target)
        orch = start_service("orchestrator", [
            "--targets", target.address, "--max-prompt-bytes", "1000", "--max-stop-strings", "3",
            "--max-stop-length", "10", "--max-prompt-tokens", "16", "--max-new-tokens", "40",
            "--max-request-id-length", "20", "--max-request-bytes", "4096"], logs)
        started.append(orch)
        ORCHESTRATOR_PID.append(orch.process.pid)
        yield orch.address
    finally:
        for s in reversed(started):
            s.stop()


def test_info_reports_every_limit_flag(orchestrator: str) -> None:
    with Client(orchestrator, timeout=30) as client:
        info = client.info()
    assert {k: info.get(k) for k in LIMITS} == LIMITS


@pytest.mark.parametrize(
    ("request_fields", "field", "limit"),
    [
        (dict(prompt="x" * 1001), "prompt", "1000 bytes"),
        (dict(prompt="é" * 501), "prompt", "1000 bytes"),  # 501 characters, 1002 bytes
        (dict(prompt="hi", stop=["a", "b", "c", "d"]), "stop", "3 stop strings"),
        (dict(prompt="hi", stop=["a", "b" * 11]), "stop[1]", "10 characters"),
        (dict(prompt=" ".join(["word"] * 40)), "prompt", "16 tokens"),  # < 1000 bytes, > 16 tokens
        (dict(prompt=list(range(1, 18))), "prompt_token_ids", "16 tokens"),
        (dict(prompt="hi", max_new_tokens=41), "max_new_tokens", "40"),
        (dict(prompt="hi", request_id="r" * 21), "request_id", "20 characters"),
    ],
)
def test_a_request_over_a_limit_is_invalid_argument_naming_field_and_limit(
    orchestrator: str, request_fields: dict, field: str, limit: str
) -> None:
    fields = {"max_new_tokens": 4, **request_fields}
    prompt = fields.pop("prompt")
    with Client(orchestrator, timeout=30) as client:
        with pytest.raises(DSIError) as err:
            client.generate(prompt, **fields)
        assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert err.value.details.startswith(f"{field}: ") and limit in err.value.details, err.value.details


def test_a_request_at_every_limit_is_served(orchestrator: str) -> None:
    with Client(orchestrator, timeout=30) as client:
        result = client.generate(list(range(1, 17)), max_new_tokens=40, stop=["\x00", "\x01", "\x02" * 10],
                                 ignore_eos=True, request_id="r" * 20)
    assert result.finish_reason == "length" and len(result.token_ids) == 40


def test_a_request_message_over_the_byte_limit_is_refused_before_it_is_decoded(orchestrator: str) -> None:
    """--max-request-bytes bounds the whole message (here many stop strings of allowed length would
    be refused by validation anyway: the transport refuses first, RESOURCE_EXHAUSTED)."""
    with Client(orchestrator, timeout=30) as client:
        with pytest.raises(DSIError) as err:
            client.generate("hi", max_new_tokens=4, stop=["s" * 10] * 500)  # about 6 kB
        assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED, err.value.details
        assert client.generate("hi", max_new_tokens=2).finish_reason in ("length", "eos")  # still serving


def test_the_running_orchestrator_has_no_torch_loaded(orchestrator: str) -> None:
    """It runs no model: after serving requests, no torch library is mapped into its process (the
    tokenizer is HuggingFace tokenizers, validation is torch-free)."""
    with Client(orchestrator, timeout=30) as client:
        client.generate("def f(x):", max_new_tokens=4, ignore_eos=True)
    maps = Path(f"/proc/{ORCHESTRATOR_PID[0]}/maps").read_text()
    assert "libtorch" not in maps and "/torch/" not in maps
    assert "tokenizers" in maps  # the check can see libraries: the tokenizer's native one is there
