"""Model families, one file each. ``find_adapter`` picks the one for a model instance."""

from __future__ import annotations

from .base import AttachedState, ModelAdapter, SelectionRecord
from .qwen2_5_vl import Qwen2_5_VLAdapter

__all__ = ["ADAPTERS", "AttachedState", "ModelAdapter", "SelectionRecord", "find_adapter", "supported_classes"]

ADAPTERS: tuple[type[ModelAdapter], ...] = (Qwen2_5_VLAdapter,)


def supported_classes() -> list[str]:
    return [name for adapter in ADAPTERS for name in adapter.class_names]


def find_adapter(model) -> type[ModelAdapter]:
    """The adapter of ``model``'s family; ``TypeError`` naming the supported classes otherwise."""
    for adapter in ADAPTERS:
        if adapter.supports(model):
            return adapter
    raise TypeError(
        f"{type(model).__name__} is not a supported vision-language model; supported classes: "
        + ", ".join(supported_classes())
    )
