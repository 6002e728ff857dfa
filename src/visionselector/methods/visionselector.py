"""VisionSelector: a learned importance scorer with a differentiable top-k.

The Learnable Importance Scorer (LIS) projects each visual token to a query and a
key of width ``h`` and scores token ``i`` by its mean scaled dot product with every
key, ``s_i = mean_j <q_i, k_j> / sqrt(h)``. Because the mean is linear, this equals
``<q_i, mean_j k_j> / sqrt(h)`` and further ``x_i . (Wq^T kbar) + bq . kbar`` over
``sqrt(h)``: the same numbers in ``O(N * D + D * h)`` instead of the
``O(N^2 * h)`` of a materialised attention matrix.

Option ``diversity`` (0 by default: the paper's method, exactly) keeps tokens by maximal
marginal relevance over the trained scores instead of plain top-k, the selection of
IDPruner (Tencent AngelSlim): each step trades a token's normalised score against its
cosine similarity to the tokens already kept (:func:`~visionselector.ops.diversity.mmr_keep`).
It changes hard selection only; training (soft selection) is the same either way.
Option ``focus`` (1.0 by default: off) keeps only a share of each image's tokens that way
and spreads the rest of the budget on an even grid (:mod:`~visionselector.ops.context`;
``context="diverse"``: by max-min diversity); option ``merge`` merges the dropped tokens into
the kept ones (:mod:`~visionselector.ops.merge`). They too change hard selection only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from ..ops.context import fill_even_grid, fill_max_min, focus_count
from ..ops.diversity import mmr_flops, mmr_keep
from ..ops.merge import merge_flops
from .base import (Selection, SelectionMethod, VisualTokens, check_options, check_value, merge_option, merged_selection,
                   register_method)

__all__ = ["ImportanceScorer", "VisionSelectorMethod", "VisionSelectorOptions"]


class ImportanceScorer(nn.Module):
    """The Learnable Importance Scorer.

    Args:
        in_features: width ``D`` of the visual tokens (the language model's hidden size).
        hidden_dim: width ``h`` of queries and keys; defaults to ``in_features // 2``.
        init_std: standard deviation of the initial weights (biases start at 0), small
            so that the untrained scorer is almost flat.

    ``forward(x [B, N, D], mask [B, N] | None) -> scores [B, N]`` in the scorer's
    parameter dtype; masked entries are 0 and do not enter the mean.
    """

    def __init__(self, in_features: int, hidden_dim: int | None = None, *, init_std: float = 1e-4) -> None:
        super().__init__()
        in_features = check_value("ImportanceScorer in_features", in_features, int, at_least=1)
        hidden_dim = check_value("ImportanceScorer hidden_dim", hidden_dim, int, optional=True, at_least=1)
        if hidden_dim is None:
            hidden_dim = in_features // 2
        if hidden_dim < 1:
            raise ValueError(f"ImportanceScorer hidden_dim defaults to in_features // 2, which is 0 for in_features "
                             f"{in_features}; give hidden_dim (an integer >= 1)")
        self.in_features = in_features
        self.hidden_dim = hidden_dim
        self.query = nn.Linear(in_features, hidden_dim)
        self.key = nn.Linear(in_features, hidden_dim)
        self.init_std = check_value("ImportanceScorer init_std", init_std, float, above=0.0)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for layer in (self.query, self.key):
            nn.init.normal_(layer.weight, mean=0.0, std=self.init_std)
            nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if x.ndim != 3 or x.shape[-1] != self.in_features:
            raise ValueError(
                f"ImportanceScorer expects features [B, N, {self.in_features}], got {tuple(x.shape)}"
            )
        x = x.to(self.query.weight.dtype)
        if mask is None:
            mean_token = x.mean(1)
        else:
            mask = mask.to(device=x.device, dtype=torch.bool)
            weights = mask.to(x.dtype).unsqueeze(-1)
            mean_token = (x * weights).sum(1) / weights.sum(1).clamp(min=1)
        mean_key = self.key(mean_token)  # [B, h]
        direction = mean_key @ self.query.weight  # [B, D]
        offset = mean_key @ self.query.bias  # [B]
        scores = (torch.einsum("bnd,bd->bn", x, direction) + offset.unsqueeze(1)) / math.sqrt(self.hidden_dim)
        if mask is not None:
            scores = scores.masked_fill(~mask, 0.0)
        return scores

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, hidden_dim={self.hidden_dim}"


def diversity_option(at_zero: str):
    """The ``diversity`` option of the learned methods (:func:`~visionselector.ops.diversity.mmr_keep`);
    ``at_zero`` ends its help, saying what 0 is."""
    return field(default=0.0, metadata={
        "help": "weight of redundancy against score when keeping tokens (maximal marginal relevance on cosine "
                f"similarity, as IDPruner); 0 keeps the top-scored tokens, {at_zero}",
        "at_least": 0.0, "at_most": 1.0})


def focus_option():
    """The ``focus`` option of the learned methods (:mod:`~visionselector.ops.context`)."""
    return field(default=1.0, metadata={
        "help": "share of each image's visual tokens chosen by score (and diversity); the rest of the budget is "
                "spread on an even grid of the image, for context. 1.0 gives the whole budget to the score",
        "above": 0.0, "at_most": 1.0})


CONTEXTS = ("grid", "diverse")


def context_option():
    """The ``context`` option of the learned methods: how the budget left after ``focus`` is spent."""
    return field(default="grid", metadata={
        "help": "how the budget left after focus is spent: 'grid' (an even grid of each image) or 'diverse' (each "
                "next token the one least like any kept token, DivPrune's rule)"})


def checked_context(context: str, method: str) -> str:
    if context not in CONTEXTS:
        raise ValueError(f"option 'context' of method {method!r} must be one of {', '.join(map(repr, CONTEXTS))}, "
                         f"got {context!r}")
    return context


def keep_focus_then_context(scores: torch.Tensor, tokens: VisualTokens, budget: torch.Tensor, diversity: float,
                            focus: float, context: str = "grid") -> torch.Tensor:
    """``BoolTensor[B, N]``: ``focus_count`` tokens by MMR over ``scores`` ``[B, N]``, then the rest
    of ``budget`` on an even grid (:func:`~visionselector.ops.context.fill_even_grid`) or by max-min
    diversity (:func:`~visionselector.ops.context.fill_max_min`); exactly
    :func:`~visionselector.ops.diversity.mmr_keep` at ``focus == 1``."""
    if focus >= 1.0:
        return mmr_keep(scores, tokens.features, budget, tokens.valid, diversity)
    keep = mmr_keep(scores, tokens.features, focus_count(budget, tokens.valid, focus), tokens.valid, diversity)
    if context == "diverse":
        return fill_max_min(keep, budget, tokens.features, tokens.valid)
    return fill_even_grid(keep, budget, tokens.valid, tokens.segments)


def learned_config(config: dict, diversity: float, focus: float, merge: bool = False, context: str = "grid") -> dict:
    """``config`` plus the selection options that differ from their defaults, so that a selector
    saved without them stays readable by versions that predate them."""
    if diversity:
        config["diversity"] = diversity
    if focus != 1.0:
        config["focus"] = focus
    if merge:
        config["merge"] = True
    if context != "grid":
        config["context"] = context
    return config


def selection_rule_flops(method, visual: int, hidden: int, budget: int) -> int:
    """The products of a learned method's selection rule: MMR's cosine similarities when
    ``diversity > 0``, the ``N x N`` similarity of the max-min context (``2 N^2 D``) when
    ``context="diverse"`` and ``focus < 1``, and the merge's (:func:`~visionselector.ops.merge.merge_flops`)."""
    if budget >= visual or budget <= 0:
        return 0
    flops = mmr_flops(visual, hidden, budget, method.diversity)
    if method.focus < 1.0 and method.context == "diverse":
        flops += 2 * visual * visual * hidden
    if method.merges:
        flops += merge_flops(visual, hidden, budget)
    return flops


@dataclass
class VisionSelectorOptions:
    """Options of :class:`VisionSelectorMethod`."""

    hidden_dim: int | None = field(default=None, metadata={
        "help": "width h of the scorer's queries and keys (None: half the language model's hidden size)",
        "at_least": 1})
    # A zero std would start every weight at 0, where the scorer's gradients vanish too.
    init_std: float = field(default=1e-4, metadata={"help": "standard deviation of the scorer's initial weights",
                                                    "above": 0.0})
    diversity: float = diversity_option("as the paper does")
    focus: float = focus_option()
    context: str = context_option()
    merge: bool = merge_option()


@register_method
class VisionSelectorMethod(SelectionMethod):
    """Keeps the tokens a trained :class:`ImportanceScorer` ranks highest."""

    name = "visionselector"
    description = "learned importance scorer with differentiable top-k (VisionSelector)"
    trainable = True
    options_class = VisionSelectorOptions

    def __init__(self, hidden_size: int, hidden_dim: int | None = None, init_std: float = 1e-4,
                 diversity: float = 0.0, focus: float = 1.0, context: str = "grid", merge: bool = False) -> None:
        super().__init__(hidden_size)
        options = check_options(type(self), {"hidden_dim": hidden_dim, "init_std": init_std, "diversity": diversity,
                                             "focus": focus, "context": context, "merge": merge})
        self.scorer = ImportanceScorer(hidden_size, options["hidden_dim"], init_std=options["init_std"])
        self.diversity = options["diversity"]
        self.focus = options["focus"]
        self.context = checked_context(options["context"], self.name)
        self.merges = options["merge"]
        if self.focus < 1.0 and self.context == "grid":  # the context grid needs each image's token grid
            self.needs = type(self).needs | {"segments"}

    def scores(self, features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.scorer(features, mask)

    def select(self, tokens: VisualTokens, budget: torch.Tensor) -> Selection:
        keep = keep_focus_then_context(self.token_scores(tokens), tokens, budget, self.diversity, self.focus,
                                       self.context)
        return merged_selection(keep, tokens, self.merges)

    def selection_flops(self, visual: int, hidden: int, budget: int, prompt: int) -> int:
        """The scorer's products: the mean token's key and its direction (``4 D h``) and one dot
        product per token (``2 N D``); plus the selection's (:func:`selection_rule_flops`)."""
        return (4 * hidden * self.scorer.hidden_dim + 2 * visual * hidden
                + selection_rule_flops(self, visual, hidden, budget))

    def config_dict(self) -> dict:
        return learned_config({"hidden_dim": self.scorer.hidden_dim}, self.diversity, self.focus, self.merges,
                              self.context)
