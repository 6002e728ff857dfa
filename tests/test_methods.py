"""Training-free methods: exact selections on known inputs, and behaviour inside the model."""

import math

import pytest
import torch

import visionselector as vs
from visionselector.methods import VisualTokens
from visionselector.methods.divprune import max_min_diverse
from visionselector.methods.pool import PoolMethod
from visionselector.methods.uniform import UniformMethod
from visionselector.ops.grid import even_grid, pooling_grid, split_budget
from visionselector.presets import SampleSpec, synthetic_batch

from conftest import make_model, single_sample

PRE_LLM_METHODS = ["random", "uniform", "pool", "divprune", "visionzip"]


def test_divprune_greedy_order_on_points_in_the_plane():
    angles = torch.tensor([0.0, 10.0, 90.0, 180.0, 185.0]) * math.pi / 180
    points = torch.stack([angles.cos(), angles.sin()], dim=1)
    # 90 degrees has the farthest nearest neighbour; then 185 is farthest from it; then 0
    # (distance 1 from 90, nearly 2 from 185) beats 10 (0.83 from 90) and 180 (duplicate of 185).
    assert max_min_diverse(points, 3).tolist() == [2, 4, 0]
    assert max_min_diverse(points, 5).tolist() == [0, 1, 2, 3, 4]
    assert max_min_diverse(points * 7.0, 3).tolist() == [2, 4, 0]  # cosine: scale does not matter


def test_divprune_method_keeps_budget_per_padded_row():
    method = vs.methods.get_method_class("divprune")(2)
    angles = torch.tensor([[0.0, 10.0, 90.0, 180.0, 185.0], [0.0, 1.0, 2.0, 0.0, 0.0]]) * math.pi / 180
    features = torch.stack([angles.cos(), angles.sin()], dim=-1)
    valid = torch.tensor([[True] * 5, [True, True, True, False, False]])
    keep = method.select(VisualTokens(features, valid), torch.tensor([3, 2])).keep
    assert keep.tolist() == [[True, False, True, False, True], [True, False, True, False, False]]


@pytest.mark.parametrize(
    "height, width, count, expected",
    [
        (4, 4, 4, [5, 7, 13, 15]),
        (6, 6, 9, [7, 9, 11, 19, 21, 23, 31, 33, 35]),
        (2, 8, 4, [9, 11, 13, 15]),  # a 1 x 4 grid on a wide frame: cell centres at row 1, columns 1, 3, 5, 7
        (4, 4, 16, list(range(16))),
        (3, 3, 1, [4]),  # the centre
    ],
)
def test_uniform_grid_on_known_frames(height, width, count, expected):
    assert even_grid(height, width, count).tolist() == expected


def test_uniform_grid_always_returns_exactly_count_distinct_tokens():
    for height in range(1, 9):
        for width in range(1, 9):
            for count in range(0, height * width + 1):
                points = even_grid(height, width, count)
                assert len(points) == count == len(set(points.tolist()))
                assert count == 0 or (points.min() >= 0 and points.max() < height * width)


def test_split_budget_is_exact_and_proportional():
    assert split_budget(10, [16, 4, 8]) == [6, 1, 3]
    assert split_budget(3, [5, 5, 5, 5]) == [1, 1, 1, 0]
    assert split_budget(40, [16, 4]) == [16, 4]
    for budget in range(0, 30):
        assert sum(split_budget(budget, [16, 4, 8])) == min(budget, 28)


def test_uniform_method_splits_the_budget_over_frames():
    tokens = VisualTokens(torch.zeros(1, 20, 2), torch.ones(1, 20, dtype=torch.bool), segments=[[(1, 4, 4), (1, 2, 2)]])
    keep = UniformMethod(2).select(tokens, torch.tensor([5])).keep
    # 16/20 of 5 is 4 tokens for the 4x4 frame, 1 for the 2x2 frame (its centre rounds to index 3)
    assert torch.nonzero(keep[0]).flatten().tolist() == [5, 7, 13, 15, 16 + 3]


def test_pool_merges_cells_into_their_centre_token():
    features = torch.arange(16, dtype=torch.float32).view(1, 16, 1).repeat(1, 1, 2)
    tokens = VisualTokens(features, torch.ones(1, 16, dtype=torch.bool), segments=[[(1, 4, 4)]])
    selection = PoolMethod(2).select(tokens, torch.tensor([4]))
    kept = torch.nonzero(selection.keep[0]).flatten().tolist()
    assert kept == [0, 2, 8, 10]
    assert selection.features[0, kept, 0].tolist() == [2.5, 4.5, 10.5, 12.5]
    assert pooling_grid(4, 12, 12) == (2, 6) and pooling_grid(8, 8, 15) == (4, 4) and pooling_grid(8, 8, 3) == (2, 2)


@pytest.mark.parametrize("method", PRE_LLM_METHODS)
def test_retention_one_is_an_exact_no_op(method):
    model = make_model()
    batch = synthetic_batch(model.config, [SampleSpec(images=[(8, 8)]), SampleSpec(images=[(4, 8)], prefix=6)])
    with torch.no_grad():
        expected_logits = model(**batch).logits
        expected_ids = model.generate(**batch, max_new_tokens=4, do_sample=False)
        vs.attach(model, method=method, retention=1.0)
        assert torch.equal(model(**batch).logits, expected_logits)
        assert torch.equal(model.generate(**batch, max_new_tokens=4, do_sample=False), expected_ids)


SAMPLES = [
    SampleSpec(images=[(8, 8)], prefix=2, suffix=3),
    SampleSpec(images=[(4, 12)], prefix=7, suffix=1),
    SampleSpec(images=[(4, 4)], videos=[(2, 4, 8)], prefix=3, suffix=5),
]


@pytest.mark.parametrize("method", PRE_LLM_METHODS)
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_batch_equals_single_samples(method, attn):
    model = make_model(attn)
    vs.attach(model, method=method, retention=0.3)
    batch = synthetic_batch(model.config, SAMPLES, padding_side="right", seed=7)
    with torch.no_grad():
        batch_logits = model(**batch).logits
        valid = model._visionselector_state.last.token_valid
        batch_selection = [s.tolist() for s in vs.last_selection(model)]
        for row in range(len(SAMPLES)):
            single = single_sample(batch, row, SAMPLES)
            single_logits = model(**single).logits
            assert vs.last_selection(model)[0].tolist() == batch_selection[row]
            torch.testing.assert_close(batch_logits[row, valid[row]], single_logits[0], atol=2e-5, rtol=1e-4)
    budgets = [max(1, math.floor(0.3 * n)) for n in (16, 12, 4 + 16)]
    # pool's grids happen to hit these budgets exactly: 2x2 of 4x4, 1x3 of 2x6, and 1x1, 1x3, 1x2 frames.
    assert [len(s) for s in batch_selection] == budgets


def test_layout_is_read_off_positions_in_forward_and_generate():
    model = make_model()
    vs.attach(model, method="uniform", retention=0.25)
    batch = synthetic_batch(model.config, [SampleSpec(images=[(8, 8)]),
                                           SampleSpec(images=[(4, 8), (8, 4)], videos=[(4, 4, 4)])])
    from visionselector.adapters.positions import MRoPEPositions

    seen = []
    original = MRoPEPositions.segments

    def spy(*args):
        seen.append(original(*args))
        return seen[-1]

    MRoPEPositions.segments = spy
    try:
        with torch.no_grad():
            model(**batch)
            model.generate(**batch, max_new_tokens=2, do_sample=False)  # encodes images before prefill
    finally:
        MRoPEPositions.segments = original
    expected = [[(1, 4, 4)], [(1, 2, 4), (1, 4, 2), (4, 2, 2)]]
    assert seen == [expected, expected]


def test_pool_sends_the_cell_means_to_the_language_model():
    model = make_model()
    batch = synthetic_batch(model.config, [SampleSpec(images=[(8, 8)])])
    with torch.no_grad():
        features = model.model.get_image_features(batch["pixel_values"], batch["image_grid_thw"]).pooler_output[0]
    vs.attach(model, method="pool", retention=0.25)
    captured = {}
    layer = model.model.language_model.layers[0]
    handle = layer.register_forward_pre_hook(lambda module, args, kwargs: captured.update(h=args[0] if args else kwargs["hidden_states"]), with_kwargs=True)
    try:
        with torch.no_grad():
            model(**batch)
    finally:
        handle.remove()
    kept = vs.last_selection(model)[0].tolist()
    assert kept == [0, 2, 8, 10]  # the 4x4 token grid pooled 2x2
    grid = features.view(4, 4, -1)
    expected = torch.stack([grid[r:r + 2, c:c + 2].mean((0, 1)) for r in (0, 2) for c in (0, 2)])
    visual_slots = (batch["input_ids"][0] == model.config.image_token_id).nonzero().flatten()
    first = visual_slots[0].item()
    torch.testing.assert_close(captured["h"][0, first:first + 4], expected)


def test_visionzip_keeps_dominant_tokens_and_merges_the_rest_into_contextual_ones():
    from visionselector.methods.visionzip import VisionZipMethod

    attention = torch.tensor([[0.9, 0.1, 0.8, 0.05, 0.2, 0.3, 0.01, 0.02]])
    features = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.1, 1.0], [1.0, 0.1], [0.0, 2.0], [2.0, 0.1], [0.2, 1.0]]])
    tokens = VisualTokens(features, torch.ones(1, 8, dtype=torch.bool), encoder_attention=attention)
    selection = VisionZipMethod(2, contextual_ratio=0.5).select(tokens, torch.tensor([4]))
    # 2 dominant (tokens 0 and 2), 2 contextual targets evenly spaced among the other six
    # [1, 3, 4, 5, 6, 7] -> positions 1.5 and 4.5 -> tokens 3 and 6.
    assert torch.nonzero(selection.keep[0]).flatten().tolist() == [0, 2, 3, 6]
    # Token 3 gathers the upward-pointing 1, 5, 7; token 6 gathers the rightward 4.
    expected_3 = (features[0, 3] + features[0, 1] + features[0, 5] + features[0, 7]) / 4
    expected_6 = (features[0, 6] + features[0, 4]) / 2
    torch.testing.assert_close(selection.features[0, 3], expected_3)
    torch.testing.assert_close(selection.features[0, 6], expected_6)
    torch.testing.assert_close(selection.features[0, 0], features[0, 0])


def test_encoder_attention_probe_matches_full_attention_matrices():
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb_vision
    from transformers.vision_utils import get_vision_window_index

    model = make_model()
    vs.attach(model, method="visionzip", retention=0.25)
    batch = synthetic_batch(model.config, [SampleSpec(images=[(8, 8), (4, 8)])])
    visual = model.model.visual
    block = visual.blocks[visual.fullatt_block_indexes[-1]].attn
    seen = {}
    handle = block.register_forward_hook(
        lambda module, args, kwargs, output: seen.update(hidden=args[0], **kwargs), with_kwargs=True)
    try:
        with torch.no_grad():
            model.model.get_image_features(batch["pixel_values"], batch["image_grid_thw"])
    finally:
        handle.remove()
    _, recorded = model._visionselector_state.encoder_attention["image"][-1]

    with torch.no_grad():
        hidden = seen["hidden"]
        q, k, _ = block.qkv(hidden).reshape(hidden.shape[0], 3, block.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        q, k = apply_rotary_pos_emb_vision(q, k, *seen["position_embeddings"])
        received = []
        bounds = seen["cu_seqlens"].tolist()
        for start, end in zip(bounds[:-1], bounds[1:]):
            weights = torch.softmax(
                torch.einsum("qhd,khd->hqk", q[start:end].float(), k[start:end].float()) * block.scaling, -1)
            received.append(weights.mean((0, 1)))
        received = torch.cat(received)
    window_index, _ = get_vision_window_index(batch["image_grid_thw"], spatial_merge_size=2,
                                              window_size=visual.window_size, patch_size=visual.patch_size)
    expected = received.view(-1, 4).mean(1)[torch.argsort(window_index)]
    torch.testing.assert_close(recorded, expected, atol=1e-6, rtol=1e-5)
    assert recorded.shape == (16 + 8,)


ALL_TRAINING_FREE = ["random", "uniform", "pool", "divprune", "visionzip", "fastv", "dart", "cdpruner"]


@pytest.mark.parametrize("method", ALL_TRAINING_FREE)
def test_sdpa_and_eager_agree(method):
    results = []
    for attn in ("sdpa", "eager"):
        model = make_model(attn, text_layers=4)
        vs.attach(model, method=method, retention=0.3)
        batch = synthetic_batch(model.config, SAMPLES, padding_side="left", seed=4)
        with torch.no_grad():
            logits = model(**batch).logits
        valid = model._visionselector_state.last.token_valid
        results.append((logits[valid], [s.tolist() for s in vs.last_selection(model)]))
    assert results[0][1] == results[1][1]
    torch.testing.assert_close(results[0][0], results[1][0], atol=2e-5, rtol=1e-4)


def test_a_method_needing_what_a_family_cannot_provide_fails_clearly():
    from visionselector.adapters.base import AttachedState, select_tokens
    from visionselector.methods.visionzip import VisionZipMethod

    state = AttachedState(adapter=None, method=VisionZipMethod(4), method_name="visionzip", retention=0.5)
    embeds = torch.randn(1, 6, 4)
    visual = torch.tensor([[False, True, True, True, True, False]])
    with pytest.raises(ValueError, match="needs encoder attention, which this model family does not provide"):
        select_tokens(state, embeds, visual, torch.ones(1, 6, dtype=torch.bool), pad_left=True, extras={})


def test_list_methods_names_every_method_once():
    assert sorted(vs.list_methods()) == sorted(ALL_TRAINING_FREE + ["visionselector", "visionselector_q"])
