"""Importance with diversity: maximal marginal relevance (MMR) over visual tokens.

Greedy selection that trades a token's importance against its similarity to the tokens
already kept: each step keeps the token with the largest

    (1 - diversity) * importance_i - diversity * max_{j kept} cos(x_i, x_j)

where importance is the scores min-max normalised to [0, 1] over the row's valid tokens.
The first token kept is the most important one. At ``diversity = 0`` this is plain top-k
of the scores, and the function returns exactly :func:`~visionselector.ops.topk.hard_topk`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .topk import hard_topk

__all__ = ["normalised_importance", "mmr_keep", "mmr_flops", "cosine_similarity_matrix"]


def normalised_importance(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``scores`` ``[B, N]`` mapped to [0, 1] per row over ``mask`` (a flat row is all 0); float32."""
    scores = scores.float()
    low = scores.masked_fill(~mask, float("inf")).amin(1, keepdim=True)
    high = scores.masked_fill(~mask, -float("inf")).amax(1, keepdim=True)
    span = (high - low).clamp(min=0.0)
    # A row with no valid token has low = inf; nothing of it is ever read.
    low = torch.where(torch.isfinite(low), low, torch.zeros_like(low))
    normalised = torch.where(span > 0, (scores - low) / span.clamp(min=torch.finfo(torch.float32).tiny),
                             torch.zeros_like(scores))
    return normalised.masked_fill(~mask, 0.0)


def cosine_similarity_matrix(features: torch.Tensor) -> torch.Tensor:
    """``[B, N, D]`` -> ``[B, N, N]`` cosine similarities in float32 (a zero vector is similar to nothing)."""
    unit = F.normalize(features.float(), dim=-1)
    return unit @ unit.transpose(1, 2)


def mmr_keep(scores: torch.Tensor, features: torch.Tensor, budget: torch.Tensor, mask: torch.Tensor,
             diversity: float) -> torch.Tensor:
    """Keep ``budget[b]`` valid tokens of each row by maximal marginal relevance.

    Args:
        scores: ``[B, N]`` importance (higher is better).
        features: ``[B, N, D]`` the tokens whose cosine similarity measures redundancy.
        budget: ``LongTensor[B]``, at most each row's valid count.
        mask: ``BoolTensor[B, N]``, valid tokens.
        diversity: weight in [0, 1] of the redundancy penalty; 0 is top-k of ``scores``.

    Returns:
        ``BoolTensor[B, N]``, exactly ``budget[b]`` True per row. Ties go to the lower index.
    """
    if diversity == 0.0:
        return hard_topk(scores, budget, mask=mask)
    if bool(torch.isnan(scores[mask]).any()):
        raise ValueError("scores contain NaN; cannot rank visual tokens")
    batch, count = scores.shape
    budget = torch.minimum(budget.to(scores.device), mask.sum(1))
    importance = normalised_importance(scores, mask)
    similarity = cosine_similarity_matrix(features)
    keep = torch.zeros(batch, count, dtype=torch.bool, device=scores.device)
    if batch == 0 or count == 0:
        return keep
    rows = torch.arange(batch, device=scores.device)
    closest = torch.full((batch, count), -1.0, device=scores.device)  # max similarity to a kept token
    steps = int(budget.max())
    for step in range(steps):
        value = importance if step == 0 else (1.0 - diversity) * importance - diversity * closest
        value = value.masked_fill(keep | ~mask, -float("inf"))
        pick = value.argmax(1)  # the first maximum: ties go to the lower index
        active = budget > step
        keep[rows[active], pick[active]] = True
        closest = torch.maximum(closest, similarity[rows, :, pick])
    return keep


def mmr_flops(visual: int, hidden: int, budget: int, diversity: float) -> int:
    """Matrix-product FLOPs :func:`mmr_keep` adds to scoring: the ``N x N`` cosine similarity
    (``2 N^2 D``) when ``diversity > 0`` and something is dropped; else 0."""
    if diversity == 0.0 or budget >= visual or budget <= 0:
        return 0
    return 2 * visual * visual * hidden
