import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import visionselector as vs


def quadratic_scores(scorer, x, mask):
    """The paper's definition: mean over valid j of <q_i, k_j> / sqrt(h), with the N x N matrix."""
    q = scorer.query(x)
    k = scorer.key(x)
    logits = q @ k.transpose(1, 2) / math.sqrt(scorer.hidden_dim)  # [B, N, N]
    weights = mask.to(x.dtype).unsqueeze(1)
    scores = (logits * weights).sum(-1) / weights.sum(-1)
    return scores.masked_fill(~mask, 0.0)


def test_linear_time_scores_equal_the_quadratic_definition():
    torch.manual_seed(0)
    scorer = vs.ImportanceScorer(24, 10).double()
    for parameter in scorer.parameters():
        torch.nn.init.normal_(parameter, std=0.3)
    x = torch.randn(3, 17, 24, dtype=torch.float64)
    mask = torch.ones(3, 17, dtype=torch.bool)
    mask[1, 11:] = False
    mask[2, 3:] = False
    torch.testing.assert_close(scorer(x, mask), quadratic_scores(scorer, x, mask))
    full = torch.ones(3, 17, dtype=torch.bool)
    torch.testing.assert_close(scorer(x), quadratic_scores(scorer, x, full))


def test_padding_does_not_change_a_rows_scores():
    scorer = vs.ImportanceScorer(8)
    torch.nn.init.normal_(scorer.query.weight, std=0.5)
    torch.nn.init.normal_(scorer.key.weight, std=0.5)
    x = torch.randn(1, 5, 8)
    padded = torch.cat([x, torch.randn(1, 4, 8) * 100], dim=1)
    mask = torch.tensor([[True] * 5 + [False] * 4])
    torch.testing.assert_close(scorer(padded, mask)[:, :5], scorer(x))


def test_parameter_count_and_initialisation_match_the_paper():
    scorer = vs.ImportanceScorer(3584)
    assert scorer.hidden_dim == 1792
    assert sum(p.numel() for p in scorer.parameters()) == 12_848_640
    assert torch.count_nonzero(scorer.query.bias) == 0 and torch.count_nonzero(scorer.key.bias) == 0
    assert abs(scorer.query.weight.std().item() - 1e-4) < 1e-5
    small = vs.ImportanceScorer(2048)
    assert small.hidden_dim == 1024 and sum(p.numel() for p in small.parameters()) == 2 * (2048 * 1024 + 1024)
    # Untrained scores are nearly flat: far below the typical token-feature scale.
    scores = small(torch.randn(1, 50, 2048))
    assert scores.abs().max() < 1e-4


def test_scorer_cost_is_linear_in_the_number_of_tokens():
    d, h = 64, 32
    scorer = vs.ImportanceScorer(d, h)

    def flops(n):
        with FlopCounterMode(display=False) as counter:
            scorer(torch.randn(1, n, d))
        return counter.get_total_flops()

    small, large = flops(1000), flops(8000)
    assert large < 8.5 * small
    # A materialised attention matrix would cost at least 2 * N^2 * h.
    assert large < 2 * 8000 * 8000 * h / 50


def test_scorer_rejects_features_of_the_wrong_width():
    with pytest.raises(ValueError, match=r"\[B, N, 16\]"):
        vs.ImportanceScorer(16)(torch.randn(2, 3, 8))
