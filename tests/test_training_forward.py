"""Training with the hard forward (straight-through): the frozen model sees exactly what the pruned
model sees at inference, and the gradient still reaches the scorer through the soft mask."""

import pytest
import torch

import visionselector as vs
from visionselector.api import get_state
from visionselector.training import SelectorTrainingConfig, train_selector

from conftest import make_model, randomise_scorer
from test_training import labelled_batch


@pytest.mark.parametrize("method", ["visionselector", "visionselector_q"])
def test_the_hard_training_forward_computes_the_loss_of_the_pruned_model(method):
    model = make_model()
    batch = labelled_batch(model)
    vs.attach(model, method=method, retention=0.25, selection_loss_weight=0.0)
    randomise_scorer(model)
    state = get_state(model)
    model.eval()
    with torch.no_grad():
        pruned = model(**batch).loss  # inference: the dropped tokens leave the sequence
    kept = [k.clone() for k in vs.last_selection(model)]
    vs.get_method(model).train()
    state.training_forward = "hard"
    straight_through = model(**batch)
    torch.testing.assert_close(straight_through.loss, pruned, rtol=1e-5, atol=1e-6)
    # The soft mask ranks the tokens as the scores do: its top-k are the tokens inference keeps.
    soft = state.last.soft_mask.detach()
    counts = state.last.visual_counts
    top = [torch.sort(torch.topk(row[:int(n)], len(k)).indices).values for row, n, k in zip(soft, counts, kept)]
    assert all(torch.equal(t, k) for t, k in zip(top, kept))
    straight_through.loss.backward()
    gradients = [p.grad for p in vs.get_method(model).parameters() if p.grad is not None]
    assert gradients and any(float(g.abs().max()) > 0 for g in gradients)
    # The paper's soft forward lets every token in, scaled: another loss.
    state.training_forward = "soft"
    with torch.no_grad():
        soft_loss = model(**batch).loss
    assert abs(float(soft_loss) - float(pruned)) > 1e-4


def test_training_forward_is_checked_and_stays_out_of_the_settings_of_soft_runs():
    with pytest.raises(ValueError, match="training_forward must be 'soft'"):
        SelectorTrainingConfig(training_forward="straight").validate()
    from visionselector.training import _settings

    assert "training_forward" not in _settings(SelectorTrainingConfig(), None)
    assert _settings(SelectorTrainingConfig(training_forward="hard"), None)["training_forward"] == "hard"
    model = make_model()
    history = train_selector(model, [labelled_batch(model)], steps=2, config=SelectorTrainingConfig(
        learning_rate=1e-2, progress=False, retention=0.25, training_forward="hard"))
    assert len(history) == 2 and all(h["loss"] == h["loss"] for h in history)
