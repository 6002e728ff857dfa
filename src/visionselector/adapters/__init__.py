"""Model families: one generic adapter, one short file of hooks per family.

``find_adapter`` dispatches on ``config.model_type``.
"""

from __future__ import annotations

from .base import AttachedState, SelectionRecord
from .generic import ModelAdapter
from .qwen2_5_vl import Qwen2_5_VLAdapter
from .qwen2_vl import Qwen2VLAdapter

__all__ = ["ADAPTERS", "AttachedState", "ModelAdapter", "SelectionRecord", "find_adapter", "supported_classes"]

ADAPTERS: dict[str, type[ModelAdapter]] = {
    adapter.family: adapter for adapter in (Qwen2VLAdapter, Qwen2_5_VLAdapter)
}


def supported_classes() -> list[str]:
    return [name for adapter in ADAPTERS.values() for name in adapter.class_names]


def find_adapter(model) -> type[ModelAdapter]:
    """The adapter of ``model``'s family; ``TypeError`` naming the supported classes otherwise."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    adapter = ADAPTERS.get(model_type)
    if adapter is None or not adapter.supports(model):
        raise TypeError(
            f"{type(model).__name__} (model_type {model_type!r}) is not a supported vision-language model; "
            "supported classes: " + ", ".join(supported_classes())
        )
    return adapter
