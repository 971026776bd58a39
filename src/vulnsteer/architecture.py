"""The one place that knows how a transformers model is built: where its decoder layers are, its key/value
heads, whether it attends through a sliding window or takes prepared masks, what its cache argument is called in
this transformers release. Plus `hooks`, the lifecycle of the forward hooks everything else installs.
"""

from __future__ import annotations

import inspect

import torch

from vulnsteer.errors import VulnsteerError

_LAYER_PATHS = ("model.layers", "model.model.layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers")


def decoder_layers(model) -> torch.nn.ModuleList:
    """The decoder blocks whose outputs form the residual stream (Llama/Qwen/Mistral/GPT-2 style models)."""
    for path in _LAYER_PATHS:
        module = model
        for name in path.split("."):
            module = getattr(module, name, None)
            if module is None:
                break
        if isinstance(module, torch.nn.ModuleList):
            return module
    raise VulnsteerError(f"cannot find the decoder layers of {type(model).__name__}")


def base_model(model) -> torch.nn.Module:
    """The module that owns the decoder layers and receives the 2-D attention mask."""
    return getattr(model, "model", model)


def key_value_heads(model) -> tuple[int, int]:
    """Key/value heads per layer and their size, from the model's config."""
    config = model.config.get_text_config()
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return getattr(config, "num_key_value_heads", None) or heads, head_dim


def sliding_window(model) -> bool:
    """Whether some layer attends through a sliding window: a prepared mask would bypass it, and its cache keeps
    only the window, so caches of different widths do not line up."""
    config = model.config.get_text_config()
    layer_types = getattr(config, "layer_types", None)
    if layer_types:
        return any(kind != "full_attention" for kind in layer_types)
    return bool(getattr(config, "sliding_window", None)) and getattr(config, "use_sliding_window", True)


def takes_additive_masks(model) -> bool:
    """Whether the model's attention takes a prepared 4-D additive mask as given (eager and SDPA attention) with
    nothing else to apply (a sliding window would be bypassed by such a mask)."""
    return getattr(model.config, "_attn_implementation", None) in ("eager", "sdpa") and not sliding_window(model)


def cache_argument(model) -> str:
    """`cache` in recent transformers releases, `past_key_values` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def given_cache(kwargs: dict):
    """The KV cache a forward call (or a hook on one) received, whatever this release names it."""
    return kwargs.get("cache", kwargs.get("past_key_values"))


def returned_cache(output):
    """The KV cache a forward pass returns (its name changed within transformers 5)."""
    return getattr(output, "cache", None) or output.past_key_values


def hidden_of(output) -> torch.Tensor:
    """A decoder layer's residual stream output (some architectures return a tuple)."""
    return output[0] if isinstance(output, tuple) else output


def with_hidden(output, hidden: torch.Tensor):
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


class Hooks:
    """Forward hooks installed together and removed together, by `remove()` or on leaving a `with` block (after
    an exception too): hooks never outlive the call they were set up for."""

    def __init__(self) -> None:
        self.handles: list[torch.utils.hooks.RemovableHandle] = []

    def add(self, handle: torch.utils.hooks.RemovableHandle) -> torch.utils.hooks.RemovableHandle:
        self.handles.append(handle)
        return handle

    def remove(self) -> None:
        while self.handles:
            self.handles.pop().remove()

    def __enter__(self) -> Hooks:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()
