"""Pruning inside the language model, for methods with ``prune_layer = K``.

Works on the standard ``transformers`` decoder layer (``input_layernorm``, then
``self_attn`` with ``q_proj``/``k_proj``, rotary embeddings passed in as
``position_embeddings``) that the Qwen, Llama and Qwen2 text models share; the family
says how its attention turns hidden states into queries and keys (Qwen3 normalises them).

At prefill, layer ``K`` runs on the full sequence; right after it the method chooses
the visual tokens to keep from signals of that layer, and one :class:`Compaction` is
applied to the hidden states, the rotary tables and the attention mask, so that layers
after ``K`` run on the shorter sequence (their KV cache holds only the kept tokens).
During decoding, layers up to ``K`` use the full-length mask and later layers a mask
over their compacted cache. Only the signals a method asks for are computed (one query
row for the last-token attention), so every layer keeps its attention implementation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..methods.base import VisualTokens
from ..ops.sequence import gather_sequence
from ..ops.topk import token_budget
from .base import AttachedState, choose, gather_visual, given_cache, replace_forward
from .compaction import Compaction

__all__ = ["LayerPruning", "install_layer_pruning", "decoder_signals", "standard_query_key"]


@dataclass
class LayerPruning:
    """The per-call state shared by the wrapped decoder layers."""

    prefill: bool
    visual_mask: torch.Tensor | None = None
    token_valid: torch.Tensor | None = None
    pad_left: bool = True
    active: bool = False
    masks: dict = field(default_factory=dict)  # layer type -> the mask of the compacted sequence
    position_embeddings: tuple | None = None
    compaction: Compaction | None = None
    cache: Any = None


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def standard_query_key(attention, normed: torch.Tensor):
    """Per-head queries ``[B, L, H, d]`` and keys ``[B, L, Hkv, d]`` before rotary embedding,
    with the per-head ``q_norm``/``k_norm`` of Qwen3-style attention when the layer has them."""
    batch, length, _ = normed.shape
    head_dim = attention.head_dim
    query = attention.q_proj(normed).view(batch, length, -1, head_dim)
    key = attention.k_proj(normed).view(batch, length, -1, head_dim)
    if hasattr(attention, "q_norm"):
        query, key = attention.q_norm(query), attention.k_norm(key)
    return query, key


def decoder_signals(layer, hidden_states, position_embeddings, token_valid, needs,
                    query_key: Callable = standard_query_key) -> dict[str, torch.Tensor]:
    """Signals of a decoder layer's attention on its input ``hidden_states`` ``[B, L, D]``.

    ``query_attention`` ``[B, L]``: softmax attention of each row's last valid token over
    the valid tokens up to it, mean over heads. ``key_norms`` ``[B, L]``: norm of each
    token's key, mean over key heads (rotary embeddings do not change norms).
    """
    attention = layer.self_attn
    normed = layer.input_layernorm(hidden_states)
    batch, length, _ = normed.shape
    positions = torch.arange(length, device=normed.device)
    last = torch.where(token_valid, positions, torch.full_like(positions, -1)).amax(1)  # [B]
    rows = torch.arange(batch, device=normed.device)
    queries, keys = query_key(attention, normed)
    signals = {}
    if "key_norms" in needs:
        signals["key_norms"] = keys.float().norm(dim=-1).mean(-1)
    if "query_attention" in needs:
        query = queries[rows, last].float()  # [B, H, d]
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


def layer_type(text_model, index: int) -> str:
    types = getattr(text_model.config, "layer_types", None)
    return types[index] if types else "full_attention"


def install_layer_pruning(text_model, state: AttachedState, create_masks: Callable,
                          query_key: Callable = standard_query_key) -> None:
    """Wrap decoder layers ``K`` and later of ``text_model`` for ``state.method.prune_layer = K``.

    ``create_masks(inputs_embeds, attention_mask_2d, cache, layer_idx)`` builds, per layer
    type, the masks the family's layers expect for the compacted sequence.
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
        # Text models that number the tokens themselves (1-D, no position_ids) share one table across the batch.
        batch = hidden_states.shape[0]
        tables = tuple(table.expand(batch, *table.shape[1:]) for table in kwargs["position_embeddings"])
        signals = decoder_signals(pruning_layer, hidden_states, tables,
                                  context.token_valid, method.needs, query_key)
        output = original(hidden_states, *args, **kwargs)
        hidden = output[0] if isinstance(output, tuple) else output
        visual = gather_visual(hidden, context.visual_mask)
        budget = token_budget(state.retention, visual.counts)
        tokens = VisualTokens(visual.features, visual.valid, **{
            name: gather_sequence(value.unsqueeze(-1), visual.positions).squeeze(-1)
            for name, value in signals.items()
        })
        _, _, compaction, record = choose(state, tokens, visual, budget, context.visual_mask, context.token_valid,
                                          pad_left=context.pad_left)
        state.call_record = record
        pruned = compaction.apply(hidden)
        context.position_embeddings = tuple(compaction.apply(table) for table in tables)
        context.compaction = compaction
        compact_mask = None if compaction.all_valid else compaction.mask()
        context.masks = create_masks(pruned, compact_mask, given_cache(kwargs), layer_index + 1)
        context.cache = given_cache(kwargs)
        context.active = True
        return (pruned,) + tuple(output[1:]) if isinstance(output, tuple) else pruned

    replace_forward(pruning_layer, pruning_forward, state)
    for index in range(layer_index + 1, len(layers)):
        replace_forward(layers[index], _pruned_layer_forward(layers[index].forward, layer_type(text_model, index),
                                                             state), state)


def _pruned_layer_forward(original, kind: str, state: AttachedState):
    def forward(hidden_states, *args, **kwargs):
        context: LayerPruning | None = state.layer_pruning
        if context is not None and context.active:
            kwargs["attention_mask"] = context.masks[kind]
            if context.position_embeddings is not None:
                kwargs["position_embeddings"] = context.position_embeddings
        return original(hidden_states, *args, **kwargs)

    return forward
