"""Every ``generate`` option either works on a pruned prompt or is refused by name, on every
family with every method; records never outlive the call they describe."""

import warnings

import pytest
import torch

import visionselector as vs
from visionselector.api import get_state

from families import FAMILIES
from test_family_contract import METHODS, _attach, _cases, _family_cases, _model

SAMPLES = [(1,), (2,)]


def _inside_llm(model):
    """Methods whose selection would change as the answer grows when re-run without a cache."""
    method = get_state(model).method
    return method.prune_layer is not None or "prompt" in method.needs


@pytest.mark.parametrize("family, method", _cases(METHODS))
def test_beam_search_runs_on_the_pruned_prompt_and_reports_one_selection_per_sample(family, method):
    model = _model(family)
    _attach(model, method, 0.4)
    batch = family.batch(SAMPLES)
    with torch.no_grad():
        model.generate(**batch, max_new_tokens=2, do_sample=False)
        greedy = vs.last_selection(model)
        beams = model.generate(**batch, max_new_tokens=3, do_sample=False, num_beams=2, num_return_sequences=2)
        selections = vs.last_selection(model)
        assert len(selections) == len(SAMPLES)
        assert all(torch.equal(a, b) for a, b in zip(selections, greedy))
        for row in range(len(SAMPLES)):
            alone = family.single(batch, SAMPLES, row)
            own = model.generate(**alone, max_new_tokens=3, do_sample=False, num_beams=2, num_return_sequences=2)
            assert torch.equal(own[:, -3:], beams[2 * row:2 * row + 2, -3:])


@pytest.mark.parametrize("family, method", _cases(METHODS))
def test_generating_without_a_cache_equals_generating_with_one_or_is_refused(family, method):
    model = _model(family)
    _attach(model, method, 0.4)
    batch = family.batch(SAMPLES)
    # Without a cache every step re-reads the answer, where a placeholder id would be an image.
    quiet = dict(suppress_tokens=list(family.placeholder_ids))
    with torch.no_grad():
        cached = model.generate(**batch, max_new_tokens=3, do_sample=False, output_logits=True,
                                return_dict_in_generate=True, **quiet)
        if _inside_llm(model):
            with pytest.raises(ValueError, match=f"use_cache=False is not supported with method '{method}'"):
                model.generate(**batch, max_new_tokens=3, do_sample=False, use_cache=False)
            return
        uncached = model.generate(**batch, max_new_tokens=3, do_sample=False, output_logits=True,
                                  return_dict_in_generate=True, use_cache=False, **quiet)
    assert torch.equal(cached.sequences, uncached.sequences)
    for mine, theirs in zip(uncached.logits, cached.logits):
        torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=1e-4)


REFUSED = {
    "prompt_lookup_num_tokens": (dict(prompt_lookup_num_tokens=2), "prompt_lookup_num_tokens"),
    "assistant_model": ("assistant", "assistant_model"),
    "static cache": (dict(cache_implementation="static"), "cache_implementation='static'"),
    "prefill_chunk_size": (dict(prefill_chunk_size=4), "prefill_chunk_size"),
}


@pytest.mark.parametrize("option", sorted(REFUSED))
@pytest.mark.parametrize("family", _family_cases())
def test_generate_options_that_cannot_run_on_a_pruned_prompt_are_refused_by_name(family, option):
    model = _model(family)
    _attach(model, "uniform", 0.4)
    options, name = REFUSED[option]
    if options == "assistant":
        options = dict(assistant_model=_model(family, seed=1))
    batch = family.batch(SAMPLES[:1])
    with pytest.raises(ValueError, match=name.replace("(", r"\(")):
        model.generate(**batch, max_new_tokens=3, do_sample=False, **options)


@pytest.mark.parametrize("family", _family_cases())
def test_generating_in_training_mode_warns_and_reports_what_reached_the_model(family):
    model = _model(family)
    _attach(model, "visionselector", 0.3)
    batch = family.batch(SAMPLES)
    model.train()
    with torch.no_grad(), pytest.warns(UserWarning, match="training mode.*model.eval"):
        model.generate(**batch, max_new_tokens=2, do_sample=False)
    counts = get_state(model).last.visual_counts.tolist()
    assert [len(kept) for kept in vs.last_selection(model)] == counts
    model.eval()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")
        model.generate(**batch, max_new_tokens=2, do_sample=False)
    assert [len(kept) for kept in vs.last_selection(model)] == [max(1, int(0.3 * n)) for n in counts]


@pytest.mark.parametrize("family", _family_cases())
def test_a_forward_without_input_ids_leaves_no_record_of_an_earlier_call(family):
    model = _model(family)
    _attach(model, "uniform", 0.3)
    batch = family.batch(SAMPLES)
    with torch.no_grad():
        model(**batch)
        assert len(vs.last_selection(model)) == len(SAMPLES)
        embeds = model.get_input_embeddings()(torch.tensor([[5, 6, 7]] * len(SAMPLES)))
        model(inputs_embeds=embeds)
    with pytest.raises(RuntimeError, match="no selection to report.*inputs_embeds only"):
        vs.last_selection(model)


def _visionzip_families():
    from visionselector.adapters import ADAPTERS
    from visionselector.methods import get_method_class

    method = get_method_class("visionzip")
    return [pytest.param(FAMILIES[name], id=name) for name in sorted(FAMILIES)
            if ADAPTERS[name].refusal(method) is None]


@pytest.mark.parametrize("family", _visionzip_families())
def test_visionzip_never_reads_attention_recorded_for_other_pixels(family):
    model = _model(family)
    _attach(model, "visionzip", 0.3)
    batch = family.batch([(1,)])
    other = family.batch([(1,)], seed=9)  # the same layout, other pixels
    core = model.model
    with torch.no_grad():
        outputs = model(**batch).logits
        kept = vs.last_selection(model)[0]
        # Encoder outputs computed earlier (a feature cache) for the same pixels find their attention...
        pixel_keys = [k for k in batch if k.startswith("pixel_values")]
        features = core.get_image_features(**{k: batch[k] for k in batch if k not in ("input_ids", "attention_mask",
                                                                                        "mm_token_type_ids")},
                                           return_dict=True)
        # ...and after other pixels were encoded, outputs for the first ones still find their own.
        core.get_image_features(**{k: other[k] for k in other if k not in ("input_ids", "attention_mask",
                                                                           "mm_token_type_ids")},
                                return_dict=True)
        rest = {k: v for k, v in batch.items() if k not in pixel_keys}
        again = model(**rest, mm_encoder_outputs={"image": features}).logits
        assert torch.equal(vs.last_selection(model)[0], kept)
        torch.testing.assert_close(again, outputs)
        # Outputs whose encoding left no record (computed before attach, or loaded) are refused.
        get_state(model).encoder_attention.clear()
        with pytest.raises(RuntimeError, match="no encoder attention was recorded"):
            model(**rest, mm_encoder_outputs={"image": features})
        # Attention recorded for other pixels is never read for these.
        core.get_image_features(**{k: other[k] for k in other if k not in ("input_ids", "attention_mask",
                                                                           "mm_token_type_ids")},
                                return_dict=True)
        with pytest.raises(RuntimeError, match="recorded for other images"):
            model(**rest, mm_encoder_outputs={"image": features})
