"""Qwen3-VL and Qwen3-VL-MoE: Qwen2-VL's hooks, plus DeepStack.

Images lay out as in Qwen2-VL; a video is one block of placeholders per frame, each
between its own ``<t seconds>`` timestamp and vision_start/vision_end, and a sample's
budget spans all its visual tokens. Positions are interleaved M-RoPE (the rotary
embedding interleaves the same ``[3, B, L]`` rows). The text model also receives
``visual_pos_masks`` ``[B, L]`` and ``deepstack_visual_embeds`` (per DeepStack layer, one
row per True entry of the mask, row-major), added to the visual tokens' hidden states
after the first decoder layers: they follow every compaction of the visual tokens (also
the one FastV/DART apply after layer K, when DeepStack layers come later), and in soft
mode each row is scaled like its token. A token that a method merges (pool, VisionZip)
keeps its own DeepStack rows. An encoded image is one tensor
``[1 + layers, tokens, D]``: the merged features, then each DeepStack layer's.
"""

from __future__ import annotations

import functools
import sys

import torch

from .base import AttachedState, replace_method
from .qwen2_vl import Qwen2VLAdapter

__all__ = ["Qwen3VLAdapter", "Qwen3VLMoeAdapter"]


class Qwen3VLAdapter(Qwen2VLAdapter):
    family = "qwen3_vl"
    module = "qwen3_vl"
    class_names = ("Qwen3VLForConditionalGeneration", "Qwen3VLModel")

    @classmethod
    def encode_images(cls, model, pixels: dict) -> list:
        output = cls.image_features(model, pixels)
        return [torch.stack([features, *(layer[image] for layer in output.deepstack_features)]).detach().clone()
                for image, features in enumerate(output.pooler_output)]

    @classmethod
    def token_count(cls, encoded) -> int:
        return int(encoded.shape[1])

    @classmethod
    def encoder_outputs(cls, encoded: list) -> dict:
        output_class = sys.modules[cls.classes()[1].__module__].BaseModelOutputWithDeepstackFeatures
        layers = {item.shape[0] for item in encoded}
        if len(layers) != 1:
            raise ValueError(f"encoded images disagree on their number of DeepStack layers: {sorted(layers)}")
        return {"image": output_class(
            pooler_output=tuple(item[0] for item in encoded),
            deepstack_features=[tuple(item[layer] for item in encoded) for layer in range(1, layers.pop())])}

    @classmethod
    def compact_extras(cls, kwargs: dict, compaction, visual_mask) -> dict:
        # The rows follow the core's visual_pos_masks (every image/video placeholder), not visual_mask.
        where, rows = kwargs.get("visual_pos_masks"), kwargs.get("deepstack_visual_embeds")
        if where is None or rows is None:
            return kwargs
        restricted, compact_where = compaction.apply_flat(list(rows), where)
        return {**kwargs, "visual_pos_masks": compact_where, "deepstack_visual_embeds": restricted}

    @classmethod
    def scale_extras(cls, kwargs: dict, scale: torch.Tensor, visual_mask) -> dict:
        where, rows = kwargs.get("visual_pos_masks"), kwargs.get("deepstack_visual_embeds")
        if where is None or rows is None:
            return kwargs
        factor = scale[where.to(scale.device)].unsqueeze(-1)
        return {**kwargs, "deepstack_visual_embeds": [layer * factor.to(layer.device, layer.dtype) for layer in rows]}

    @classmethod
    def patch(cls, model, state: AttachedState) -> None:
        super().patch(model, state)
        if state.method.prune_layer is not None:
            install_deepstack_after_pruning(cls.text_model(cls.core(model)), state)


def install_deepstack_after_pruning(text_model, state: AttachedState) -> None:
    """DeepStack layers after the pruning layer add their features to the compacted hidden states:
    restrict the rows and the mask with the compaction that layer applied."""
    original = text_model._deepstack_process

    @functools.wraps(original)
    def deepstack_process(hidden_states, visual_pos_masks, visual_embeds):
        context = state.layer_pruning
        if (context is not None and context.prefill and context.compaction is not None
                and visual_pos_masks.shape[1] == context.compaction.length):
            (visual_embeds,), visual_pos_masks = context.compaction.apply_flat([visual_embeds], visual_pos_masks)
        return original(hidden_states, visual_pos_masks, visual_embeds)

    replace_method(text_model, "_deepstack_process", deepstack_process, state)


class Qwen3VLMoeAdapter(Qwen3VLAdapter):
    family = "qwen3_vl_moe"
    module = "qwen3_vl_moe"
    class_names = ("Qwen3VLMoeForConditionalGeneration", "Qwen3VLMoeModel")
