import math

import pytest
import torch

import visionselector as vs
from visionselector.ops.topk import validate_retention


def test_soft_topk_rows_sum_to_k_and_masked_entries_are_zero():
    scores = torch.randn(4, 12)
    mask = torch.ones(4, 12, dtype=torch.bool)
    mask[1, 5:] = False
    mask[3, 9:] = False
    k = torch.tensor([3, 2, 7, 1])
    p = vs.soft_topk(scores, k, mask=mask)
    assert p.dtype == scores.dtype
    torch.testing.assert_close(p.sum(1), k.float(), atol=1e-5, rtol=0)
    assert torch.all(p[~mask] == 0)
    assert torch.all((p[mask] > 0) & (p[mask] < 1))


def test_soft_topk_preserves_the_ranking_of_scores():
    scores = torch.tensor([[0.3, -1.0, 2.0, 0.1, 5.0]])
    p = vs.soft_topk(scores, 2)
    assert torch.equal(p.argsort(descending=True), scores.argsort(descending=True))


def test_soft_topk_gradient_matches_finite_differences_with_padding():
    torch.manual_seed(3)
    scores = torch.randn(3, 9, dtype=torch.float64, requires_grad=True)
    mask = torch.ones(3, 9, dtype=torch.bool)
    mask[0, 6:] = False
    mask[2, 4:] = False
    k = torch.tensor([2, 5, 1])
    assert torch.autograd.gradcheck(lambda s: vs.soft_topk(s, k, mask=mask), (scores,), eps=1e-6, atol=1e-7)


def test_soft_topk_gradient_is_the_implicit_formula():
    scores = torch.randn(2, 6, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(2, 6, dtype=torch.float64)
    p = vs.soft_topk(scores, 3)
    (grad,) = torch.autograd.grad(p, scores, upstream)
    v = p.detach() * (1 - p.detach())
    gv = upstream * v
    expected = gv - v * gv.sum(1, keepdim=True) / v.sum(1, keepdim=True)
    torch.testing.assert_close(grad, expected)
    # The constraint sum(p) = k is kept to first order: gradients of the row sum vanish.
    (grad_of_sum,) = torch.autograd.grad(vs.soft_topk(scores, 3).sum(), scores)
    torch.testing.assert_close(grad_of_sum, torch.zeros_like(grad_of_sum), atol=1e-12, rtol=0)


def test_soft_topk_edge_budgets_are_exact_with_zero_gradient():
    scores = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[1, 3:] = False
    k = torch.tensor([5, 7, 0])  # k = N, k > n_valid, k = 0
    p = vs.soft_topk(scores, k, mask=mask)
    assert torch.equal(p[0], torch.ones(5, dtype=torch.float64))
    assert torch.equal(p[1], mask[1].double())
    assert torch.equal(p[2], torch.zeros(5, dtype=torch.float64))
    (grad,) = torch.autograd.grad(p, scores, torch.randn(3, 5, dtype=torch.float64))
    assert torch.equal(grad, torch.zeros_like(grad))


@pytest.mark.parametrize("scale", [1e-9, 1e-3, 1.0, 1e3, 1e6])
def test_soft_topk_is_accurate_across_score_scales(scale):
    torch.manual_seed(0)
    scores = torch.randn(3, 200) * scale
    p = vs.soft_topk(scores, 40)
    torch.testing.assert_close(p.sum(1), torch.full((3,), 40.0), atol=2e-3, rtol=0)
    assert torch.isfinite(p).all()


def test_soft_topk_huge_ties_split_the_budget_evenly():
    p = vs.soft_topk(torch.tensor([[1e6, 1e6, 1e6, -1e6]]), 2)
    torch.testing.assert_close(p, torch.tensor([[2 / 3, 2 / 3, 2 / 3, 0.0]]), atol=1e-5, rtol=0)


def test_soft_topk_all_equal_scores_give_uniform_mask():
    p = vs.soft_topk(torch.zeros(2, 8), torch.tensor([2, 6]))
    torch.testing.assert_close(p, torch.tensor([[0.25] * 8, [0.75] * 8]))


def test_soft_topk_bfloat16_input_computes_in_float32_and_returns_bfloat16():
    scores32 = torch.randn(2, 64)
    scores16 = scores32.bfloat16()
    p16 = vs.soft_topk(scores16, 10)
    p32 = vs.soft_topk(scores16.float(), 10)
    assert p16.dtype == torch.bfloat16
    torch.testing.assert_close(p16.float(), p32, atol=4e-3, rtol=0)
    scores16.requires_grad_(True)
    (grad,) = torch.autograd.grad(vs.soft_topk(scores16, 10).float().pow(2).sum(), scores16)
    assert grad.dtype == torch.bfloat16 and torch.isfinite(grad.float()).all()


def test_soft_topk_accepts_a_single_row_and_int_or_tensor_budget():
    scores = torch.randn(7)
    a = vs.soft_topk(scores, 3)
    b = vs.soft_topk(scores.unsqueeze(0), torch.tensor([3])).squeeze(0)
    assert a.shape == (7,)
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize(
    "call, error",
    [
        (lambda: vs.soft_topk(torch.randn(2, 4), -1), ValueError),
        (lambda: vs.soft_topk(torch.randn(2, 4), torch.tensor([1, 2, 3])), ValueError),
        (lambda: vs.soft_topk(torch.randn(2, 4), 1.5), TypeError),
        (lambda: vs.soft_topk(torch.tensor([[0.0, float("nan")]]), 1), ValueError),
        (lambda: vs.soft_topk(torch.randn(2, 3, 4), 1), ValueError),
        (lambda: vs.soft_topk(torch.randn(2, 4), 1, mask=torch.ones(2, 5, dtype=torch.bool)), ValueError),
    ],
)
def test_soft_topk_rejects_bad_input(call, error):
    with pytest.raises(error):
        call()


def test_hard_topk_exact_selection_ties_break_to_lower_index():
    scores = torch.tensor([[1.0, 3.0, 3.0, 2.0, 3.0], [0.0, 0.0, 0.0, 0.0, 0.0]])
    keep = vs.hard_topk(scores, torch.tensor([2, 3]))
    assert keep.tolist() == [[False, True, True, False, False], [True, True, True, False, False]]


def test_hard_topk_never_keeps_masked_entries_even_with_high_scores():
    scores = torch.tensor([[9.0, 1.0, 8.0, 2.0, -float("inf")]])
    mask = torch.tensor([[False, True, True, True, True]])
    keep = vs.hard_topk(scores, 4, mask=mask)
    assert keep.tolist() == [[False, True, True, True, True]]
    assert vs.hard_topk(scores, 2, mask=mask).tolist() == [[False, False, True, True, False]]


@pytest.mark.parametrize(
    "retention, counts, expected",
    [
        (0.2, [100, 7, 4, 0], [20, 1, 1, 0]),
        (0.29, [100], [29]),  # 0.29 * 100 is 28.999999999999996 in floating point
        (0.5, [5, 1], [2, 1]),
        (1.0, [13, 0], [13, 0]),
        (1e-6, [50], [1]),
    ],
)
def test_token_budget(retention, counts, expected):
    assert vs.token_budget(retention, torch.tensor(counts)).tolist() == expected


@pytest.mark.parametrize("bad", [0, 0.0, -0.1, 1.0001, float("nan"), float("inf"), "0.5", None, True])
def test_retention_outside_unit_interval_is_rejected(bad):
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        validate_retention(bad)


def test_validate_retention_accepts_the_boundary():
    assert validate_retention(1) == 1.0
    assert math.isclose(validate_retention(1e-9), 1e-9)
