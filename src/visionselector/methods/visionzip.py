"""VisionZip (CVPR 2025): dominant tokens by attention received in the vision encoder,
plus a few contextual tokens merged from the rest.

Per sample with budget ``k``: ``k_c = floor(contextual_ratio * k)`` contextual and
``k - k_c`` dominant tokens. Dominant: the tokens that receive the most attention in
the vision encoder (for encoders without a [CLS] token, such as Qwen's, the mean
attention received in the last full-attention block, as public ports do). Contextual:
``k_c`` targets evenly spaced among the remaining tokens; every other remaining token
joins the target it is most similar to (cosine similarity of the visual embeddings),
and each target becomes the mean of its group, at the target's place and position.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..ops.topk import hard_topk
from .base import Selection, SelectionMethod, VisualTokens, check_options, register_method

__all__ = ["VisionZipMethod", "VisionZipOptions", "merge_contextual"]


@dataclass
class VisionZipOptions:
    """Options of :class:`VisionZipMethod`."""

    # Below 1 so that at least one dominant token is kept whenever the budget is positive.
    contextual_ratio: float = field(default=0.15, metadata={
        "help": "share of the budget spent on merged contextual tokens", "at_least": 0.0, "below": 1.0})


def merge_contextual(features: torch.Tensor, rest: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge the tokens ``rest`` (indices into ``features`` ``[N, D]``) into ``count`` contextual tokens.

    Returns the target indices ``LongTensor[count]`` and their merged features ``[count, D]``.
    """
    targets = rest[((torch.arange(count, device=rest.device) + 0.5) * len(rest) / count).floor().long()]
    others = rest[~torch.isin(rest, targets)]
    merged = features[targets].float().clone()
    sizes = torch.ones(count, device=features.device)
    if len(others):
        similarity = F.normalize(features[others].float(), dim=-1) @ F.normalize(features[targets].float(), dim=-1).T
        group = similarity.argmax(1)
        merged.index_add_(0, group, features[others].float())
        sizes.index_add_(0, group, torch.ones(len(others), device=features.device))
    return targets, (merged / sizes.unsqueeze(1)).to(features.dtype)


@register_method
class VisionZipMethod(SelectionMethod):
    """Args: contextual_ratio: share of the budget spent on merged contextual tokens."""

    name = "visionzip"
    description = "dominant tokens by encoder attention received, plus merged contextual tokens (VisionZip)"
    needs = frozenset({"encoder_attention"})
    options_class = VisionZipOptions

    def __init__(self, hidden_size: int, contextual_ratio: float = 0.15) -> None:
        super().__init__(hidden_size)
        self.contextual_ratio = check_options(type(self), {"contextual_ratio": contextual_ratio})["contextual_ratio"]

    def select(self, tokens: VisualTokens, budget: torch.Tensor) -> Selection:
        keep = torch.zeros_like(tokens.valid)
        features = tokens.features.clone()
        counts = tokens.valid.sum(1).tolist()
        for row, (n, k) in enumerate(zip(counts, budget.tolist())):
            if k == 0:
                continue
            contextual = int(self.contextual_ratio * k) if k < n else 0
            dominant = hard_topk(tokens.encoder_attention[row, :n].float(), k - contextual)
            keep[row, :n] = dominant
            if contextual:
                rest = torch.nonzero(~dominant).flatten()
                targets, merged = merge_contextual(tokens.features[row, :n], rest, contextual)
                keep[row, targets] = True
                features[row, targets] = merged
        return Selection(keep, features)

    def selection_flops(self, visual: int, hidden: int, budget: int, prompt: int) -> int:
        """The contextual merge: the ``N - k`` remaining tokens' cosine similarity to the ``k_c``
        targets (``2 (N - k) k_c D``) and their sums into the targets' means (``(N - k) D``).
        Ranking by encoder attention counts 0; that attention comes from the vision encoder,
        which is not counted here."""
        if budget <= 0 or budget >= visual:
            return 0
        contextual = int(self.contextual_ratio * budget)
        if not contextual:
            return 0
        others = visual - budget
        return 2 * others * contextual * hidden + others * hidden

    def config_dict(self) -> dict:
        return {"contextual_ratio": self.contextual_ratio}
