"""Compaction of padded sequences after some of their tokens are dropped."""

from __future__ import annotations

import torch

__all__ = ["compact_index", "gather_sequence"]


def compact_index(keep: torch.Tensor, *, pad_left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Where each kept token lands in a re-padded, shorter batch.

    Args:
        keep: ``BoolTensor[B, L]``, the tokens that stay (padding must be False).
        pad_left: put each row's padding on the left (for generation) or the right.

    Returns:
        ``index`` ``LongTensor[B, L']``: for each slot of the compacted batch, the
        position in the original row it takes its token from (0 in padding slots), and
        ``valid`` ``BoolTensor[B, L']``, False in padding slots. ``L' = max_b keep[b].sum()``.
        Kept tokens stay in their original order.
    """
    batch, length = keep.shape
    lengths = keep.sum(1)
    new_length = int(lengths.max()) if batch else 0
    rank = keep.long().cumsum(1) - 1
    if pad_left:
        rank = rank + (new_length - lengths).unsqueeze(1)
    # Dropped tokens are routed to a spare column that is cut off afterwards.
    slot = torch.where(keep, rank, torch.full_like(rank, new_length))
    source = torch.arange(length, device=keep.device).expand(batch, length)
    index = torch.zeros(batch, new_length + 1, dtype=torch.long, device=keep.device)
    index.scatter_(1, slot, source)
    valid = torch.zeros(batch, new_length + 1, dtype=torch.bool, device=keep.device)
    valid.scatter_(1, slot, keep)
    return index[:, :new_length], valid[:, :new_length]


def gather_sequence(values: torch.Tensor, index: torch.Tensor, *, seq_dim: int = 1) -> torch.Tensor:
    """Gather ``values`` along its sequence axis with a per-row ``index`` ``[B, L']``.

    ``values`` has the batch axis just before ``seq_dim`` (``[B, L, ...]`` with
    ``seq_dim=1``, or ``[3, B, L]`` with ``seq_dim=2``); trailing axes are carried along.
    """
    shape = [1] * values.ndim
    shape[seq_dim - 1] = index.shape[0]
    shape[seq_dim] = index.shape[1]
    expanded = index.view(shape).expand(
        *[values.shape[d] if d not in (seq_dim - 1, seq_dim) else shape[d] for d in range(values.ndim)]
    )
    return values.gather(seq_dim, expanded)
