"""Tiny Qwen3-VL, Qwen3-VL-MoE, Qwen3.5 and Qwen3.5-MoE (M-RoPE families of the Qwen3 generation).

All four use ``Qwen3VLProcessor`` (``AutoProcessor`` maps ``qwen3_vl_moe``, ``qwen3_5`` and
``qwen3_5_moe`` to it), which lays images out exactly like Qwen2/2.5-VL (see ``qwen_mrope``);
only videos get per-frame timestamps. Their text rotary is *interleaved* M-RoPE: frequency
``i`` rotates by the height position when ``i % 3 == 1`` and ``i < 3 * mrope_section[1]``, by
the width position when ``i % 3 == 2`` and ``i < 3 * mrope_section[2]``, and by the temporal
position otherwise. The vision tower has a learned position table resampled to each grid
(``num_position_embeddings``) on top of 2-D rotary.

* Qwen3-VL(-MoE): q_norm/k_norm attention; DeepStack: the vision blocks in
  ``deepstack_visual_indexes`` each feed a merger whose output is added to the hidden states
  of the visual tokens after text layer 0, 1, 2...
* Qwen3.5(-MoE): hybrid text model, ``layer_types`` from ``full_attention_interval`` (4 layers
  -> 3 ``linear_attention`` Gated DeltaNet layers then 1 ``full_attention`` layer with a gated
  query, q_norm/k_norm and partial rotary, ``partial_rotary_factor`` 0.25). Its cache is a plain
  ``DynamicCache(config=...)``, which gives the linear layers ``LinearAttentionLayer`` (conv and
  recurrent state) and the full-attention layer a ``DynamicLayer``. No DeepStack.
"""

from __future__ import annotations

from .qwen_mrope import TEXT_WIDTHS, TOKEN_IDS, mrope_family, set_attn_implementation

__all__ = ["qwen3_vl_config", "qwen3_vl_moe_config", "qwen3_5_config", "qwen3_5_moe_config", "FAMILIES"]

# Vision tower shared by the four families (patch 16 as in the real checkpoints; an 8x8 learned
# position table instead of 48x48).
VISION = dict(hidden_size=32, intermediate_size=64, num_heads=2, patch_size=16, spatial_merge_size=2,
              temporal_patch_size=2, out_hidden_size=64, num_position_embeddings=64)

# Qwen3-VL: head_dim 32 (not hidden/heads = 16, like the 4B checkpoint's 128 vs 80);
# interleaved sections [6, 5, 5] of 16 frequencies, in proportion to the real [24, 20, 20].
QWEN3_VL_ROPE = {"rope_type": "default", "rope_theta": 5e6, "mrope_section": [6, 5, 5], "mrope_interleaved": True}
# Qwen3.5: head_dim 64 with partial rotary 0.25 -> 16 rotary dims, 8 frequencies split [3, 3, 2]
# like the real [11, 11, 10].
QWEN3_5_ROPE = {"rope_type": "default", "rope_theta": 1e7, "mrope_section": [3, 3, 2], "mrope_interleaved": True,
                "partial_rotary_factor": 0.25}
LINEAR_ATTENTION = dict(linear_conv_kernel_dim=4, linear_key_head_dim=16, linear_value_head_dim=16,
                        linear_num_key_heads=2, linear_num_value_heads=4, full_attention_interval=4)
MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)


def qwen3_vl_config(attn_implementation: str = "sdpa"):
    from transformers import Qwen3VLConfig

    config = Qwen3VLConfig(
        text_config=dict(TEXT_WIDTHS, head_dim=32, rope_parameters=dict(QWEN3_VL_ROPE)),
        vision_config=dict(VISION, depth=4, deepstack_visual_indexes=[0, 1, 2]),
        **TOKEN_IDS,
    )
    return set_attn_implementation(config, attn_implementation)


def qwen3_vl_moe_config(attn_implementation: str = "sdpa"):
    from transformers import Qwen3VLMoeConfig

    config = Qwen3VLMoeConfig(
        text_config=dict(TEXT_WIDTHS, head_dim=32, rope_parameters=dict(QWEN3_VL_ROPE), decoder_sparse_step=1,
                         **MOE),
        vision_config=dict(VISION, depth=4, deepstack_visual_indexes=[0, 1, 2]),
        **TOKEN_IDS,
    )
    return set_attn_implementation(config, attn_implementation)


def qwen3_5_config(attn_implementation: str = "sdpa"):
    from transformers import Qwen3_5Config

    config = Qwen3_5Config(
        text_config=dict(TEXT_WIDTHS, head_dim=64, rope_parameters=dict(QWEN3_5_ROPE), **LINEAR_ATTENTION),
        vision_config=dict(VISION, depth=2),
        **TOKEN_IDS,
    )
    return set_attn_implementation(config, attn_implementation)


def qwen3_5_moe_config(attn_implementation: str = "sdpa"):
    from transformers import Qwen3_5MoeConfig

    text = {key: value for key, value in TEXT_WIDTHS.items() if key != "intermediate_size"}
    config = Qwen3_5MoeConfig(
        text_config=dict(text, head_dim=64, rope_parameters=dict(QWEN3_5_ROPE), shared_expert_intermediate_size=32,
                         **LINEAR_ATTENTION, **MOE),
        vision_config=dict(VISION, depth=2),
        **TOKEN_IDS,
    )
    return set_attn_implementation(config, attn_implementation)


FAMILIES = [
    mrope_family("qwen3_vl", "Qwen3VLForConditionalGeneration", qwen3_vl_config,
                 notes={"processor": "Qwen3VLProcessor", "deepstack": True}),
    mrope_family("qwen3_vl_moe", "Qwen3VLMoeForConditionalGeneration", qwen3_vl_moe_config,
                 notes={"processor": "Qwen3VLProcessor", "deepstack": True, "moe": True}),
    mrope_family("qwen3_5", "Qwen3_5ForConditionalGeneration", qwen3_5_config,
                 notes={"processor": "Qwen3VLProcessor", "hybrid_linear_attention": True}),
    mrope_family("qwen3_5_moe", "Qwen3_5MoeForConditionalGeneration", qwen3_5_moe_config,
                 notes={"processor": "Qwen3VLProcessor", "hybrid_linear_attention": True, "moe": True}),
]
