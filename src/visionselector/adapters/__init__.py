"""Model families: one generic adapter, one short file of hooks per family.

``find_adapter`` dispatches on ``config.model_type``.
"""

from __future__ import annotations

from .base import AttachedState, SelectionRecord
from .generic import ModelAdapter
from .llava import LlavaAdapter
from .llava_onevision import LlavaOnevisionAdapter
from .qwen2_5_vl import Qwen2_5_VLAdapter
from .qwen2_vl import Qwen2VLAdapter
from .qwen3_5 import Qwen3_5Adapter, Qwen3_5MoeAdapter
from .qwen3_vl import Qwen3VLAdapter, Qwen3VLMoeAdapter

__all__ = ["ADAPTERS", "AttachedState", "ModelAdapter", "SelectionRecord", "find_adapter", "supported_classes",
           "support_matrix"]

ADAPTERS: dict[str, type[ModelAdapter]] = {
    adapter.family: adapter for adapter in (Qwen2VLAdapter, Qwen2_5_VLAdapter, Qwen3VLAdapter, Qwen3VLMoeAdapter,
                                            Qwen3_5Adapter, Qwen3_5MoeAdapter, LlavaAdapter, LlavaOnevisionAdapter)
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


# Families people ask for that have no adapter yet, listed so the matrix says so.
WITHOUT_ADAPTER = {
    "LLaVA-OneVision-1.5": "the paper's second model; transformers has its classes (model_type `llava_onevision1_5`) "
                           "only from 5.25, and there is no adapter for it yet, so attaching a method to it fails "
                           "with the list of supported classes",
}


def support_matrix() -> str:
    """Which method runs on which family, as a Markdown table generated from the registries
    (the README's copy is checked against it), with each refusal's reason below it."""
    from ..methods import get_method_class, list_methods

    methods = sorted(list_methods())
    lines = ["| family (`config.model_type`) | classes | " + " | ".join(f"`{m}`" for m in methods) + " |",
             "| --- | --- | " + " | ".join("---" for _ in methods) + " |"]
    reasons: dict[str, int] = {}
    for name, adapter in ADAPTERS.items():
        cells = []
        for method in methods:
            reason = adapter.refusal(get_method_class(method))
            if reason is None:
                cells.append("yes")
            else:
                number = reasons.setdefault(f"{reason}", len(reasons) + 1)
                cells.append(f"no ({number})")
        classes = ", ".join(f"`{c}`" for c in adapter.class_names)
        lines.append(f"| `{name}` | {classes} | " + " | ".join(cells) + " |")
    for model in WITHOUT_ADAPTER:
        lines.append(f"| {model} | no adapter | " + " | ".join("-" for _ in methods) + " |")
    lines.append("")
    lines += [f"- ({number}) {reason}." for reason, number in reasons.items()]
    for model, why in WITHOUT_ADAPTER.items():
        lines.append(f"- {model}: {why}.")
    return "\n".join(lines)
