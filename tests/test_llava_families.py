"""LLaVA-1.5 and LLaVA-OneVision: what the contract does not check on its own.

Cached encoder outputs equal pixels, the [CLS] attention VisionZip reads equals the row of an
eager attention map, OneVision's grids follow the processor's layout (newline tokens included)
on every path, and VisionZip is refused on OneVision.
"""

import pytest
import torch

import visionselector as vs
from visionselector.adapters import find_adapter
from visionselector.api import get_state

from families.llava import IMAGE_ID, LLAVA, LLAVA_ONEVISION, VIDEO_ID, newline_mask

SAMPLES = [(1,), (0, 2), (), (2,)]
SIDE = ("image_sizes", "batch_num_images")


def _record(model, field):
    """What the method is handed at each selection (``field`` of its VisualTokens)."""
    method, seen = get_state(model).method, []
    select = method.select

    def recording(tokens, budget):
        seen.append(getattr(tokens, field))
        return select(tokens, budget)

    method.select = recording
    return seen


def _cached(family, model, batch):
    """The batch with its images encoded sample by sample (as a feature cache holds them)."""
    adapter, items = find_adapter(model), []
    for row in range(len(SAMPLES)):
        alone = family.single(batch, SAMPLES, row)
        if "pixel_values" in alone:
            pixels = {k: v for k, v in alone.items() if k not in ("input_ids", "attention_mask")}
            items += adapter.encode_images(model, pixels)
    cached = {k: v for k, v in batch.items() if k != "pixel_values"}
    cached["mm_encoder_outputs"] = adapter.encoder_outputs(items)
    return cached


@pytest.mark.parametrize("family", [LLAVA, LLAVA_ONEVISION], ids=lambda f: f.name)
def test_cached_encoder_outputs_give_the_logits_of_pixels(family):
    model = family.build()
    batch = family.batch(SAMPLES)
    with torch.no_grad():
        expected = model(**batch).logits
        torch.testing.assert_close(model(**_cached(family, model, batch)).logits, expected, atol=1e-5, rtol=1e-5)
        vs.attach(model, "uniform", 0.4)
        pruned = model(**batch).logits[:, -1]
        kept = vs.last_selection(model)
        torch.testing.assert_close(model(**_cached(family, model, batch)).logits[:, -1], pruned, atol=1e-5, rtol=1e-5)
    assert all(torch.equal(a, b) for a, b in zip(vs.last_selection(model), kept))


def test_the_cls_attention_probe_equals_the_eager_attention_map():
    model = LLAVA.build(attn_implementation="eager")
    batch = LLAVA.batch(SAMPLES)
    tower = model.model.vision_tower
    index = len(tower.encoder.layers) - 2  # vision_feature_layer -2
    outputs = {}
    handle = tower.encoder.layers[index].register_forward_hook(lambda m, a, out: outputs.update(layer=out))
    with torch.no_grad():
        reference = tower(batch["pixel_values"], output_attentions=True, output_hidden_states=True)
    handle.remove()
    torch.testing.assert_close(reference.hidden_states[-2], outputs["layer"], atol=0, rtol=0)
    cls_row = reference.attentions[index][:, :, 0, 1:].mean(1)  # [images, patches], [CLS] dropped ("default")
    vs.attach(model, "visionzip", 0.4)
    seen = _record(model, "encoder_attention")
    with torch.no_grad():
        model(**batch)
        model.generate(**batch, max_new_tokens=2, do_sample=False)
    assert len(seen) == 2
    first = 0
    for row, sample in enumerate(SAMPLES):
        count = len(sample) * cls_row.shape[1]
        expected = cls_row[first:first + len(sample)].flatten()
        first += len(sample)
        for recorded in seen:  # the forward, then the prefill of generate
            torch.testing.assert_close(recorded[row, :count], expected, atol=1e-6, rtol=1e-5)


def _flags(blocks):
    """Newline flags of a OneVision sample's blocks: each image is a base tile, then a block whose last
    column is newline tokens (its tile grid, or the single newline of an image of a multi-image sample)."""
    flags = []
    for index, (frames, height, width) in enumerate(blocks):
        row = [False] * width if index % 2 == 0 else [False] * (width - 1) + [True]
        flags += row * height * frames
    return flags


def _check_layout(model, batch, layout):
    mask = newline_mask(model, batch)
    for row, blocks in enumerate(layout):
        placeholders = batch["input_ids"][row] == IMAGE_ID
        assert sum(f * h * w for f, h, w in blocks) == int(placeholders.sum())
        assert _flags(blocks) == mask[row, placeholders].tolist()


def test_onevision_grids_follow_the_processor_layout_on_every_path():
    family = LLAVA_ONEVISION
    model = family.build()
    batch = family.batch(SAMPLES)
    vs.attach(model, "uniform", 0.4)
    seen = _record(model, "segments")
    with torch.no_grad():
        model(**batch)  # pixels
        model.generate(**batch, max_new_tokens=2, do_sample=False)  # generate drops image_sizes from the forward
        model(**_cached(family, model, batch))  # cached outputs with the image processor's side inputs
    assert len(seen) == 3 and seen[0] == seen[1] == seen[2]
    assert seen[0][1] == [(1, 4, 4), (1, 1, 1), (1, 4, 4), (1, 1, 1)]  # a multi-image sample
    _check_layout(model, batch, seen[0])
    without_sizes = {k: v for k, v in _cached(family, model, batch).items() if k not in SIDE}
    with torch.no_grad(), pytest.raises(ValueError, match="image_sizes"):
        model(**without_sizes)


def test_onevision_video_grids():
    model = LLAVA_ONEVISION.build()
    frames, pooled = 3, 2  # 4 x 4 patches pooled to 2 x 2 per frame, then one newline per video
    ids = torch.tensor([[5, 6] + [VIDEO_ID] * (frames * pooled * pooled + 1) + [7, 8]])
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
             "pixel_values_videos": torch.randn(1, frames, 3, 28, 28)}
    vs.attach(model, "pool", 0.5)
    seen = _record(model, "segments")
    with torch.no_grad():
        model(**batch)
        model.generate(**batch, max_new_tokens=2, do_sample=False)
    assert seen == [[[(frames, pooled, pooled), (1, 1, 1)]]] * 2


def test_visionzip_is_refused_on_onevision():
    model = LLAVA_ONEVISION.build()
    with pytest.raises(ValueError, match="visionzip.*llava_onevision"):
        vs.attach(model, "visionzip", 0.4)
    assert not vs.is_attached(model)


def test_llava_full_feature_strategy_keeps_the_cls_token_as_its_own_block():
    from transformers import LlavaForConditionalGeneration

    from families.llava import llava_config

    config = llava_config("eager")
    config.vision_feature_select_strategy = "full"
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config).eval()
    ids = torch.tensor([[5, 6] + [IMAGE_ID] * 17 + [7] + [IMAGE_ID] * 17 + [8]])
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": torch.randn(2, 3, 28, 28)}
    with torch.no_grad():
        reference = model.model.vision_tower(batch["pixel_values"], output_attentions=True)
    vs.attach(model, "uniform", 0.5)
    segments = _record(model, "segments")
    with torch.no_grad():
        model(**batch)
    assert segments == [[[(1, 1, 1), (1, 4, 4), (1, 1, 1), (1, 4, 4)]]]
    vs.detach(model)
    vs.attach(model, "visionzip", 0.5)
    attention = _record(model, "encoder_attention")
    with torch.no_grad():
        model(**batch)
    expected = reference.attentions[0][:, :, 0].mean(1).flatten()  # the [CLS] row, its own column included
    torch.testing.assert_close(attention[0][0], expected, atol=1e-6, rtol=1e-5)
