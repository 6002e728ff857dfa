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
from .base import InsideLLMMethod, Selection, VisualTokens, register_method

__all__ = ["FastVMethod"]


@register_method
class FastVMethod(InsideLLMMethod):
    """Args: layer: the decoder layer ``K`` whose last-token attention ranks the visual tokens."""

    name = "fastv"
    description = "drop visual tokens least attended by the last token at LLM layer K (FastV)"
    needs = frozenset({"query_attention"})

    def select(self, tokens: VisualTokens, budget: torch.Tensor) -> Selection:
        return Selection(hard_topk(tokens.query_attention.float(), budget, mask=tokens.valid))
