"""VisionSelector-Q and the diversity (MMR) selection: definitions, gradients, batches, round trips."""

import math

import pytest
import torch
import torch.nn.functional as F

import visionselector as vs
from visionselector.methods.base import VisualTokens
from visionselector.methods.visionselector_q import QuestionAwareSelectorMethod, QuestionScorer
from visionselector.ops.diversity import mmr_keep, normalised_importance
from visionselector.ops.topk import hard_topk
from visionselector.presets import SampleSpec, synthetic_batch

from conftest import make_model, randomise_scorer
from families import FAMILIES


# ------------------------------------------------------------------ MMR

def mmr_reference(scores, features, count, diversity):
    """Maximal marginal relevance of one row, written from the definition with Python lists."""
    n = len(scores)
    low, high = min(scores), max(scores)
    importance = [(s - low) / (high - low) if high > low else 0.0 for s in scores]
    unit = [f / f.norm() if f.norm() > 0 else f for f in features]
    chosen = []
    for _ in range(min(count, n)):
        best, best_value = None, -math.inf
        for i in range(n):
            if i in chosen:
                continue
            if not chosen:
                value = importance[i]
            else:
                closest = max(float(unit[i] @ unit[j]) for j in chosen)
                value = (1 - diversity) * importance[i] - diversity * closest
            if value > best_value:  # strict: ties stay with the lower index
                best, best_value = i, value
        chosen.append(best)
    return sorted(chosen)


@pytest.mark.parametrize("diversity", [0.2, 0.5, 0.9, 1.0])
def test_mmr_matches_the_definition_on_padded_batches(diversity):
    generator = torch.Generator().manual_seed(3)
    counts, budgets = [9, 5, 7], [4, 5, 1]
    features = torch.randn(3, 9, 6, generator=generator, dtype=torch.float64)
    scores = torch.randn(3, 9, generator=generator, dtype=torch.float64)
    mask = torch.arange(9).unsqueeze(0) < torch.tensor(counts).unsqueeze(1)
    features[~mask] = 1e3  # padding must never matter
    keep = mmr_keep(scores, features, torch.tensor(budgets), mask, diversity)
    for row, (n, k) in enumerate(zip(counts, budgets)):
        expected = mmr_reference(scores[row, :n].tolist(), list(features[row, :n].float()), k, diversity)
        assert torch.nonzero(keep[row]).flatten().tolist() == expected
        assert not keep[row, n:].any()


def test_mmr_without_diversity_is_exactly_top_k():
    generator = torch.Generator().manual_seed(0)
    scores = torch.randn(2, 12, generator=generator)
    scores[0, 3] = scores[0, 7]  # a tie, broken towards the lower index by both
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[1, 8:] = False
    budget = torch.tensor([5, 3])
    features = torch.randn(2, 12, 4, generator=generator)
    assert torch.equal(mmr_keep(scores, features, budget, mask, 0.0), hard_topk(scores, budget, mask=mask))


def test_mmr_skips_duplicates_that_top_k_keeps():
    # Tokens 0 and 1 are the same object and score highest; token 2 is another object.
    features = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.7, 0.7]]])
    scores = torch.tensor([[1.0, 0.95, 0.6, 0.0]])
    mask = torch.ones(1, 4, dtype=torch.bool)
    budget = torch.tensor([2])
    assert torch.nonzero(hard_topk(scores, budget, mask=mask)[0]).flatten().tolist() == [0, 1]
    assert torch.nonzero(mmr_keep(scores, features, budget, mask, 0.5)[0]).flatten().tolist() == [0, 2]


def test_mmr_edge_cases():
    mask = torch.tensor([[True, True, False]])
    features = torch.randn(1, 3, 4)
    flat = torch.zeros(1, 3)
    # A flat row: every importance is 0, so diversity alone decides after the first (lowest index) token.
    keep = mmr_keep(flat, features, torch.tensor([2]), mask, 0.5)
    assert keep.tolist() == [[True, True, False]]
    assert torch.equal(normalised_importance(torch.tensor([[2.0, 4.0, 99.0]]), mask), torch.tensor([[0.0, 1.0, 0.0]]))
    # A budget above the valid count keeps every valid token and nothing else.
    assert mmr_keep(torch.randn(1, 3), features, torch.tensor([3]), mask, 0.5).tolist() == [[True, True, False]]
    with pytest.raises(ValueError, match="NaN"):
        mmr_keep(torch.tensor([[float("nan"), 0.0, 0.0]]), features, torch.tensor([1]), mask, 0.5)


# ------------------------------------------------------------------ the question scorer

def explicit_question_scores(scorer: QuestionScorer, x, mask, prompt, prompt_mask):
    """The definition with materialised keys: <K x_i + k, P u + p> / sqrt(h), u the gated mean prompt token."""
    rows = []
    for b in range(x.shape[0]):
        tokens = prompt[b][prompt_mask[b]]
        if tokens.shape[0] == 0:
            rows.append(torch.zeros(x.shape[1], dtype=x.dtype))
            continue
        weights = torch.softmax(scorer.gate(tokens).squeeze(-1), dim=0)
        pooled = (weights.unsqueeze(-1) * tokens).sum(0)
        query = scorer.query(pooled)
        keys = scorer.key(x[b])  # [N, h]
        rows.append((keys @ query) / math.sqrt(scorer.hidden_dim))
    return torch.stack(rows).masked_fill(~mask, 0.0)


def _random_scorer(d=12, h=5, seed=0):
    torch.manual_seed(seed)
    scorer = QuestionScorer(d, h).double()
    for parameter in scorer.parameters():
        torch.nn.init.normal_(parameter, std=0.4)
    return scorer


def _inputs(seed=1, d=12):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 7, d, generator=generator, dtype=torch.float64)
    prompt = torch.randn(3, 5, d, generator=generator, dtype=torch.float64)
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3, [1] * 6 + [0]], dtype=torch.bool)
    prompt_mask = torch.tensor([[1] * 5, [1] * 2 + [0] * 3, [0] * 5], dtype=torch.bool)
    return x, mask, prompt, prompt_mask


def test_question_scores_equal_the_definition_and_ignore_padding():
    scorer = _random_scorer()
    x, mask, prompt, prompt_mask = _inputs()
    expected = explicit_question_scores(scorer, x, mask, prompt, prompt_mask)
    torch.testing.assert_close(scorer(x, mask, prompt, prompt_mask), expected)
    assert torch.count_nonzero(expected[2]) == 0  # no prompt: no question term
    noisy_x, noisy_prompt = x.clone(), prompt.clone()
    noisy_x[~mask] = 1e4
    noisy_prompt[~prompt_mask] = -1e4
    torch.testing.assert_close(scorer(noisy_x, mask, noisy_prompt, prompt_mask), expected)


def test_question_scores_gradients_match_finite_differences():
    scorer = _random_scorer(d=6, h=3)
    x, mask, prompt, prompt_mask = _inputs(d=6)
    x.requires_grad_(True)
    prompt.requires_grad_(True)
    weights = torch.randn(3, 7, dtype=torch.float64)

    def total(x, prompt, *parameters):
        return (torch.func.functional_call(scorer, dict(zip(names, parameters)), (x, mask, prompt, prompt_mask))
                * weights).sum()

    names = [name for name, _ in scorer.named_parameters()]
    parameters = [p.detach().clone().requires_grad_(True) for p in scorer.parameters()]
    assert torch.autograd.gradcheck(total, (x, prompt, *parameters))


def test_the_scorer_is_flat_and_pools_evenly_when_untrained():
    scorer = QuestionScorer(64, 32)
    assert torch.count_nonzero(scorer.gate.weight) == 0
    x, prompt = torch.randn(2, 30, 64), torch.randn(2, 9, 64)
    scores = scorer(x, torch.ones(2, 30, dtype=torch.bool), prompt, torch.ones(2, 9, dtype=torch.bool))
    assert scores.abs().max() < 1e-5
    torch.testing.assert_close(scorer.pooled_prompt(prompt, torch.ones(2, 9, dtype=torch.bool)), prompt.mean(1))


def test_the_method_ranks_by_the_question():
    """With the key and query maps the identity, token i scores <x_i, question>: the asked token first."""
    method = QuestionAwareSelectorMethod(4, hidden_dim=4, image_score=False)
    with torch.no_grad():
        for layer in (method.scorer.question.query, method.scorer.question.key):
            layer.weight.copy_(torch.eye(4))
            layer.bias.zero_()
    objects = torch.eye(4).unsqueeze(0)  # four tokens, four orthogonal "objects"
    valid = torch.ones(1, 4, dtype=torch.bool)
    for asked in range(4):
        tokens = VisualTokens(objects, valid, prompt=torch.eye(4)[asked].view(1, 1, 4),
                              prompt_valid=torch.ones(1, 1, dtype=torch.bool))
        assert torch.nonzero(method.select(tokens, torch.tensor([1])).keep[0]).flatten().tolist() == [asked]
    with pytest.raises(ValueError, match="reads the prompt"):
        method.select(VisualTokens(objects, valid), torch.tensor([1]))


def test_cost_is_linear_in_tokens_and_prompt():
    from torch.utils.flop_counter import FlopCounterMode

    def flops(n, t, d=256, h=128):
        method = QuestionAwareSelectorMethod(d, hidden_dim=h)
        tokens = VisualTokens(torch.randn(1, n, d), torch.ones(1, n, dtype=torch.bool), prompt=torch.randn(1, t, d),
                              prompt_valid=torch.ones(1, t, dtype=torch.bool))
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            method.token_scores(tokens)
        return counter.get_total_flops()

    # Doubling the tokens adds work linear in N * D, never N^2 or N * h * D.
    base, double_tokens, double_prompt = flops(512, 16), flops(1024, 16), flops(512, 32)
    assert double_tokens - base <= 2 * 512 * 256 * 3
    assert double_prompt - base <= 2 * 16 * 256 * 3


# ------------------------------------------------------------------ on a model

def _batch(model):
    return synthetic_batch(model.config, [SampleSpec(images=[(8, 8)], suffix=6),
                                          SampleSpec(images=[(4, 8)], suffix=3)])


@pytest.mark.parametrize("options", [{"retention": 0.25, "diversity": 0.4},
                                     {"retention": 0.4, "diversity": 0.4, "focus": 0.1}], ids=["mmr", "focus"])
@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_batched_selection_equals_each_sample_alone(name, options):
    family = FAMILIES[name]
    model = family.build(seed=0)
    vs.attach(model, method="visionselector_q", **options)
    randomise_scorer(model, seed=4)
    samples = [(1,), (0, 2), (2,)]
    batch = family.batch(samples)
    with torch.no_grad():
        model(**batch)
    together = [k.tolist() for k in vs.last_selection(model)]
    for row in range(len(samples)):
        with torch.no_grad():
            model(**family.single(batch, samples, row))
        assert [k.tolist() for k in vs.last_selection(model)] == [together[row]]


def test_the_question_changes_the_selection():
    model = make_model()
    vs.attach(model, method="visionselector_q", retention=0.25, image_score=False)
    randomise_scorer(model, seed=2)
    with torch.no_grad():  # the query's bias is the same for every question; without it the question decides
        vs.get_scorer(model).question.query.bias.zero_()
    batch = synthetic_batch(model.config, [SampleSpec(images=[(8, 8)], suffix=6)])
    kept = []
    for text_seed in range(4):
        generator = torch.Generator().manual_seed(100 + text_seed)
        ids = batch["input_ids"].clone()
        text = (ids >= 4) & (ids < 100)  # the tiny vocabulary's ordinary words: the question
        ids[text] = torch.randint(4, 100, (int(text.sum()),), generator=generator)
        with torch.no_grad():
            model(**{**batch, "input_ids": ids})
        kept.append(vs.last_selection(model)[0].tolist())
    assert len({tuple(k) for k in kept}) > 1


def test_save_and_attach_round_trip(tmp_path):
    model = make_model()
    vs.attach(model, method="visionselector_q", retention=0.3, diversity=0.25, image_score=True)
    randomise_scorer(model, seed=7)
    batch = _batch(model)
    with torch.no_grad():
        expected = model(**batch).logits
    selection = [k.tolist() for k in vs.last_selection(model)]
    vs.save_selector(model, tmp_path / "q")
    fresh = make_model()
    vs.attach(fresh, method="visionselector_q", retention=0.3, selector=tmp_path / "q")
    method = vs.get_method(fresh)
    assert method.diversity == 0.25 and method.scorer.image is not None
    with torch.no_grad():
        torch.testing.assert_close(fresh(**batch).logits, expected)
    assert [k.tolist() for k in vs.last_selection(fresh)] == selection
    with pytest.raises(ValueError, match="saved for method 'visionselector_q'"):
        vs.attach(make_model(), method="visionselector", selector=tmp_path / "q")


def test_training_reads_the_question_but_never_the_answer():
    model = make_model()
    vs.attach(model, method="visionselector_q", retention=0.25)
    randomise_scorer(model, seed=5)
    model.train()
    batch = synthetic_batch(model.config, [SampleSpec(images=[(8, 8)], suffix=6)])
    ids = batch["input_ids"]
    labels = torch.full_like(ids, -100)
    labels[:, -2:] = ids[:, -2:]  # the last two tokens are the answer
    outputs = model(**batch, labels=labels)
    outputs.loss.backward()
    scorer = vs.get_scorer(model)
    assert scorer.question.gate.weight.grad.abs().sum() > 0 and scorer.question.query.weight.grad.abs().sum() > 0
    state = vs.api.get_state(model)
    soft = state.last.soft_mask.detach().clone()
    other = ids.clone()
    other[:, -2:] = (ids[:, -2:] % 40) + 1  # another answer
    with torch.no_grad():
        model(**{**batch, "input_ids": other}, labels=labels)
    torch.testing.assert_close(state.last.soft_mask, soft)
    with pytest.raises(ValueError, match="pass labels"):
        model(**batch)


def test_diversity_zero_is_the_papers_selection():
    model = make_model()
    vs.attach(model, retention=0.25)
    randomise_scorer(model, seed=3)
    batch = _batch(model)
    with torch.no_grad():
        model(**batch)
    plain = [k.tolist() for k in vs.last_selection(model)]
    vs.detach(model)
    vs.attach(model, retention=0.25, diversity=0.0)
    randomise_scorer(model, seed=3)
    with torch.no_grad():
        model(**batch)
    assert [k.tolist() for k in vs.last_selection(model)] == plain
    assert vs.get_method(model).config_dict() == {"hidden_dim": vs.get_scorer(model).hidden_dim}
    vs.detach(model)
    vs.attach(model, retention=0.25, diversity=0.9)
    randomise_scorer(model, seed=3)
    with torch.no_grad():
        model(**batch)
    assert [k.tolist() for k in vs.last_selection(model)] != plain


def test_selection_flops_count_the_products_that_run():
    from torch.utils.flop_counter import FlopCounterMode

    n, t, d, h, k = 40, 7, 24, 10, 9
    tokens = VisualTokens(torch.randn(1, n, d), torch.ones(1, n, dtype=torch.bool), prompt=torch.randn(1, t, d),
                          prompt_valid=torch.ones(1, t, dtype=torch.bool))
    for method in (QuestionAwareSelectorMethod(d, hidden_dim=h, diversity=0.5),
                   QuestionAwareSelectorMethod(d, hidden_dim=h, image_score=False),
                   vs.methods.get_method_class("visionselector")(d, hidden_dim=h, diversity=0.3),
                   vs.methods.get_method_class("visionselector")(d, hidden_dim=h)):
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            method.select(tokens, torch.tensor([k]))
        # The counter sees matrix products only; the gate's softmax and the sums are not products.
        assert counter.get_total_flops() == method.selection_flops(n, d, k, t)
