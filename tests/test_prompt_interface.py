"""The prompt a question-aware method reads, on every family: exactly the input embeddings of
each sample's valid non-visual tokens, in order, less the answer when labels are given; and
only for the methods that ask for it.

Probe methods record what they receive. Most checks stop the forward right after the probe
has recorded (the language model's layers have nothing to add to what the method was given),
so that every family can be covered quickly; the checks that keep tokens run it through.
"""

from typing import ClassVar

import pytest
import torch

import visionselector as vs
from visionselector.methods import Selection, SelectionMethod, VisualTokens, register_method
from visionselector.methods.base import _REGISTRY
from visionselector.methods.cdpruner import CDPrunerMethod

from families import FAMILIES

SAMPLES = [(1,), (), (0, 2)]  # indices into the family's image sizes; () is text only
ANSWER = 2  # the last valid tokens of each sample, labelled as the answer (text in every family)


class _Recorded(Exception):
    """Raised by a probe after recording, to end the forward there."""


class _Probe(SelectionMethod):
    """Records the prompt it is given, then keeps each sample's first ``budget`` tokens (or stops
    the forward, when ``stop`` is set)."""

    records: ClassVar[list] = []
    stop: ClassVar[bool] = False

    def _record(self, tokens: VisualTokens) -> None:
        prompt = None if tokens.prompt is None else tokens.prompt.detach().clone()
        valid = None if tokens.prompt_valid is None else tokens.prompt_valid.clone()
        _Probe.records.append((prompt, valid))
        if _Probe.stop:
            raise _Recorded

    def select(self, tokens: VisualTokens, budget: torch.Tensor) -> Selection:
        self._record(tokens)
        rank = tokens.valid.long().cumsum(1)
        return Selection(tokens.valid & (rank <= budget.to(rank.device)[:, None]))


class PromptProbe(_Probe):
    name = "prompt_probe_test"
    description = "test probe that reads the prompt"
    needs = frozenset({"prompt"})


class BlindProbe(_Probe):
    name = "blind_probe_test"
    description = "test probe that does not ask for the prompt"


class TrainablePromptProbe(_Probe):
    name = "trainable_prompt_probe_test"
    description = "trainable test probe that reads the prompt"
    trainable = True
    needs = frozenset({"prompt"})

    def __init__(self, hidden_size: int) -> None:
        super().__init__(hidden_size)
        self.direction = torch.nn.Parameter(torch.linspace(-1.0, 1.0, hidden_size))

    def token_scores(self, tokens: VisualTokens) -> torch.Tensor:
        self._record(tokens)
        return (tokens.features.float() @ self.direction).masked_fill(~tokens.valid, 0.0)


PROBES = (PromptProbe, BlindProbe, TrainablePromptProbe)


@pytest.fixture
def probes():
    """Registers the probes for one test and removes them afterwards, so that no other test's
    ``list_methods()`` sees them."""
    for probe in PROBES:
        register_method(probe)
    _Probe.records.clear()
    _Probe.stop = True
    try:
        yield _Probe.records
    finally:
        _Probe.stop = False
        _Probe.records.clear()
        for probe in PROBES:
            _REGISTRY.pop(probe.name, None)


def _family_cases():
    return [pytest.param(family, id=name) for name, family in sorted(FAMILIES.items())]


def _model(family):
    torch.manual_seed(0)
    return family.build(attn_implementation="sdpa", seed=0)


def _visual_mask(family, batch):
    return torch.isin(batch["input_ids"], torch.tensor(family.placeholder_ids))


def _answer_labels(batch):
    """Labels with the last ``ANSWER`` valid tokens of each sample supervised, -100 elsewhere."""
    valid = batch["attention_mask"].bool()
    from_end = valid.flip(1).long().cumsum(1).flip(1)  # 1 at the last valid token, 2 before it ...
    answer = valid & (from_end <= ANSWER)
    return batch["input_ids"].masked_fill(~answer, -100)


def _expected_prompt(model, family, batch, labels=None):
    """Per sample, the embedding-table rows of its valid, non-visual, unlabelled tokens, in order."""
    text = batch["attention_mask"].bool() & ~_visual_mask(family, batch)
    if labels is not None:
        text &= labels == -100
    with torch.no_grad():
        embeddings = model.get_input_embeddings()(batch["input_ids"])
    return [embeddings[row][text[row]] for row in range(text.shape[0])]


def _run(model, batch, **kwargs):
    """A forward that the probe may stop once it has recorded."""
    try:
        model(**batch, **kwargs)
    except _Recorded:
        pass


def _check_prompt(record, expected):
    prompt, valid = record
    counts = [rows.shape[0] for rows in expected]
    assert prompt.shape[:2] == valid.shape == (len(expected), max(1, max(counts)))
    for row, rows in enumerate(expected):
        assert valid[row].tolist() == [True] * counts[row] + [False] * (valid.shape[1] - counts[row])
        assert torch.equal(prompt[row, : counts[row]], rows)


@pytest.mark.parametrize("family", _family_cases())
def test_the_prompt_is_each_samples_text_embeddings_in_order(family, probes):
    model = _model(family)
    vs.attach(model, "prompt_probe_test", 0.5)
    for side in ("left", "right"):
        batch = family.batch(SAMPLES, padding_side=side)
        with torch.no_grad():
            _run(model, batch)
        _check_prompt(probes[-1], _expected_prompt(model, family, batch))
    assert len(probes) == 2
    # The whole forward runs with the prompt read, and the method's selection is what reaches the model.
    _Probe.stop = False
    batch = family.batch(SAMPLES)
    with torch.no_grad():
        model(**batch)
    _check_prompt(probes[-1], _expected_prompt(model, family, batch))
    counts = _visual_mask(family, batch).sum(1).tolist()
    assert [k.tolist() for k in vs.last_selection(model)] == [list(range(max(1, n // 2) if n else 0))
                                                               for n in counts]


@pytest.mark.parametrize("family", _family_cases())
def test_labelled_answer_tokens_are_left_out_of_the_prompt(family, probes):
    model = _model(family)
    batch = family.batch(SAMPLES)
    labels = _answer_labels(batch)
    expected = _expected_prompt(model, family, batch, labels)
    assert [rows.shape[0] for rows in expected] == [
        rows.shape[0] - ANSWER for rows in _expected_prompt(model, family, batch)]
    # Hard selection (eval mode).
    vs.attach(model, "prompt_probe_test", 0.5)
    with torch.no_grad():
        _run(model, batch, labels=labels)
    _check_prompt(probes[-1], expected)
    vs.detach(model)
    # Soft selection (training), where the answer is part of the input the method sees.
    vs.attach(model, "trainable_prompt_probe_test", 0.5, mode="soft")
    _run(model, batch, labels=labels)
    _check_prompt(probes[-1], expected)
    assert len(probes) == 2


@pytest.mark.parametrize("family", _family_cases())
def test_soft_selection_without_labels_is_refused(family, probes):
    model = _model(family)
    batch = family.batch(SAMPLES[:1])
    vs.attach(model, "trainable_prompt_probe_test", 0.5, mode="soft")
    with pytest.raises(ValueError, match="pass labels"):
        model(**batch)
    vs.detach(model)
    vs.attach(model, "trainable_prompt_probe_test", 0.5)  # mode "auto": soft in training mode
    model.train()
    with pytest.raises(ValueError, match="pass labels"):
        model(**batch)
    assert probes == []


@pytest.mark.parametrize("family", _family_cases())
def test_a_method_that_does_not_ask_for_the_prompt_does_not_get_it(family, probes):
    model = _model(family)
    vs.attach(model, "blind_probe_test", 0.5)
    batch = family.batch(SAMPLES)
    with torch.no_grad():
        _run(model, batch, labels=_answer_labels(batch))
    assert probes == [(None, None)]


@pytest.mark.parametrize("family", _family_cases())
def test_cdpruner_keeps_its_budget_and_reads_the_prompt(family):
    model = _model(family)
    vs.attach(model, "cdpruner", 0.4)
    samples = [(1,), (0, 2)]
    batch = family.batch(samples)
    with torch.no_grad():
        model(**batch)
    kept = vs.last_selection(model)
    visual = _visual_mask(family, batch)
    counts = visual.sum(1).tolist()
    assert [len(k) for k in kept] == [max(1, 2 * n // 5) for n in counts]  # retention 2/5
    # The same selection from the definition: CDPruner on the sample's visual features and the
    # embeddings of its text tokens.
    with torch.no_grad():
        reference = family.reference(model, batch)
    text = batch["attention_mask"].bool() & ~visual
    method = CDPrunerMethod(reference.embeds.shape[-1])
    for row, n in enumerate(counts):
        tokens = VisualTokens(reference.embeds[row][visual[row]][None], torch.ones(1, n, dtype=torch.bool),
                              prompt=reference.embeds[row][text[row]][None],
                              prompt_valid=torch.ones(1, int(text[row].sum()), dtype=torch.bool))
        keep = method.select(tokens, torch.tensor([max(1, 2 * n // 5)])).keep[0]
        assert torch.equal(kept[row], torch.nonzero(keep).flatten())
