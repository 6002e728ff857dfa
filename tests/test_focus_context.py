"""Focus, then context: the learned methods' ``focus`` option (visionselector.ops.context)."""

import math

import pytest
import torch

import visionselector as vs
from visionselector.methods.base import VisualTokens
from visionselector.methods.visionselector import keep_focus_then_context
from visionselector.ops.context import fill_even_grid, focus_count
from visionselector.ops.diversity import mmr_keep
from visionselector.ops.grid import even_grid
from visionselector.presets import SampleSpec, synthetic_batch

from conftest import make_model, randomise_scorer


def fill_reference(kept: set[int], frames: list[tuple[int, int]], missing: int) -> set[int]:
    """The definition, one sample at a time with Python sets: the missing tokens split over the
    frames by their free tokens (largest remainder, earlier frames first on ties), then per
    frame the free points of the coarsest even grid with enough of them, thinned evenly."""
    free = []
    offset = 0
    for height, width in frames:
        free.append(sum(1 for i in range(height * width) if offset + i not in kept))
        offset += height * width
    total = sum(free)
    exact = [missing * f / total for f in free]
    shares = [math.floor(e) for e in exact]
    for i in sorted(range(len(free)), key=lambda i: (-(exact[i] - math.floor(exact[i])), i))[:missing - sum(shares)]:
        shares[i] += 1
    chosen = set(kept)
    offset = 0
    for (height, width), share in zip(frames, shares):
        if share:
            for size in range(share, height * width + 1):
                points = [int(p) for p in even_grid(height, width, size) if offset + int(p) not in kept]
                if len(points) >= share:
                    break
            chosen |= {offset + points[math.floor((i + 0.5) * len(points) / share)] for i in range(share)}
        offset += height * width
    return chosen


def test_focus_count_is_a_share_of_the_image_capped_by_the_budget():
    valid = torch.arange(300).unsqueeze(0) < torch.tensor([[256], [100], [10]])
    budget = torch.tensor([51, 51, 3])
    assert focus_count(budget, valid, 0.05).tolist() == [13, 5, 1]  # round(12.8), round(5.0), max(1, round(0.5))
    assert focus_count(budget, valid, 0.5).tolist() == [51, 50, 3]
    assert focus_count(budget, valid, 1.0) is budget


def test_the_grid_fills_the_centres_of_an_even_grid():
    valid = torch.ones(1, 16, dtype=torch.bool)
    empty = torch.zeros(1, 16, dtype=torch.bool)
    # 4 of a 4 x 4 frame: the centres of its 2 x 2 cells.
    assert torch.nonzero(fill_even_grid(empty, torch.tensor([4]), valid, [[(1, 4, 4)]])[0]).flatten().tolist() == \
        [5, 7, 13, 15]
    kept = empty.clone()
    kept[0, 5] = True  # one centre is taken: the 5-point grid has enough free points
    filled = fill_even_grid(kept, torch.tensor([5]), valid, [[(1, 4, 4)]])
    assert torch.nonzero(filled[0]).flatten().tolist() == [4, 5, 6, 14, 15]
    assert fill_even_grid(kept, torch.tensor([1]), valid, [[(1, 4, 4)]]) is kept  # nothing is missing


@pytest.mark.parametrize("seed", range(6))
def test_the_grid_matches_the_definition_on_padded_batches(seed):
    generator = torch.Generator().manual_seed(seed)
    layouts = [[(1, 6, 5)], [(2, 3, 4), (1, 2, 2)], [(1, 1, 7)]]
    counts = [sum(f * h * w for f, h, w in blocks) for blocks in layouts]
    width = max(counts) + 3
    valid = torch.arange(width).unsqueeze(0) < torch.tensor(counts).unsqueeze(1)
    keep = (torch.rand(3, width, generator=generator) < 0.2) & valid
    budget = torch.tensor([int(keep[row].sum()) + int(torch.randint(0, counts[row] - int(keep[row].sum()) + 1, (1,),
                                                                    generator=generator)) for row in range(3)])
    filled = fill_even_grid(keep, budget, valid, layouts)
    for row, blocks in enumerate(layouts):
        frames = [(h, w) for f, h, w in blocks for _ in range(f)]
        kept = set(torch.nonzero(keep[row]).flatten().tolist())
        expected = fill_reference(kept, frames, int(budget[row]) - len(kept))
        assert set(torch.nonzero(filled[row]).flatten().tolist()) == expected
        assert int(filled[row].sum()) == int(budget[row]) and not filled[row, counts[row]:].any()


def test_the_grid_refuses_what_it_cannot_place():
    valid = torch.ones(1, 16, dtype=torch.bool)
    empty = torch.zeros(1, 16, dtype=torch.bool)
    with pytest.raises(ValueError, match="token grid"):
        fill_even_grid(empty, torch.tensor([4]), valid, None)
    with pytest.raises(ValueError, match="hold 12 tokens, but it has 16"):
        fill_even_grid(empty, torch.tensor([4]), valid, [[(1, 3, 4)]])


def test_focus_one_is_exactly_mmr_and_focus_below_one_keeps_the_budget():
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(2, 20, 8, generator=generator)
    scores = torch.randn(2, 20, generator=generator)
    valid = torch.arange(20).unsqueeze(0) < torch.tensor([[20], [12]])
    tokens = VisualTokens(features, valid, segments=[[(1, 4, 5)], [(1, 3, 4)]])
    budget = torch.tensor([8, 5])
    for diversity in (0.0, 0.5):
        assert torch.equal(keep_focus_then_context(scores, tokens, budget, diversity, 1.0),
                           mmr_keep(scores, features, budget, valid, diversity))
        keep = keep_focus_then_context(scores, tokens, budget, diversity, 0.25)
        first = mmr_keep(scores, features, torch.tensor([5, 3]), valid, diversity)  # round(0.25 * 20), round(3.0)
        assert keep.sum(1).tolist() == [8, 5] and not (first & ~keep).any() and not (keep & ~valid).any()


@pytest.mark.parametrize("method", ["visionselector", "visionselector_q"])
def test_focus_round_trips_and_is_checked(method, tmp_path):
    model = make_model()
    vs.attach(model, method=method, retention=0.4, diversity=0.5, focus=0.1)
    randomise_scorer(model, seed=5)
    assert "segments" in vs.get_method(model).needs
    batch = synthetic_batch(model.config, [SampleSpec(images=[(8, 8)], suffix=6),
                                           SampleSpec(images=[(4, 8)], suffix=3)])
    with torch.no_grad():
        expected = model(**batch).logits
    selection = [k.tolist() for k in vs.last_selection(model)]
    vs.save_selector(model, tmp_path / "s")
    fresh = make_model()
    vs.attach(fresh, method=method, retention=0.4, selector=tmp_path / "s")
    assert vs.get_method(fresh).focus == 0.1 and vs.get_method(fresh).config_dict()["focus"] == 0.1
    with torch.no_grad():
        torch.testing.assert_close(fresh(**batch).logits, expected)
    assert [k.tolist() for k in vs.last_selection(fresh)] == selection
    vs.detach(fresh)
    vs.attach(fresh, method=method, retention=0.4, selector=tmp_path / "s", focus=1.0)  # an option overrides the file
    assert "focus" not in vs.get_method(fresh).config_dict()
    assert "segments" not in vs.get_method(fresh).needs
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match="focus"):
            vs.attach(make_model(), method=method, retention=0.4, focus=bad)


def max_min_reference(features: torch.Tensor, kept: list[int], valid: int, budget: int) -> set[int]:
    """Greedy max-min diversity continued from ``kept``, one sample with Python loops: each step the
    free token whose largest cosine similarity to a kept token is smallest (the lower index on ties)."""
    chosen = list(kept)
    while len(chosen) < min(budget, valid):
        def closest(i):
            return max(float(torch.nn.functional.cosine_similarity(features[i], features[j], dim=0)) for j in chosen)
        chosen.append(min((i for i in range(valid) if i not in chosen), key=lambda i: (round(closest(i), 5), i)))
    return set(chosen)


def test_the_diverse_context_continues_max_min_diversity_from_the_focus_tokens():
    from visionselector.ops.context import fill_max_min

    generator = torch.Generator().manual_seed(3)
    features = torch.randn(3, 20, 5, generator=generator)
    valid = torch.arange(20).unsqueeze(0) < torch.tensor([[20], [14], [9]])
    keep = torch.zeros(3, 20, dtype=torch.bool)
    keep[0, [2, 7]] = True
    keep[1, 4] = True
    keep[2, [0, 1, 2]] = True
    budget = torch.tensor([8, 6, 12])  # the last row asks for more than it has
    filled = fill_max_min(keep, budget, features, valid)
    for row in range(3):
        kept = torch.nonzero(keep[row]).flatten().tolist()
        expected = max_min_reference(features[row], kept, int(valid[row].sum()), int(budget[row]))
        assert set(torch.nonzero(filled[row]).flatten().tolist()) == expected
    assert fill_max_min(filled, budget, features, valid) is filled  # nothing missing: unchanged


def test_the_diverse_context_needs_no_token_grid_and_bad_contexts_are_named():
    model = make_model()
    vs.attach(model, method="visionselector", retention=0.3, diversity=0.5, focus=0.1, context="diverse")
    assert "segments" not in vs.get_method(model).needs
    assert vs.get_method(model).config_dict()["context"] == "diverse"
    vs.detach(model)
    with pytest.raises(ValueError, match="'grid', 'diverse'.*'even'"):
        vs.attach(model, method="visionselector_q", retention=0.3, focus=0.1, context="even")
