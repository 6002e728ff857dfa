"""CDPruner: the greedy DPP MAP against its definition, and the method on inputs whose answer
can be worked out by hand."""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

import visionselector as vs
from visionselector.methods import VisualTokens, get_method_class
from visionselector.methods import cdpruner as cdpruner_module
from visionselector.methods.cdpruner import (
    CDPrunerMethod,
    cdpruner_picks,
    conditional_kernel_factor,
    greedy_dpp_map,
    prompt_relevance,
)


def _random_psd(size, generator, rank=None):
    """A random symmetric positive (semi-)definite ``[size, size]`` float64 kernel of the given rank."""
    factor = torch.randn(size, rank or size + 2, generator=generator, dtype=torch.float64)
    factor = factor * torch.rand(size, 1, generator=generator, dtype=torch.float64).add(0.2)  # uneven qualities
    return factor @ factor.T


def _det(kernel, items):
    if not items:
        return 1.0
    index = torch.tensor(items)
    return float(torch.linalg.det(kernel[index][:, index]))


def _brute_force_greedy(kernel, count):
    """From the definition: each step adds the item that makes det of the enlarged submatrix
    largest; ties to the lower index."""
    chosen = []
    for _ in range(count):
        best, best_det = None, -math.inf
        for item in range(kernel.shape[0]):
            if item in chosen:
                continue
            value = _det(kernel, chosen + [item])
            if value > best_det:
                best, best_det = item, value
        chosen.append(best)
    return chosen


def _exact_map(kernel, count):
    """The size-``count`` subset of largest det (ties to the lexicographically first)."""
    return max(itertools.combinations(range(kernel.shape[0]), count), key=lambda items: (_det(kernel, list(items)),
                                                                                           [-i for i in items]))


# ---------------------------------------------------------------- greedy MAP


def test_greedy_map_equals_the_greedy_of_the_definition_on_random_kernels():
    generator = torch.Generator().manual_seed(0)
    cases = 0
    for size in (2, 3, 5, 7, 9):
        for count in sorted({1, 2, size // 2, size - 1} - {size}):
            for trial in range(10):
                # Full-rank kernels, and (every other trial) nearly low-rank ones.
                kernel = _random_psd(size, generator, rank=None if trial % 2 else 2)
                kernel = kernel + (0 if trial % 2 else 0.01) * torch.eye(size, dtype=torch.float64)
                assert greedy_dpp_map(kernel, count).tolist() == _brute_force_greedy(kernel, count)
                cases += 1
    assert cases == 140


def test_greedy_map_is_the_exact_map_where_greedy_must_be():
    generator = torch.Generator().manual_seed(1)
    for size in (3, 5, 8):
        kernel = _random_psd(size, generator)
        # One item: the largest diagonal entry is the largest 1x1 determinant.
        assert greedy_dpp_map(kernel, 1).tolist() == [int(torch.argmax(kernel.diagonal()))]
        assert greedy_dpp_map(kernel, 1).tolist() == list(_exact_map(kernel, 1))
        # Diagonal kernel: det is the product of the chosen entries, so the k largest are the MAP.
        diagonal = torch.diag(torch.rand(size, generator=generator, dtype=torch.float64) + 0.1)
        for count in range(1, size):
            picks = greedy_dpp_map(diagonal, count)
            assert picks.tolist() == torch.argsort(diagonal.diagonal(), descending=True)[:count].tolist()
            assert sorted(picks.tolist()) == list(_exact_map(diagonal, count))


def test_how_often_greedy_finds_the_exact_map(record_property):
    """Information only: greedy MAP is not always the exact MAP, so nothing is asserted about how often."""
    generator = torch.Generator().manual_seed(2)
    equal = total = 0
    for size in (5, 6, 7):
        for count in (2, 3, 4):
            for _ in range(5):
                kernel = _random_psd(size, generator, rank=3)  # low rank: harder cases
                kernel = kernel + 0.05 * torch.eye(size, dtype=torch.float64)
                equal += sorted(greedy_dpp_map(kernel, count).tolist()) == list(_exact_map(kernel, count))
                total += 1
    record_property("greedy_equals_exact_map", f"{equal}/{total}")
    print(f"greedy DPP MAP equals the exact MAP on {equal}/{total} random kernels")


def test_greedy_map_budget_edges_and_dtypes():
    kernel = _random_psd(6, torch.Generator().manual_seed(3))
    assert torch.equal(greedy_dpp_map(kernel, 6), torch.arange(6))
    assert torch.equal(greedy_dpp_map(kernel, 10), torch.arange(6))
    assert greedy_dpp_map(kernel, 0).tolist() == []
    assert greedy_dpp_map(torch.zeros(0, 0), 3).tolist() == []
    assert greedy_dpp_map(kernel.float(), 3).tolist() == greedy_dpp_map(kernel, 3).tolist()
    with pytest.raises(ValueError, match="square"):
        greedy_dpp_map(torch.ones(3, 4), 2)


def test_greedy_map_ties_go_to_the_lower_index():
    assert greedy_dpp_map(torch.eye(5, dtype=torch.float64), 3).tolist() == [0, 1, 2]
    kernel = torch.diag(torch.tensor([1.0, 2.0, 2.0, 1.0]))
    assert greedy_dpp_map(kernel, 3).tolist() == [1, 2, 0]


def test_a_kernel_of_lower_rank_than_the_budget_still_fills_it():
    # Six tokens in a plane: after two picks every other token lies in their span, so no pick
    # raises the determinant; a new round picks the largest of the rest first.
    angles = torch.tensor([0.0, 30.0, 60.0, 90.0, 120.0, 150.0], dtype=torch.float64) * math.pi / 180
    lengths = torch.tensor([1.0, 1.1, 1.2, 1.3, 1.4, 1.5], dtype=torch.float64)
    points = torch.stack([angles.cos(), angles.sin()], 1) * lengths[:, None]
    kernel = points @ points.T
    picks = greedy_dpp_map(kernel, 5).tolist()
    assert picks[:2] == _brute_force_greedy(kernel, 2)
    # The third pick restarts: the largest remaining diagonal entry.
    rest = [i for i in range(6) if i not in picks[:2]]
    assert picks[2] == max(rest, key=lambda i: float(kernel[i, i]))
    # By hand: 150 degrees (longest), then 60 (farthest from its line); a new round from 120
    # (longest left), then 30 (perpendicular to it); a third round takes 90 (longer than 0).
    assert picks == [5, 2, 4, 1, 3]
    # Zero vectors are never preferred, but are kept when the budget reaches them.
    with_zero = torch.zeros(3, 3, dtype=torch.float64)
    with_zero[1, 1] = 1.0
    assert greedy_dpp_map(with_zero, 2).tolist() == [1, 0]


# ---------------------------------------------------------------- the kernel


def test_relevance_is_the_min_max_normalised_mean_cosine_to_the_prompt():
    generator = torch.Generator().manual_seed(4)
    features = torch.randn(7, 5, generator=generator)
    prompt = torch.randn(3, 5, generator=generator) * torch.tensor([[1.0], [4.0], [0.5]])
    unit = F.normalize(features, dim=-1)
    cosines = torch.stack([F.cosine_similarity(features, p[None], dim=-1) for p in prompt], 1)  # [7, 3]
    raw = cosines.mean(1)
    expected = (raw - raw.min() + 1e-6) / (raw.max() - raw.min() + 1e-6)
    torch.testing.assert_close(prompt_relevance(unit, prompt), expected)
    assert int(torch.argmax(prompt_relevance(unit, prompt))) == int(torch.argmax(raw))
    assert float(prompt_relevance(unit, prompt).max()) == pytest.approx(1.0)
    # No prompt, or equal relevances: uniform.
    assert torch.equal(prompt_relevance(unit, prompt[:0]), torch.ones(7))
    same = torch.ones(4, 5)
    torch.testing.assert_close(prompt_relevance(F.normalize(same, dim=-1), prompt), torch.ones(4))


@pytest.mark.parametrize("theta", [None, 0.0, 0.5, 0.9])
def test_kernel_factor_gives_the_conditional_kernel(theta):
    generator = torch.Generator().manual_seed(5)
    features = torch.randn(6, 4, generator=generator, dtype=torch.float64)
    prompt = torch.randn(2, 4, generator=generator, dtype=torch.float64)
    factor = conditional_kernel_factor(features, prompt, theta)
    relevance = prompt_relevance(F.normalize(features, dim=-1), prompt)
    similarity = F.cosine_similarity(features[:, None], features[None], dim=-1)
    quality = relevance if theta is None else torch.exp(theta / (2 * (1 - theta)) * relevance)
    expected = quality[:, None] * similarity * quality[None]
    kernel = factor @ factor.T
    # Equal up to one constant factor (the theta form is scaled to avoid overflow).
    scale = expected[0, 0] / kernel[0, 0]
    torch.testing.assert_close(kernel * scale, expected)
    if theta is None:
        torch.testing.assert_close(scale, torch.tensor(1.0, dtype=torch.float64))


def test_a_theta_near_one_does_not_overflow():
    generator = torch.Generator().manual_seed(6)
    features, prompt = torch.randn(20, 8, generator=generator), torch.randn(3, 8, generator=generator)
    factor = conditional_kernel_factor(features, prompt, 0.999)
    assert torch.isfinite(factor).all()
    picks = cdpruner_picks(features, prompt, 5, 0.999)
    relevance = prompt_relevance(F.normalize(features, dim=-1), prompt)
    assert picks[0] == torch.argmax(relevance)


# ---------------------------------------------------------------- the method on known inputs


def _tokens(features, prompt=None, valid=None, prompt_valid=None):
    """VisualTokens for one or more rows: ``features`` ``[B, N, D]`` and ``prompt`` ``[B, T, D]``."""
    if valid is None:
        valid = torch.ones(features.shape[:2], dtype=torch.bool)
    if prompt is not None and prompt_valid is None:
        prompt_valid = torch.ones(prompt.shape[:2], dtype=torch.bool)
    return VisualTokens(features, valid, prompt=prompt, prompt_valid=prompt_valid)


def _kept(method, tokens, budget):
    keep = method.select(tokens, torch.as_tensor(budget, dtype=torch.long).reshape(-1)).keep
    return [torch.nonzero(row).flatten().tolist() for row in keep]


@pytest.mark.parametrize("theta", [None, 0.5])
def test_the_most_relevant_token_first_and_a_duplicate_never_beside_its_twin(theta):
    e = torch.eye(4)
    # Tokens: e0, a duplicate of e0 (twice as long: cosine ignores length), e1, e2, e0 + e1.
    features = torch.stack([e[0], 2 * e[0], e[1], e[2], e[0] + e[1]])
    prompt = torch.stack([e[1], e[1] + 0.1 * e[3]])  # about e1
    # Relevance: e1 first (cos ~1), then e0 + e1 (~0.7); e0, its twin and e2 tie at 0.
    picks = cdpruner_picks(features, prompt, 4, theta).tolist()
    assert picks[0] == 2
    assert not {0, 1} <= set(picks)
    assert sorted(picks) == [0, 2, 3, 4]  # e0 and e2 are orthogonal to e1; the twin adds nothing
    method = CDPrunerMethod(4, theta=theta)
    assert _kept(method, _tokens(features[None], prompt[None]), 4) == [[0, 2, 3, 4]]
    assert _kept(method, _tokens(features[None], prompt[None]), 1) == [[2]]


def test_orthogonal_tokens_are_kept_in_order_of_relevance():
    # With orthonormal tokens S = I, so det L_Y is the product of the chosen qualities: the k
    # most relevant tokens are the MAP, for any theta.
    generator = torch.Generator().manual_seed(7)
    basis, _ = torch.linalg.qr(torch.randn(16, 16, generator=generator))
    features = basis[:10] * torch.rand(10, 1, generator=generator).add(0.5)
    prompt = torch.randn(5, 16, generator=generator)
    relevance = prompt_relevance(F.normalize(features, dim=-1), prompt)
    order = torch.argsort(relevance, descending=True)
    for theta in (None, 0.2, 0.8):
        assert cdpruner_picks(features, prompt, 6, theta).tolist() == order[:6].tolist()


def test_without_a_prompt_the_selection_is_pure_similarity_diversity():
    generator = torch.Generator().manual_seed(8)
    features = torch.randn(1, 12, 6, generator=generator)
    double = features[0].double()
    similarity = F.cosine_similarity(double[:, None], double[None], dim=-1)
    expected = sorted(greedy_dpp_map(similarity, 5).tolist())
    no_prompt = _tokens(features, torch.randn(1, 3, 6), prompt_valid=torch.zeros(1, 3, dtype=torch.bool))
    for theta in (None, 0.0, 0.7):
        method = CDPrunerMethod(6, theta=theta)
        assert _kept(method, no_prompt, 5) == [expected]
        assert _kept(method, _tokens(features), 5) == [expected]  # prompt absent altogether
    # theta = 0 ignores the prompt even when there is one.
    assert _kept(CDPrunerMethod(6, theta=0.0), _tokens(features, torch.randn(1, 3, 6, generator=generator)), 5) \
        == [expected]


def test_the_method_equals_greedy_map_of_the_kernel_written_from_its_definition():
    generator = torch.Generator().manual_seed(9)
    features = torch.randn(30, 16, generator=generator)
    prompt = torch.randn(7, 16, generator=generator)
    cosine = F.cosine_similarity(features[:, None].double(), features[None].double(), dim=-1)
    raw = F.cosine_similarity(features[:, None].double(), prompt[None].double(), dim=-1).mean(1)
    relevance = (raw - raw.min() + 1e-6) / (raw.max() - raw.min() + 1e-6)
    for theta in (None, 0.5):
        quality = relevance if theta is None else torch.exp(theta / (2 * (1 - theta)) * relevance)
        kernel = quality[:, None] * cosine * quality[None]
        assert cdpruner_picks(features, prompt, 10, theta).tolist() == greedy_dpp_map(kernel, 10).tolist()


def test_the_dense_kernel_and_the_row_by_row_kernel_pick_alike(monkeypatch):
    generator = torch.Generator().manual_seed(10)
    features, prompt = torch.randn(40, 12, generator=generator), torch.randn(4, 12, generator=generator)
    dense = cdpruner_picks(features, prompt, 15, None)
    monkeypatch.setattr(cdpruner_module, "DENSE_KERNEL_TOKENS", 8)
    assert torch.equal(cdpruner_picks(features, prompt, 15, None), dense)


def test_a_padded_batch_equals_each_sample_alone():
    generator = torch.Generator().manual_seed(11)
    counts, prompt_counts, budgets = [9, 4, 12, 0], [3, 0, 5, 2], [3, 4, 5, 0]
    width, prompt_width, dim = max(counts), max(prompt_counts), 8
    # Padding slots hold large garbage: it must not reach any row's selection.
    features = torch.randn(4, width, dim, generator=generator) * 100
    prompt = torch.randn(4, prompt_width, dim, generator=generator) * 100
    valid = torch.zeros(4, width, dtype=torch.bool)
    prompt_valid = torch.zeros(4, prompt_width, dtype=torch.bool)
    for row, (n, t) in enumerate(zip(counts, prompt_counts)):
        features[row, :n] = torch.randn(n, dim, generator=generator)
        prompt[row, :t] = torch.randn(t, dim, generator=generator)
        valid[row, :n] = True
        prompt_valid[row, :t] = True
    method = CDPrunerMethod(dim)
    batch = _kept(method, _tokens(features, prompt, valid, prompt_valid), budgets)
    for row, (n, t) in enumerate(zip(counts, prompt_counts)):
        alone = _tokens(features[row:row + 1, :n], prompt[row:row + 1, :t])
        assert batch[row] == _kept(method, alone, budgets[row])[0]
        assert len(batch[row]) == min(budgets[row], n)


def test_bfloat16_input_selects_as_float32_on_well_separated_tokens():
    generator = torch.Generator().manual_seed(12)
    basis, _ = torch.linalg.qr(torch.randn(32, 32, generator=generator))
    # Twelve orthogonal directions with well-spaced relevances, four of them duplicated.
    weights = torch.linspace(1.0, 0.1, 12)
    features = torch.cat([basis[:12], 2 * basis[:4]])  # 2x: exact in bfloat16 too
    prompt = (weights[:, None] * basis[:12]).sum(0, keepdim=True)
    method = CDPrunerMethod(32)
    for budget in (1, 5, 12):
        full = _kept(method, _tokens(features[None], prompt[None]), budget)
        half = _kept(method, _tokens(features[None].bfloat16(), prompt[None].bfloat16()), budget)
        assert half == full
        assert full == [list(range(budget))]  # the most relevant, and never a duplicate


def test_budget_edges():
    generator = torch.Generator().manual_seed(13)
    features = torch.randn(2, 6, 4, generator=generator)
    valid = torch.tensor([[True] * 6, [True] * 4 + [False] * 2])
    prompt = torch.randn(2, 2, 4, generator=generator)
    method = CDPrunerMethod(4)
    tokens = _tokens(features, prompt, valid)
    assert _kept(method, tokens, [6, 4]) == [list(range(6)), list(range(4))]
    assert _kept(method, tokens, [9, 9]) == [list(range(6)), list(range(4))]  # never a padding slot
    for budget in range(1, 6):
        kept = _kept(method, tokens, [budget, min(budget, 4)])
        assert [len(k) for k in kept] == [budget, min(budget, 4)]
    # Budget 1 keeps the most relevant token.
    for row, n in enumerate((6, 4)):
        relevance = prompt_relevance(F.normalize(features[row, :n], dim=-1), prompt[row])
        assert _kept(method, tokens, [1, 1])[row] == [int(torch.argmax(relevance))]


def test_a_large_sample_keeps_exactly_its_budget():
    generator = torch.Generator().manual_seed(14)
    features = torch.randn(1, 1280, 32, generator=generator)  # more tokens than dimensions
    prompt = torch.randn(1, 20, 32, generator=generator)
    kept = CDPrunerMethod(32).select(_tokens(features, prompt), torch.tensor([256])).keep
    assert int(kept.sum()) == 256


def test_registration_and_options():
    assert get_method_class("cdpruner") is CDPrunerMethod
    assert "cdpruner" in vs.list_methods()
    assert CDPrunerMethod.needs == frozenset({"prompt"}) and not CDPrunerMethod.trainable
    assert CDPrunerMethod(8).theta is None
    assert CDPrunerMethod(8, theta=0.5).config_dict() == {"theta": 0.5}
    for bad in (1.0, -0.1, float("nan"), "0.5"):
        with pytest.raises(ValueError, match="theta"):
            CDPrunerMethod(8, theta=bad)


@pytest.mark.parametrize("dense", [True, False])
def test_selection_flops_are_the_matrix_products_the_selection_runs(dense, monkeypatch):
    from torch.utils.flop_counter import FlopCounterMode

    if not dense:
        monkeypatch.setattr(cdpruner_module, "DENSE_KERNEL_TOKENS", 8)
    generator = torch.Generator().manual_seed(15)
    dim = 16
    method = CDPrunerMethod(dim, theta=0.5)
    for visual, prompt_count, budget in [(40, 5, 10), (40, 0, 10), (12, 3, 1), (12, 3, 2), (12, 3, 12)]:
        features = torch.randn(1, visual, dim, generator=generator)
        prompt = torch.randn(1, 5, dim, generator=generator)
        prompt_valid = torch.arange(5)[None] < prompt_count
        with FlopCounterMode(display=False) as counter:
            method.select(_tokens(features, prompt, prompt_valid=prompt_valid), torch.tensor([budget]))
        # The prompt's mean is additions (1 FLOP per added element), which the counter does not see.
        averaging = prompt_count * dim if budget < visual else 0
        counted = counter.get_total_flops() + averaging
        assert method.selection_flops(visual=visual, hidden=dim, budget=budget, prompt=prompt_count) == counted
    assert method.selection_flops(visual=12, hidden=dim, budget=12, prompt=3) == 0
