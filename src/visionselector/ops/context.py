"""Focus, then context: a few tokens by relevance, the rest of the budget on an even grid.

A language model trained on whole images reads a pruned image through attention whose
softmax was calibrated on the whole image's population of tokens. A selection that
spends its whole budget on the most relevant tokens changes that population: on the
reference task, keeping every token of the objects a question asks about and almost
no background makes the model over-count them by one (docs/reference-task.md). Keeping
a small *focus* set by relevance and spreading the rest of the budget evenly over the
image keeps both the evidence and a sample of the image in its natural proportions.

:func:`focus_count` says how many tokens the relevance rule keeps; :func:`fill_even_grid`
adds the rest on an even grid of each frame.
"""

from __future__ import annotations

import torch

from .diversity import cosine_similarity_matrix
from .grid import even_grid, frame_sizes, split_budget, thin_evenly

__all__ = ["focus_count", "fill_even_grid", "fill_max_min"]


def focus_count(budget: torch.Tensor, valid: torch.Tensor, focus: float) -> torch.Tensor:
    """Per row, the tokens kept by relevance: ``min(budget, max(1, round(focus * valid tokens)))``.

    Args:
        budget: ``LongTensor[B]``, tokens each row keeps in all.
        valid: ``BoolTensor[B, N]``.
        focus: share of the row's visual tokens (not of its budget) chosen by relevance;
            1.0 leaves the whole budget to relevance.

    Returns:
        ``LongTensor[B]`` (``budget`` itself when ``focus == 1``).
    """
    if focus >= 1.0:
        return budget
    counts = valid.sum(1).to(budget.device)
    wanted = torch.clamp(torch.round(counts.double() * focus).long(), min=1)
    return torch.minimum(budget, wanted)


def _grid_of_free(height: int, width: int, taken: torch.Tensor, count: int) -> list[int]:
    """``count`` row-major indices of an ``height x width`` frame, not in ``taken`` (``BoolTensor``
    over the frame), spread evenly: the points of the coarsest even grid that has at least
    ``count`` free ones, thinned evenly to ``count``."""
    free = int((~taken).sum())
    count = min(count, free)
    if count <= 0:
        return []
    for size in range(count, height * width + 1):
        points = even_grid(height, width, size)
        points = points[~taken[points]]
        if len(points) >= count:
            return thin_evenly(points, count).tolist()
    raise AssertionError("the full grid holds every free token")


def fill_even_grid(keep: torch.Tensor, budget: torch.Tensor, valid: torch.Tensor,
                   segments: list[list[tuple[int, int, int]]] | None) -> torch.Tensor:
    """Add tokens to ``keep`` until each row holds ``budget[b]``, on an even grid of each frame.

    A row's missing tokens are split over its frames in proportion to their tokens not
    yet kept (largest remainder); in each frame they are the free points of the coarsest
    even grid (:func:`~visionselector.ops.grid.even_grid`) that has enough of them, thinned
    evenly. Deterministic; no token is kept twice.

    Args:
        keep: ``BoolTensor[B, N]``, tokens already kept (within ``valid``).
        budget: ``LongTensor[B]``, at most each row's valid count.
        valid: ``BoolTensor[B, N]``, each row's tokens left-aligned.
        segments: per row, its visual blocks as ``(frames, height, width)`` token grids.

    Returns:
        a new ``BoolTensor[B, N]`` with exactly ``budget[b]`` True per row (``keep`` itself
        when no row needs more).
    """
    budget = torch.minimum(budget.to(keep.device), valid.sum(1).to(keep.device))
    missing = (budget - keep.sum(1)).tolist()
    if all(m <= 0 for m in missing):
        return keep
    if segments is None:
        raise ValueError("spreading the rest of the budget on an even grid needs each image's token grid, which "
                         "this model family does not provide; use focus=1.0")
    keep = keep.clone()
    for row, (blocks, count) in enumerate(zip(segments, missing)):
        if count <= 0:
            continue
        frames = frame_sizes(blocks)
        if sum(h * w for h, w in frames) != int(valid[row].sum()):
            raise ValueError(f"sample {row}: its token grids {blocks} hold {sum(h * w for h, w in frames)} tokens, "
                             f"but it has {int(valid[row].sum())} visual tokens")
        starts, offset = [], 0
        for height, width in frames:
            starts.append(offset)
            offset += height * width
        free = [h * w - int(keep[row, s:s + h * w].sum()) for (h, w), s in zip(frames, starts)]
        for (height, width), start, share in zip(frames, starts, split_budget(count, free)):
            taken = keep[row, start:start + height * width].cpu()
            chosen = _grid_of_free(height, width, taken, share)
            if chosen:  # one write per frame, not one per token (each would be a kernel launch on a GPU)
                keep[row, start + torch.tensor(chosen, device=keep.device)] = True
    return keep


def fill_max_min(keep: torch.Tensor, budget: torch.Tensor, features: torch.Tensor, valid: torch.Tensor
                 ) -> torch.Tensor:
    """Add tokens to ``keep`` until each row holds ``budget[b]``, each the token least like any kept one.

    Each step keeps the free token whose largest cosine similarity to the kept tokens is the
    smallest (greedy max-min diversity, DivPrune's rule, continued from the tokens already
    kept; a row with none kept starts from its first token). Ties go to the lower index.

    Args:
        keep: ``BoolTensor[B, N]``, tokens already kept (within ``valid``).
        budget: ``LongTensor[B]``.
        features: ``[B, N, D]``, the tokens whose similarity is measured.
        valid: ``BoolTensor[B, N]``.

    Returns:
        a new ``BoolTensor[B, N]`` with ``min(budget[b], valid tokens)`` True per row (``keep``
        itself when no row needs more).
    """
    budget = torch.minimum(budget.to(keep.device), valid.sum(1).to(keep.device))
    missing = budget - keep.sum(1)
    steps = int(missing.max()) if missing.numel() else 0
    if steps <= 0:
        return keep
    keep = keep.clone()
    similarity = cosine_similarity_matrix(features)  # [B, N, N]
    rows = torch.arange(keep.shape[0], device=keep.device)
    closest = torch.where(keep.unsqueeze(1), similarity, torch.full_like(similarity, -torch.inf)).amax(-1)
    closest = torch.where(keep.any(1, keepdim=True), closest, torch.zeros_like(closest))
    for step in range(steps):
        value = (-closest).masked_fill(keep | ~valid, -torch.inf)
        pick = value.argmax(1)
        active = missing > step
        keep[rows[active], pick[active]] = True
        closest = torch.maximum(closest, similarity[rows, :, pick])
    return keep
