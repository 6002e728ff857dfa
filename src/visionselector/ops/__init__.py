"""Pure tensor functions: budgets, top-k selection and sequence compaction."""

from .sequence import compact_index, gather_sequence
from .topk import hard_topk, soft_topk, token_budget, validate_retention

__all__ = [
    "compact_index",
    "gather_sequence",
    "hard_topk",
    "soft_topk",
    "token_budget",
    "validate_retention",
]
