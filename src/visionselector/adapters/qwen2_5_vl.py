"""Qwen2.5-VL: Qwen2-VL's hooks, with a windowed vision encoder.

The encoder attends within windows except in its ``fullatt_block_indexes`` blocks, and
runs on patches permuted into window order: VisionZip reads the last full-attention
block and maps its scores back to the output's order.
"""

from __future__ import annotations

import torch

from .base import AttachedState, replace_method
from .qwen2_vl import Qwen2VLAdapter

__all__ = ["Qwen2_5_VLAdapter"]


class Qwen2_5_VLAdapter(Qwen2VLAdapter):
    family = "qwen2_5_vl"
    module = "qwen2_5_vl"
    class_names = ("Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLModel")

    @classmethod
    def probe_block(cls, tower) -> int:
        if not getattr(tower, "fullatt_block_indexes", None):
            raise ValueError("this vision encoder has no full-attention block to read attention from")
        return tower.fullatt_block_indexes[-1]

    @classmethod
    def prepare_probe(cls, tower, probe: dict, state: AttachedState) -> None:
        original = tower.permute_input_for_window_attn

        def permute(input_tensor, window_index, seq_len):
            probe["window_index"] = window_index
            return original(input_tensor, window_index, seq_len=seq_len)

        replace_method(tower, "permute_input_for_window_attn", permute, state)

    @classmethod
    def merged_order(cls, probe: dict) -> torch.Tensor:
        window_index = probe.pop("window_index", None)
        if window_index is None:
            raise RuntimeError("the vision encoder ran without the attention probe seeing its window order")
        return torch.argsort(window_index)
