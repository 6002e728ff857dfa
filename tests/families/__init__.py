"""Tiny configurations of every supported model family, built from the real ``transformers``
classes, with inputs laid out the way each family's processor lays them out.

Each module in this package defines one or more :class:`TinyFamily` objects and lists them
in ``FAMILIES``; this package collects them so that a test parametrised over
``FAMILIES`` covers every family. Everything here is written from the families'
definitions and never imports ``visionselector``: it is the independent side of the
reference tests.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from typing import Callable

import torch

__all__ = ["TinyFamily", "ReferenceInputs", "FAMILIES", "family"]


@dataclass
class ReferenceInputs:
    """The unpruned input of a family's text model for a batch.

    ``embeds`` ``[B, L, D]``: token embeddings with the visual features in place.
    ``positions``: what the text model takes as ``position_ids`` for these tokens
    (``[3, B, L]`` for M-RoPE families, ``[B, L]`` for 1-D ones), exactly as the unpatched
    model would number them in ``generate``.
    ``visual_mask`` ``BoolTensor[B, L]``: every placeholder token (image and video).
    ``deepstack`` (Qwen3-VL): per DeepStack layer, ``[B, L, D]`` features scattered to the
    visual positions (zero elsewhere); ``None`` for families without DeepStack.
    """

    embeds: torch.Tensor
    positions: torch.Tensor
    visual_mask: torch.Tensor
    deepstack: list[torch.Tensor] | None = None


@dataclass
class TinyFamily:
    """One family's tiny model and inputs.

    ``name``: the ``config.model_type`` of the model ``build`` returns.
    ``build(attn_implementation="sdpa", seed=0)``: the ``...ForConditionalGeneration`` model,
    float32, eval mode, 4 decoder layers.
    ``image_sizes``: a few image sizes (family-specific units) with different token counts.
    ``batch(samples, padding_side="left", seed=0)``: processor-style inputs; ``samples[b]`` is
    a tuple of indices into ``image_sizes`` (one per image of sample ``b``; ``()`` for text
    only).
    ``single(batch, samples, row)``: sample ``row`` of such a batch alone, unpadded, with only
    its own pixels (the same dict layout as ``batch``).
    ``reference(model, batch)``: :class:`ReferenceInputs`.
    ``run_text(model, embeds, positions, attention_mask, past_key_values, deepstack=None,
    visual_mask=None)``: logits ``[B, L, V]`` and the cache, from running the family's
    text model and head directly on ``embeds`` with explicit positions and a 2-D mask;
    ``deepstack``/``visual_mask`` as in :class:`ReferenceInputs` but already restricted to
    the tokens of ``embeds``.
    ``next_positions(reference, attention_mask, step)``: the ``position_ids`` the unpatched
    model gives generated token number ``step`` (0 for the first token after the prompt),
    in the layout of ``ReferenceInputs.positions`` with a sequence length of 1.
    ``placeholder_ids``: the image/video placeholder token ids.
    """

    name: str
    build: Callable
    image_sizes: tuple
    batch: Callable
    single: Callable
    reference: Callable
    run_text: Callable
    next_positions: Callable
    placeholder_ids: tuple[int, ...]
    notes: dict = field(default_factory=dict)


def _collect() -> dict[str, TinyFamily]:
    found: dict[str, TinyFamily] = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        module = importlib.import_module(f"{__name__}.{info.name}")
        for tiny in getattr(module, "FAMILIES", ()):
            if tiny.name in found:
                raise ValueError(f"family {tiny.name!r} defined twice")
            found[tiny.name] = tiny
    return found


FAMILIES: dict[str, TinyFamily] = _collect()


def family(name: str) -> TinyFamily:
    return FAMILIES[name]
