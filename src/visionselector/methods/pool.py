"""Average pooling: fewer, merged tokens on a coarser grid of each image and frame.

Retention maps to the grid like this: a sample's budget ``max(1, floor(r * N))`` is split
over its frames in proportion to their sizes, and each frame of ``h x w`` tokens is
pooled to a ``gh x gw`` grid with ``gh = round(sqrt(share * h / w))`` and
``gw = round(share / gh)`` (:func:`~visionselector.ops.grid.pooling_grid`). So the number of tokens kept is
the nearest count whole grid rows and columns allow, not always the budget exactly.
Each pooled token is the mean of its cell and takes the place and position of the
cell's centre token (for cells of even size, the upper-left of the central ones),
which is what ``last_selection`` reports.
"""

from __future__ import annotations

import torch

from ..ops.grid import frame_sizes, pooling_grid, split_budget
from .base import Selection, SelectionMethod, VisualTokens, register_method

__all__ = ["PoolMethod"]


@register_method
class PoolMethod(SelectionMethod):
    name = "pool"
    description = "average pooling to a coarser grid per image / frame (downsampling floor)"
    needs = frozenset({"segments"})
    exact_budget = False

    def select(self, tokens: VisualTokens, budget: torch.Tensor) -> Selection:
        keep = torch.zeros_like(tokens.valid)
        pooled = tokens.features.clone()
        for row, (segments, k) in enumerate(zip(tokens.segments, budget.tolist())):
            frames = frame_sizes(segments)
            shares = split_budget(k, [h * w for h, w in frames])
            offset = 0
            for (height, width), share in zip(frames, shares):
                if share > 0:
                    frame = tokens.features[row, offset:offset + height * width].view(height, width, -1)
                    for index, value in _pool_frame(frame, *pooling_grid(height, width, share)):
                        keep[row, offset + index] = True
                        pooled[row, offset + index] = value
                offset += height * width
        return Selection(keep, pooled)

    def selection_flops(self, visual: int, hidden: int, budget: int, prompt: int) -> int:
        """The cell means: each visual token's ``D`` features are added into its cell once (``N D``)."""
        return visual * hidden if budget > 0 else 0


def _pool_frame(frame: torch.Tensor, grid_h: int, grid_w: int):
    """Yield ``(row-major index of the cell's centre token, mean feature of the cell)``."""
    height, width, _ = frame.shape
    row_edges = [i * height // grid_h for i in range(grid_h + 1)]
    col_edges = [j * width // grid_w for j in range(grid_w + 1)]
    for i in range(grid_h):
        for j in range(grid_w):
            top, bottom, left, right = row_edges[i], row_edges[i + 1], col_edges[j], col_edges[j + 1]
            centre = ((top + bottom - 1) // 2) * width + (left + right - 1) // 2
            yield centre, frame[top:bottom, left:right].float().mean((0, 1)).to(frame.dtype)
