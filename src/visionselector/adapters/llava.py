"""LLaVA-1.5 (``llava``): a CLIP vision tower, a projector and a Llama text model.

Each image is resized and centre-cropped to the tower's square input: one run of ``s * s``
``image_token_id`` placeholders (``s = image_size // patch_size``), row-major, after CLIP's
[CLS] feature under ``vision_feature_select_strategy="full"``. Positions are 1-D; the text
model numbers decoding steps from the cache length, which the generic text-model wrapper
already translates to the uncompressed count.

Grids (``uniform``, ``pool``): per image ``(1, s, s)``, after ``(1, 1, 1)`` for [CLS] under
"full" (``(1, H // patch, W // patch)`` where the call carries ``image_sizes``). ``generate``
encodes the images before the forward and drops ``image_sizes``/``batch_num_images`` from it,
so the adapter remembers them from the encoder call that made the prefill's encoder outputs.

VisionZip: the attention the [CLS] query pays each token (mean over heads) in the encoder
layer whose output is the selected feature layer (``hidden_states[k]`` is the output of layer
``k - 1``), computed for that one query row from the layer's input and its own projections.
"""

from __future__ import annotations

import functools
import inspect
import itertools
import weakref

import torch

from .base import AttachedState, replace_forward, replace_method
from .generic import ModelAdapter, record_encoder_attention
from .positions import LinearPositions

__all__ = ["LlavaAdapter"]

GRIDS = "visionselector_grids"  # a call's per-item blocks, in its inputs, for `segments`
LAYOUT_ARGUMENTS = ("image_sizes", "batch_num_images", "vision_aspect_ratio")


class LlavaAdapter(ModelAdapter):
    family = "llava"
    module = "llava"
    class_names = ("LlavaForConditionalGeneration", "LlavaModel")
    positions = LinearPositions()
    side_inputs: tuple[str, ...] = ("image_sizes",)  # what the image processor gives besides pixels
    reads_encoder_attention = True
    lays_out_grids = True

    @classmethod
    def vision_tower(cls, core):
        return core.vision_tower

    @classmethod
    def placeholder_ids(cls, config) -> dict[str, int]:
        return {"image": int(config.image_token_id)}

    @classmethod
    def encode_images(cls, model, pixels: dict) -> list:
        core = cls.core(model)
        weight = next(cls.vision_tower(core).parameters())
        side = {name: pixels[name] for name in cls.side_inputs if pixels.get(name) is not None}
        output = core.get_image_features(pixel_values=pixels["pixel_values"].to(weight.device, weight.dtype),
                                         **side, return_dict=True)
        return [tensor.detach().clone() for tensor in output.pooler_output]

    @classmethod
    def item_blocks(cls, config, inputs: dict) -> dict:
        """Modality -> the blocks of each of its items, in batch order (repeated where all are alike)."""
        vision, strategy = config.vision_config, config.vision_feature_select_strategy
        if inputs.get("image_sizes") is not None:
            sizes = torch.as_tensor(inputs["image_sizes"]).tolist()
            return {"image": [[(1, h // vision.patch_size, w // vision.patch_size)] for h, w in sizes]}
        side, cls_token = vision.image_size // vision.patch_size, vision.model_type == "clip_vision_model"
        if strategy == "default" and not cls_token:
            raise ValueError(f"a {vision.model_type} tower has no [CLS] feature to drop, so its tokens form no grid")
        return {"image": itertools.repeat([(1, 1, 1)] * (cls_token and strategy == "full") + [(1, side, side)])}

    @classmethod
    def patch(cls, model, state: AttachedState) -> None:
        if "segments" in state.method.needs:  # installed first: runs inside the generic core wrapper
            core, encoded = cls.core(model), {}
            get_features, forward = core.get_image_features, core.forward
            signature = inspect.signature(get_features)

            @functools.wraps(get_features)
            def remembering(*args, **kwargs):
                output = get_features(*args, **kwargs)
                bound = signature.bind_partial(*args, **kwargs).arguments
                side = {k: v for k, v in bound.items() if k in LAYOUT_ARGUMENTS and v is not None}
                if isinstance(getattr(output, "pooler_output", None), (list, tuple)) and "image_sizes" in side:
                    # Each item's blocks, found again by the item's tensor: generate may hand the
                    # outputs back regrouped (repeated for beams) in a new container.
                    blocks = cls.item_blocks(core.config, side)["image"]
                    encoded.clear()
                    encoded.update({id(item): (weakref.ref(item), grid)
                                    for item, grid in zip(output.pooler_output, blocks)})
                return output

            def remembered_blocks(image):
                found = [encoded.get(id(item)) for item in getattr(image, "pooler_output", None) or ()]
                if not found or any(entry is None or entry[0]() is not item
                                    for entry, item in zip(found, image.pooler_output)):
                    return None
                return [grid for _, grid in found]

            @functools.wraps(forward)
            def grids_forward(*args, **kwargs):
                if any(kwargs.get(name) is not None for name in cls.visual_inputs):
                    ids = cls.placeholder_ids(core.config)
                    remembered = remembered_blocks((kwargs.get("mm_encoder_outputs") or {}).get("image"))
                    if remembered is not None:
                        state.current_inputs[GRIDS] = {ids["image"]: remembered}
                    else:
                        given = {k: v for k, v in kwargs.items() if v is not None}
                        state.current_inputs[GRIDS] = {
                            ids[modality]: items for modality, items in cls.item_blocks(core.config, given).items()}
                return forward(*args, **kwargs)

            replace_method(core, "get_image_features", remembering, state)
            replace_forward(core, grids_forward, state)
        super().patch(model, state)

    @classmethod
    def segments(cls, state, token_ids, visual_mask, positions, inputs):
        queues = {token_id: iter(items) for token_id, items in inputs.get(GRIDS, {}).items()}
        layout = []
        for row_ids, row_mask in zip(token_ids.tolist(), visual_mask.tolist()):
            ids, blocks, start = [t for t, m in zip(row_ids, row_mask) if m], [], 0
            while start < len(ids):
                item = next(queues.get(ids[start], iter(())), None)
                if item is None:
                    raise ValueError(f"the {cls.family} adapter cannot lay out these visual tokens in grids: pass the "
                                     f"image processor's {' and '.join(cls.side_inputs)} with mm_encoder_outputs")
                size = sum(f * h * w for f, h, w in item)
                if ids[start:start + size] != ids[start:start + 1] * size:
                    raise ValueError(f"a run of placeholder tokens does not match its item's {size} visual tokens")
                blocks, start = blocks + item, start + size
            layout.append(blocks)
        return layout

    @classmethod
    def install_encoder_attention_probe(cls, core, state: AttachedState) -> None:
        config, encoder = core.config, getattr(cls.vision_tower(core), "encoder", None)
        layer, strategy = config.vision_feature_layer, config.vision_feature_select_strategy
        if config.vision_config.model_type != "clip_vision_model" or not isinstance(layer, int) or encoder is None:
            raise ValueError(f"method {state.method_name!r} reads CLIP's [CLS] attention at one feature layer; this "
                             f"{cls.family} model has a {config.vision_config.model_type} tower and "
                             f"vision_feature_layer={layer!r}")
        index = layer % (len(encoder.layers) + 1) - 1  # hidden_states[k] is the output of layer k - 1
        if index < 0:
            raise ValueError("the selected vision features are the embeddings, before any attention")
        rows: list = []

        def before_attention(module, args, kwargs):
            hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            with torch.no_grad():
                query = module.q_proj(hidden[:, :1]).unflatten(-1, (-1, module.head_dim)).float()
                key = module.k_proj(hidden).unflatten(-1, (-1, module.head_dim)).float()
                row = (torch.einsum("bqhd,bkhd->bhqk", query, key) * module.scale).softmax(-1)[:, :, 0].mean(1)
                rows.append(row[:, 1:] if strategy == "default" else row)

        get_features = core.get_image_features

        @functools.wraps(get_features)
        def features_with_attention(*args, **kwargs):
            rows.clear()
            output = get_features(*args, **kwargs)
            if rows:
                record_encoder_attention(state, "image", output, torch.cat(rows).flatten())
            rows.clear()
            return output

        replace_method(core, "get_image_features", features_with_attention, state)
        handle = encoder.layers[index].self_attn.register_forward_pre_hook(before_attention, with_kwargs=True)
        state.restore.append(handle.remove)
