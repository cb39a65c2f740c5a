"""Session KV caches that can be cut back exactly: after a draft is rejected (the session's sequence
diverges) and after a forward pass cancelled between decoder layers (some layers hold the new tokens,
the rest do not).

transformers 5 keeps only the last ``sliding_window - 1`` tokens in a sliding-window layer
(``DynamicSlidingWindowLayer``: Mistral, Gemma2's local layers, Qwen2 with a window...). Such a layer
cannot be cut back once it has dropped tokens from its front: the tokens it would need again are
gone. So every attention layer here keeps its full history in a plain ``DynamicLayer``; the model
still attends within its window, because the attention mask is built from absolute positions
(``create_sliding_window_causal_mask``), and with a full-length layer the mask covers every cached
token. The output is the same (a masked key contributes exactly zero), the cost is memory: sliding
layers hold as many tokens as full ones, within the session token budget.

Layers with recurrent state (linear attention, convolution, Mamba-style hybrids) or other layouts
cannot be cut back at all; a session holding one is recomputed from scratch instead (exact, slower).
"""

from __future__ import annotations

from typing import Any


def new_kv_cache(config: Any) -> Any:
    """A DynamicCache for ``config`` whose attention layers all keep their full history."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

    cache = DynamicCache(config=config)
    # Exactly the sliding class: hybrids that derive from it also carry recurrent state.
    cache.layers = [DynamicLayer() if type(layer) is DynamicSlidingWindowLayer else layer for layer in cache.layers]
    return cache


def is_croppable(cache: Any) -> bool:
    """Whether every layer can be cut back to any earlier length, layer by layer."""
    from transformers.cache_utils import DummyLayer, DynamicLayer

    layers = getattr(cache, "layers", None)
    return layers is not None and all(type(layer) in (DynamicLayer, DummyLayer) for layer in layers)


def layer_lengths(cache: Any) -> list[int]:
    """Tokens held by each layer (0 for layers that hold none)."""
    from transformers.cache_utils import DynamicLayer

    return [layer.get_seq_length() if isinstance(layer, DynamicLayer) else 0 for layer in cache.layers]


def crop_kv_cache(cache: Any, length: int) -> bool:
    """Cut every layer back to ``length`` tokens, each by its own excess (after an aborted forward the
    first layers hold the new tokens and the rest do not). False when the cache cannot be cut back
    (the caller must start the session over)."""
    from transformers.cache_utils import DynamicLayer

    if not is_croppable(cache):
        return False
    for layer in cache.layers:
        if type(layer) is DynamicLayer:
            extra = layer.get_seq_length() - length
            if extra > 0:
                layer.crop(-extra)
    return True
