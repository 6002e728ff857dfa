"""Qwen3.5 and Qwen3.5-MoE: Qwen2-VL's hooks on a hybrid language model.

The vision side is Qwen3-VL's without DeepStack (a learned position table resampled to
each grid, 2-D rotary, no window attention: VisionZip reads the last block as in
Qwen2-VL), and the layout and interleaved M-RoPE positions are Qwen3-VL's. The language
model is hybrid: three of every four decoder layers are Gated DeltaNet (linear
attention) layers, which keep a convolution and a recurrent state over the whole
sequence instead of a per-token cache, then one full-attention layer. Pruning before the
language model is exact: the compacted prefill builds those states from the kept
tokens only, and decoding continues them. Pruning inside the language model is refused.
"""

from __future__ import annotations

from .qwen2_vl import Qwen2VLAdapter

__all__ = ["Qwen3_5Adapter", "Qwen3_5MoeAdapter"]


class Qwen3_5Adapter(Qwen2VLAdapter):
    family = "qwen3_5"
    module = "qwen3_5"
    class_names = ("Qwen3_5ForConditionalGeneration", "Qwen3_5Model")
    recurrent_state = True

    @classmethod
    def refusal(cls, method) -> str | None:
        if getattr(method, "inside_llm", False) or getattr(method, "prune_layer", None) is not None:
            return ("it prunes inside the language model from the attention of decoder layer K, but this "
                    "language model is hybrid: three of every four layers are Gated DeltaNet (linear-attention) "
                    "layers, which have no attention weights to read and keep a recurrent state over every token "
                    "instead of a per-token cache that could be shortened after layer K; use a method that prunes "
                    "before the language model")
        return super().refusal(method)


class Qwen3_5MoeAdapter(Qwen3_5Adapter):
    family = "qwen3_5_moe"
    module = "qwen3_5_moe"
    class_names = ("Qwen3_5MoeForConditionalGeneration", "Qwen3_5MoeModel")
