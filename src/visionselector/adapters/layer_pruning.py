"""Pruning inside the language model, for methods with ``prune_layer = K``.

Works on the standard ``transformers`` decoder layer (``input_layernorm``, then
``self_attn`` with ``q_proj``/``k_proj``, rotary embeddings passed in as
``position_embeddings``) that Qwen2, Qwen2.5-VL and Llama-style models share.

At prefill, layer ``K`` runs on the full sequence; right after it the method chooses
the visual tokens to keep from signals of that layer, the hidden states, rotary
embeddings and attention mask are compacted, and layers after ``K`` run on the
shorter sequence (their KV cache holds only the kept tokens). During decoding, layers
up to ``K`` use the full-length mask and later layers a mask over their compacted cache.
Only the signals a method asks for are computed (one query row for the last-token
attention), so every layer keeps its attention implementation (SDPA, FlashAttention).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..ops.sequence import compact_index, gather_sequence
from ..ops.topk import token_budget
from .base import (
    AttachedState,
    SelectionRecord,
    check_budget,
    gather_visual,
    kept_indices,
    replace_forward,
    scatter_to_sequence,
)
from ..methods.base import VisualTokens

__all__ = ["LayerPruning", "install_layer_pruning", "decoder_signals"]


@dataclass
class LayerPruning:
    """The per-call state shared by the wrapped decoder layers."""

    prefill: bool
    visual_mask: torch.Tensor | None = None
    token_valid: torch.Tensor | None = None
    pad_left: bool = True
    active: bool = False
    mask: Any = None
    position_embeddings: tuple | None = None
    compact_valid: torch.Tensor | None = None
    cache: Any = None


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def decoder_signals(layer, hidden_states, position_embeddings, token_valid, needs) -> dict[str, torch.Tensor]:
    """Signals of a decoder layer's attention on its input ``hidden_states`` ``[B, L, D]``.

    ``query_attention`` ``[B, L]``: softmax attention of each row's last valid token over
    the valid tokens up to it, mean over heads. ``key_norms`` ``[B, L]``: norm of each
    token's key, mean over key heads (rotary embeddings do not change norms).
    """
    attention = layer.self_attn
    head_dim = attention.head_dim
    normed = layer.input_layernorm(hidden_states)
    batch, length, _ = normed.shape
    keys = attention.k_proj(normed).view(batch, length, -1, head_dim)  # [B, L, Hkv, d]
    signals = {}
    if "key_norms" in needs:
        signals["key_norms"] = keys.float().norm(dim=-1).mean(-1)
    if "query_attention" in needs:
        positions = torch.arange(length, device=normed.device)
        last = torch.where(token_valid, positions, torch.full_like(positions, -1)).amax(1)  # [B]
        rows = torch.arange(batch, device=normed.device)
        query = attention.q_proj(normed[rows, last]).view(batch, -1, head_dim).float()  # [B, H, d]
        cos, sin = (p.float() for p in position_embeddings)  # [B, L, d]
        query = query * cos[rows, last].unsqueeze(1) + _rotate_half(query) * sin[rows, last].unsqueeze(1)
        keys = keys.float()
        keys = keys * cos.unsqueeze(2) + _rotate_half(keys) * sin.unsqueeze(2)
        groups = query.shape[1] // keys.shape[2]
        keys = keys.repeat_interleave(groups, dim=2)  # [B, L, H, d]
        logits = torch.einsum("bhd,blhd->bhl", query, keys) * attention.scaling
        visible = token_valid & (positions.unsqueeze(0) <= last.unsqueeze(1))
        logits = logits.masked_fill(~visible.unsqueeze(1), -torch.inf)
        signals["query_attention"] = torch.softmax(logits, dim=-1).mean(1)
    return signals


def install_layer_pruning(text_model, state: AttachedState, create_mask) -> None:
    """Wrap decoder layers ``K`` and later of ``text_model`` for ``state.method.prune_layer = K``.

    ``create_mask(inputs_embeds, attention_mask_2d, cache, layer_idx)`` builds the mask the
    family's layers expect for the compacted sequence.
    """
    method = state.method
    layer_index = method.prune_layer
    layers = text_model.layers
    if layer_index >= len(layers) - 1:
        raise ValueError(f"method {state.method_name!r} prunes after decoder layer {layer_index}, but the model has "
                         f"{len(layers)} layers; choose layer between 0 and {len(layers) - 2}")
    pruning_layer = layers[layer_index]
    original = pruning_layer.forward

    def pruning_forward(hidden_states, *args, **kwargs):
        context: LayerPruning | None = state.layer_pruning
        if context is None or not context.prefill:
            return original(hidden_states, *args, **kwargs)
        signals = decoder_signals(pruning_layer, hidden_states, kwargs["position_embeddings"],
                                  context.token_valid, method.needs)
        output = original(hidden_states, *args, **kwargs)
        hidden = output[0] if isinstance(output, tuple) else output
        visual = gather_visual(hidden, context.visual_mask)
        budget = token_budget(state.retention, visual.counts)
        tokens = VisualTokens(visual.features, visual.valid, **{
            name: gather_sequence(value.unsqueeze(-1), visual.positions).squeeze(-1)
            for name, value in signals.items()
        })
        with torch.no_grad():
            keep_visual = method.select(tokens, budget).keep & visual.valid
        check_budget(method, keep_visual, budget, visual.counts)
        length = hidden.shape[1]
        keep = (context.token_valid & ~context.visual_mask) | scatter_to_sequence(keep_visual, visual, length, False)
        index, valid = compact_index(keep, pad_left=context.pad_left)
        record = SelectionRecord(kept_indices(keep_visual, visual.valid), visual.counts, "hard", token_index=index,
                                 token_valid=valid)
        state.last = state.call_record = record
        pruned = gather_sequence(hidden, index)
        cos, sin = kwargs["position_embeddings"]
        context.position_embeddings = (gather_sequence(cos, index), gather_sequence(sin, index))
        context.compact_valid = valid
        compact_mask = None if bool(valid.all()) else valid.long()
        context.mask = create_mask(pruned, compact_mask, kwargs.get("past_key_values"), layer_index + 1)
        context.cache = kwargs.get("past_key_values")
        context.active = True
        return (pruned,) + tuple(output[1:]) if isinstance(output, tuple) else pruned

    replace_forward(pruning_layer, pruning_forward, state)
    for layer in layers[layer_index + 1:]:
        replace_forward(layer, _pruned_layer_forward(layer.forward, state), state)


def _pruned_layer_forward(original, state: AttachedState):
    def forward(hidden_states, *args, **kwargs):
        context: LayerPruning | None = state.layer_pruning
        if context is not None and context.active:
            kwargs["attention_mask"] = context.mask
            if context.position_embeddings is not None:
                kwargs["position_embeddings"] = context.position_embeddings
        return original(hidden_states, *args, **kwargs)

    return forward
