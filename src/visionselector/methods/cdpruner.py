"""CDPruner (NeurIPS 2025): keep the visual tokens of maximal diversity conditioned on the prompt.

Q. Zhang, M. Liu, L. Li, M. Lu, Y. Zhang, J. Pan, Q. She, S. Zhang, "Beyond Attention or
Similarity: Maximizing Conditional Diversity for Token Pruning in MLLMs", NeurIPS 2025
(arXiv:2506.10967). Training-free: the kept tokens are the greedy MAP subset of a
determinantal point process (DPP) whose kernel weighs the similarity of visual tokens by
their relevance to the prompt.

The kernel, for one sample with visual tokens ``x_1 .. x_N`` (LLM-space embeddings) and
prompt token embeddings ``t_1 .. t_T``:

- similarity ``S_ij = cos(x_i, x_j)``;
- relevance ``r_i = mean_m cos(x_i, t_m)``, min-max normalised over the sample's tokens,
  ``r'_i = (r_i - min r + delta) / (max r - min r + delta)`` with ``delta = 1e-6``: the most
  relevant token gets 1, the least a small positive weight (so it can still be kept when
  the budget reaches it), and a sample whose tokens are all equally relevant gets 1
  everywhere;
- quality ``q_i = r'_i`` (``theta=None``, the kernel of the authors' released code), or
  ``q_i = exp(alpha * r'_i)`` with ``alpha = theta / (2 * (1 - theta))`` for a trade-off
  ``theta`` in ``[0, 1)`` (the form the authors' code offers as an option, after Chen et
  al.): then ``log det L_Y = theta / (1 - theta) * sum_{i in Y} r'_i + log det S_Y``, so
  ``theta = 0`` is pure diversity and larger values favour relevance;
- kernel ``L = diag(q) S diag(q)``, i.e. ``L_ij = q_i * q_j * cos(x_i, x_j)``.

The kept set ``Y`` (``|Y| = k``) greedily maximises ``log det L_Y``: each step adds the token
whose addition multiplies the determinant the most, found by the incremental Cholesky
update of Chen, Zhang and Zhou ("Fast Greedy MAP Inference for Determinantal Point
Process to Improve Recommendation Diversity", NeurIPS 2018) in ``O(N * k)`` per step. Ties
go to the lower index.

Where the relevance comes from: the authors' LLaVA code compares CLIP image embeddings
with CLIP text-tower embeddings of the instruction, and negates that similarity, an effect
the authors report seeing only with CLIP. This implementation reads the prompt's input
embeddings (the language model's embedding table), the source for models without a CLIP
text tower, and uses the relevance as the paper defines it: higher similarity to the
prompt is more relevant.

Edge cases: a sample without valid prompt tokens (or with ``prompt`` absent) has uniform
relevance, so the kernel is ``S`` and the selection is pure similarity diversity; a budget
of at least the sample's token count keeps every token. When every remaining token lies
(numerically) in the span of the tokens picked so far, so that no pick can raise the
determinant (more tokens than the features have dimensions, or duplicates), the greedy
starts a new round over the remaining tokens: the budget is always met exactly, with the
most diverse of what is left. Everything is computed in float32 (float64 stays float64).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..ops.merge import merge_flops
from .base import (Selection, SelectionMethod, VisualTokens, check_options, merge_option, merged_selection,
                   register_method)

__all__ = ["CDPrunerMethod", "CDPrunerOptions", "conditional_kernel_factor", "greedy_dpp_map", "prompt_relevance"]

# Added to both ends of the min-max normalisation of the relevance (the authors add 1e-6 to
# the numerator): the least relevant token keeps a weight > 0, and equal relevances give 1.
_RELEVANCE_OFFSET = 1e-6
# A token whose squared residual (its kernel vector's part orthogonal to the round's picks)
# is below this many machine epsilons of its own squared norm counts as in their span: its
# residual is then rounding noise, not a gain in determinant.
_SPAN_TOLERANCE_EPS = 1000.0
# Gains within this many machine epsilons (relative) of the best are a tie, which goes to the
# lower index: equal gains computed along different paths differ by rounding alone.
_TIE_TOLERANCE_EPS = 64.0
# Samples with at most this many visual tokens get their [N, N] kernel formed (256 MiB in
# float32 at the limit); larger ones compute only the kernel rows of the picked tokens.
DENSE_KERNEL_TOKENS = 8192


def _working_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every other dtype is computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _best(gain: torch.Tensor, eligible: torch.Tensor, tie: float) -> int | None:
    """Index of the largest ``gain`` ``[N]`` among ``eligible`` ``[N]`` (``None`` if none is), the lowest
    index among those within ``tie`` (relative) of the largest."""
    masked = torch.where(eligible, gain, torch.full_like(gain, -math.inf))
    best = masked.max()
    if math.isinf(float(best)):
        return None
    return int(torch.argmax((masked >= best - tie * best.abs()).to(torch.uint8)))


def _greedy_map(kernel_row: Callable[[int], torch.Tensor], diagonal: torch.Tensor, count: int) -> torch.Tensor:
    """Greedy MAP of a DPP given its kernel's diagonal ``[N]`` and a function returning row ``j``
    ``[N]`` of the kernel (rows are asked for only for the picked tokens); ``LongTensor[count]``
    in pick order.

    Incremental Cholesky (Chen et al. 2018): ``residual[i]`` is the squared norm of token
    ``i``'s kernel vector orthogonal to the picks of the current round, so ``det L_{Y+i} =
    det L_Y * residual[i]`` and the best pick is the largest residual. Picking ``j`` adds the
    factor row ``e = (L_j - C[:, j]^T C) / sqrt(residual[j])`` and subtracts ``e**2``.
    """
    n = diagonal.shape[0]
    device = diagonal.device
    if count >= n:
        return torch.arange(n, device=device)
    if count <= 0:
        return torch.zeros(0, dtype=torch.long, device=device)
    eps = torch.finfo(diagonal.dtype).eps
    floor = _SPAN_TOLERANCE_EPS * eps * diagonal
    residual = diagonal.clone()
    factors = diagonal.new_zeros(count, n)  # one row of the Cholesky factor per pick of the round
    available = torch.ones(n, dtype=torch.bool, device=device)
    picks: list[int] = []
    round_start = 0
    for step in range(count):
        pick = _best(residual, available & (residual > floor), _TIE_TOLERANCE_EPS * eps)
        if pick is None:
            # Every remaining token lies in the span of this round's picks: no pick raises the
            # determinant. A new round over the remaining tokens fills the budget with the most
            # diverse of them.
            round_start, residual = step, diagonal.clone()
            pick = _best(residual, available & (residual > floor), _TIE_TOLERANCE_EPS * eps)
            if pick is None:  # only zero vectors are left: nothing to choose between
                pick = int(torch.argmax(available.to(torch.uint8)))
        picks.append(pick)
        available[pick] = False
        if step + 1 < count and residual[pick] > floor[pick]:  # the last pick needs no update
            previous = factors[round_start:step]  # [picks this round, N]
            row = kernel_row(pick).to(diagonal.dtype) - previous[:, pick] @ previous
            factors[step] = row / torch.sqrt(residual[pick])
            residual = residual - factors[step] ** 2
    return torch.tensor(picks, dtype=torch.long, device=device)


def greedy_dpp_map(kernel: torch.Tensor, count: int) -> torch.Tensor:
    """Greedy MAP subset of the DPP with kernel ``kernel`` ``[N, N]`` (symmetric positive
    semi-definite): ``LongTensor[count]`` in pick order, each pick the token that multiplies
    ``det kernel[Y, Y]`` the most (ties to the lower index). ``count >= N`` returns
    ``arange(N)`` exactly. Computed in float32 (float64 stays float64)."""
    if kernel.ndim != 2 or kernel.shape[0] != kernel.shape[1]:
        raise ValueError(f"greedy_dpp_map expects a square kernel [N, N], got {tuple(kernel.shape)}")
    if count >= kernel.shape[0]:
        return torch.arange(kernel.shape[0], device=kernel.device)
    kernel = kernel.to(_working_dtype(kernel.dtype))
    return _greedy_map(lambda j: kernel[j], kernel.diagonal().clone(), count)


def prompt_relevance(unit_features: torch.Tensor, prompt: torch.Tensor) -> torch.Tensor:
    """Normalised relevance ``r'`` ``[N]`` of unit-norm visual tokens ``[N, D]`` to the prompt
    tokens ``[T, D]`` (any norms; ``T`` may be 0): the mean cosine similarity to the prompt
    tokens, min-max normalised to ``(0, 1]``; all ones when ``T == 0`` or all are equal."""
    if prompt.shape[0] == 0:
        return unit_features.new_ones(unit_features.shape[0])
    # The mean of the cosines is the dot product with the mean unit prompt vector: O((N + T) * D).
    mean_prompt = F.normalize(prompt.to(unit_features.dtype), dim=-1).mean(0)
    relevance = mean_prompt @ unit_features.T
    low, high = relevance.min(), relevance.max()
    return (relevance - low + _RELEVANCE_OFFSET) / (high - low + _RELEVANCE_OFFSET)


def _quality_and_directions(features: torch.Tensor, prompt: torch.Tensor,
                            theta: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q [N], x / |x| [N, D])`` of CDPruner's kernel ``L = diag(q) S diag(q)`` (``q`` up to one
    constant factor; see :func:`conditional_kernel_factor`); zero tokens get zero directions."""
    unit = F.normalize(features.to(_working_dtype(features.dtype)), dim=-1)
    relevance = prompt_relevance(unit, prompt)
    if theta is None:
        return relevance, unit
    return torch.exp(theta / (2.0 * (1.0 - theta)) * (relevance - 1.0)), unit


def conditional_kernel_factor(features: torch.Tensor, prompt: torch.Tensor, theta: float | None) -> torch.Tensor:
    """``B`` ``[N, D]`` with ``B B^T = c * diag(q) S diag(q)``, CDPruner's conditional kernel up to a
    constant ``c > 0``, for visual tokens ``features`` ``[N, D]`` and prompt embeddings ``prompt``
    ``[T, D]``: row ``i`` is ``q_i * x_i / |x_i|`` (zero for a zero token). In float32 (float64
    stays float64).

    With ``theta``, ``q_i = exp(alpha * (r'_i - 1))``: ``exp(alpha * r'_i)`` scaled by ``exp(-alpha)``
    so that it cannot overflow as ``theta`` nears 1; a constant factor of the kernel scales every
    ``det L_Y`` of a given size alike and so leaves the greedy choice unchanged."""
    quality, unit = _quality_and_directions(features, prompt, theta)
    return quality.unsqueeze(-1) * unit


def cdpruner_picks(features: torch.Tensor, prompt: torch.Tensor, count: int, theta: float | None) -> torch.Tensor:
    """CDPruner's kept tokens of one sample, ``LongTensor[min(count, N)]`` in pick order, from its
    visual tokens ``[N, D]`` and prompt embeddings ``[T, D]``.

    Up to :data:`DENSE_KERNEL_TOKENS` tokens the kernel ``B B^T`` is formed in one matrix
    product (one pass over ``B``, where ``count`` matrix-vector products would read it
    ``count`` times); beyond, only the rows of the picked tokens are computed, ``B[j] @ B^T``, so
    that memory stays ``O(N * (D + count))``."""
    n = features.shape[0]
    if count >= n:
        return torch.arange(n, device=features.device)
    quality, unit = _quality_and_directions(features, prompt, theta)
    factor = quality.unsqueeze(-1) * unit
    # L_ii = q_i^2 |x_i / |x_i||^2, taken exactly rather than from the product, whose rounding
    # would otherwise decide between tokens of equal quality (all of them, without a prompt).
    diagonal = quality.square() * unit.ne(0).any(-1)
    if n <= DENSE_KERNEL_TOKENS:
        kernel = factor @ factor.T
        return _greedy_map(lambda j: kernel[j], diagonal, count)
    return _greedy_map(lambda j: factor[j] @ factor.T, diagonal, count)


@dataclass
class CDPrunerOptions:
    """Options of :class:`CDPrunerMethod`."""

    theta: float | None = field(default=None, metadata={
        "help": "relevance-diversity trade-off: token quality exp(theta / (2 (1 - theta)) r) with r the "
                "normalised prompt relevance (0: diversity only); None: quality r itself, the kernel of "
                "CDPruner's released code",
        "at_least": 0.0, "below": 1.0})
    merge: bool = merge_option()


@register_method
class CDPrunerMethod(SelectionMethod):
    """Args: theta: the relevance-diversity trade-off in ``[0, 1)``, or ``None`` for the released kernel."""

    name = "cdpruner"
    description = "greedy MAP of a DPP on visual-token similarity conditioned on prompt relevance (CDPruner)"
    needs = frozenset({"prompt"})
    options_class = CDPrunerOptions

    def __init__(self, hidden_size: int, theta: float | None = None, merge: bool = False) -> None:
        super().__init__(hidden_size)
        options = check_options(type(self), {"theta": theta, "merge": merge})
        self.theta, self.merges = options["theta"], options["merge"]

    def select(self, tokens: VisualTokens, budget: torch.Tensor) -> Selection:
        keep = torch.zeros_like(tokens.valid)
        counts = tokens.valid.sum(1).tolist()
        for row, (n, k) in enumerate(zip(counts, budget.tolist())):
            if tokens.prompt is None:
                prompt = tokens.features.new_zeros(0, tokens.features.shape[-1])
            elif tokens.prompt_valid is None:
                prompt = tokens.prompt[row]
            else:
                prompt = tokens.prompt[row][tokens.prompt_valid[row].bool()]
            keep[row, cdpruner_picks(tokens.features[row, :n], prompt, k, self.theta)] = True
        return merged_selection(keep, tokens, self.merges)

    def selection_flops(self, visual: int, hidden: int, budget: int, prompt: int) -> int:
        """Relevance (the prompt's mean, ``T * D``, and one product with it, ``2 N D``), the kernel
        (``2 N^2 D``; beyond :data:`DENSE_KERNEL_TOKENS` tokens ``2 N D`` per row, for all picks but
        the last) and the greedy's Cholesky updates (``2 N i`` after pick ``i`` of ``0 .. k - 2``:
        ``N (k - 1) (k - 2)``, the most: a new round starts again from 0). Normalisation and
        the rest are elementwise: 0."""
        if budget >= visual or budget <= 0:
            return 0
        relevance = prompt * hidden + 2 * visual * hidden if prompt > 0 else 0
        if visual <= DENSE_KERNEL_TOKENS:
            kernel = 2 * visual * visual * hidden
        else:
            kernel = 2 * visual * hidden * (budget - 1)
        merging = merge_flops(visual, hidden, budget) if self.merges else 0
        return relevance + kernel + visual * (budget - 1) * (budget - 2) + merging

    def config_dict(self) -> dict:
        return {"theta": self.theta, **({"merge": True} if self.merges else {})}
