"""Qwen2-VL, and what the Qwen vision-language families share.

Visual tokens are runs of ``image_token_id``/``video_token_id`` placeholders, one per
merged 2x2 patch group; positions are 3-D M-RoPE. The vision encoder has no window
attention, so VisionZip reads the attention each patch receives in its last block.
"""

from __future__ import annotations

import functools
import sys

import torch

from ..ops.attention import attention_received
from .base import AttachedState, cache_keyword, replace_method
from .generic import ModelAdapter, UncompressedLength, record_encoder_attention

__all__ = ["Qwen2VLAdapter"]


class Qwen2VLAdapter(ModelAdapter):
    family = "qwen2_vl"
    module = "qwen2_vl"
    class_names = ("Qwen2VLForConditionalGeneration", "Qwen2VLModel")
    reads_encoder_attention = True
    lays_out_grids = True

    @classmethod
    def check_inputs(cls, model, input_ids, inputs) -> None:
        merge_unit = int(model.config.vision_config.spatial_merge_size) ** 2
        ids = cls.placeholder_ids(model.config)
        for modality, pixels in (("image", "pixel_values"), ("video", "pixel_values_videos")):
            if inputs.get(pixels) is None:
                continue
            grid_name = f"{modality}_grid_thw"
            grid = inputs.get(grid_name)
            if grid is None:
                raise ValueError(f"{pixels} given without {grid_name}; the processor returns both")
            expected = int(grid.prod(-1).sum()) // merge_unit
            found = int((input_ids == ids[modality]).sum())
            if expected != found:
                raise ValueError(
                    f"{modality} placeholder mismatch: input_ids hold {found} {modality} tokens (id "
                    f"{ids[modality]}) but {grid_name} describes {expected} merged patches; build inputs with the "
                    "model's processor")

    @classmethod
    def image_features(cls, model, pixels: dict):
        """The core's ``get_image_features`` output for the image processor's ``pixels``."""
        core, tower = cls.core(model), cls.vision_tower(cls.core(model))
        device = next(tower.parameters()).device
        return core.get_image_features(pixels["pixel_values"].to(device, tower.dtype),
                                       pixels["image_grid_thw"].to(device), return_dict=True)

    @classmethod
    def encode_images(cls, model, pixels: dict) -> list:
        return [tensor.detach().clone() for tensor in cls.image_features(model, pixels).pooler_output]

    @classmethod
    def image_grid(cls, model, batch: dict) -> tuple[int, int]:
        _, height, width = (int(v) for v in batch["image_grid_thw"][0])
        merge = int(model.config.vision_config.spatial_merge_size)
        return height // merge, width // merge

    @classmethod
    def run_vision(cls, model, batch: dict) -> None:
        core = cls.core(model)
        if "pixel_values" in batch:
            core.get_image_features(batch["pixel_values"], batch["image_grid_thw"])
        if "pixel_values_videos" in batch:
            core.get_video_features(batch["pixel_values_videos"], batch["video_grid_thw"])

    @classmethod
    def segments(cls, state, token_ids, visual_mask, positions, inputs):
        return cls.positions.segments(token_ids, visual_mask, positions)

    @classmethod
    def decoding_positions(cls, core, input_ids, inputs_embeds, kwargs, uncompressed_past):
        stand_in = {cache_keyword(core.compute_3d_position_ids): UncompressedLength(uncompressed_past)}
        return core.compute_3d_position_ids(
            input_ids=input_ids, image_grid_thw=None, video_grid_thw=None, inputs_embeds=inputs_embeds,
            attention_mask=kwargs.get("attention_mask"), **stand_in)

    # VisionZip: the attention each patch receives in one encoder block, averaged over its merge group.

    @classmethod
    def probe_block(cls, tower) -> int:
        return len(tower.blocks) - 1

    @classmethod
    def merged_order(cls, probe: dict) -> torch.Tensor | None:
        """Where each merged token of the encoder's output sits among the probed groups (``None``: in order)."""
        return None

    @classmethod
    def install_encoder_attention_probe(cls, core, state: AttachedState) -> None:
        apply_rotary = sys.modules[cls.classes()[0].__module__].apply_rotary_pos_emb_vision
        tower = cls.vision_tower(core)
        attention = tower.blocks[cls.probe_block(tower)].attn
        merge_unit = int(core.config.vision_config.spatial_merge_size) ** 2
        probe: dict = {}
        cls.prepare_probe(tower, probe, state)

        def before_attention(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            cu_seqlens = kwargs["cu_seqlens"] if "cu_seqlens" in kwargs else args[1]
            cos, sin = kwargs["position_embeddings"]
            with torch.no_grad():
                length = hidden.shape[0]
                qkv = module.qkv(hidden).reshape(length, 3, module.num_heads, -1).permute(1, 0, 2, 3)
                query, key = apply_rotary(qkv[0], qkv[1], cos, sin)
                probe["received"] = attention_received(query, key, cu_seqlens, module.scaling)

        def after_encoder(module, args, output):
            received = probe.pop("received", None)
            if received is None:
                raise RuntimeError("the vision encoder ran without the attention probe seeing its probed block")
            merged = received.view(-1, merge_unit).mean(1)
            order = cls.merged_order(probe)
            probe["result"] = merged if order is None else merged[order]

        def features_with_attention(modality, original):
            @functools.wraps(original)
            def wrapper(*args, **kwargs):
                outputs = original(*args, **kwargs)
                result = probe.pop("result", None)
                if result is not None:
                    record_encoder_attention(state, modality, outputs, result)
                return outputs

            return wrapper

        for modality in ("image", "video"):
            name = f"get_{modality}_features"
            replace_method(core, name, features_with_attention(modality, getattr(core, name)), state)
        for handle in (attention.register_forward_pre_hook(before_attention, with_kwargs=True),
                       tower.register_forward_hook(after_encoder)):
            state.restore.append(handle.remove)

    @classmethod
    def prepare_probe(cls, tower, probe: dict, state: AttachedState) -> None:
        """Family-specific bookkeeping the probe needs (Qwen2.5-VL: its window order)."""
