"""OpenAI's wire format for /v1/completions and /v1/chat/completions: the request models, their
translation into one orchestrator ``Generate`` call, and the response and stream-chunk bodies.

Supported: model, prompt/messages, max_tokens/max_completion_tokens, temperature, top_p, seed, stop,
stream, stream_options.include_usage, n (1 only), user (ignored), and the extensions top_k,
ignore_eos and ``dsi`` {mode, lookahead, sp_degree, verification}. Anything else is refused with a
400 naming it, never silently accepted; a parameter that is unsupported but set to its neutral value
(``logprobs: null``, ``presence_penalty: 0``, ``tools: []``, ...) is let through, since many clients
send those by default.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from dsi.client import Delta
from dsi.services.gateway.errors import APIError, bad_request, unrecognized, unsupported

# OpenAI's default for /v1/completions; chat completions default to as many tokens as fit.
COMPLETIONS_DEFAULT_MAX_TOKENS = 16
MAX_SEED = 2**64 - 1

# Parameters of OpenAI's API this server does not implement, with the values that mean "off".
_NEUTRAL: dict[str, tuple[Any, ...]] = {
    "logprobs": (None, False),
    "top_logprobs": (None, 0),
    "logit_bias": (None, {}),
    "presence_penalty": (None, 0),
    "frequency_penalty": (None, 0),
    "repetition_penalty": (None, 1),
    "response_format": (None, {"type": "text"}),
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "functions": (None, []),
    "function_call": (None, "none"),
    "parallel_tool_calls": (None,),
    "best_of": (None, 1),
    "echo": (None, False),
    "suffix": (None, ""),
    "store": (None, False),
    "metadata": (None, {}),
    "modalities": (None, ["text"]),
    "audio": (None,),
    "prediction": (None,),
    "reasoning_effort": (None,),
    "service_tier": (None, "auto", "default"),
    "web_search_options": (None,),
}
_FINISH = {"length": "length", "eos": "stop", "stop": "stop"}


class DSIOptions(BaseModel):
    """The ``dsi`` extension object: how this request is decoded (see ``dsi generate --help``)."""

    model_config = ConfigDict(extra="forbid")
    mode: Literal["dsi", "si", "nonsi"] = "dsi"
    lookahead: int = 0  # 0 = the orchestrator's default
    sp_degree: int = 0  # 0 = every healthy target
    verification: Literal["coupled", "rejection"] = "coupled"


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class _Request(BaseModel):
    model_config = ConfigDict(extra="allow")  # extras are checked against _NEUTRAL, then refused
    model: str
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: Any = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    n: int | None = 1
    user: str | None = None  # accepted and ignored
    top_k: int | None = None
    ignore_eos: bool = False
    dsi: DSIOptions | None = None


class CompletionRequest(_Request):
    prompt: Any
    max_tokens: int | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant"]
    content: Any = None
    name: str | None = None


class ChatCompletionRequest(_Request):
    messages: list[ChatMessage]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None


@dataclass(frozen=True)
class Generation:
    """One orchestrator Generate call: what to send, and how to name fields in errors."""

    prompt: str | list[int]
    kwargs: dict[str, Any]  # keyword arguments of AsyncClient.stream
    stream: bool
    include_usage: bool
    params: dict[str, str] = field(default_factory=dict)  # orchestrator field -> OpenAI parameter


def check_extras(req: _Request) -> None:
    for name, value in (req.model_extra or {}).items():
        if name not in _NEUTRAL:
            raise unrecognized(name)
        if value not in _NEUTRAL[name]:
            raise unsupported(name)


def completion_prompt(raw: Any) -> str | list[int]:
    """OpenAI's prompt forms: a string, token ids, or a list holding one of those (one prompt only)."""
    if isinstance(raw, list) and raw and all(isinstance(p, str | list) for p in raw):
        if len(raw) != 1:
            raise bad_request("prompt", f"one prompt per request (n=1); got a batch of {len(raw)}")
        raw = raw[0]
    if isinstance(raw, str):
        return raw
    if isinstance(raw, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in raw):
        if not raw:
            raise bad_request("prompt", "must not be empty")
        return list(raw)
    raise bad_request("prompt", "must be a string, a list of token ids, or a list holding one of those")


def message_text(i: int, content: Any) -> str:
    """A message's content as text: a string, or text parts (joined with newlines)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise bad_request(f"messages[{i}].content[{j}]", "only text parts ({'type': 'text', 'text': ...}) "
                                                                   "are supported")
            texts.append(part["text"])
        return "\n".join(texts)
    raise bad_request(f"messages[{i}].content", "must be a string or a list of text parts")


def conversation(req: ChatCompletionRequest) -> list[dict[str, str]]:
    """The messages as chat templates expect them ('developer' is OpenAI's new name for 'system')."""
    if not req.messages:
        raise bad_request("messages", "must not be empty")
    out = []
    for i, m in enumerate(req.messages):
        msg = {"role": "system" if m.role == "developer" else m.role, "content": message_text(i, m.content)}
        if m.name is not None:
            msg["name"] = m.name
        out.append(msg)
    return out


def _stop(raw: Any) -> list[str]:
    if raw is None:
        return []
    if isinstance(raw, str):
        return [raw]
    if isinstance(raw, list) and all(isinstance(s, str) for s in raw):
        return list(raw)
    raise bad_request("stop", "must be a string or a list of strings")


def generation(
    req: _Request, prompt: str | list[int], max_tokens: int, tokens_param: str, *, truncate_at_context: bool,
    request_id: str,
) -> Generation:
    """The orchestrator call for a validated request (ranges are the orchestrator's to check)."""
    if req.n not in (None, 1):
        raise bad_request("n", f"only n=1 is supported, got {req.n}")
    if req.stream_options is not None and not req.stream:
        raise bad_request("stream_options", "is only allowed when stream is true")
    if req.seed is not None and not 0 <= req.seed <= MAX_SEED:
        raise bad_request("seed", f"must be in [0, 2**64), got {req.seed}")
    opts = req.dsi or DSIOptions()
    top_k = req.top_k or 0
    kwargs: dict[str, Any] = dict(
        max_new_tokens=max_tokens,
        mode=opts.mode,
        temperature=1.0 if req.temperature is None else req.temperature,  # OpenAI's default
        top_k=0 if top_k == -1 else top_k,  # -1 also means off, as in vLLM
        top_p=req.top_p,
        seed=req.seed,
        lookahead=opts.lookahead,
        sp_degree=opts.sp_degree,
        verification=opts.verification,
        stop=_stop(req.stop),
        ignore_eos=req.ignore_eos,
        truncate_at_context=truncate_at_context,
        request_id=request_id,
    )
    prompt_param = "messages" if isinstance(req, ChatCompletionRequest) else "prompt"
    params = {"prompt": prompt_param, "prompt_token_ids": prompt_param, "max_new_tokens": tokens_param,
              "stop": "stop", **{f: f"dsi.{f}" for f in ("mode", "lookahead", "sp_degree", "verification")}}
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    return Generation(prompt, kwargs, bool(req.stream), include_usage, params)


@dataclass
class Result:
    """What one Generate produced, gathered from its deltas."""

    text: str = ""
    finish_reason: str | None = None
    stats: dict[str, Any] = field(default_factory=dict)

    def add(self, d: Delta) -> None:
        self.text += d.text
        if d.stats is not None:
            self.finish_reason = finish_reason(d.finish_reason)
            self.stats = d.stats


def finish_reason(reason: str | None) -> str | None:
    return _FINISH.get(reason or "", "stop") if reason is not None else None


def usage(stats: dict[str, Any]) -> dict[str, int]:
    prompt, completion = int(stats.get("prompt_tokens", 0)), int(stats.get("new_tokens", 0))
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


@dataclass(frozen=True)
class ResponseShape:
    """Builds the bodies of one response: ``chat`` selects chat.completion(.chunk) over text_completion."""

    id: str
    model: str
    chat: bool
    created: int = field(default_factory=lambda: int(time.time()))

    def _envelope(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def full(self, result: Result) -> dict[str, Any]:
        if self.chat:
            choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": result.text}}
        else:
            choice = {"index": 0, "text": result.text}
        choice.update(logprobs=None, finish_reason=result.finish_reason)
        body = self._envelope("chat.completion" if self.chat else "text_completion")
        body.update(choices=[choice], usage=usage(result.stats), dsi=result.stats)
        return body

    def chunk(self, text: str | None, finish: str | None = None, stats: dict[str, Any] | None = None,
              role: bool = False) -> dict[str, Any]:
        """A stream chunk: new text (chat: the first chunk also carries the role), or the last one
        with the finish reason and the request's stats under ``dsi``."""
        if self.chat:
            delta: dict[str, Any] = {}
            if role:
                delta["role"] = "assistant"
            if text is not None:
                delta["content"] = text
            choice: dict[str, Any] = {"index": 0, "delta": delta}
        else:
            choice = {"index": 0, "text": text or ""}
        choice.update(logprobs=None, finish_reason=finish)
        body = self._envelope("chat.completion.chunk" if self.chat else "text_completion")
        body["choices"] = [choice]
        if stats is not None:
            body["dsi"] = stats
        return body

    def usage_chunk(self, stats: dict[str, Any]) -> dict[str, Any]:
        body = self._envelope("chat.completion.chunk" if self.chat else "text_completion")
        body.update(choices=[], usage=usage(stats))
        return body


def error_event(exc: APIError) -> dict[str, Any]:
    """An error after the stream started (the status line is already sent): OpenAI clients raise it."""
    return exc.body()
