"""The OpenAI-compatible HTTP gateway, with the official `openai` package as the client, against a
real local cluster on tiny models: the same text as ``Client.generate`` for the same settings
(greedy and seeded, streamed and not), usage, errors in OpenAI's shape naming the parameter, chat
templates, a client closing a stream early (the targets see the cancellation), and the orchestrator
going down (503)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

openai = pytest.importorskip("openai")

from transformers import AutoTokenizer  # noqa: E402

from dsi.client import Client  # noqa: E402
from dsi.default_pair import PRETRAINED  # noqa: E402
from dsi.v1 import target_pb2, target_pb2_grpc  # noqa: E402
from tests.integration.procs import Service, start_cluster, start_service  # noqa: E402

pytestmark = pytest.mark.integration

# A chat template in the style of instruction-tuned models (the tiny pair has none of its own).
TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
PROMPTS = ["def fibonacci(n):", "import os\n", "class Foo:", "The quick brown"]
MESSAGES = [
    {"role": "system", "content": "You write Python."},
    {"role": "user", "content": "A function that adds two numbers."},
]
N = 12


def http_get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def start_gateway(orchestrator: str, log_dir: Path, *args: str) -> tuple[Service, str]:
    gw = start_service("gateway", ["--orchestrator", orchestrator, *args], log_dir, timeout_s=120)
    return gw, f"http://{gw.address}"


@pytest.fixture(scope="module")
def cluster(tiny_pair: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """Two targets, a drafter, the orchestrator, and two gateways: one with a --chat-template file,
    one with an API key, no chat template and room for one request at a time."""
    target_dir, drafter_dir = tiny_pair
    logs = tmp_path_factory.mktemp("gateway-logs")
    template = logs / "chat.jinja"
    template.write_text(TEMPLATE)
    with start_cluster(target_dir, drafter_dir, logs) as c:
        orch = c.orchestrator
        # --tokenizer: the orchestrator names its model without the checkpoint's path.
        gw, url = start_gateway(orch.address, logs, "--chat-template", str(template), "--tokenizer", str(target_dir))
        c.add(gw)
        keyed, keyed_url = start_gateway(orch.address, logs, "--api-key", "sesame", "--served-model-name", "tiny",
                                         "--max-concurrent-requests", "1", "--max-request-bytes", "2000",
                                         "--tokenizer", str(target_dir))
        c.add(keyed)
        yield {"orchestrator": orch.address, "url": url, "keyed_url": keyed_url, "model": target_dir.name,
               "tokenizer": AutoTokenizer.from_pretrained(str(target_dir))}


@pytest.fixture(scope="module")
def oai(cluster: dict[str, Any]) -> Any:
    return openai.OpenAI(base_url=cluster["url"] + "/v1", api_key="unused", max_retries=0, timeout=120)


SETTINGS = {
    "greedy": dict(temperature=0.0),
    "seeded": dict(temperature=0.9, top_p=0.9, seed=1234),
}


@pytest.mark.parametrize("sampling", ["greedy", "seeded"])
def test_completions_equal_client_generate_streamed_and_not(cluster, oai, sampling: str) -> None:
    s = SETTINGS[sampling]
    extra = {"ignore_eos": True, "top_k": 50 if sampling == "seeded" else 0, "dsi": {"mode": "dsi", "lookahead": 3}}
    with Client(cluster["orchestrator"], timeout=120) as client:
        for prompt in PROMPTS:
            ref = client.generate(prompt, max_new_tokens=N, ignore_eos=True, top_k=extra["top_k"], lookahead=3,
                                  **s)
            resp = oai.completions.create(model=cluster["model"], prompt=prompt, max_tokens=N, extra_body=extra, **s)
            assert resp.object == "text_completion" and len(resp.choices) == 1
            assert resp.choices[0].text == ref.text, prompt
            assert resp.choices[0].finish_reason == "length"
            n_prompt = len(cluster["tokenizer"](prompt, add_special_tokens=False)["input_ids"])
            assert (resp.usage.prompt_tokens, resp.usage.completion_tokens, resp.usage.total_tokens) == (
                n_prompt, N, n_prompt + N)
            assert resp.dsi["mode"] == "dsi" and 0.0 <= resp.dsi["acceptance_rate"] <= 1.0
            assert resp.dsi["new_tokens"] == N

            chunks = list(oai.completions.create(model=cluster["model"], prompt=prompt, max_tokens=N, stream=True,
                                                 stream_options={"include_usage": True}, extra_body=extra, **s))
            texts = [c.choices[0].text for c in chunks if c.choices]
            assert "".join(texts) == ref.text, prompt
            assert sum(1 for t in texts if t) > 1  # really streamed, not one block at the end
            finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
            assert finishes[-1] == "length" and not any(finishes[:-1])
            assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == N
            assert chunks[-1].usage.prompt_tokens == n_prompt


@pytest.mark.parametrize("sampling", ["greedy", "seeded"])
def test_chat_completions_render_the_template_and_equal_client_generate(cluster, oai, sampling: str) -> None:
    s = SETTINGS[sampling]
    rendered = cluster["tokenizer"].apply_chat_template(MESSAGES, chat_template=TEMPLATE, tokenize=False,
                                                        add_generation_prompt=True)
    assert rendered.endswith("<|assistant|>\n")
    with Client(cluster["orchestrator"], timeout=120) as client:
        ref = client.generate(rendered, max_new_tokens=N, ignore_eos=True, **s)
    resp = oai.chat.completions.create(model=cluster["model"], messages=MESSAGES, max_completion_tokens=N,
                                       extra_body={"ignore_eos": True}, **s)
    assert resp.object == "chat.completion"
    assert resp.choices[0].message.role == "assistant"
    assert resp.choices[0].message.content == ref.text
    assert resp.usage.prompt_tokens == ref.stats["prompt_tokens"] and resp.usage.completion_tokens == N
    stream = oai.chat.completions.create(model=cluster["model"], messages=MESSAGES, max_tokens=N, stream=True,
                                         extra_body={"ignore_eos": True}, **s)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == ref.text
    assert chunks[-1].choices[0].finish_reason == "length"
    assert chunks[-1].dsi["new_tokens"] == N


def test_stop_strings_and_default_chat_length(cluster, oai) -> None:
    with Client(cluster["orchestrator"], timeout=120) as client:
        full = client.generate(PROMPTS[0], max_new_tokens=24, temperature=0.0, ignore_eos=True)
        stop = full.text[8:10]  # a string the output is known to contain
        ref = client.generate(PROMPTS[0], max_new_tokens=24, temperature=0.0, ignore_eos=True, stop=[stop, "@@"])
    assert ref.finish_reason == "stop"
    for value in ([stop, "@@"], stop):
        resp = oai.completions.create(model=cluster["model"], prompt=PROMPTS[0], max_tokens=24, temperature=0,
                                      stop=value, extra_body={"ignore_eos": True})
        assert resp.choices[0].text == ref.text and resp.choices[0].finish_reason == "stop"
    # No max_tokens on chat: generate until EOS or the context (finish reason 'stop' or 'length').
    resp = oai.chat.completions.create(model=cluster["model"], messages=MESSAGES, temperature=0, stop=["\n"])
    assert resp.choices[0].finish_reason in ("stop", "length") and "\n" not in resp.choices[0].message.content


def test_token_id_prompts_and_the_default_length(cluster, oai) -> None:
    ids = cluster["tokenizer"](PROMPTS[2], add_special_tokens=False)["input_ids"]
    by_text = oai.completions.create(model=cluster["model"], prompt=PROMPTS[2], temperature=0,
                                     extra_body={"ignore_eos": True})
    by_ids = oai.completions.create(model=cluster["model"], prompt=ids, temperature=0, extra_body={"ignore_eos": True})
    assert by_ids.choices[0].text == by_text.choices[0].text
    assert by_ids.usage.completion_tokens == by_text.usage.completion_tokens == 16  # OpenAI's default max_tokens
    assert by_ids.usage.prompt_tokens == len(ids)


def test_models_health_metrics_and_a_wrong_model(cluster, oai) -> None:
    assert [m.id for m in oai.models.list().data] == [cluster["model"]]
    assert oai.models.retrieve(cluster["model"]).id == cluster["model"]
    with pytest.raises(openai.NotFoundError) as err:
        oai.completions.create(model="gpt-4o", prompt="hi", max_tokens=2)
    assert err.value.code == "model_not_found" and err.value.param == "model"
    status, body = http_get(cluster["url"] + "/health")
    assert status == 200 and json.loads(body)["status"] == "ok"
    status, body = http_get(cluster["url"] + "/metrics")
    assert status == 200 and 'dsi_gateway_requests_total{endpoint="completions",status="404"}' in body


BAD = [
    ("completions", {"max_tokens": 0}, "max_tokens"),
    ("completions", {"temperature": -1.0}, "temperature"),
    ("completions", {"top_p": 1.5}, "top_p"),
    ("completions", {"n": 2}, "n"),
    ("completions", {"logprobs": 2}, "logprobs"),
    ("completions", {"logit_bias": {"5": 10}}, "logit_bias"),
    ("completions", {"echo": True}, "echo"),
    ("completions", {"seed": -1}, "seed"),
    ("completions", {"prompt": ""}, "prompt"),
    ("completions", {"prompt": ["a", "b"]}, "prompt"),
    ("completions", {"stream_options": {"include_usage": True}}, "stream_options"),
    ("completions", {"extra_body": {"frobnicate": 1}}, "frobnicate"),
    ("completions", {"extra_body": {"dsi": {"lookahead": 1000}}}, "dsi.lookahead"),
    ("completions", {"extra_body": {"dsi": {"mode": "fast"}}}, "dsi.mode"),
    ("completions", {"extra_body": {"top_k": -5}}, "top_k"),
    ("chat", {"max_completion_tokens": 0}, "max_completion_tokens"),
    ("chat", {"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools"),
    ("chat", {"response_format": {"type": "json_object"}}, "response_format"),
    ("chat", {"messages": []}, "messages"),
    ("chat", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages[0].content[0]"),
    ("chat", {"messages": [{"role": "tool", "content": "x", "tool_call_id": "1"}]}, "messages[0].role"),
]


@pytest.mark.parametrize(("endpoint", "override", "param"), BAD, ids=[p for _, _, p in BAD])
def test_bad_input_is_a_400_naming_the_parameter(cluster, oai, endpoint: str, override: dict, param: str) -> None:
    if endpoint == "chat":
        kwargs: dict[str, Any] = {"model": cluster["model"], "messages": MESSAGES, "max_tokens": 4, **override}
        call = oai.chat.completions.create
    else:
        kwargs = {"model": cluster["model"], "prompt": "def f():", "max_tokens": 4, **override}
        call = oai.completions.create
    with pytest.raises(openai.BadRequestError) as err:
        call(**kwargs)
    assert err.value.param == param, err.value.message
    assert param in err.value.body["message"], err.value.body


def test_neutral_values_of_unsupported_parameters_are_accepted(cluster, oai) -> None:
    resp = oai.chat.completions.create(model=cluster["model"], messages=MESSAGES, max_tokens=3, temperature=0,
                                       presence_penalty=0, frequency_penalty=0, logprobs=False, n=1, user="u1",
                                       response_format={"type": "text"})
    assert resp.usage.completion_tokens <= 3


def test_api_key_and_a_model_without_chat_template(cluster) -> None:
    url = cluster["keyed_url"] + "/v1"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url, api_key="wrong", max_retries=0).models.list()
    keyed = openai.OpenAI(base_url=url, api_key="sesame", max_retries=0, timeout=60)
    assert [m.id for m in keyed.models.list().data] == ["tiny"]
    assert keyed.completions.create(model="tiny", prompt="x = ", max_tokens=2).usage.completion_tokens <= 2
    with pytest.raises(openai.BadRequestError) as err:
        keyed.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=2)
    assert "--chat-template" in err.value.message
    with pytest.raises(openai.APIStatusError) as err:
        keyed.completions.create(model="tiny", prompt="x" * 3000, max_tokens=2)
    assert err.value.status_code == 413


def test_over_the_concurrency_limit_is_a_429_not_a_wait(cluster) -> None:
    keyed = openai.OpenAI(base_url=cluster["keyed_url"] + "/v1", api_key="sesame", max_retries=0, timeout=60)
    stream = keyed.completions.create(model="tiny", prompt="x = ", max_tokens=2000, stream=True,
                                      extra_body={"ignore_eos": True})
    try:
        next(iter(stream))  # the one slot is taken until this stream ends
        with pytest.raises(openai.RateLimitError):
            keyed.completions.create(model="tiny", prompt="y = ", max_tokens=2)
    finally:
        stream.close()
    deadline = time.monotonic() + 20
    while True:  # the slot is free again once the gateway has seen the disconnect
        try:
            assert keyed.completions.create(model="tiny", prompt="y = ", max_tokens=2).usage.completion_tokens <= 2
            break
        except openai.RateLimitError:
            assert time.monotonic() < deadline
            time.sleep(0.1)


def test_the_builtin_pair_ships_a_chat_template() -> None:
    for name in ("target", "drafter"):
        tok = AutoTokenizer.from_pretrained(str(PRETRAINED / name))
        text = tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
        assert text == '"""\nsystem: You write Python.\nuser: A function that adds two numbers.\n"""\n\n'


def test_the_gateway_imports_no_torch() -> None:
    code = ("import sys, dsi.services.gateway.server, dsi.services.gateway.app, dsi.cli; dsi.cli.build_parser(); "
            "sys.exit(1 if 'torch' in sys.modules or 'transformers' in sys.modules else 0)")
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0


@pytest.fixture()
def slow_target(tiny_pair: tuple[Path, Path], log_dir: Path) -> Iterator[Service]:
    """A target whose forwards take 150 ms (emulated), so a request is mid-forward when it is cancelled."""
    target = start_service("target", ["--model", str(tiny_pair[0]), "--threads", "1",
                                      "--emulate-latency-ms", "150:150"], log_dir)
    try:
        yield target
    finally:
        target.stop()


def target_counters(address: str) -> Any:
    with grpc.insecure_channel(address) as ch:
        return target_pb2_grpc.TargetServiceStub(ch).Info(target_pb2.TargetInfoRequest(), timeout=10).counters


def test_a_client_closing_a_stream_cancels_the_work_on_the_targets(slow_target: Service, log_dir: Path) -> None:
    started: list[Service] = []
    try:
        # Target-only (no drafter): nothing else cancels a Verify, so a cancellation is the client's.
        orch = start_service("orchestrator", ["--targets", slow_target.address], log_dir)
        started.append(orch)
        gw, url = start_gateway(orch.address, log_dir)
        started.append(gw)
        before = target_counters(slow_target.address)
        oai = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
        stream = oai.completions.create(model=orch_model(url), prompt=PROMPTS[0], max_tokens=400,
                                        temperature=0, stream=True, extra_body={"ignore_eos": True})
        got = 0
        for chunk in stream:
            got += bool(chunk.choices and chunk.choices[0].text)
            if got == 2:
                break
        stream.close()  # closes the HTTP connection mid-stream
        deadline = time.monotonic() + 20
        while target_counters(slow_target.address).cancelled == before.cancelled and time.monotonic() < deadline:
            time.sleep(0.1)
        after = target_counters(slow_target.address)
        assert after.cancelled == before.cancelled + 1
        assert after.cancelled_mid_forward + after.cancelled_queued >= before.cancelled_mid_forward + 1
        time.sleep(0.6)  # four forwards' time: none starts after the cancellation
        assert target_counters(slow_target.address).forwards_completed == after.forwards_completed
        assert after.forwards_completed - before.forwards_completed < 20  # far from the 400 tokens asked
        _, metrics = http_get(url + "/metrics")
        assert 'dsi_gateway_client_disconnects_total{endpoint="completions"} 1.0' in metrics
    finally:
        for s in reversed(started):
            s.stop()


def orch_model(url: str) -> str:
    with urllib.request.urlopen(url + "/v1/models", timeout=10) as resp:
        return str(json.loads(resp.read())["data"][0]["id"])


def test_orchestrator_down_is_503_and_not_ready(slow_target: Service, log_dir: Path) -> None:
    started: list[Service] = []
    try:
        orch = start_service("orchestrator", ["--targets", slow_target.address], log_dir)
        started.append(orch)
        gw, url = start_gateway(orch.address, log_dir)
        started.append(gw)
        oai = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
        model = orch_model(url)
        assert oai.completions.create(model=model, prompt="x", max_tokens=1).usage.completion_tokens == 1
        orch.stop()
        with pytest.raises(openai.APIStatusError) as err:
            oai.completions.create(model=model, prompt="x", max_tokens=1)
        assert err.value.status_code == 503
        assert slow_target.address not in err.value.message  # internal endpoints stay internal
        with pytest.raises(openai.APIStatusError) as err:
            list(oai.completions.create(model=model, prompt="x", max_tokens=1, stream=True))
        assert err.value.status_code == 503
        status, _ = http_get(url + "/health")
        assert status == 503
    finally:
        for s in reversed(started):
            s.stop()


def test_dsi_up_http_port_serves_the_openai_api(tiny_pair: tuple[Path, Path], tmp_path: Path) -> None:
    target_dir, drafter_dir = tiny_pair
    proc = subprocess.Popen(
        [sys.executable, "-m", "dsi.cli", "up", "--target-model", str(target_dir), "--drafter-model",
         str(drafter_dir), "--targets", "1", "--port", "0", "--http-port", "0", "--log-dir", str(tmp_path / "logs")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        assert proc.stdout is not None
        lines = [proc.stdout.readline(), proc.stdout.readline()]
        assert lines[0].startswith("orchestrator listening on "), lines
        assert lines[1].startswith("gateway listening on http://"), (lines, proc.stderr.read() if proc.stderr else "")
        url = lines[1].split()[-1]
        oai = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=60)
        model = oai.models.list().data[0].id
        text = "".join(c.choices[0].text for c in oai.completions.create(
            model=model, prompt=PROMPTS[0], max_tokens=N, temperature=0, stream=True, extra_body={"ignore_eos": True}))
        with Client(lines[0].split()[-1], timeout=60) as client:
            assert text == client.generate(PROMPTS[0], max_new_tokens=N, ignore_eos=True).text
        proc.terminate()
        assert proc.wait(timeout=60) == 0
        with pytest.raises(openai.APIConnectionError):
            oai.models.list()  # the gateway stopped with the cluster
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
