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

    def selection_flops(self, visual: int, hidden: int, budget: int, prompt: int) -> int:
        """The probe of layer ``K``: queries and keys of the sample's ``L = visual + prompt`` tokens
        (``2 * 2 L D^2``) and the last token's attention logits over them (``2 L D``).

        Query and key widths are taken as ``D`` (heads x head width): exact for multi-head
        attention with ``H d = D``; under grouped-query attention the keys are narrower and
        this is an upper bound.
        """
        length = visual + prompt
        return 2 * 2 * length * hidden * hidden + 2 * length * hidden
