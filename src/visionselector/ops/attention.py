"""Attention probes: only the scores a method needs, computed beside the model's own attention."""

from __future__ import annotations

import torch

__all__ = ["attention_received"]


def attention_received(query, key, cu_seqlens, scaling, chunk: int = 512) -> torch.Tensor:
    """Mean attention each token receives within its image: ``query``/``key`` ``[S, H, d]`` -> ``[S]``."""
    received = torch.zeros(query.shape[0], dtype=torch.float32, device=query.device)
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        keys = key[start:end].transpose(0, 1).float()  # [H, n, d]
        total = torch.zeros(end - start, dtype=torch.float32, device=query.device)
        for first in range(start, end, chunk):
            queries = query[first:min(first + chunk, end)].transpose(0, 1).float()
            total += torch.softmax(queries @ keys.transpose(1, 2) * scaling, dim=-1).sum((0, 1))
        received[start:end] = total / (query.shape[1] * (end - start))
    return received
