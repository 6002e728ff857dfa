"""Spatial helpers for methods that use the layout of image and video tokens."""

from __future__ import annotations

import math

import torch

__all__ = ["split_budget", "even_grid", "thin_evenly", "frame_sizes", "pooling_grid"]


def split_budget(budget: int, sizes: list[int]) -> list[int]:
    """Split ``budget`` over parts of the given ``sizes`` in proportion, exactly.

    Largest remainder: each part gets ``floor(budget * size / total)``, and the tokens
    left go to the largest fractional parts (earlier parts first on ties). No part gets
    more than its size.
    """
    total = sum(sizes)
    if budget >= total:
        return list(sizes)
    if budget <= 0 or total == 0:
        return [0] * len(sizes)
    exact = [budget * size / total for size in sizes]
    shares = [min(size, math.floor(value)) for size, value in zip(sizes, exact)]
    order = sorted(range(len(sizes)), key=lambda i: (-(exact[i] - math.floor(exact[i])), i))
    left = budget - sum(shares)
    while left > 0:
        for i in order:
            if left == 0:
                break
            if shares[i] < sizes[i]:
                shares[i] += 1
                left -= 1
    return shares


def frame_sizes(segments: list[tuple[int, int, int]]) -> list[tuple[int, int]]:
    """The ``(height, width)`` of every frame of a sample's blocks, in token order."""
    return [(height, width) for frames, height, width in segments for _ in range(frames)]


def thin_evenly(points: torch.Tensor, count: int) -> torch.Tensor:
    """``count`` of ``points`` ``[P]``, evenly spaced in their order (entry ``floor((i + 0.5) P / count)``
    for ``i < count``); ``points`` itself when ``count >= P``."""
    if count >= len(points):
        return points
    return points[((torch.arange(count) + 0.5) * len(points) / count).floor().long()]


def even_grid(height: int, width: int, count: int) -> torch.Tensor:
    """``count`` row-major indices of an ``height x width`` frame spread on an even grid.

    The grid has ``gh x gw`` cells of the frame's aspect ratio, with ``gh * gw >= count``;
    each cell contributes its centre token. When the grid has more points than
    ``count``, an evenly spaced subset of them (in row-major order) is kept.

    Returns:
        sorted ``LongTensor[count]``.
    """
    cells = height * width
    if count >= cells:
        return torch.arange(cells)
    if count <= 0:
        return torch.zeros(0, dtype=torch.long)
    grid_h = min(height, max(1, round(math.sqrt(count * height / width))))
    grid_w = min(width, math.ceil(count / grid_h))
    grid_h = min(height, math.ceil(count / grid_w))
    rows = ((torch.arange(grid_h) + 0.5) * height / grid_h).floor().long()
    cols = ((torch.arange(grid_w) + 0.5) * width / grid_w).floor().long()
    points = (rows.unsqueeze(1) * width + cols.unsqueeze(0)).flatten()
    return thin_evenly(points, count).sort().values


def pooling_grid(height: int, width: int, count: int) -> tuple[int, int]:
    """The pooled grid ``(gh, gw)`` of a frame for a target of ``count`` tokens.

    ``gh = round(sqrt(count * height / width))`` keeps the frame's aspect ratio and
    ``gw = round(count / gh)``, each clamped to ``[1, frame side]``: so ``gh * gw`` is the
    count nearest ``count`` that an aspect-true grid of whole rows and columns allows.
    """
    if count >= height * width:
        return height, width
    count = max(1, count)
    grid_h = min(height, max(1, round(math.sqrt(count * height / width))))
    grid_w = min(width, max(1, round(count / grid_h)))
    return grid_h, grid_w
