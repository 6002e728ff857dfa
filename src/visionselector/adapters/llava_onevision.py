"""LLaVA-OneVision (``llava_onevision``): a SigLIP tower, AnyRes tiles and a Qwen2 text model.

An image of a one-image sample gives the base image's ``s * s`` patches, then its tile grid
unpadded to the image's aspect ratio (and downsampled beyond ``anyres_max_N``), row by row,
each row followed by one ``image_newline`` feature; an image of a sample with several images
gives its base patches and a single ``image_newline``. A video gives its frames' pooled
patches and one ``image_newline``.

Newline tokens are ordinary placeholder tokens: the processor counts them as image tokens,
they compete for the budget like any visual token (budget ``floor(r * N)`` over all of a
sample's placeholders), and ``last_selection`` indexes all placeholder tokens in sequence
order, newline tokens included.

Grids (``uniform``, ``pool``), per image: the base tile ``(1, s, s)``, then the unpadded grid
as ``(1, h, w + 1)`` (its last column is the newline column), or ``(1, 1, 1)`` for the newline
of an image of a multi-image sample; per video ``(frames, p, p)`` (``p = ceil(s / 2)``) and
``(1, 1, 1)``. ``h`` and ``w`` come from ``image_sizes`` through the modeling file's own helpers.

VisionZip is refused: SigLIP has no [CLS] token, and AnyRes unpads and interpolates the
tiles, so no per-token encoder attention corresponds exactly to the placeholder tokens.

Cached encoder outputs (:meth:`encode_images`) give the logits of pixels when encoded as the
processor lays the sample out: ``batch_num_images`` decides whether an image is tiled (alone in
its sample) or gets its base patches only (one of several); without it every image is tiled.
A feature cache encodes images one by one, so it leaves multi-image samples out
(``images_encode_alone = False``): they run on pixels, as the processor lays them out.
"""

from __future__ import annotations

import itertools
import math

import torch

from .llava import LlavaAdapter

__all__ = ["LlavaOnevisionAdapter"]


class LlavaOnevisionAdapter(LlavaAdapter):
    family = "llava_onevision"
    module = "llava_onevision"
    class_names = ("LlavaOnevisionForConditionalGeneration", "LlavaOnevisionModel")
    side_inputs = ("image_sizes", "batch_num_images")
    reads_encoder_attention = False
    images_encode_alone = False  # an image of a multi-image sample is not tiled

    @classmethod
    def refusal(cls, method) -> str | None:
        if "encoder_attention" in method.needs:
            return ("it reads the vision encoder's attention per visual token, but SigLIP has no [CLS] token and "
                    "AnyRes unpads and interpolates the tiles, so no encoder attention corresponds exactly to "
                    "the placeholder tokens")
        return super().refusal(method)

    @classmethod
    def placeholder_ids(cls, config) -> dict[str, int]:
        return {"image": int(config.image_token_id), "video": int(config.video_token_id)}

    @classmethod
    def item_blocks(cls, config, inputs: dict) -> dict:
        side = config.vision_config.image_size // config.vision_config.patch_size
        blocks = {}
        if inputs.get("image_sizes") is not None:
            sizes = torch.as_tensor(inputs["image_sizes"]).tolist()
            counts = inputs.get("batch_num_images")  # as the model reads it: tiled when alone in its sample
            tiled = [True] * len(sizes) if counts is None else [n == 1 for n in torch.as_tensor(counts).tolist()
                                                                 for _ in range(n)]
            aspect_ratio = inputs.get("vision_aspect_ratio") or config.vision_aspect_ratio
            blocks["image"] = [[(1, side, side), cls.tile_grid(config, size, aspect_ratio) if alone else (1, 1, 1)]
                               for size, alone in zip(sizes, tiled)]
        pooled = math.ceil(side / 2)
        videos, encoded = inputs.get("pixel_values_videos"), (inputs.get("mm_encoder_outputs") or {}).get("video")
        if videos is not None or encoded is not None:
            frames = videos.shape[1] if videos is not None else (encoded.pooler_output.shape[1] - 1) // pooled**2
            blocks["video"] = itertools.repeat([(frames, pooled, pooled), (1, 1, 1)])
        return blocks

    @classmethod
    def tile_grid(cls, config, size: list, aspect_ratio: str) -> tuple[int, int, int]:
        """``(1, h, w + 1)``: the unpadded, possibly downsampled tile grid of an image, newline column last."""
        import transformers.models.llava_onevision.modeling_llava_onevision as modeling

        side = config.vision_config.image_size // config.vision_config.patch_size
        rows, columns = modeling.get_anyres_image_grid_shape(size, config.image_grid_pinpoints,
                                                             config.vision_config.image_size)
        height, width = modeling.unpad_image(torch.empty(0, rows * side, columns * side), size).shape[1:]
        ratio = math.sqrt(height * width / (int(aspect_ratio.strip("anyres_max_")) * side**2))
        if ratio > 1.1:
            height, width = int(height // ratio), int(width // ratio)
        return (1, height, width + 1)
