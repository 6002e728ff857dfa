"""Model configurations and synthetic processor-style inputs, for tests, demos and benchmarks.

Everything here builds the real ``transformers`` classes; only the sizes are small.
Nothing is downloaded.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

__all__ = ["SampleSpec", "qwen2_5_vl_config", "tiny_qwen2_5_vl_config", "build_qwen2_5_vl", "synthetic_batch"]

# Token ids of the tiny configurations (a small vocabulary has room for them).
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
IMAGE_ID, VIDEO_ID, VISION_START_ID, VISION_END_ID = 100, 101, 102, 103
FIRST_TEXT_ID, VOCAB_SIZE = 4, 128


def _mrope_section(head_dim: int) -> list[int]:
    """Rotary frequencies split over (time, height, width) in Qwen's 1:1.5:1.5 proportion
    ([16, 24, 24] for head_dim 128)."""
    half = head_dim // 2
    temporal = half // 4
    height = (half - temporal) // 2
    return [temporal, height, half - temporal - height]


def qwen2_5_vl_config(*, hidden_size: int, text_layers: int, heads: int, kv_heads: int, intermediate_size: int,
                      vocab_size: int, vision_depth: int, vision_hidden: int, vision_heads: int, patch_size: int,
                      window_size: int, attn_implementation: str = "sdpa", rope_theta: float = 1e6,
                      **text_overrides):
    """A Qwen2.5-VL config of the given widths with the family's real structure (windowed
    and full-attention vision blocks, 2x2 patch merger, M-RoPE), using this module's token ids."""
    from transformers import Qwen2_5_VLConfig

    text_config = dict(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=text_layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        max_position_embeddings=32768, bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID,
        rope_parameters={"rope_type": "default", "rope_theta": rope_theta,
                         "mrope_section": _mrope_section(hidden_size // heads)},
    )
    text_config.update(text_overrides)
    config = Qwen2_5_VLConfig(
        text_config=text_config,
        vision_config=dict(
            depth=vision_depth, hidden_size=vision_hidden, intermediate_size=2 * vision_hidden,
            num_heads=vision_heads, patch_size=patch_size, spatial_merge_size=2, temporal_patch_size=2,
            window_size=window_size, out_hidden_size=hidden_size, fullatt_block_indexes=[vision_depth - 1],
            tokens_per_second=2,
        ),
        image_token_id=IMAGE_ID, video_token_id=VIDEO_ID,
        vision_start_token_id=VISION_START_ID, vision_end_token_id=VISION_END_ID,
    )
    for sub_config in (config, config.text_config, config.vision_config):
        sub_config._attn_implementation = attn_implementation
    return config


def tiny_qwen2_5_vl_config(*, text_layers: int = 2, hidden_size: int = 64, vision_depth: int = 2,
                           attn_implementation: str = "sdpa", **text_overrides):
    """Test-sized Qwen2.5-VL: 4-pixel patches, width 64, two decoder layers."""
    return qwen2_5_vl_config(
        hidden_size=hidden_size, text_layers=text_layers, heads=4, kv_heads=2, intermediate_size=2 * hidden_size,
        vocab_size=VOCAB_SIZE, vision_depth=vision_depth, vision_hidden=32, vision_heads=2, patch_size=4,
        window_size=16, attn_implementation=attn_implementation, rope_theta=10000.0, **text_overrides,
    )


# Published widths (the config.json of each instruct checkpoint); weights are random.
ARCHITECTURES = {
    "qwen2.5-vl-3b": dict(family="qwen2_5_vl", hidden_size=2048, text_layers=36, heads=16, kv_heads=2,
                          intermediate_size=11008, vocab_size=151936, tie_word_embeddings=True, vision_depth=32),
    "qwen2.5-vl-7b": dict(family="qwen2_5_vl", hidden_size=3584, text_layers=28, heads=28, kv_heads=4,
                          intermediate_size=18944, vocab_size=152064, tie_word_embeddings=False, vision_depth=32),
    "qwen3-vl-8b": dict(family="qwen3_vl", hidden_size=4096, text_layers=36, heads=32, kv_heads=8, head_dim=128,
                        intermediate_size=12288, vocab_size=151936, tie_word_embeddings=False, vision_depth=27),
    "qwen3.5-27b": dict(family="qwen3_5", hidden_size=5120, text_layers=64, heads=24, kv_heads=4, head_dim=256,
                        intermediate_size=17408, vocab_size=248320, tie_word_embeddings=False, vision_depth=27),
}
VISION_7B_3B = dict(vision_depth=32, vision_hidden=1280, vision_intermediate=3420, vision_heads=16,
                    fullatt_block_indexes=[7, 15, 23, 31])
# The Qwen3 vision tower (SigLIP-2 sized, 16-pixel patches), shared by Qwen3-VL and Qwen3.5.
VISION_QWEN3 = dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, patch_size=16,
                    spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=2304)
TOKEN_IDS = dict(image_token_id=IMAGE_ID, video_token_id=VIDEO_ID, vision_start_token_id=VISION_START_ID,
                 vision_end_token_id=VISION_END_ID)


def architecture_config(name: str, *, text_layers: int | None = None, vision_layers: int | None = None,
                        attn_implementation: str = "sdpa"):
    """The config of a published architecture (random weights are enough to time it), optionally
    keeping only the first ``text_layers`` decoder layers and ``vision_layers`` vision blocks."""
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {name!r}; known: {', '.join(sorted(ARCHITECTURES))}")
    spec = ARCHITECTURES[name]
    layers = spec["text_layers"] if text_layers is None else text_layers
    depth = spec["vision_depth"] if vision_layers is None else vision_layers
    if not 1 <= layers <= spec["text_layers"] or not 1 <= depth <= spec["vision_depth"]:
        raise ValueError(f"{name} has {spec['text_layers']} decoder layers and {spec['vision_depth']} vision blocks; "
                         f"got {layers} and {depth}")
    text = dict(vocab_size=spec["vocab_size"], hidden_size=spec["hidden_size"],
                intermediate_size=spec["intermediate_size"], num_hidden_layers=layers,
                num_attention_heads=spec["heads"], num_key_value_heads=spec["kv_heads"],
                bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID)
    builder = {"qwen2_5_vl": _qwen2_5_vl_architecture, "qwen3_vl": _qwen3_vl_architecture,
               "qwen3_5": _qwen3_5_architecture}[spec["family"]]
    config = builder(spec, text, depth)
    for sub_config in (config, config.text_config, config.vision_config):
        sub_config._attn_implementation = attn_implementation
    return config


def _qwen2_5_vl_architecture(spec, text, depth):
    from transformers import Qwen2_5_VLConfig

    # The last kept vision block always uses full attention, as in the original.
    full_attention = [i for i in VISION_7B_3B["fullatt_block_indexes"] if i < depth - 1] + [depth - 1]
    text.update(max_position_embeddings=128000, rope_parameters={
        "rope_type": "default", "rope_theta": 1e6, "mrope_section": _mrope_section(spec["hidden_size"] // spec["heads"])})
    return Qwen2_5_VLConfig(
        text_config=text,
        vision_config=dict(
            depth=depth, hidden_size=VISION_7B_3B["vision_hidden"], intermediate_size=VISION_7B_3B["vision_intermediate"],
            num_heads=VISION_7B_3B["vision_heads"], patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
            window_size=112, out_hidden_size=spec["hidden_size"], fullatt_block_indexes=full_attention,
            tokens_per_second=2,
        ),
        tie_word_embeddings=spec["tie_word_embeddings"], **TOKEN_IDS,
    )


def _qwen3_vl_architecture(spec, text, depth):
    from transformers import Qwen3VLConfig

    text.update(head_dim=spec["head_dim"], max_position_embeddings=262144, rope_parameters={
        "rope_type": "default", "rope_theta": 5e6, "mrope_section": [24, 20, 20], "mrope_interleaved": True})
    # DeepStack taps the same blocks as the original (8, 16, 24), those that a shortened tower keeps.
    deepstack = [i for i in (8, 16, 24) if i < depth] or [depth - 1]
    vision = dict(VISION_QWEN3, depth=depth, out_hidden_size=spec["hidden_size"], deepstack_visual_indexes=deepstack)
    return Qwen3VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=spec["tie_word_embeddings"],
                         **TOKEN_IDS)


def _qwen3_5_architecture(spec, text, depth):
    from transformers import Qwen3_5Config

    text.update(head_dim=spec["head_dim"], max_position_embeddings=262144, linear_num_key_heads=16,
                linear_num_value_heads=48, linear_key_head_dim=128, linear_value_head_dim=128,
                linear_conv_kernel_dim=4, rope_parameters={
                    "rope_type": "default", "rope_theta": 1e7, "partial_rotary_factor": 0.25,
                    "mrope_section": [11, 11, 10], "mrope_interleaved": True})
    vision = dict(VISION_QWEN3, depth=depth, out_hidden_size=spec["hidden_size"])
    return Qwen3_5Config(text_config=text, vision_config=vision, tie_word_embeddings=spec["tie_word_embeddings"],
                         **TOKEN_IDS)


def build_qwen2_5_vl(config=None, *, seed: int = 0, dtype: torch.dtype = torch.float32):
    """A randomly initialised ``Qwen2_5_VLForConditionalGeneration`` in eval mode."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    config = config if config is not None else tiny_qwen2_5_vl_config()
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config).to(dtype)
    return model.eval()


@dataclass
class SampleSpec:
    """One synthetic sample: text around images (``(h, w)`` patch grids) and/or a video.

    ``prefix``/``suffix`` are the numbers of text tokens before the first and after the
    last visual block; ``videos`` are ``(t, h, w)`` grids in patches.
    """

    images: list[tuple[int, int]] = field(default_factory=list)
    videos: list[tuple[int, int, int]] = field(default_factory=list)
    prefix: int = 3
    suffix: int = 4


def synthetic_batch(config, samples: list[SampleSpec], *, padding_side: str = "left", seed: int = 0,
                    device: str | torch.device = "cpu") -> dict:
    """Processor-style inputs (``input_ids``, ``attention_mask``, ``pixel_values``, grids,
    ``mm_token_type_ids``) for ``samples``, with random pixels and random text tokens."""
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    vision = config.vision_config
    merge = vision.spatial_merge_size
    patch_dim = vision.in_channels * vision.temporal_patch_size * vision.patch_size ** 2
    generator = torch.Generator().manual_seed(seed)

    # Text ids from the model's own vocabulary, never one it treats as special.
    special = {getattr(config, name, None) for name in ("image_token_id", "video_token_id", "vision_start_token_id",
                                                         "vision_end_token_id")}
    special |= {getattr(config.text_config, name, None) for name in ("pad_token_id", "bos_token_id", "eos_token_id")}
    vocabulary = config.text_config.vocab_size
    words = torch.tensor([i for i in range(FIRST_TEXT_ID, min(IMAGE_ID, vocabulary)) if i not in special]
                         or [i for i in range(vocabulary) if i not in special])

    def text(count):
        return words[torch.randint(len(words), (count,), generator=generator)].tolist()

    rows, images, image_grids, videos, video_grids = [], [], [], [], []
    for sample in samples:
        row = text(sample.prefix)
        for height, width in sample.images:
            if height % merge or width % merge:
                raise ValueError(f"image grid {(height, width)} must be a multiple of spatial_merge_size={merge}")
            image_grids.append([1, height, width])
            images.append(torch.randn(height * width, patch_dim, generator=generator))
            row += [config.vision_start_token_id] + [config.image_token_id] * (height * width // merge ** 2)
            row += [config.vision_end_token_id] + text(2)
        for frames, height, width in sample.videos:
            video_grids.append([frames, height, width])
            videos.append(torch.randn(frames * height * width, patch_dim, generator=generator))
            row += [config.vision_start_token_id]
            row += [config.video_token_id] * (frames * height * width // merge ** 2)
            row += [config.vision_end_token_id] + text(2)
        rows.append(row + text(sample.suffix))

    length = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), length), PAD_ID, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
    for index, row in enumerate(rows):
        span = slice(length - len(row), length) if padding_side == "left" else slice(0, len(row))
        input_ids[index, span] = torch.tensor(row)
        attention_mask[index, span] = 1
    mm_token_type_ids = torch.zeros_like(input_ids, dtype=torch.int)
    mm_token_type_ids[input_ids == config.image_token_id] = 1
    mm_token_type_ids[input_ids == config.video_token_id] = 2
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "mm_token_type_ids": mm_token_type_ids}
    if images:
        batch["pixel_values"] = torch.cat(images)
        batch["image_grid_thw"] = torch.tensor(image_grids)
    if videos:
        batch["pixel_values_videos"] = torch.cat(videos)
        batch["video_grid_thw"] = torch.tensor(video_grids)
        batch["second_per_grid_ts"] = torch.ones(len(videos))
    return {key: value.to(device) for key, value in batch.items()}
