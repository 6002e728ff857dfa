"""Uniform spatial subsampling: an even grid of each image and frame, a floor for comparisons."""

from __future__ import annotations

import torch

from ..ops.grid import even_grid, frame_sizes, split_budget
from .base import Selection, SelectionMethod, VisualTokens, register_method

__all__ = ["UniformMethod"]


@register_method
class UniformMethod(SelectionMethod):
    """Splits each sample's budget over its frames in proportion to their sizes
    (largest remainder), then keeps the centres of an even grid in each frame."""

    name = "uniform"
    description = "spatially even grid subsample of each image / frame (a floor for comparisons)"
    needs = frozenset({"segments"})

    def select(self, tokens: VisualTokens, budget: torch.Tensor) -> Selection:
        keep = torch.zeros_like(tokens.valid)
        for row, (segments, k) in enumerate(zip(tokens.segments, budget.tolist())):
            frames = frame_sizes(segments)
            shares = split_budget(k, [h * w for h, w in frames])
            offset = 0
            for (height, width), share in zip(frames, shares):
                keep[row, offset + even_grid(height, width, share).to(keep.device)] = True
                offset += height * width
        return Selection(keep)

    def selection_flops(self, visual: int, hidden: int, budget: int, prompt: int) -> int:
        """0: the grid's positions follow from the frame sizes alone."""
        return 0
