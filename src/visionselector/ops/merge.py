"""Merge the dropped visual tokens into the kept ones, and weigh each kept token by its size.

Pruning changes the population of tokens a language model's softmax attention was
calibrated on: with most of the background gone, the few objects left take a larger
share of every query's attention, and a model that counts from that share over-counts
(docs/reference-task.md). Merging keeps the share. Each dropped token joins the kept
token most like it (cosine similarity of their embeddings); a kept token becomes the
mean of its group and carries the group's *size*; every attention query then adds
``log(size)`` to its logit for that key, so that the group draws the attention its
members would have drawn together if they were alike (proportional attention, as in
token merging for vision transformers). Nothing is dropped that leaves no trace, and
the sequence is exactly as short as without merging.

:func:`absorb_dropped` computes the merged embeddings and sizes; :func:`size_bias`
turns sizes into the additive bias of each key.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .sequence import compact_index, gather_sequence

__all__ = ["absorb_dropped", "additive_mask", "size_bias", "merge_flops", "TIE"]

# Cosine similarities this close to a token's best count as a tie, which goes to the earlier kept token.
TIE = 1e-6


def absorb_dropped(features: torch.Tensor, keep: torch.Tensor, valid: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge every dropped token into its most similar kept token of the same row.

    Args:
        features: ``[B, N, D]`` visual embeddings.
        keep: ``BoolTensor[B, N]``, the kept tokens (a subset of ``valid``).
        valid: ``BoolTensor[B, N]``, the real tokens (False in padding).

    Returns:
        ``(merged [B, N, D], sizes [B, N])``. At a kept slot, ``merged`` is the mean (in
        float32, cast back) of the kept token and the dropped tokens whose most similar
        kept token (largest cosine similarity; within :data:`TIE` of it, the earliest) it is, and
        ``sizes`` counts them (1 + absorbed); elsewhere ``merged`` is ``features`` and
        ``sizes`` is 0. A row that keeps every valid token, or none, is unchanged.
    """
    keep = keep & valid
    sizes = keep.to(torch.float32)
    dropped = valid & ~keep
    if not bool((dropped.any(1) & keep.any(1)).any()):
        return features, sizes
    slots, slot_valid = compact_index(keep, pad_left=False)  # [B, K]
    unit = F.normalize(features.float(), dim=-1)
    owner = torch.zeros(keep.shape, dtype=torch.long, device=features.device)  # [B, N], a slot of the row's kept
    for row, kept in enumerate(keep.sum(1).tolist()):
        if kept == 0:
            continue
        # One product per row, of the row's own size: a sample's groups do not depend on its batch
        # (identical tokens, such as LLaVA-OneVision's row separators, tie exactly and go to the first).
        tokens = torch.nonzero(valid[row]).flatten()
        similarity = unit[row, tokens] @ unit[row, slots[row, :kept]].T  # [n, k]
        # Identical kept tokens can differ in the last bits of a product; within TIE of the best is a tie.
        best = similarity.amax(-1, keepdim=True)
        owner[row, tokens] = (similarity >= best - TIE).int().argmax(-1)
    # A kept token owns itself, whatever its similarity to other kept tokens.
    own_slot = keep.long().cumsum(1) - 1
    owner = torch.where(keep, own_slot, owner)
    member = keep | dropped
    batch, count = slots.shape
    totals = torch.zeros(batch, count, features.shape[-1], dtype=torch.float32, device=features.device)
    totals.scatter_add_(1, owner.unsqueeze(-1).expand(-1, -1, features.shape[-1]),
                        features.float() * member.unsqueeze(-1))
    group = torch.zeros(batch, count, dtype=torch.float32, device=features.device)
    group.scatter_add_(1, owner, member.to(torch.float32))
    means = totals / group.clamp(min=1.0).unsqueeze(-1)
    merged = torch.where(keep.unsqueeze(-1), gather_sequence(means, own_slot.clamp(min=0)).to(features.dtype),
                         features)
    sizes = torch.where(keep, gather_sequence(group, own_slot.clamp(min=0)), torch.zeros_like(sizes))
    return merged, sizes


def size_bias(sizes: torch.Tensor) -> torch.Tensor:
    """The attention bias of each key: ``log(size)`` where ``size >= 1``, 0 elsewhere (text,
    padding); ``sizes`` ``[B, L]`` -> ``[B, L]`` float32."""
    sizes = sizes.to(torch.float32)
    return torch.where(sizes >= 1.0, torch.log(sizes.clamp(min=1.0)), torch.zeros_like(sizes))


def merge_flops(visual: int, hidden: int, budget: int) -> int:
    """FLOPs of :func:`absorb_dropped` for one sample of ``visual`` tokens keeping ``budget``:
    the ``N x k`` cosine similarity (``2 N k D``) and one addition per element of each
    dropped embedding (``(N - k) D``); 0 when nothing or everything is dropped."""
    if budget >= visual or budget <= 0:
        return 0
    return 2 * visual * budget * hidden + (visual - budget) * hidden


def additive_mask(valid: torch.Tensor, key_bias: torch.Tensor, query_length: int, dtype: torch.dtype
                  ) -> torch.Tensor:
    """The 4-D additive attention mask of the last ``query_length`` of ``K`` tokens, with a bias per key.

    Args:
        valid: ``BoolTensor[B, K]``, the keys that may be attended to (False at padding).
        key_bias: ``[B, K]``, added to every query's logit for that key (:func:`size_bias`).
        query_length: ``Q``; query ``i`` is token ``K - Q + i`` and sees keys ``0 .. K - Q + i``.
        dtype: the attention's dtype.

    Returns:
        ``[B, 1, Q, K]``: ``key_bias`` where a query sees a key, the dtype's lowest value elsewhere
        (a query that sees nothing, padding, then attends uniformly rather than to NaN).
    """
    batch, keys = valid.shape
    device = valid.device
    rows = torch.arange(keys - query_length, keys, device=device).unsqueeze(1)  # [Q, 1]
    visible = (torch.arange(keys, device=device).unsqueeze(0) <= rows).unsqueeze(0) & valid.bool().unsqueeze(1)
    lowest = torch.finfo(dtype).min
    values = key_bias.to(device=device, dtype=torch.float32).unsqueeze(1).expand(batch, query_length, keys)
    return torch.where(visible, values, torch.full_like(values, lowest)).to(dtype).unsqueeze(1)
