"""Chat messages -> prompt text with the tokenizer's own chat template (``apply_chat_template`` with
``add_generation_prompt=True``), or with the template file the gateway was started with.

transformers (and with it torch) is imported only when the tokenizer is loaded, in a worker thread
after the gateway started, so that the gateway itself starts fast."""

from __future__ import annotations

import logging
from typing import Any

from dsi.services.gateway.errors import APIError, bad_request

log = logging.getLogger(__name__)


def load_tokenizer(name: str) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(name)


class ChatTemplate:
    """Renders conversations; ``override`` is the text of a --chat-template file (None: the tokenizer's)."""

    def __init__(self, tokenizer: Any | None, override: str | None, load_error: str = "") -> None:
        self.tokenizer = tokenizer
        self.override = override
        self.load_error = load_error

    def render(self, messages: list[dict[str, str]]) -> str:
        if self.tokenizer is None:
            raise APIError(500, f"the gateway could not load the model's tokenizer for chat templates "
                                f"({self.load_error}); start it with --tokenizer", "server_error")
        if self.override is None and not getattr(self.tokenizer, "chat_template", None):
            raise bad_request(None, "the model has no chat template, so /v1/chat/completions cannot format "
                                    "messages; use /v1/completions, or start the gateway with --chat-template PATH")
        from jinja2 import TemplateError

        try:
            text = self.tokenizer.apply_chat_template(
                messages, chat_template=self.override, tokenize=False, add_generation_prompt=True
            )
        except TemplateError as exc:  # e.g. raise_exception('roles must alternate') in the template
            raise bad_request("messages", f"the chat template refused them: {exc}") from None
        return str(text)
