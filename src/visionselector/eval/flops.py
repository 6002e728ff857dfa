"""Analytic prefill FLOPs of a language model that runs each decoder layer at its own length.

Convention, the one ``torch.utils.flop_counter.FlopCounterMode`` follows for the same
forward (a test checks the two agree exactly):

- 2 FLOPs per multiply-add of a matrix product, and nothing else: norms, activations,
  softmax, rotary embeddings, residual additions and the embedding lookup count 0;
- a decoder layer at sequence length ``L`` (hidden size ``D``, ``H`` query heads and
  ``Hkv`` key/value heads of width ``d``, MLP width ``I``) costs

  - projections ``q``, ``k``, ``v``, ``o``: ``2 L D (H d) + 2 * 2 L D (Hkv d) + 2 L (H d) D``;
  - attention ``Q K^T`` and ``A V`` over the full ``L x L`` score matrix, as the counter
    counts SDPA and eager attention (causal masking is not subtracted):
    ``2 * 2 H L^2 d``;
  - the gated MLP's ``gate``, ``up`` and ``down`` projections: ``3 * 2 L D I``;

- the LM head (``D x V``) on the last token only, as ``generate``'s prefill computes
  logits for that position alone.

torch's counter knows the SDPA kernels of CUDA (flash, memory-efficient, cuDNN) but, in
torch 2.13, not the CPU one (``aten._scaled_dot_product_flash_attention_for_cpu``): on CPU
it counts no attention unless given the same formula for that kernel (the tests do).

The analytic count covers dense decoders of softmax attention with a gated MLP
(Qwen2 / Qwen2.5-VL, Qwen3-VL, Llama and the LLaVA family's language models);
:func:`decoder_flops` refuses other layouts (mixture-of-experts, linear-attention layers)
rather than guess.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["decoder_widths", "layer_flops", "decoder_flops", "layer_lengths", "sample_prefill_flops"]

# Layer types whose attention is softmax attention over (a window of) the sequence.
_ATTENTION_LAYER_TYPES = ("full_attention", "sliding_attention")
_EXPERT_FIELDS = ("num_experts", "num_local_experts", "n_routed_experts")


def decoder_widths(text_config) -> dict[str, int]:
    """The widths the count needs, read from a language model's config.

    Returns ``hidden`` (``D``), ``heads`` (``H``), ``kv_heads`` (``Hkv``), ``head_dim``
    (``d``; ``D // H`` where the config gives none), ``intermediate`` (``I``), ``vocab``
    (``V``) and ``layers``. ``ValueError`` for a layout the count does not cover.
    """
    missing = [name for name in ("hidden_size", "num_attention_heads", "intermediate_size", "vocab_size",
                                 "num_hidden_layers") if not isinstance(getattr(text_config, name, None), int)]
    if missing:
        raise ValueError(f"cannot count prefill FLOPs of a {getattr(text_config, 'model_type', '?')!r} language "
                         f"model: its config has no {', '.join(missing)}")
    experts = [name for name in _EXPERT_FIELDS if (getattr(text_config, name, None) or 0) > 0]
    if experts:
        raise ValueError(f"cannot count prefill FLOPs of a {text_config.model_type!r} language model: it is a "
                         f"mixture of experts ({experts[0]}={getattr(text_config, experts[0])}); the analytic "
                         "count covers dense decoders with a gated MLP")
    types = sorted(set(getattr(text_config, "layer_types", None) or ()) - set(_ATTENTION_LAYER_TYPES))
    if types:
        raise ValueError(f"cannot count prefill FLOPs of a {text_config.model_type!r} language model: it has "
                         f"{', '.join(types)} layers; the analytic count covers layers of type "
                         f"{' or '.join(_ATTENTION_LAYER_TYPES)}")
    heads = text_config.num_attention_heads
    return {
        "hidden": text_config.hidden_size,
        "heads": heads,
        "kv_heads": getattr(text_config, "num_key_value_heads", None) or heads,
        "head_dim": getattr(text_config, "head_dim", None) or text_config.hidden_size // heads,
        "intermediate": text_config.intermediate_size,
        "vocab": text_config.vocab_size,
        "layers": text_config.num_hidden_layers,
    }


def layer_flops(text_config, length: int) -> int:
    """FLOPs of one decoder layer on a sequence of ``length`` tokens (batch 1; see the module docstring)."""
    w = decoder_widths(text_config)
    queries, keys = w["heads"] * w["head_dim"], w["kv_heads"] * w["head_dim"]
    projections = 2 * length * w["hidden"] * (queries + 2 * keys) + 2 * length * queries * w["hidden"]
    attention = 2 * 2 * w["heads"] * length * length * w["head_dim"]
    mlp = 3 * 2 * length * w["hidden"] * w["intermediate"]
    return projections + attention + mlp


def decoder_flops(text_config, lengths_per_layer: Sequence[int], *, logits_tokens: int = 1) -> int:
    """Prefill FLOPs of the language model for one sample.

    Args:
        text_config: the language model's config (``model.config.get_text_config()``).
        lengths_per_layer: the sequence length each decoder layer runs at, one per layer,
            in order (:func:`layer_lengths`).
        logits_tokens: positions the LM head runs on (1: the prefill of ``generate``).

    Returns:
        FLOPs (2 per multiply-add), as an ``int``.
    """
    w = decoder_widths(text_config)
    lengths = [int(length) for length in lengths_per_layer]
    if len(lengths) != w["layers"]:
        raise ValueError(f"lengths_per_layer has {len(lengths)} entries; the language model has {w['layers']} "
                         "decoder layers, one length each")
    if any(length < 0 for length in lengths) or logits_tokens < 0:
        raise ValueError(f"lengths and logits_tokens must be >= 0, got {lengths} and {logits_tokens}")
    return sum(layer_flops(text_config, length) for length in lengths) + 2 * logits_tokens * w["hidden"] * w["vocab"]


def layer_lengths(layers: int, full: int, kept: int, prune_layer: int | None = None) -> list[int]:
    """The sequence length of each of ``layers`` decoder layers for one sample.

    ``full``: the sample's tokens before selection (text and every visual token);
    ``kept``: after it. A method that prunes inside the language model after layer ``K``
    (``prune_layer = K``) runs layers ``0..K`` at ``full`` and the rest at ``kept``; any
    other method runs every layer at ``kept``.
    """
    if prune_layer is None:
        return [kept] * layers
    first = min(layers, prune_layer + 1)
    return [full] * first + [kept] * (layers - first)


def sample_prefill_flops(text_config, *, text: int, visual: int, kept: int, prune_layer: int | None = None) -> int:
    """Language-model prefill FLOPs of one sample of ``text`` text tokens and ``visual`` visual
    tokens of which ``kept`` reach the language model (all of them: ``kept = visual``)."""
    layers = decoder_widths(text_config)["layers"]
    return decoder_flops(text_config, layer_lengths(layers, text + visual, text + kept, prune_layer))
