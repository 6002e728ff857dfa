"""Qwen3-VL(-MoE) and Qwen3.5(-MoE): what the family contract does not pin down on its own.

DeepStack rows follow exactly the kept tokens, in order (hard, soft, and pruning inside the
language model); cached encoder outputs carry DeepStack; the VisionZip probe and the FastV/DART
signals agree with the model's own attention weights; Qwen3-VL videos (one timestamped block
per frame) share one budget per sample; decoding with a padded mask numbers steps like the
unpruned model; Qwen3.5 refuses pruning inside its hybrid language model.
"""

import io
import math
import sys

import pytest
import torch

import visionselector as vs
from visionselector.adapters import ADAPTERS
from visionselector.adapters.layer_pruning import decoder_signals
from visionselector.api import get_state

from families import family
from families.qwen_mrope import TEXT_IDS
from test_family_contract import _reference_run

SAMPLES = [(1,), (0, 2), (), (2,)]


def _model(name, attn="sdpa"):
    torch.manual_seed(0)
    return family(name).build(attn_implementation=attn, seed=0)


def _spy_deepstack(model) -> list:
    """Record ``(visual_pos_masks, rows)`` of every DeepStack addition the text model makes."""
    text_model, calls = model.model.language_model, []
    original = text_model._deepstack_process

    def spy(hidden_states, visual_pos_masks, visual_embeds):
        calls.append((visual_pos_masks.clone(), visual_embeds.clone()))
        return original(hidden_states, visual_pos_masks, visual_embeds)

    text_model._deepstack_process = spy
    return calls


def _kept_rows(reference, kept, valid):
    """Written from the definition: each sample's kept tokens (valid text, kept visual) keep their
    order, left-padded to the longest; DeepStack rows are those of the kept visual tokens, samples
    in order. Returns (mask over the compacted batch, rows per DeepStack layer)."""
    masks, rows = [], [[] for _ in reference.deepstack]
    for row, indices in enumerate(kept):
        positions = torch.nonzero(reference.visual_mask[row]).flatten()[indices]
        keep = valid[row] & ~reference.visual_mask[row]
        keep[positions] = True
        masks.append(reference.visual_mask[row][keep])
        for layer, features in zip(rows, reference.deepstack):
            layer.append(features[row, positions])
    width = max(len(mask) for mask in masks)
    mask = torch.stack([torch.cat([mask.new_zeros(width - len(mask)), mask]) for mask in masks])
    return mask, [torch.cat(layer) for layer in rows]


@pytest.mark.parametrize("method, options", [("random", {}), ("fastv", {"layer": 1})])
def test_deepstack_rows_follow_the_kept_tokens_in_order(method, options):
    model = _model("qwen3_vl")
    calls = _spy_deepstack(model)
    vs.attach(model, method, 0.4, **options)
    batch = family("qwen3_vl").batch(SAMPLES)
    with torch.no_grad():
        model(**batch)
    kept = vs.last_selection(model)
    vs.detach(model)
    reference = family("qwen3_vl").reference(model, batch)
    mask, rows = _kept_rows(reference, kept, batch["attention_mask"].bool())
    first = options.get("layer", 0)  # DeepStack layers before the pruning layer see every token
    assert len(calls) == len(rows) == 3
    for layer, (seen_mask, seen_rows) in enumerate(calls):
        if layer < first:
            assert torch.equal(seen_mask, reference.visual_mask)
            assert torch.equal(seen_rows, reference.deepstack[layer][reference.visual_mask])
        else:
            assert torch.equal(seen_mask, mask), layer
            assert torch.equal(seen_rows, rows[layer]), layer  # a reversed or shifted restriction fails here


def test_fastv_on_deepstack_equals_masking_the_dropped_tokens_after_layer_k():
    """Dropping tokens after layer K = keeping them but letting no one attend to them from layer K+1
    on (an eager model with the dropped keys masked), DeepStack included."""
    pruned, reference = _model("qwen3_vl"), _model("qwen3_vl", "eager")
    vs.attach(pruned, "fastv", 0.4, layer=1)
    batch = family("qwen3_vl").batch(SAMPLES[:2])
    with torch.no_grad():
        logits = pruned(**batch).logits[:, -1]
    ids, config = batch["input_ids"], reference.config
    visual = (ids == config.image_token_id) | (ids == config.video_token_id)
    dropped = visual.clone()
    for row, indices in enumerate(vs.last_selection(pruned)):
        dropped[row, torch.nonzero(visual[row]).flatten()[indices]] = False

    def mask_dropped(module, args, kwargs):
        mask = kwargs["attention_mask"]
        columns = dropped[:, None, None, :]
        kwargs["attention_mask"] = (mask & ~columns if mask.dtype == torch.bool
                                    else mask.masked_fill(columns, torch.finfo(mask.dtype).min))
        return args, kwargs

    handles = [layer.register_forward_pre_hook(mask_dropped, with_kwargs=True)
               for layer in reference.model.language_model.layers[2:]]
    with torch.no_grad():
        expected = reference(**batch).logits[:, -1]
    for handle in handles:
        handle.remove()
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-4)


def test_soft_mode_scales_each_deepstack_row_by_its_token():
    model = _model("qwen3_vl")
    calls = _spy_deepstack(model)
    vs.attach(model, "visionselector", 0.3, mode="soft")
    batch = family("qwen3_vl").batch(SAMPLES[:2])
    with torch.no_grad():
        model(**batch)
        soft = get_state(model).last.soft_mask
        reference = family("qwen3_vl").reference(model, batch)
    scale = torch.cat([soft[row, :int(n)] for row, n in enumerate(reference.visual_mask.sum(1))]).unsqueeze(-1)
    for layer, (seen_mask, seen_rows) in enumerate(calls):
        assert torch.equal(seen_mask, reference.visual_mask)
        torch.testing.assert_close(seen_rows, reference.deepstack[layer][reference.visual_mask] * scale)
    # A 0/1 mask: a dropped token's DeepStack rows vanish like its embedding, a kept one's are untouched.
    adapter, mask = ADAPTERS["qwen3_vl"], reference.visual_mask
    rows = [layer[mask] for layer in reference.deepstack]
    hard = torch.ones(mask.shape)
    hard[mask] = (torch.arange(int(mask.sum())) % 3 == 0).float()
    scaled = adapter.scale_extras({"visual_pos_masks": mask, "deepstack_visual_embeds": rows}, hard, mask)
    for original, result in zip(rows, scaled["deepstack_visual_embeds"]):
        assert torch.equal(result, torch.where(hard[mask].bool()[:, None], original, torch.zeros_like(original)))


@pytest.mark.parametrize("name", ["qwen3_vl", "qwen3_vl_moe", "qwen3_5"])
def test_cached_encoder_outputs_give_the_logits_of_pixels(name):
    model, adapter = _model(name), ADAPTERS[name]
    batch = family(name).batch([(1,), (0, 2)])
    with torch.no_grad():
        items = adapter.encode_images(model, {k: batch[k] for k in ("pixel_values", "image_grid_thw")})
    assert [adapter.token_count(item) for item in items] == [6, 4, 12]
    buffer = io.BytesIO()
    torch.save(items, buffer)  # the feature cache stores items with torch.save and loads weights only
    buffer.seek(0)
    items = torch.load(buffer, weights_only=True)
    cached = {k: v for k, v in batch.items() if k != "pixel_values"}
    cached["mm_encoder_outputs"] = adapter.encoder_outputs(items)
    with torch.no_grad():
        torch.testing.assert_close(model(**cached).logits, model(**batch).logits, atol=1e-6, rtol=1e-6)
        vs.attach(model, "visionselector", 0.3)
        expected, kept = model(**batch).logits, vs.last_selection(model)
        torch.testing.assert_close(model(**cached).logits, expected, atol=1e-6, rtol=1e-6)
    assert all(torch.equal(a, b) for a, b in zip(vs.last_selection(model), kept))


@pytest.mark.parametrize("name", ["qwen3_vl", "qwen3_5"])
def test_visionzip_probe_equals_the_encoders_own_attention(name):
    from transformers import AttentionInterface

    model = _model(name)
    modeling = sys.modules[type(model).__module__]
    weights = []

    def recording(module, query, key, value, attention_mask, **kwargs):
        output, attention = modeling.eager_attention_forward(module, query, key, value, attention_mask, **kwargs)
        weights.append(attention)
        return output, attention

    AttentionInterface.register("visionselector_test_recording", recording)
    model.model.visual.config._attn_implementation = "visionselector_test_recording"
    vs.attach(model, "visionzip", 0.3)
    batch = family(name).batch([(0, 2)])
    with torch.no_grad():
        model.model.get_image_features(batch["pixel_values"], batch["image_grid_thw"])
    _, recorded = get_state(model).encoder_attention["image"][-1]
    last_block = weights[-len(batch["image_grid_thw"]):]  # one call per image in the last block
    received = torch.cat([w[0].float().mean(0).mean(0) for w in last_block])  # mean over heads and queries
    torch.testing.assert_close(recorded, received.view(-1, 4).mean(1), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("method", ["fastv", "dart"])
def test_inside_llm_signals_use_the_normalised_queries_and_keys(method):
    model, layer_index = _model("qwen3_vl", "eager"), 1
    layer = model.model.language_model.layers[layer_index]
    with torch.no_grad():  # norms far from identity, so skipping them would show
        layer.self_attn.q_norm.weight.uniform_(0.2, 2.0)
        layer.self_attn.k_norm.weight.uniform_(0.2, 2.0)
    seen = {}
    handle = layer.register_forward_pre_hook(
        lambda module, args, kwargs: seen.update(hidden=args[0], rotary=kwargs["position_embeddings"]),
        with_kwargs=True)
    batch = family("qwen3_vl").batch([(1,), (0, 2)])
    with torch.no_grad():
        output = model(**batch, output_attentions=True, use_cache=True)
        handle.remove()
        valid = batch["attention_mask"].bool()
        signals = decoder_signals(layer, seen["hidden"], seen["rotary"], valid, {"query_attention", "key_norms"},
                                  ADAPTERS["qwen3_vl"].query_key)
    if method == "fastv":  # left padding: the last token is every row's last valid token
        expected = output.attentions[layer_index][:, :, -1, :].float().mean(1)
        torch.testing.assert_close(signals["query_attention"], expected, atol=1e-6, rtol=1e-5)
    else:  # the cache holds the rotated keys (rotation keeps norms)
        keys = output.past_key_values.layers[layer_index].keys
        torch.testing.assert_close(signals["key_norms"][valid], keys.float().norm(dim=-1).mean(1)[valid])


@pytest.mark.parametrize("name", ["qwen3_5", "qwen3_5_moe"])
@pytest.mark.parametrize("method", ["fastv", "dart"])
def test_qwen3_5_refuses_pruning_inside_its_hybrid_language_model(name, method):
    model = _model(name)
    with pytest.raises(ValueError, match=rf"{method}.*{name}.*Gated DeltaNet"):
        vs.attach(model, method, 0.3, layer=3)
    assert not vs.is_attached(model)


@pytest.mark.parametrize("name", ["qwen3_vl", "qwen3_5"])
def test_a_decoding_loop_with_a_padded_mask_numbers_steps_as_the_unpruned_model(name):
    model = _model(name)
    vs.attach(model, "divprune", 0.3)
    batch = family(name).batch([(1,), (0, 2)])
    with torch.no_grad():
        expected = model.generate(**batch, max_new_tokens=4, do_sample=False, output_logits=True,
                                  return_dict_in_generate=True)
        out, mask = model(**batch, use_cache=True), batch["attention_mask"]
        logits = [out.logits[:, -1]]
        for _ in range(3):
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            out = model(input_ids=logits[-1].argmax(-1, keepdim=True), attention_mask=mask,
                        past_key_values=out.past_key_values, use_cache=True)
            logits.append(out.logits[:, -1])
    for step, (mine, theirs) in enumerate(zip(logits, expected.logits)):
        torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=1e-4, msg=f"step {step}")


# ---- Qwen3-VL videos: one block per frame, each after its own timestamp --------------------------

FRAME = (4, 6)  # patches per frame -> 6 tokens after the 2x2 merge


def _video_batch(config, samples, seed=0):
    """``samples[b] = (image or None, frames)``: text, optionally a 4x4-patch image, then a video of
    ``frames`` temporal patches laid out as the Qwen3-VL processor does it: per frame a ``<t seconds>``
    timestamp (three text tokens here), vision_start, its placeholders, vision_end; then text."""
    vision = config.vision_config
    dim = vision.in_channels * vision.temporal_patch_size * vision.patch_size ** 2
    generator = torch.Generator().manual_seed(seed)
    text = lambda n: TEXT_IDS[torch.randint(len(TEXT_IDS), (n,), generator=generator)].tolist()  # noqa: E731
    rows, images, image_grids, videos, video_grids = [], [], [], [], []
    for image, frames in samples:
        row = text(3)
        if image:
            image_grids.append([1, 4, 4])
            images.append(torch.randn(16, dim, generator=generator))
            row += [config.vision_start_token_id] + [config.image_token_id] * 4 + [config.vision_end_token_id]
        video_grids.append([frames, *FRAME])
        videos.append(torch.randn(frames * FRAME[0] * FRAME[1], dim, generator=generator))
        for _ in range(frames):
            row += text(3) + [config.vision_start_token_id] + [config.video_token_id] * 6 + [config.vision_end_token_id]
        rows.append(row + text(4))
    length = max(len(row) for row in rows)
    ids = torch.zeros(len(rows), length, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for index, row in enumerate(rows):
        ids[index, length - len(row):], mask[index, length - len(row):] = torch.tensor(row), 1
    types = (ids == config.image_token_id).long() + 2 * (ids == config.video_token_id).long()
    batch = dict(input_ids=ids, attention_mask=mask, mm_token_type_ids=types, pixel_values_videos=torch.cat(videos),
                 video_grid_thw=torch.tensor(video_grids))
    if images:
        batch.update(pixel_values=torch.cat(images), image_grid_thw=torch.tensor(image_grids))
    return batch


VIDEO_SAMPLES = [(True, 3), (False, 2)]


def test_a_video_samples_budget_spans_all_its_frames_and_pruning_equals_the_definition():
    model = _model("qwen3_vl")
    vs.attach(model, "visionselector", 0.3)
    batch = _video_batch(model.config, VIDEO_SAMPLES)
    with torch.no_grad():
        logits = model(**batch).logits[:, -1]
        kept = vs.last_selection(model)
        ids = model.generate(**batch, max_new_tokens=3, do_sample=False)[:, -3:]
        vs.detach(model)
        expected_logits, expected_ids = _reference_run(family("qwen3_vl"), model, batch, kept, 3)
    assert [len(k) for k in kept] == [math.floor(0.3 * (4 + 18)), math.floor(0.3 * 12)]
    torch.testing.assert_close(logits, expected_logits, atol=1e-5, rtol=1e-4)
    assert torch.equal(ids, expected_ids)


def test_uniform_and_pool_split_a_video_samples_budget_over_its_frames():
    model = _model("qwen3_vl")
    batch = _video_batch(model.config, VIDEO_SAMPLES)
    positions, _ = model.model.get_rope_index(batch["input_ids"], batch["mm_token_type_ids"],
                                              batch["image_grid_thw"], batch["video_grid_thw"],
                                              attention_mask=batch["attention_mask"])
    visual = (batch["input_ids"] == model.config.image_token_id) | (batch["input_ids"] == model.config.video_token_id)
    segments = ADAPTERS["qwen3_vl"].segments(None, batch["input_ids"], visual, positions, {})
    assert segments == [[(1, 2, 2)] + [(1, 2, 3)] * 3, [(1, 2, 3)] * 2]
    for method in ("uniform", "pool"):
        vs.attach(model, method, 0.5)
        with torch.no_grad():
            model(**batch)
        for kept, sizes in zip(vs.last_selection(model), ([4, 6, 6, 6], [6, 6])):
            per_frame = [int(((kept >= start) & (kept < start + size)).sum())
                         for start, size in zip([sum(sizes[:i]) for i in range(len(sizes))], sizes)]
            assert all(count >= 1 for count in per_frame), (method, per_frame)
            assert len(set(per_frame[-2:])) == 1, (method, per_frame)  # equal frames, equal shares
            if method == "uniform":
                assert sum(per_frame) == math.floor(0.5 * sum(sizes)), per_frame
        vs.detach(model)
