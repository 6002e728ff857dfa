"""LLaVA-1.5 (``llava``) and LLaVA-OneVision (``llava_onevision``), tiny.

Both are built from the real ``transformers`` classes; only the sizes are small. Inputs are
laid out as the families' processors lay them out (``LlavaProcessor`` with a CLIP image
processor; ``LlavaOnevisionProcessor`` with ``LlavaOnevisionImageProcessor``):

* LLaVA-1.5: every image is resized and centre-cropped to the vision tower's square input, so
  every image has the same number of placeholder tokens, ``(image_size // patch_size) ** 2``
  (the CLS token is counted by the processor and dropped again by the "default" feature
  selection). ``pixel_values`` is ``[num_images, C, H, W]``; there is no ``image_sizes``.
* LLaVA-OneVision: a sample with one image gets AnyRes tiles (the base image plus the tiles of
  the best ``image_grid_pinpoints`` resolution); its features are the base image's patches
  followed by the unpadded tile grid, downsampled when larger than ``anyres_max_9`` allows,
  with one ``image_newline`` feature after each grid row. An image of a sample with several
  images is padded to a square and gets the base patches only, followed by a single
  ``image_newline``. The processor counts the newline features as image tokens.
  ``pixel_values`` is ``[num_images, max_patches, C, H, W]`` (zero-padded on the patch axis),
  ``image_sizes`` ``[num_images, 2]`` the original (height, width), ``batch_num_images`` the
  number of images of each sample that has images (text-only samples are left out, as the
  image processor leaves them out).

Nothing here imports ``visionselector``.
"""

from __future__ import annotations

import math

import torch
from transformers import (
    CLIPVisionConfig,
    DynamicCache,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    Qwen2Config,
    SiglipVisionConfig,
)
from transformers.image_processing_utils import select_best_resolution

from . import ReferenceInputs, TinyFamily

__all__ = ["FAMILIES", "LLAVA", "LLAVA_ONEVISION", "newline_mask", "onevision_image_layout",
           "onevision_num_patches"]

# Token ids of the tiny configurations.
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
IMAGE_ID, VIDEO_ID = 398, 399
FIRST_TEXT_ID, VOCAB_SIZE = 3, 400

# Text around the images of a sample: before the first, between two, after the last.
PREFIX, BETWEEN, SUFFIX = 3, 2, 4

# Vision towers: 28-pixel square inputs of 7-pixel patches, a 4 x 4 patch grid.
IMAGE_SIZE, PATCH_SIZE, CHANNELS = 28, 7, 3
GRID = IMAGE_SIZE // PATCH_SIZE

# (height, width) in pixels of the original images; see ``onevision_image_layout`` for what
# each gives LLaVA-OneVision:
#   (30, 70): best fit 56 x 84 (2 x 3 tiles), 8 x 12 grid unpadded to 6 x 12 -> 16 + 72 + 6 = 94
#   (100, 90): best fit 112 x 112 (4 x 4 tiles), 16 x 16 unpadded to 16 x 14, downsampled by
#              anyres_max_9 to 12 x 11 -> 16 + 132 + 12 = 160
#   (28, 28): best fit 28 x 28 (1 tile), 4 x 4 -> 16 + 16 + 4 = 36
# and in a sample with several images each one gives 16 + 1 = 17.
IMAGE_SIZES = ((30, 70), (100, 90), (28, 28))
PINPOINTS = [[28, 28], [28, 56], [56, 28], [56, 56], [56, 84], [84, 56], [112, 112]]
ASPECT_RATIO = "anyres_max_9"


def _text_config(cls, attn_implementation):
    config = cls(
        vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID,
    )
    config._attn_implementation = attn_implementation
    return config


def _vision_config(cls, attn_implementation, **extra):
    config = cls(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, num_channels=CHANNELS, **extra)
    config._attn_implementation = attn_implementation
    return config


def _finish(config, attn_implementation):
    for sub_config in (config, config.text_config, config.vision_config):
        sub_config._attn_implementation = attn_implementation
    return config


def llava_config(attn_implementation: str = "sdpa") -> LlavaConfig:
    """LLaVA-1.5 structure: CLIP tower, features of the second-to-last layer without CLS, Llama."""
    config = LlavaConfig(
        vision_config=_vision_config(CLIPVisionConfig, attn_implementation, projection_dim=32),
        text_config=_text_config(LlamaConfig, attn_implementation),
        image_token_index=IMAGE_ID, image_seq_length=GRID * GRID, projector_hidden_act="gelu",
        vision_feature_layer=-2, vision_feature_select_strategy="default",
    )
    return _finish(config, attn_implementation)


def onevision_config(attn_implementation: str = "sdpa") -> LlavaOnevisionConfig:
    """LLaVA-OneVision structure (as the released ``llava-hf/llava-onevision-qwen2-*-ov-hf``):
    SigLIP tower without head, last-layer features of every patch ("full"), Qwen2, AnyRes."""
    config = LlavaOnevisionConfig(
        vision_config=_vision_config(SiglipVisionConfig, attn_implementation, vision_use_head=False),
        text_config=_text_config(Qwen2Config, attn_implementation),
        image_token_index=IMAGE_ID, video_token_index=VIDEO_ID, projector_hidden_act="gelu",
        vision_feature_layer=-1, vision_feature_select_strategy="full",
        image_grid_pinpoints=[list(p) for p in PINPOINTS], vision_aspect_ratio=ASPECT_RATIO,
    )
    return _finish(config, attn_implementation)


def _build(model_class, make_config):
    def build(attn_implementation: str = "sdpa", seed: int = 0):
        config = make_config(attn_implementation)
        torch.manual_seed(seed)
        model = model_class(config).to(torch.float32)
        return model.eval()

    return build


# --------------------------------------------------------------------------- token layouts
def onevision_num_patches(height: int, width: int, multi: bool, *, pinpoints=None,
                          image_size: int = IMAGE_SIZE) -> int:
    """Tiles the image processor makes of an image (base image included); 1 in a multi-image
    sample (``image_size_to_num_patches`` in the modeling file)."""
    if multi:
        return 1
    best_height, best_width = select_best_resolution([height, width], pinpoints or PINPOINTS)
    return math.ceil(best_height / image_size) * math.ceil(best_width / image_size) + 1


def onevision_image_layout(height: int, width: int, multi: bool, *, pinpoints=None, image_size: int = IMAGE_SIZE,
                           patch_size: int = PATCH_SIZE, aspect_ratio: str = ASPECT_RATIO) -> list[bool]:
    """One flag per placeholder token of an image of ``height`` x ``width`` pixels, True where
    the feature is ``image_newline``; ``len`` is the processor's token count.

    The arithmetic of ``LlavaOnevisionProcessor._get_number_of_features`` /
    ``_get_unpadded_features`` (``vision_feature_select_strategy="full"``: no CLS to remove) and
    of ``LlavaOnevisionModel.pack_image_features``: base patches, then the unpadded (and, beyond
    ``anyres_max_N``, downsampled) grid row by row, each row followed by a newline."""
    side = image_size // patch_size
    base = [False] * side * side
    if multi:
        return base + [True]
    best_height, best_width = select_best_resolution([height, width], pinpoints or PINPOINTS)
    current_height = side * (best_height // image_size)
    current_width = side * (best_width // image_size)
    if width / height > current_width / current_height:
        new_height = int(round(height * (current_width / width), 7))
        current_height -= ((current_height - new_height) // 2) * 2
    else:
        new_width = int(round(width * (current_height / height), 7))
        current_width -= ((current_width - new_width) // 2) * 2
    max_num_patches = int(aspect_ratio.strip("anyres_max_"))
    ratio = math.sqrt(current_height * current_width / (max_num_patches * side**2))
    if ratio > 1.1:
        current_height, current_width = int(current_height // ratio), int(current_width // ratio)
    return base + ([False] * current_width + [True]) * current_height


def _model_layout_kwargs(model):
    if model is None:
        return {}
    config = model.config
    return dict(pinpoints=[list(p) for p in config.image_grid_pinpoints], image_size=config.vision_config.image_size,
                patch_size=config.vision_config.patch_size, aspect_ratio=config.vision_aspect_ratio)


def _images_per_row(batch):
    """Per row of the batch, the (index into the batch's images, is_multi) of its images."""
    rows = batch["input_ids"].shape[0]
    has_images = (batch["input_ids"] == IMAGE_ID).any(-1).tolist()
    counts = batch["batch_num_images"].tolist() if "batch_num_images" in batch else []
    out, start, sample = [], 0, 0
    for row in range(rows):
        if not has_images[row]:
            out.append([])
            continue
        n = counts[sample]
        sample += 1
        out.append([(start + k, n > 1) for k in range(n)])
        start += n
    return out


def newline_mask(model, batch) -> torch.Tensor:
    """``BoolTensor[B, L]``: the placeholder positions of a LLaVA-OneVision batch that hold
    ``image_newline`` (computed from the unpadding arithmetic; ``model`` gives the config, or
    ``None`` for this module's constants)."""
    ids = batch["input_ids"]
    mask = torch.zeros(ids.shape, dtype=torch.bool)
    kwargs = _model_layout_kwargs(model)
    for row, images in enumerate(_images_per_row(batch)):
        flags = []
        for index, multi in images:
            height, width = batch["image_sizes"][index].tolist()
            flags += onevision_image_layout(height, width, multi, **kwargs)
        positions = (ids[row] == IMAGE_ID).nonzero().flatten()
        if len(flags) != len(positions):
            raise ValueError(f"row {row}: {len(positions)} placeholders for {len(flags)} image features")
        mask[row, positions] = torch.tensor(flags, dtype=torch.bool)
    return mask.to(ids.device)


def newline_token_count(batch) -> torch.Tensor:
    """``LongTensor[B]``: the number of ``image_newline`` tokens of each sample."""
    return newline_mask(None, batch).sum(-1)


# --------------------------------------------------------------------------- inputs
def _words():
    special = {PAD_ID, BOS_ID, EOS_ID, IMAGE_ID, VIDEO_ID}
    return torch.tensor([i for i in range(FIRST_TEXT_ID, VOCAB_SIZE) if i not in special])


def _pad(rows, padding_side):
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    length = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), length), PAD_ID, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
    for index, row in enumerate(rows):
        span = slice(length - len(row), length) if padding_side == "left" else slice(0, len(row))
        input_ids[index, span] = torch.tensor(row, dtype=torch.long)
        attention_mask[index, span] = 1
    return input_ids, attention_mask


def _llava_batch(samples, padding_side="left", seed=0):
    generator = torch.Generator().manual_seed(seed)
    words = _words()
    rows, pixels = [], []
    for sample in samples:
        row = words[torch.randint(len(words), (PREFIX,), generator=generator)].tolist()
        for k, _index in enumerate(sample):
            if k:
                row += words[torch.randint(len(words), (BETWEEN,), generator=generator)].tolist()
            row += [IMAGE_ID] * (GRID * GRID)
            pixels.append(torch.randn(CHANNELS, IMAGE_SIZE, IMAGE_SIZE, generator=generator))
        row += words[torch.randint(len(words), (SUFFIX,), generator=generator)].tolist()
        rows.append(row)
    input_ids, attention_mask = _pad(rows, padding_side)
    batch = {"input_ids": input_ids, "attention_mask": attention_mask}
    if pixels:
        batch["pixel_values"] = torch.stack(pixels)
    return batch


def _llava_single(batch, samples, row):
    keep = batch["attention_mask"][row].bool()
    out = {"input_ids": batch["input_ids"][row, keep][None]}
    out["attention_mask"] = torch.ones_like(out["input_ids"])
    start, count = sum(len(s) for s in samples[:row]), len(samples[row])
    if count:
        out["pixel_values"] = batch["pixel_values"][start:start + count]
    return out


def _onevision_batch(samples, padding_side="left", seed=0):
    generator = torch.Generator().manual_seed(seed)
    words = _words()
    rows, pixels, sizes, counts = [], [], [], []
    for sample in samples:
        multi = len(sample) > 1
        row = words[torch.randint(len(words), (PREFIX,), generator=generator)].tolist()
        for k, index in enumerate(sample):
            if k:
                row += words[torch.randint(len(words), (BETWEEN,), generator=generator)].tolist()
            height, width = IMAGE_SIZES[index]
            row += [IMAGE_ID] * len(onevision_image_layout(height, width, multi))
            patches = onevision_num_patches(height, width, multi)
            pixels.append(torch.randn(patches, CHANNELS, IMAGE_SIZE, IMAGE_SIZE, generator=generator))
            sizes.append([height, width])
        row += words[torch.randint(len(words), (SUFFIX,), generator=generator)].tolist()
        rows.append(row)
        if sample:
            counts.append(len(sample))
    input_ids, attention_mask = _pad(rows, padding_side)
    batch = {"input_ids": input_ids, "attention_mask": attention_mask}
    if pixels:
        batch["pixel_values"] = _stack_patches(pixels)
        batch["image_sizes"] = torch.tensor(sizes, dtype=torch.long)
        batch["batch_num_images"] = torch.tensor(counts, dtype=torch.long)
    return batch


def _stack_patches(pixels):
    """``[num_images, max_patches, C, H, W]``, zero-padded on the patch axis (``do_pad``)."""
    most = max(p.shape[0] for p in pixels)
    out = torch.zeros(len(pixels), most, *pixels[0].shape[1:])
    for index, p in enumerate(pixels):
        out[index, : p.shape[0]] = p
    return out


def _onevision_single(batch, samples, row):
    keep = batch["attention_mask"][row].bool()
    out = {"input_ids": batch["input_ids"][row, keep][None]}
    out["attention_mask"] = torch.ones_like(out["input_ids"])
    start, count = sum(len(s) for s in samples[:row]), len(samples[row])
    if count:
        sizes = batch["image_sizes"][start:start + count]
        most = max(onevision_num_patches(h, w, count > 1) for h, w in sizes.tolist())
        out["pixel_values"] = batch["pixel_values"][start:start + count, :most]
        out["image_sizes"] = sizes
        out["batch_num_images"] = torch.tensor([count], dtype=torch.long)
    return out


# --------------------------------------------------------------------------- reference
def generate_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """``GenerationMixin._prepare_position_ids_for_generation``: cumsum of the mask - 1, 0 on padding."""
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.masked_fill(attention_mask == 0, 0)


def _image_features(model, batch):
    if "pixel_values" not in batch:
        return None
    kwargs = {"pixel_values": batch["pixel_values"]}
    for key in ("image_sizes", "batch_num_images"):
        if key in batch:
            kwargs[key] = batch[key]
    output = model.model.get_image_features(**kwargs, return_dict=True)
    return torch.cat(list(output.pooler_output), dim=0)


def _reference(model, batch):
    ids = batch["input_ids"]
    with torch.no_grad():
        embeds = model.model.get_input_embeddings()(ids)
        image_mask = ids == IMAGE_ID
        features = _image_features(model, batch)
        if features is not None:
            if features.shape[0] != int(image_mask.sum()):
                raise ValueError(f"{int(image_mask.sum())} image placeholders for {features.shape[0]} features")
            embeds = embeds.clone()
            embeds[image_mask] = features.to(embeds.dtype)  # row-major, as masked_scatter fills them
    visual_mask = image_mask | (ids == VIDEO_ID)
    return ReferenceInputs(embeds=embeds, positions=generate_positions(batch["attention_mask"]),
                           visual_mask=visual_mask, deepstack=None)


def _run_text(model, embeds, positions, attention_mask, past_key_values, deepstack=None, visual_mask=None):
    if deepstack:
        raise ValueError("LLaVA families have no DeepStack features")
    if past_key_values is None:
        past_key_values = DynamicCache(config=model.config.text_config)
    output = model.model.language_model(inputs_embeds=embeds, position_ids=positions, attention_mask=attention_mask,
                                        past_key_values=past_key_values, use_cache=True)
    return model.lm_head(output.last_hidden_state), output.past_key_values


def _next_positions(reference, attention_mask, step):
    """What ``generate`` gives generated token ``step``: the last prompt position + 1 + step
    (``_update_model_kwargs_for_generation``). With left padding that is the number of valid
    prompt tokens + step; with right padding a padded row continues from 0 (its last column is
    padding, numbered 0), which is what the unpatched model does too."""
    return reference.positions[:, -1:] + 1 + step


LLAVA = TinyFamily(
    name="llava",
    build=_build(LlavaForConditionalGeneration, llava_config),
    image_sizes=IMAGE_SIZES,
    batch=_llava_batch,
    single=_llava_single,
    reference=_reference,
    run_text=_run_text,
    next_positions=_next_positions,
    placeholder_ids=(IMAGE_ID,),
    notes={"tokens_per_image": GRID * GRID,
           "same_tokens_for_every_size": "LLaVA-1.5 resizes and centre-crops every image to the tower's input"},
)

LLAVA_ONEVISION = TinyFamily(
    name="llava_onevision",
    build=_build(LlavaOnevisionForConditionalGeneration, onevision_config),
    image_sizes=IMAGE_SIZES,
    batch=_onevision_batch,
    single=_onevision_single,
    reference=_reference,
    run_text=_run_text,
    next_positions=_next_positions,
    placeholder_ids=(IMAGE_ID, VIDEO_ID),
    notes={"newline_token_count": newline_token_count, "newline_mask": newline_mask,
           "image_layout": onevision_image_layout},
)

FAMILIES = [LLAVA, LLAVA_ONEVISION]
