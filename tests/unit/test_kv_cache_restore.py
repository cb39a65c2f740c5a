"""The session cache after a forward cancelled between decoder layers, or cut back after a rejection,
is exact for every cache layer type: full attention (Llama), sliding window (Mistral), hybrid
sliding/global (Gemma2) and recurrent state (LFM2's convolution layers, which are started over)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

from dsi.services.model.kv_cache import crop_kv_cache, is_croppable, layer_lengths, new_kv_cache
from dsi.services.model.loading import LoadedModel
from dsi.services.model.runner import ForwardCancelled, Job, ModelRunner

pytestmark = pytest.mark.unit

VOCAB = 97
WINDOW = 8  # sliding window: the prompts below are three windows long
LAYERS = 4


def _llama() -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2))


def _mistral_sliding() -> Any:
    from transformers import MistralConfig, MistralForCausalLM

    return MistralForCausalLM(MistralConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                            num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2,
                                            sliding_window=WINDOW))


def _gemma2_hybrid() -> Any:
    from transformers import Gemma2Config, Gemma2ForCausalLM

    return Gemma2ForCausalLM(Gemma2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                          num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2,
                                          head_dim=8, sliding_window=WINDOW))


def _lfm2_recurrent() -> Any:
    from transformers import Lfm2Config, Lfm2ForCausalLM

    return Lfm2ForCausalLM(Lfm2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2,
                                      layer_types=["conv", "full_attention", "conv", "full_attention"]))


MODELS: dict[str, Callable[[], Any]] = {
    "llama-full": _llama,
    "mistral-sliding": _mistral_sliding,
    "gemma2-hybrid": _gemma2_hybrid,
    "lfm2-recurrent": _lfm2_recurrent,
}


@pytest.fixture(scope="module", params=list(MODELS))
def runner(request: pytest.FixtureRequest) -> ModelRunner:
    torch.manual_seed(0)
    model = MODELS[request.param]().eval()
    loaded = LoadedModel(model=model, name=request.param, device=torch.device("cpu"), dtype=torch.float32,
                         vocab_size=VOCAB, vocab_fingerprint="", eos_token_ids=[], num_layers=LAYERS,
                         instance_id="test")
    r = ModelRunner(loaded)
    yield r
    r.close()


def _forward(runner: ModelRunner, session: str, ids: list[int], first_logit: int,
             cancel_before_layer: int | None = None) -> torch.Tensor:
    """runner.forward on this thread; with cancel_before_layer=k the job is cancelled as layer k starts."""
    job = Job()
    handle = None
    if cancel_before_layer is not None:
        # Runs before the runner's own pre-hook on layer k, which then stops the forward there.
        layer = runner._layers[cancel_before_layer]
        handle = layer.register_forward_pre_hook(lambda *_: job.cancel.set(), prepend=True)
    try:
        return runner._run_job(job, lambda j: runner.forward(j, session, ids, first_logit)[0])
    finally:
        if handle is not None:
            handle.remove()


def _reference(runner: ModelRunner, ids: list[int], first_logit: int) -> torch.Tensor:
    with torch.inference_mode():
        return runner.loaded.model(torch.tensor([ids]), use_cache=False).logits[0, first_logit:].float()


def _tokens(seed: int, n: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, VOCAB, (n,), generator=g).tolist()


def _assert_same(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert got.argmax(-1).tolist() == want.argmax(-1).tolist()


@pytest.mark.parametrize("layer", range(LAYERS))
def test_cancel_mid_window_then_continue_and_diverge(runner: ModelRunner, layer: int) -> None:
    prompt = _tokens(1, 3 * WINDOW)
    window = _tokens(2, 5)
    other = _tokens(3, 6)
    sid = f"s{layer}"
    _forward(runner, sid, prompt, len(prompt) - 1)
    with pytest.raises(ForwardCancelled):
        _forward(runner, sid, prompt + window, len(prompt) - 1, cancel_before_layer=layer)
    session = runner.sessions.get(sid)
    if is_croppable(session.kv):
        # The window re-reads the prompt's last token (its logits score the first draft).
        assert layer_lengths(session.kv) == [len(prompt) - 1] * LAYERS
        assert session.tokens == prompt[:-1]
    # The same window again, after the cancel.
    seq = prompt + window
    _assert_same(_forward(runner, sid, seq, len(prompt) - 1), _reference(runner, seq, len(prompt) - 1))
    # A rejection three tokens back: the cache is cut back past what a sliding layer would have dropped.
    seq = prompt[:-3] + other
    _assert_same(_forward(runner, sid, seq, len(prompt) - 4), _reference(runner, seq, len(prompt) - 4))


@pytest.mark.parametrize("layer", range(LAYERS))
def test_cancel_during_prefill(runner: ModelRunner, layer: int) -> None:
    prompt = _tokens(4, 3 * WINDOW + 1)
    sid = f"p{layer}"
    with pytest.raises(ForwardCancelled):
        _forward(runner, sid, prompt, len(prompt) - 1, cancel_before_layer=layer)
    session = runner.sessions.get(sid)
    assert session.tokens == []
    if is_croppable(session.kv):
        assert layer_lengths(session.kv) == [0] * LAYERS
    _assert_same(_forward(runner, sid, prompt, 0), _reference(runner, prompt, 0))


def test_cache_layer_types() -> None:
    """Sliding layers become full-history layers; recurrent layers stay and make the cache uncroppable."""
    from transformers import Gemma2Config, Lfm2Config, MistralConfig

    assert is_croppable(new_kv_cache(MistralConfig(num_hidden_layers=2, sliding_window=WINDOW)))
    assert is_croppable(new_kv_cache(Gemma2Config(num_hidden_layers=2, sliding_window=WINDOW)))
    recurrent = new_kv_cache(Lfm2Config(num_hidden_layers=2, layer_types=["conv", "full_attention"]))
    assert not is_croppable(recurrent)
    assert crop_kv_cache(recurrent, 0) is False
