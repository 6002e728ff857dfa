"""How a family numbers its tokens, as a strategy the generic adapter calls.

After pruning, kept tokens keep the positions they had in the full sequence, and
decoding continues with the numbers the uncompressed model would use. Two schemes
cover the supported families: 3-D M-RoPE (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3.5) and
plain 1-D positions (the LLaVA families).
"""

from __future__ import annotations

import torch

from .compaction import Compaction

__all__ = ["PositionStrategy", "MRoPEPositions", "LinearPositions"]


class PositionStrategy:
    """``seq_dim``: the sequence axis of the positions the text model takes.
    ``explicit_mask``: whether a compacted prefill must always carry a 2-D attention mask
    (with 1-D positions that jump, no mask and no cache, ``transformers`` would read each
    jump as the start of a new packed sequence and block attention across it)."""

    seq_dim: int = 1
    explicit_mask: bool = False

    def full(self, position_ids: torch.Tensor | None, batch: int, length: int, device) -> torch.Tensor:
        """Positions of a prefill of ``length`` tokens, as the text model would compute them."""
        raise NotImplementedError

    def continuing(self, position_ids: torch.Tensor | None, start: int, length: int, batch: int,
                   device) -> torch.Tensor:
        """Positions of ``length`` tokens that follow ``start`` uncompressed tokens; ``position_ids``
        (given by ``generate``, already in the uncompressed numbering) win when present."""
        raise NotImplementedError

    def compact(self, positions: torch.Tensor, compaction: Compaction) -> torch.Tensor:
        return compaction.apply(positions, seq_dim=self.seq_dim)


class MRoPEPositions(PositionStrategy):
    """Qwen's 3-D positions ``[3, B, L]`` (temporal, height, width).

    ``generate`` passes ``[4, B, L]`` (a text row first), plain calls ``[3, B, L]``,
    ``[B, L]`` or nothing. The text row only serves to detect packed sequences, and
    compacted positions are not contiguous, so it is dropped; the interleaving of the
    sections (Qwen3-VL) happens inside the rotary embedding, from these same rows.
    """

    seq_dim = 2

    def full(self, position_ids, batch, length, device):
        return self.continuing(position_ids, 0, length, batch, device)

    def continuing(self, position_ids, start, length, batch, device):
        if position_ids is None:
            return torch.arange(start, start + length, device=device).view(1, 1, -1).expand(3, batch, -1)
        if position_ids.ndim == 2:
            return position_ids.unsqueeze(0).expand(3, -1, -1)
        if position_ids.shape[0] == 4:
            return position_ids[1:]
        return position_ids

    def segments(self, token_ids, visual_mask, positions):
        """Each sample's visual blocks as ``(frames, height, width)`` token grids, in sequence order.

        Read off the 3-D M-RoPE positions, which hold the layout whatever path built the
        inputs (``generate`` encodes images before the forward and passes no grids): a
        block's first token sets ``(t0, h0, w0)``; a row is the tokens at ``h0 + r``, a frame
        restarts at ``(h0, w0)`` with a later time, and the next block starts elsewhere.
        """
        if positions is None:
            raise ValueError("this method needs the 3-D positions of the visual tokens; pass mm_token_type_ids "
                             "(the processor returns it) so that the model can compute them")
        layout = []
        for row_ids, row_mask, row_t, row_h, row_w in zip(token_ids.tolist(), visual_mask.tolist(),
                                                         *(p.tolist() for p in positions)):
            blocks, start, length = [], 0, len(row_ids)
            while start < length:
                if not row_mask[start]:
                    start += 1
                    continue
                end = start
                while end < length and row_mask[end] and row_ids[end] == row_ids[start]:
                    end += 1
                while start < end:  # one run of placeholders may hold several blocks
                    h0, w0 = row_h[start], row_w[start]
                    width = 1
                    while start + width < end and row_h[start + width] == h0 and row_w[start + width] == w0 + width:
                        width += 1
                    height = 1
                    while (start + height * width < end and row_h[start + height * width] == h0 + height
                           and row_w[start + height * width] == w0):
                        height += 1
                    frames, size = 1, height * width
                    while (start + frames * size < end and row_h[start + frames * size] == h0
                           and row_w[start + frames * size] == w0
                           and row_t[start + frames * size] >= row_t[start + (frames - 1) * size]):
                        frames += 1
                    blocks.append((frames, height, width))
                    start += frames * size
            layout.append(blocks)
        return layout


class LinearPositions(PositionStrategy):
    """1-D positions ``[B, L]``; without ``position_ids`` the text model counts from the cache length."""

    seq_dim = 1
    explicit_mask = True

    def full(self, position_ids, batch, length, device):
        return self.continuing(position_ids, 0, length, batch, device)

    def continuing(self, position_ids, start, length, batch, device):
        if position_ids is None:
            return torch.arange(start, start + length, device=device).unsqueeze(0).expand(batch, -1)
        return position_ids.expand(batch, -1) if position_ids.shape[0] != batch else position_ids
