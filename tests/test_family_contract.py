"""The contract every family meets with every method: one matrix, so that a new method or
family inherits the whole suite.

Families come from ``tests/families`` (tiny configs of the real ``transformers`` classes,
inputs laid out as each processor lays them out); methods from the registry. A method a
family cannot run must be refused at attach, naming the family.
"""

import pytest
import torch

import visionselector as vs
from visionselector.adapters import ADAPTERS, find_adapter
from visionselector.api import get_state

from families import FAMILIES

METHODS = sorted(vs.list_methods())
# Methods that keep a subset of the visual tokens unchanged, before the language model: their
# pruned runs can be checked against a reference written from the definition.
SUBSET_METHODS = ["cdpruner", "divprune", "random", "uniform", "visionselector"]
SAMPLES = [(1,), (0, 2), (), (2,)]  # indices into the family's image sizes; () is text only


def _refusal(family, method):
    return ADAPTERS[family.name].refusal(vs.methods.get_method_class(method))


def _model(family, attn="sdpa", seed=0):
    torch.manual_seed(seed)
    return family.build(attn_implementation=attn, seed=seed)


def _attach(model, method, retention, seed=1):
    vs.attach(model, method=method, retention=retention)
    if get_state(model).method.trainable:
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for parameter in vs.get_scorer(model).parameters():
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)


def _cases(methods):
    cases = []
    for name, family in sorted(FAMILIES.items()):
        for method in methods:
            marks = []
            if name in ADAPTERS and _refusal(family, method):
                marks = [pytest.mark.skip(reason=f"{method} is refused on {name}: {_refusal(family, method)}")]
            cases.append(pytest.param(family, method, id=f"{name}-{method}", marks=marks))
    return cases


def _family_cases():
    return [pytest.param(family, id=name) for name, family in sorted(FAMILIES.items())]


def test_every_tiny_family_has_an_adapter_and_every_adapter_a_tiny_family():
    assert sorted(FAMILIES) == sorted(ADAPTERS)


@pytest.mark.parametrize("family, method", _cases(METHODS))
def test_retention_one_is_exact_and_detach_restores(family, method):
    model = _model(family)
    batch = family.batch(SAMPLES)
    with torch.no_grad():
        expected = model(**batch).logits
        expected_ids = model.generate(**batch, max_new_tokens=3, do_sample=False)
        _attach(model, method, 1.0)
        assert torch.equal(model(**batch).logits, expected)
        assert torch.equal(model.generate(**batch, max_new_tokens=3, do_sample=False), expected_ids)
        vs.set_retention(model, 0.3)
        assert not torch.equal(model(**batch).logits[:, -1], expected[:, -1])
        vs.detach(model)
        assert torch.equal(model(**batch).logits, expected)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("family, method", _cases(METHODS))
def test_a_padded_batch_equals_each_sample_alone(family, method, attn):
    model = _model(family, attn)
    _attach(model, method, 0.4)
    batch = family.batch(SAMPLES)
    with torch.no_grad():
        logits = model(**batch).logits[:, -1]
        selections = vs.last_selection(model)
        ids = model.generate(**batch, max_new_tokens=3, do_sample=False)[:, -3:]
        for row in range(len(SAMPLES)):
            alone = family.single(batch, SAMPLES, row)
            torch.testing.assert_close(model(**alone).logits[0, -1], logits[row], atol=1e-4, rtol=1e-4)
            assert torch.equal(vs.last_selection(model)[0], selections[row])
            assert torch.equal(model.generate(**alone, max_new_tokens=3, do_sample=False)[0, -3:], ids[row])


def _reference_run(family, model, batch, kept, steps):
    """Prefill logits at the last token and greedy ids, from the definition: text plus the kept
    visual tokens at their original positions (and their DeepStack features), left-padded;
    then decoding one token at a time at the uncompressed positions."""
    reference = family.reference(model, batch)
    valid = batch["attention_mask"].bool()
    keep = valid & ~reference.visual_mask
    for row, indices in enumerate(kept):
        visual_positions = torch.nonzero(reference.visual_mask[row]).flatten()
        keep[row, visual_positions[indices]] = True
    lengths = keep.sum(1)
    width = int(lengths.max())
    batch_size = keep.shape[0]
    index = torch.zeros(batch_size, width, dtype=torch.long)
    mask = torch.zeros(batch_size, width, dtype=torch.long)
    for row in range(batch_size):
        chosen = torch.nonzero(keep[row]).flatten()
        index[row, width - len(chosen):] = chosen
        mask[row, width - len(chosen):] = 1
    embeds = torch.stack([reference.embeds[row, index[row]] for row in range(batch_size)])
    if reference.positions.ndim == 3:
        positions = torch.stack([reference.positions[:, row, index[row]] for row in range(batch_size)], dim=1)
    else:
        positions = torch.stack([reference.positions[row, index[row]] for row in range(batch_size)])
    visual = torch.stack([reference.visual_mask[row, index[row]] for row in range(batch_size)]) & mask.bool()
    deepstack = None
    if reference.deepstack is not None:
        deepstack = [torch.stack([layer[row, index[row]] for row in range(batch_size)]) for layer in reference.deepstack]
    logits, cache = family.run_text(model, embeds, positions, mask, None, deepstack=deepstack, visual_mask=visual)
    first = logits[:, -1]
    token = first.argmax(-1, keepdim=True)
    generated = [token]
    for step in range(1, steps):
        mask = torch.cat([mask, torch.ones(batch_size, 1, dtype=torch.long)], dim=1)
        step_embeds = model.get_input_embeddings()(token)
        positions = family.next_positions(reference, batch["attention_mask"], step - 1)
        step_logits, cache = family.run_text(model, step_embeds, positions, mask, cache)
        token = step_logits[:, -1].argmax(-1, keepdim=True)
        generated.append(token)
    return first, torch.cat(generated, dim=1)


@pytest.mark.parametrize("family, method", _cases(SUBSET_METHODS))
def test_pruned_prefill_and_decoding_equal_the_definition(family, method):
    model = _model(family)
    _attach(model, method, 0.3)
    batch = family.batch(SAMPLES)
    with torch.no_grad():
        logits = model(**batch).logits[:, -1]
        kept = vs.last_selection(model)
        ids = model.generate(**batch, max_new_tokens=4, do_sample=False)[:, -4:]
        assert torch.equal(vs.last_selection(model)[0], kept[0])
        vs.detach(model)
        expected_logits, expected_ids = _reference_run(family, model, batch, kept, 4)
    torch.testing.assert_close(logits, expected_logits, atol=1e-5, rtol=1e-4)
    assert torch.equal(ids, expected_ids)


@pytest.mark.parametrize("family", _family_cases())
def test_a_hand_written_decoding_loop_numbers_steps_as_the_unpruned_model(family):
    model = _model(family)
    _attach(model, "visionselector", 0.3)
    batch = family.batch([(1,)])
    with torch.no_grad():
        expected = model.generate(**batch, max_new_tokens=4, do_sample=False, output_logits=True,
                                  return_dict_in_generate=True)
        prompt = {k: v for k, v in batch.items()}
        out = model(**prompt, use_cache=True)
        cache, token, logits = out.past_key_values, out.logits[:, -1:].argmax(-1), [out.logits[:, -1]]
        for _ in range(3):
            out = model(input_ids=token, past_key_values=cache, use_cache=True)
            cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
            logits.append(out.logits[:, -1])
    for step, (mine, theirs) in enumerate(zip(logits, expected.logits)):
        torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=1e-4, msg=f"step {step}")


@pytest.mark.parametrize("family", _family_cases())
def test_the_soft_training_path_reaches_the_scorer(family):
    model = _model(family)
    vs.attach(model, "visionselector", 0.3, mode="soft")
    batch = family.batch(SAMPLES[:2])
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    output = model(**batch, labels=labels)
    assert torch.isfinite(output.loss)
    output.loss.backward()
    gradients = [p.grad for p in vs.get_scorer(model).parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in gradients)
    assert any(bool(g.abs().sum() > 0) for g in gradients)
    state = get_state(model)
    assert "selection" in state.last_losses and state.last.soft_mask is not None


@pytest.mark.parametrize("family", _family_cases())
def test_a_selector_saved_for_another_family_is_refused(family, tmp_path):
    model = _model(family)
    vs.attach(model, "visionselector", 0.3)
    vs.save_selector(model, tmp_path / "selector")
    vs.detach(model)
    import json

    config_path = tmp_path / "selector" / "selector_config.json"
    config = json.loads(config_path.read_text())
    other = next(name for name in sorted(ADAPTERS) if name != family.name)
    config["model_family"] = other
    config_path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=f"{other}.*{family.name}"):
        vs.attach(model, "visionselector", 0.3, selector=tmp_path / "selector")
    assert not vs.is_attached(model)


@pytest.mark.parametrize("family", _family_cases())
def test_dispatch_is_on_model_type(family):
    model = _model(family)
    assert find_adapter(model).family == model.config.model_type == family.name
