"""DivPrune (CVPR 2025): keep a maximally diverse subset of the visual tokens.

The selection solves the max-min diversity problem greedily on cosine distance
``1 - cos(x_i, x_j)`` between visual embeddings: the first token is the one whose
nearest other token is farthest away; each next token is the one farthest from the
tokens chosen so far (the largest minimum distance). Ties go to the lower index. Option
``merge`` merges each dropped token into its most similar kept one
(:mod:`~visionselector.ops.merge`); max-min diversity is the greedy k-center rule, so each
kept token stands for the tokens nearest it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..ops.merge import merge_flops
from .base import (Selection, SelectionMethod, VisualTokens, check_options, merge_option, merged_selection,
                   register_method)

__all__ = ["DivPruneMethod", "DivPruneOptions", "max_min_diverse"]

# Rows of the distance matrix computed at a time when finding nearest neighbours.
_CHUNK = 1024


def max_min_diverse(features: torch.Tensor, count: int) -> torch.Tensor:
    """Greedy max-min diverse subset of ``features`` ``[N, D]``; ``LongTensor[count]`` in pick order."""
    n = features.shape[0]
    if count >= n:
        return torch.arange(n, device=features.device)
    if count <= 0:
        return torch.zeros(0, dtype=torch.long, device=features.device)
    unit = F.normalize(features.float(), dim=-1)
    nearest = torch.empty(n, device=features.device)
    for start in range(0, n, _CHUNK):
        distance = 1.0 - unit[start:start + _CHUNK] @ unit.T
        rows = torch.arange(distance.shape[0], device=features.device)
        distance[rows, rows + start] = float("inf")  # a token is not its own neighbour
        nearest[start:start + _CHUNK] = distance.min(1).values
    chosen = [int(torch.argmax(nearest))]
    min_distance = 1.0 - unit @ unit[chosen[0]]
    min_distance[chosen[0]] = -float("inf")
    for _ in range(count - 1):
        pick = int(torch.argmax(min_distance))
        chosen.append(pick)
        min_distance = torch.minimum(min_distance, 1.0 - unit @ unit[pick])
        min_distance[chosen] = -float("inf")
    return torch.tensor(chosen, device=features.device)


@dataclass
class DivPruneOptions:
    """Options of :class:`DivPruneMethod`."""

    merge: bool = merge_option()


@register_method
class DivPruneMethod(SelectionMethod):
    name = "divprune"
    description = "greedy max-min diversity on cosine distance of visual embeddings (DivPrune)"
    options_class = DivPruneOptions

    def __init__(self, hidden_size: int, merge: bool = False) -> None:
        super().__init__(hidden_size)
        self.merges = check_options(type(self), {"merge": merge})["merge"]

    def select(self, tokens: VisualTokens, budget: torch.Tensor) -> Selection:
        keep = torch.zeros_like(tokens.valid)
        counts = tokens.valid.sum(1).tolist()
        for row, (n, k) in enumerate(zip(counts, budget.tolist())):
            keep[row, max_min_diverse(tokens.features[row, :n], k)] = True
        return merged_selection(keep, tokens, self.merges)

    def selection_flops(self, visual: int, hidden: int, budget: int, prompt: int) -> int:
        """:func:`max_min_diverse`'s products: the ``N x N`` cosine similarity (``2 N^2 D``), then
        one ``N``-vector of similarities per chosen token (``2 N D k``); 0 when ``k >= N``
        (everything is kept without comparing)."""
        if budget >= visual or budget <= 0:
            return 0
        merging = merge_flops(visual, hidden, budget) if self.merges else 0
        return 2 * visual * visual * hidden + 2 * visual * hidden * budget + merging

    def config_dict(self) -> dict:
        return {"merge": True} if self.merges else {}
