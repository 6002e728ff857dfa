"""FastV (ECCV 2024): prune inside the language model by the attention of the last token.

Decoder layers ``0..K`` run on the full sequence. At layer ``K`` (default 2) the
attention the last token pays to every visual token is computed from that layer's own
queries and keys (only that one query row: the rest of the model keeps its attention
implementation), averaged over heads; the ``k`` visual tokens receiving the most
attention are kept, and layers after ``K`` see only them and the text.
"""

from __future__ import annotations

import torch

from ..ops.topk import hard_topk
from .base import Selection, SelectionMethod, VisualTokens, register_method

__all__ = ["FastVMethod"]


@register_method
class FastVMethod(SelectionMethod):
    """Args: layer: the decoder layer ``K`` whose last-token attention ranks the visual tokens."""

    name = "fastv"
    description = "drop visual tokens least attended by the last token at LLM layer K (FastV)"
    inside_llm = True
    needs = frozenset({"query_attention"})

    def __init__(self, hidden_size: int, layer: int = 2) -> None:
        super().__init__(hidden_size)
        if layer < 0:
            raise ValueError(f"layer must be a non-negative decoder layer index, got {layer}")
        self.prune_layer = int(layer)

    def select(self, tokens: VisualTokens, budget: torch.Tensor) -> Selection:
        return Selection(hard_topk(tokens.query_attention.float(), budget, mask=tokens.valid))

    def config_dict(self) -> dict:
        return {"layer": self.prune_layer}
