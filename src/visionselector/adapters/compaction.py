"""One object for one operation: the compaction of a padded batch after tokens are dropped.

A :class:`Compaction` is built once from the tokens that stay, then applied alike to
every per-token tensor of the call: embeddings, positions, hidden states, rotary
tables, labels and extras such as Qwen3-VL's DeepStack features, so that they can never
disagree about which token sits in which slot.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..ops.sequence import compact_index, gather_sequence

__all__ = ["Compaction"]


@dataclass(frozen=True)
class Compaction:
    """Slot ``j`` of row ``b`` of the compacted batch holds token ``index[b, j]`` of the input.

    ``index`` ``LongTensor[B, L']``, ``valid`` ``BoolTensor[B, L']`` (False in padding slots),
    ``length``: the input's sequence length ``L``. Kept tokens keep their order.
    """

    index: torch.Tensor
    valid: torch.Tensor
    length: int

    @classmethod
    def from_keep(cls, keep: torch.Tensor, *, pad_left: bool) -> "Compaction":
        """``keep`` ``BoolTensor[B, L]`` (padding False) -> the compaction that keeps exactly those."""
        index, valid = compact_index(keep, pad_left=pad_left)
        return cls(index, valid, keep.shape[1])

    @property
    def compact_length(self) -> int:
        return self.index.shape[1]

    @property
    def all_valid(self) -> bool:
        return bool(self.valid.all())

    def kept(self) -> torch.Tensor:
        """``BoolTensor[B, L]``: which input tokens survive."""
        keep = torch.zeros(self.index.shape[0], self.length + 1, dtype=torch.bool, device=self.index.device)
        target = torch.where(self.valid, self.index, torch.full_like(self.index, self.length))
        keep.scatter_(1, target, True)
        return keep[:, :self.length]

    def apply(self, values: torch.Tensor, *, seq_dim: int = 1) -> torch.Tensor:
        """Gather a per-token tensor (batch axis just before ``seq_dim``): ``[B, L, ...]`` -> ``[B, L', ...]``,
        or ``[P, B, L]`` -> ``[P, B, L']`` with ``seq_dim=2``."""
        if values.shape[seq_dim] != self.length:
            raise ValueError(f"a per-token tensor of length {values.shape[seq_dim]} cannot follow a compaction of "
                             f"{self.length} tokens")
        return gather_sequence(values, self.index.to(values.device), seq_dim=seq_dim)

    def apply_labels(self, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
        """Labels ``[B, L]`` of the kept tokens; padding slots are ignored."""
        compact = self.apply(labels)
        return compact.masked_fill(~self.valid.to(compact.device), ignore_index)

    def mask(self, dtype: torch.dtype = torch.long) -> torch.Tensor:
        """The 2-D attention mask ``[B, L']`` of the compacted batch."""
        return self.valid.to(dtype)

    def apply_flat(self, rows: list[torch.Tensor], where: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Restrict flat per-token tensors to the kept tokens.

        Each of ``rows`` ``[M, ...]`` holds one row per True entry of ``where`` ``BoolTensor[B, L]``,
        in row-major order (how ``hidden[where] += rows`` consumes it). Returns the rows of the
        kept tokens, and their mask ``[B, L']`` over the compacted batch, in the same
        correspondence.
        """
        where = where.to(self.index.device)
        count = int(where.sum())
        for tensor in rows:
            if tensor.shape[0] != count:
                raise ValueError(f"{tensor.shape[0]} rows for {count} marked tokens")
        survives = self.kept()[where]
        compact_where = self.apply(where) & self.valid
        return [tensor[survives.to(tensor.device)] for tensor in rows], compact_where
