"""VisionSelector-Q: a learned, question-aware importance scorer, with coverage at selection.

The paper's scorer rates each visual token by one linear function of the token given the
image, so it cannot tell which of the image's objects a question is about. This method
adds a term that reads the prompt (its token embeddings, the language model's input
embedding table; never the language model's layers):

- **question**: a learned gate ``g_j = w . t_j + c`` weighs the prompt tokens ``t_j``
  (softmax over the valid ones, so that the question's content words can dominate the
  chat template's fixed tokens), their weighted mean ``u`` is projected to a query
  ``q = P u + p`` of width ``h``, and token ``i`` scores ``<K x_i + k, q> / sqrt(h)``;
- **image** (optional, on by default): the paper's importance score of the token given
  the image (:class:`~visionselector.methods.visionselector.ImportanceScorer`), for what
  every question needs.

The score is their sum. Like the paper's, it is a bilinear form against one vector per
sample, so it costs ``O((N + T) * D + D * h)``: ``x_i . (K^T q)`` needs no ``[N, h]``
keys. It trains with the library's differentiable top-k and curriculum-annealed
selection loss, on the frozen model, exactly as the paper's scorer does.

At selection, option ``diversity`` keeps tokens by maximal marginal relevance
(:func:`~visionselector.ops.diversity.mmr_keep`): the most relevant tokens first, then
tokens unlike those already kept, so that a budget too small for every token of every
needed object still covers each of them. Option ``focus`` caps the tokens chosen that way
at a share of the image's tokens and spreads the rest of the budget on an even grid of the
image (:mod:`~visionselector.ops.context`), so that the language model still reads a
sample of the whole image in its natural proportions, which counting needs (``context=
"diverse"`` spends it by max-min diversity instead). Option ``merge`` merges each dropped
token into its most similar kept one and weighs attention to each kept token by the
tokens it stands for (:mod:`~visionselector.ops.merge`), which keeps every part of the
image's share of attention. None of these options enters training.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from .base import (Selection, SelectionMethod, VisualTokens, check_options, check_value, merge_option, merged_selection,
                   register_method)
from .visionselector import (ImportanceScorer, checked_context, context_option, diversity_option, focus_option,
                             keep_focus_then_context, learned_config, selection_rule_flops)

__all__ = ["QuestionScorer", "QuestionAwareScorer", "QuestionAwareSelectorMethod", "QuestionAwareSelectorOptions"]


class QuestionScorer(nn.Module):
    """The question term of VisionSelector-Q.

    Args:
        in_features: width ``D`` of visual and prompt tokens (the language model's hidden size).
        hidden_dim: width ``h`` of the query and keys.
        init_std: standard deviation of the initial projection weights (biases and the
            gate start at 0: the untrained scorer is almost flat and pools the prompt evenly).

    ``forward(x [B, N, D], mask [B, N], prompt [B, T, D], prompt_mask [B, T]) -> [B, N]`` in
    the parameter dtype; masked tokens score 0, and a row without prompt tokens scores 0.
    """

    def __init__(self, in_features: int, hidden_dim: int, *, init_std: float = 1e-4) -> None:
        super().__init__()
        self.in_features = check_value("QuestionScorer in_features", in_features, int, at_least=1)
        self.hidden_dim = check_value("QuestionScorer hidden_dim", hidden_dim, int, at_least=1)
        self.init_std = check_value("QuestionScorer init_std", init_std, float, above=0.0)
        self.gate = nn.Linear(in_features, 1)
        self.query = nn.Linear(in_features, hidden_dim)
        self.key = nn.Linear(in_features, hidden_dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.gate.weight)
        nn.init.zeros_(self.gate.bias)
        for layer in (self.query, self.key):
            nn.init.normal_(layer.weight, mean=0.0, std=self.init_std)
            nn.init.zeros_(layer.bias)

    def pooled_prompt(self, prompt: torch.Tensor, prompt_mask: torch.Tensor) -> torch.Tensor:
        """``[B, T, D]``, ``[B, T]`` -> the gate-weighted mean prompt token ``[B, D]`` (0 for an empty row)."""
        prompt = prompt.to(self.gate.weight.dtype)
        gate = self.gate(prompt).squeeze(-1).masked_fill(~prompt_mask, -float("inf"))
        any_token = prompt_mask.any(1, keepdim=True)
        weights = torch.softmax(torch.where(any_token, gate, torch.zeros_like(gate)), dim=1)
        weights = weights * prompt_mask.to(weights.dtype)
        return torch.einsum("bt,btd->bd", weights, prompt)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, prompt: torch.Tensor,
                prompt_mask: torch.Tensor) -> torch.Tensor:
        if x.ndim != 3 or x.shape[-1] != self.in_features:
            raise ValueError(f"QuestionScorer expects features [B, N, {self.in_features}], got {tuple(x.shape)}")
        if prompt.ndim != 3 or prompt.shape[0] != x.shape[0] or prompt.shape[-1] != self.in_features:
            raise ValueError(f"QuestionScorer expects a prompt [{x.shape[0]}, T, {self.in_features}], "
                             f"got {tuple(prompt.shape)}")
        x = x.to(self.query.weight.dtype)
        mask = mask.to(device=x.device, dtype=torch.bool)
        prompt_mask = prompt_mask.to(device=x.device, dtype=torch.bool)
        query = self.query(self.pooled_prompt(prompt, prompt_mask))  # [B, h]
        query = query * prompt_mask.any(1, keepdim=True).to(query.dtype)
        direction = query @ self.key.weight  # [B, D]
        offset = query @ self.key.bias  # [B]
        scores = (torch.einsum("bnd,bd->bn", x, direction) + offset.unsqueeze(1)) / math.sqrt(self.hidden_dim)
        return scores.masked_fill(~mask, 0.0)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, hidden_dim={self.hidden_dim}"


class QuestionAwareScorer(nn.Module):
    """The whole scorer of VisionSelector-Q: the question term plus, if ``image_score``, the
    paper's image-only term, both of width ``hidden_dim``.

    ``forward(x [B, N, D], mask [B, N], prompt [B, T, D], prompt_mask [B, T]) -> [B, N]``.
    """

    def __init__(self, in_features: int, hidden_dim: int, *, image_score: bool = True,
                 init_std: float = 1e-4) -> None:
        super().__init__()
        self.hidden_dim = hidden_dim
        self.question = QuestionScorer(in_features, hidden_dim, init_std=init_std)
        self.image = ImportanceScorer(in_features, hidden_dim, init_std=init_std) if image_score else None

    def forward(self, x: torch.Tensor, mask: torch.Tensor, prompt: torch.Tensor,
                prompt_mask: torch.Tensor) -> torch.Tensor:
        scores = self.question(x, mask, prompt, prompt_mask)
        if self.image is not None:
            scores = scores + self.image(x, mask)
        return scores


@dataclass
class QuestionAwareSelectorOptions:
    """Options of :class:`QuestionAwareSelectorMethod`."""

    hidden_dim: int | None = field(default=None, metadata={
        "help": "width h of the queries and keys (None: half the language model's hidden size)", "at_least": 1})
    init_std: float = field(default=1e-4, metadata={"help": "standard deviation of the initial weights",
                                                    "above": 0.0})
    image_score: bool = field(default=True, metadata={
        "help": "add the paper's image-only importance score to the question's"})
    diversity: float = diversity_option("as the paper's scorer does")
    focus: float = focus_option()
    context: str = context_option()
    merge: bool = merge_option()


@register_method
class QuestionAwareSelectorMethod(SelectionMethod):
    """Keeps the tokens a trained question-aware scorer ranks highest, optionally by MMR."""

    name = "visionselector_q"
    description = ("learned question-aware scorer with differentiable top-k, MMR coverage and an even-grid context "
                   "(VisionSelector-Q)")
    trainable = True
    needs = frozenset({"prompt"})
    options_class = QuestionAwareSelectorOptions

    def __init__(self, hidden_size: int, hidden_dim: int | None = None, init_std: float = 1e-4,
                 image_score: bool = True, diversity: float = 0.0, focus: float = 1.0, context: str = "grid",
                 merge: bool = False) -> None:
        super().__init__(hidden_size)
        options = check_options(type(self), {"hidden_dim": hidden_dim, "init_std": init_std,
                                             "image_score": image_score, "diversity": diversity, "focus": focus,
                                             "context": context, "merge": merge})
        width = options["hidden_dim"] if options["hidden_dim"] is not None else hidden_size // 2
        if width < 1:
            raise ValueError(f"hidden_dim defaults to half the hidden size, which is 0 for hidden size {hidden_size}; "
                             "give hidden_dim (an integer >= 1)")
        self.scorer = QuestionAwareScorer(hidden_size, width, image_score=options["image_score"],
                                          init_std=options["init_std"])
        self.diversity = options["diversity"]
        self.focus = options["focus"]
        self.context = checked_context(options["context"], self.name)
        self.merges = options["merge"]
        if self.focus < 1.0 and self.context == "grid":  # the context grid needs each image's token grid
            self.needs = type(self).needs | {"segments"}

    def token_scores(self, tokens: VisualTokens) -> torch.Tensor:
        if tokens.prompt is None or tokens.prompt_valid is None:
            raise ValueError("visionselector_q reads the prompt, but none was given; the model's adapter supplies "
                             "it when the method is attached with visionselector.attach")
        return self.scorer(tokens.features, tokens.valid, tokens.prompt, tokens.prompt_valid)

    def select(self, tokens: VisualTokens, budget: torch.Tensor) -> Selection:
        keep = keep_focus_then_context(self.token_scores(tokens), tokens, budget, self.diversity, self.focus,
                                       self.context)
        return merged_selection(keep, tokens, self.merges)

    def selection_flops(self, visual: int, hidden: int, budget: int, prompt: int) -> int:
        """The gate and the pooled prompt (``4 T D``), the query and its direction (``4 D h``), one
        dot product per token (``2 N D``), the same again for the image term, and MMR's cosine
        similarities when ``diversity > 0``, and the rest of the selection rule's (:func:`selection_rule_flops`)."""
        width = self.scorer.hidden_dim
        question = 4 * prompt * hidden + 4 * hidden * width + 2 * visual * hidden
        image = 4 * hidden * width + 2 * visual * hidden if self.scorer.image is not None else 0
        return question + image + selection_rule_flops(self, visual, hidden, budget)

    def config_dict(self) -> dict:
        return learned_config({"hidden_dim": self.scorer.hidden_dim, "image_score": self.scorer.image is not None,
                               "diversity": self.diversity}, self.diversity, self.focus,
                              self.merges, self.context)
