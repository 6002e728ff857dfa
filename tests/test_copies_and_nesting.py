"""An attached model's state stays sound when the model is copied, nested or pickled, and
``attach`` checks its own arguments before it changes anything."""

import copy
import io
import math

import pytest
import torch

import visionselector as vs
from visionselector.api import get_state

from test_family_contract import _attach, _family_cases, _model

SAMPLES = [(1,), (0, 2)]


@pytest.mark.parametrize("family", _family_cases())
def test_a_deep_copy_is_an_independent_attached_model(family):
    model = _model(family)
    _attach(model, "visionselector", 0.3)
    batch = family.batch(SAMPLES)
    with torch.no_grad():
        expected = model(**batch).logits
        twin = copy.deepcopy(model)
        assert vs.is_attached(twin) and get_state(twin) is not get_state(model)
        assert get_state(twin).method is not get_state(model).method
        torch.testing.assert_close(twin(**batch).logits, expected, atol=0, rtol=0)
        # The copy runs its own weights: changing them changes the copy only.
        for parameter in twin.parameters():
            parameter.add_(0.01)
        assert not torch.equal(twin(**batch).logits, expected)
        assert torch.equal(model(**batch).logits, expected)
        vs.set_retention(twin, 1.0)
        assert get_state(model).retention == 0.3
        # Detaching the copy leaves the original patched, and the other way round.
        vs.detach(twin)
        assert torch.equal(model(**batch).logits, expected)
        vs.detach(model)
        unpruned = model(**batch).logits
        assert not torch.equal(unpruned, expected)


@pytest.mark.parametrize("family", _family_cases())
def test_attaching_to_a_model_and_to_a_module_inside_it_is_refused(family):
    model = _model(family)
    batch = family.batch(SAMPLES)
    with torch.no_grad():
        unpruned = model(**batch).logits
    vs.attach(model, "uniform", 0.3)
    with pytest.raises(RuntimeError, match="belongs to a model that has a selection method attached"):
        vs.attach(model.model, "uniform", 0.3)
    vs.detach(model)
    vs.attach(model.model, "uniform", 0.3)
    with pytest.raises(RuntimeError, match="attached to 'model' inside this model"):
        vs.attach(model, "uniform", 0.3)
    vs.detach(model.model)
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, unpruned)


@pytest.mark.parametrize("family", _family_cases())
def test_pickling_an_attached_model_says_what_to_do(family):
    model = _model(family)
    vs.attach(model, "uniform", 0.3)
    for target in (model, model.model):
        with pytest.raises(TypeError, match="cannot be pickled.*save_selector"):
            torch.save(target, io.BytesIO())
    with pytest.raises(TypeError, match="shallow-copied"):
        copy.copy(model)
    vs.detach(model)
    torch.save(model, io.BytesIO())


@pytest.mark.parametrize("weight", [math.nan, math.inf, -0.5, True, "1"])
def test_attach_refuses_a_bad_selection_loss_weight_before_changing_anything(weight):
    from families import FAMILIES

    model = _model(FAMILIES["qwen2_5_vl"])
    with pytest.raises(ValueError, match="selection_loss_weight"):
        vs.attach(model, "visionselector", 0.3, selection_loss_weight=weight)
    assert not vs.is_attached(model)
