"""The M-RoPE Qwen families: shared helpers, and tiny Qwen2-VL and Qwen2.5-VL.

Every M-RoPE Qwen processor (``Qwen2VLProcessor``, ``Qwen2_5_VLProcessor``, and
``Qwen3VLProcessor``, which ``AutoProcessor`` also maps Qwen3-VL-MoE, Qwen3.5 and
Qwen3.5-MoE to) lays an image out the same way: the chat template writes
``<|vision_start|><|image_pad|><|vision_end|>`` and the processor expands the single
``<|image_pad|>`` into ``t * h * w / merge**2`` copies, where ``(t, h, w)`` is the image's
``image_grid_thw`` row in patches. ``pixel_values`` are the flattened patches of all images,
one row of ``channels * temporal_patch_size * patch_size**2`` per patch, images in order.
The processors also return ``mm_token_type_ids`` (0 text, 1 image, 2 video), which the models
need to build their 3-D positions. Only videos differ (Qwen3-VL writes a ``<t seconds>``
timestamp and its own vision_start/vision_end around every frame); ``batch`` builds images only.

The tiny vocabulary keeps the real checkpoints' relative layout of the special ids
(vision_start, vision_end, vision_pad, image_pad, video_pad = base + 0, 1, 2, 3, 4, as in
151652.. for Qwen2/2.5/3-VL and 248053.. for Qwen3.5) at the top of a 400-token vocabulary.
Nothing here imports ``visionselector``.
"""

from __future__ import annotations

import functools

import torch

from . import ReferenceInputs, TinyFamily

__all__ = [
    "PAD_ID", "BOS_ID", "EOS_ID", "VISION_START_ID", "VISION_END_ID", "VISION_PAD_ID", "IMAGE_ID", "VIDEO_ID",
    "VOCAB_SIZE", "IMAGE_SIZES", "TEXT_IDS", "set_attn_implementation", "mrope_family", "make_batch", "make_single",
    "make_reference", "run_text", "next_positions", "FAMILIES",
]

PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
VISION_START_ID, VISION_END_ID, VISION_PAD_ID, IMAGE_ID, VIDEO_ID = 390, 391, 392, 393, 394
VOCAB_SIZE = 400
FIRST_TEXT_ID = 4
# Ordinary text: everything below the special block, never pad/bos/eos.
TEXT_IDS = torch.arange(FIRST_TEXT_ID, VISION_START_ID)
SPECIAL_IDS = (PAD_ID, BOS_ID, EOS_ID, VISION_START_ID, VISION_END_ID, VISION_PAD_ID, IMAGE_ID, VIDEO_ID)

# Image grids in patches (h, w): 4, 6 and 12 tokens after the 2x2 merge.
IMAGE_SIZES = ((4, 4), (4, 6), (6, 8))
PREFIX, BETWEEN, SUFFIX = 3, 2, 4

TOKEN_IDS = dict(image_token_id=IMAGE_ID, video_token_id=VIDEO_ID, vision_start_token_id=VISION_START_ID,
                 vision_end_token_id=VISION_END_ID)
SPECIAL_TEXT_IDS = dict(bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID)


def set_attn_implementation(config, attn_implementation: str):
    """Sets ``_attn_implementation`` on the config and every sub-config."""
    for sub_config in (config, getattr(config, "text_config", None), getattr(config, "vision_config", None)):
        if sub_config is not None:
            sub_config._attn_implementation = attn_implementation
    return config


# --------------------------------------------------------------------------------------------
# Inputs laid out as the processors lay them out.
# --------------------------------------------------------------------------------------------

def make_batch(config, image_sizes, samples, padding_side: str = "left", seed: int = 0) -> dict:
    """Processor-style inputs for ``samples`` (tuples of indices into ``image_sizes``).

    A sample is ``PREFIX`` text tokens, its images as ``<vision_start> <image_pad> * n
    <vision_end>`` with ``BETWEEN`` text tokens between consecutive images, then ``SUFFIX`` text
    tokens; a text-only sample is ``PREFIX + SUFFIX`` text tokens. Pixels are random, one row per
    patch; text ids are random ordinary ids (never a special id).
    """
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    vision = config.vision_config
    merge = vision.spatial_merge_size
    patch_dim = vision.in_channels * vision.temporal_patch_size * vision.patch_size ** 2
    generator = torch.Generator().manual_seed(seed)

    def text(count):
        return TEXT_IDS[torch.randint(len(TEXT_IDS), (count,), generator=generator)].tolist()

    rows, pixels, grids = [], [], []
    for sample in samples:
        row = text(PREFIX)
        for position, index in enumerate(sample):
            height, width = image_sizes[index]
            if height % merge or width % merge:
                raise ValueError(f"image grid {(height, width)} is not a multiple of spatial_merge_size={merge}")
            grids.append([1, height, width])
            pixels.append(torch.randn(height * width, patch_dim, generator=generator))
            row += text(BETWEEN) if position else []
            row += [config.vision_start_token_id] + [config.image_token_id] * (height * width // merge ** 2)
            row += [config.vision_end_token_id]
        rows.append(row + text(SUFFIX))

    length = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), length), PAD_ID, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
    for index, row in enumerate(rows):
        span = slice(length - len(row), length) if padding_side == "left" else slice(0, len(row))
        input_ids[index, span] = torch.tensor(row)
        attention_mask[index, span] = 1
    mm_token_type_ids = torch.zeros_like(input_ids)
    mm_token_type_ids[input_ids == config.image_token_id] = 1
    mm_token_type_ids[input_ids == config.video_token_id] = 2
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "mm_token_type_ids": mm_token_type_ids}
    if pixels:
        batch["pixel_values"] = torch.cat(pixels)
        batch["image_grid_thw"] = torch.tensor(grids, dtype=torch.long)
    return batch


def make_single(batch: dict, samples, row: int) -> dict:
    """Sample ``row`` of ``batch`` alone: its valid tokens only, and only its own pixels."""
    keep = batch["attention_mask"][row].bool()
    single = {"input_ids": batch["input_ids"][row, keep][None],
              "attention_mask": torch.ones_like(batch["input_ids"][row, keep][None]),
              "mm_token_type_ids": batch["mm_token_type_ids"][row, keep][None]}
    if "pixel_values_videos" in batch:
        raise NotImplementedError("make_single handles images only (make_batch builds no videos)")
    counts = [len(sample) for sample in samples]
    if counts[row]:
        sizes = [int(grid.prod()) for grid in batch["image_grid_thw"]]
        first = sum(counts[:row])
        start = sum(sizes[:first])
        stop = start + sum(sizes[first:first + counts[row]])
        single["pixel_values"] = batch["pixel_values"][start:stop]
        single["image_grid_thw"] = batch["image_grid_thw"][first:first + counts[row]]
    return single


# --------------------------------------------------------------------------------------------
# The reference: the model's own building blocks, composed from the definition.
# --------------------------------------------------------------------------------------------

def _visual_outputs(core, batch):
    """(image output, video output) of the vision tower, or None where the batch has none."""
    image = video = None
    if batch.get("pixel_values") is not None:
        image = core.get_image_features(batch["pixel_values"], batch["image_grid_thw"], return_dict=True)
    if batch.get("pixel_values_videos") is not None:
        video = core.get_video_features(batch["pixel_values_videos"], batch["video_grid_thw"], return_dict=True)
    return image, video


def make_reference(model, batch: dict) -> ReferenceInputs:
    """Embeddings with the visual features in their placeholders, the ``[3, B, L]`` positions
    that ``get_rope_index`` gives (what ``generate`` hands the text model, less its text row),
    the placeholder mask, and (DeepStack families) the per-layer DeepStack features scattered
    to the visual positions."""
    core = model.model
    config = model.config
    ids = batch["input_ids"]
    embeds = core.get_input_embeddings()(ids).clone()
    image_mask = ids == config.image_token_id
    video_mask = ids == config.video_token_id
    image, video = _visual_outputs(core, batch)

    deepstack = None
    has_deepstack = bool(getattr(config.vision_config, "deepstack_visual_indexes", None))
    if has_deepstack:
        depth = len(config.vision_config.deepstack_visual_indexes)
        deepstack = [embeds.new_zeros(embeds.shape) for _ in range(depth)]
    for output, mask in ((image, image_mask), (video, video_mask)):
        if output is None:
            if mask.any():
                raise ValueError("placeholders without pixels")
            continue
        features = torch.cat(output.pooler_output)
        if features.shape[0] != int(mask.sum()):
            raise ValueError(f"{int(mask.sum())} placeholders for {features.shape[0]} feature rows")
        embeds[mask] = features.to(embeds.dtype)
        if has_deepstack:
            for layer, per_image in enumerate(output.deepstack_features):
                deepstack[layer][mask] = torch.cat(per_image).to(embeds.dtype)

    positions, _ = core.get_rope_index(
        ids, mm_token_type_ids=batch["mm_token_type_ids"], image_grid_thw=batch.get("image_grid_thw"),
        video_grid_thw=batch.get("video_grid_thw"), second_per_grid_ts=batch.get("second_per_grid_ts"),
        attention_mask=batch.get("attention_mask"),
    )
    if positions.shape[0] == 4:  # a text row first: drop it, the text model only rotates by the last 3
        positions = positions[1:]
    return ReferenceInputs(embeds=embeds, positions=positions, visual_mask=image_mask | video_mask,
                           deepstack=deepstack)


def run_text(model, embeds, positions, attention_mask, past_key_values, deepstack=None, visual_mask=None):
    """The family's text model and head on ``embeds`` with explicit ``[3, B, L]`` positions and a
    2-D mask. ``DynamicCache(config=...)`` builds the right layers for every family (including
    the linear-attention layers of Qwen3.5, which is what ``Qwen3_5TextModel`` and ``generate`` use)."""
    from transformers import DynamicCache

    if past_key_values is None:
        past_key_values = DynamicCache(config=model.config)
    extra = {}
    if deepstack is not None:
        if visual_mask is None:
            raise ValueError("deepstack needs visual_mask")
        extra = dict(visual_pos_masks=visual_mask, deepstack_visual_embeds=[d[visual_mask] for d in deepstack])
    output = model.model.language_model(
        inputs_embeds=embeds, position_ids=positions, attention_mask=attention_mask,
        past_key_values=past_key_values, use_cache=True, **extra,
    )
    return model.lm_head(output.last_hidden_state), output.past_key_values


def next_positions(reference: ReferenceInputs, attention_mask, step: int):
    """``[3, B, 1]``: generated token ``step`` of sample ``b`` sits at (largest position of the
    sample's prompt tokens) + 1 + ``step`` on all three rows. ``generate`` computes
    ``positions[..., -1] + 1 + step`` per row, which is the same for a left-padded prompt (its
    last token is text, numbered above every earlier token)."""
    positions = reference.positions
    mask = attention_mask[:, : positions.shape[-1]].bool().to(positions.device)
    top = positions.masked_fill(~mask[None], -1).amax(dim=(0, 2))  # [B]
    return (top + 1 + step).view(1, -1, 1).expand(3, -1, 1).clone()


# --------------------------------------------------------------------------------------------
# Family assembly.
# --------------------------------------------------------------------------------------------

def mrope_family(name: str, model_class: str, make_config, image_sizes=IMAGE_SIZES, notes=None) -> TinyFamily:
    """A :class:`TinyFamily` for an M-RoPE Qwen model class built from ``make_config(attn)``."""

    @functools.lru_cache(maxsize=None)
    def layout_config():
        return make_config("sdpa")

    def build(attn_implementation: str = "sdpa", seed: int = 0):
        import transformers

        config = make_config(attn_implementation)
        torch.manual_seed(seed)
        model = getattr(transformers, model_class)(config).to(torch.float32).eval()
        if model.config.model_type != name:
            raise AssertionError(f"{model_class} reports model_type {model.config.model_type!r}, expected {name!r}")
        return model

    def batch(samples, padding_side: str = "left", seed: int = 0):
        return make_batch(layout_config(), image_sizes, samples, padding_side=padding_side, seed=seed)

    return TinyFamily(
        name=name, build=build, image_sizes=tuple(image_sizes), batch=batch, single=make_single,
        reference=make_reference, run_text=run_text, next_positions=next_positions,
        placeholder_ids=(IMAGE_ID, VIDEO_ID), notes=dict(notes or {}, model_class=model_class),
    )


def mrope_section(half_rotary: int) -> list[int]:
    """Qwen2/2.5-VL's contiguous (t, h, w) split of the rotary frequencies, 1 : 1.5 : 1.5
    ([16, 24, 24] for head_dim 128)."""
    temporal = half_rotary // 4
    height = (half_rotary - temporal) // 2
    return [temporal, height, half_rotary - temporal - height]


TEXT_WIDTHS = dict(vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096, **SPECIAL_TEXT_IDS)


def qwen2_vl_config(attn_implementation: str = "sdpa"):
    """Qwen2-VL: ViT with 2-D rotary, every block full attention, 2x2 patch merger; text with
    contiguous M-RoPE sections."""
    from transformers import Qwen2VLConfig

    config = Qwen2VLConfig(
        text_config=dict(TEXT_WIDTHS, rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                                                       "mrope_section": mrope_section(16 // 2)}),
        vision_config=dict(depth=2, embed_dim=32, hidden_size=64, mlp_ratio=2, num_heads=2, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2),
        **TOKEN_IDS,
    )
    return set_attn_implementation(config, attn_implementation)


def qwen2_5_vl_config(attn_implementation: str = "sdpa"):
    """Qwen2.5-VL: windowed vision attention (2x2 merged tokens per window with patch 14 and
    window 56) with full attention in ``fullatt_block_indexes``; SwiGLU vision MLP, RMSNorm."""
    from transformers import Qwen2_5_VLConfig

    config = Qwen2_5_VLConfig(
        text_config=dict(TEXT_WIDTHS, rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                                                       "mrope_section": mrope_section(16 // 2)}),
        vision_config=dict(depth=4, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2, window_size=56, out_hidden_size=64,
                           fullatt_block_indexes=[1, 3], tokens_per_second=2),
        **TOKEN_IDS,
    )
    return set_attn_implementation(config, attn_implementation)


FAMILIES = [
    mrope_family("qwen2_vl", "Qwen2VLForConditionalGeneration", qwen2_vl_config,
                 notes={"processor": "Qwen2VLProcessor"}),
    mrope_family("qwen2_5_vl", "Qwen2_5_VLForConditionalGeneration", qwen2_5_vl_config,
                 notes={"processor": "Qwen2_5_VLProcessor", "window_attention": True}),
]
