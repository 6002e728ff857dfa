"""DART (2025): keep the visual tokens that duplicate a few pivot tokens the least.

Decoder layers ``0..K`` (default 2) run on the full sequence. Of each sample's visual
tokens, the ``num_pivots`` with the largest key norms at layer ``K`` are pivots and are
kept; the rest of the budget goes to the visual tokens whose hidden states after layer
``K`` are least similar to any pivot (smallest maximum cosine similarity). Layers after
``K`` see only the kept tokens and the text.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..ops.topk import hard_topk
from .base import InsideLLMMethod, LayerOptions, Selection, VisualTokens, check_options, register_method

__all__ = ["DartMethod", "DartOptions"]


@dataclass
class DartOptions(LayerOptions):
    """Options of :class:`DartMethod`."""

    num_pivots: int = field(default=8, metadata={"help": "pivot tokens per sample (capped by the budget)",
                                                 "at_least": 1})


@register_method
class DartMethod(InsideLLMMethod):
    """Args: layer: the decoder layer ``K``; num_pivots: pivots per sample (capped by the budget)."""

    name = "dart"
    description = "keep visual tokens least similar to a few high key-norm pivots at LLM layer K (DART)"
    needs = frozenset({"key_norms"})
    options_class = DartOptions

    def __init__(self, hidden_size: int, layer: int = 2, num_pivots: int = 8) -> None:
        super().__init__(hidden_size, layer)
        self.num_pivots = check_options(type(self), {"num_pivots": num_pivots})["num_pivots"]

    def select(self, tokens: VisualTokens, budget: torch.Tensor) -> Selection:
        pivots = hard_topk(tokens.key_norms.float(), torch.clamp(budget, max=self.num_pivots), mask=tokens.valid)
        unit = F.normalize(tokens.features.float(), dim=-1)
        to_pivots = torch.full(pivots.shape, -torch.inf, device=unit.device)  # [B, N]
        for row in range(unit.shape[0]):
            if bool(pivots[row].any()):
                to_pivots[row] = (unit[row] @ unit[row, pivots[row]].T).amax(-1)
        # Rank non-pivots by dissimilarity; pivots rank first so they are always kept.
        ranking = torch.where(pivots, torch.full_like(to_pivots, torch.inf), -to_pivots)
        return Selection(hard_topk(ranking, budget, mask=tokens.valid))

    def selection_flops(self, visual: int, hidden: int, budget: int, prompt: int) -> int:
        """The probe of layer ``K``: queries and keys of the sample's ``L = visual + prompt`` tokens
        (``2 * 2 L D^2``; widths taken as ``D``, an upper bound under grouped-query attention),
        then the cosine similarity of the ``N`` visual tokens to the ``min(k, num_pivots)``
        pivots (``2 N P D``). Key norms and the ranking count 0.
        """
        pivots = min(budget, self.num_pivots) if visual else 0
        return 2 * 2 * (visual + prompt) * hidden * hidden + 2 * visual * pivots * hidden

    def config_dict(self) -> dict:
        return {**super().config_dict(), "num_pivots": self.num_pivots}
