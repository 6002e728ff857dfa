"""FastV and DART: pruning inside the language model."""

import math

import pytest
import torch
from transformers import DynamicCache

import visionselector as vs
from visionselector.methods import VisualTokens
from visionselector.methods.dart import DartMethod
from visionselector.methods.fastv import FastVMethod
from visionselector.presets import SampleSpec, synthetic_batch

from conftest import full_embeddings, make_model, single_sample

LAYER = 2


def deep_model(attn="sdpa"):
    return make_model(attn, text_layers=5)


def test_fastv_ranks_by_the_given_attention_row():
    attention = torch.tensor([[0.05, 0.4, 0.1, 0.3, 0.15], [0.2, 0.2, 0.5, 0.1, 0.0]])
    valid = torch.tensor([[True] * 5, [True, True, True, True, False]])
    tokens = VisualTokens(torch.zeros(2, 5, 3), valid, query_attention=attention)
    keep = FastVMethod(3).select(tokens, torch.tensor([2, 3])).keep
    assert keep.tolist() == [[False, True, False, True, False], [True, True, True, False, False]]


def test_dart_keeps_pivots_and_the_least_duplicated_tokens():
    # Token 0 has the largest key norm: the pivot. Tokens 1 and 2 duplicate it; 3 is orthogonal;
    # 4 is opposite. With a budget of 3: the pivot, then 4 (cos -1), then 3 (cos 0).
    features = torch.tensor([[[1.0, 0.0], [0.9, 0.1], [1.0, 0.05], [0.0, 1.0], [-1.0, 0.0]]])
    norms = torch.tensor([[5.0, 1.0, 2.0, 1.0, 1.0]])
    tokens = VisualTokens(features, torch.ones(1, 5, dtype=torch.bool), key_norms=norms)
    keep = DartMethod(2, num_pivots=1).select(tokens, torch.tensor([3])).keep
    assert torch.nonzero(keep[0]).flatten().tolist() == [0, 3, 4]
    # Two pivots (0 and 2) and a budget of 2: only the pivots.
    keep = DartMethod(2, num_pivots=2).select(tokens, torch.tensor([2])).keep
    assert torch.nonzero(keep[0]).flatten().tolist() == [0, 2]


def test_last_token_attention_signal_equals_eager_attention_weights():
    from visionselector.adapters.layer_pruning import decoder_signals

    model = deep_model("eager")
    batch = synthetic_batch(model.config, [SampleSpec(images=[(8, 8)]), SampleSpec(images=[(4, 8)], prefix=6)],
                            padding_side="left")
    captured = {}
    layer = model.model.language_model.layers[LAYER]
    handle = layer.register_forward_pre_hook(
        lambda module, args, kwargs: captured.update(hidden=args[0], position_embeddings=kwargs["position_embeddings"]),
        with_kwargs=True)
    try:
        with torch.no_grad():
            out = model(**batch, output_attentions=True)
    finally:
        handle.remove()
    expected = out.attentions[LAYER][:, :, -1, :].mean(1)  # left padding: the last column is the last token
    with torch.no_grad():
        signal = decoder_signals(layer, captured["hidden"], captured["position_embeddings"],
                                 batch["attention_mask"].bool(), {"query_attention"})["query_attention"]
    torch.testing.assert_close(signal, expected.float(), atol=1e-6, rtol=1e-5)


def fastv_reference(model, batch, retention, steps):
    """FastV built from the model's parts: layers 0..K on the full sequence, the eager attention
    row of the last token at layer K ranks the visual tokens, later layers on the kept ones,
    then greedy decoding with positions continuing from the uncompressed sequence."""
    core, text = model.model, model.model.language_model
    embeds, positions, visual = full_embeddings(model, batch)
    cos, sin = text.rotary_emb(embeds, positions)
    with torch.no_grad():
        eager_attention = model(**batch, output_attentions=True).attentions[LAYER][0, :, -1, :].mean(0)
    visual_positions = torch.nonzero(visual[0]).flatten()
    k = max(1, math.floor(retention * len(visual_positions)))
    ranked = sorted(range(len(visual_positions)), key=lambda i: (-eager_attention[visual_positions[i]].item(), i))
    kept_visual = sorted(ranked[:k])
    keep = ~visual[0]
    keep[visual_positions[kept_visual]] = True
    kept = torch.nonzero(keep).flatten()

    def causal(length):  # additive mask for the eager layers
        return torch.full((length, length), -torch.inf).triu(1)[None, None]

    cache = DynamicCache(config=text.config)
    hidden = embeds
    for index, layer in enumerate(text.layers):
        if index == LAYER + 1:
            hidden, cos, sin = hidden[:, kept], cos[:, kept], sin[:, kept]
        hidden = layer(hidden, attention_mask=causal(hidden.shape[1]), position_embeddings=(cos, sin),
                       past_key_values=cache, use_cache=True)
    logits = model.lm_head(text.norm(hidden))
    step_logits, token = [logits[:, -1]], logits[:, -1].argmax(-1)
    next_position = positions.max().item() + 1
    for step in range(steps - 1):
        hidden = core.get_input_embeddings()(token[:, None])
        step_cos, step_sin = text.rotary_emb(hidden, torch.full((3, 1, 1), next_position + step))
        for layer in text.layers:
            hidden = layer(hidden, attention_mask=None, position_embeddings=(step_cos, step_sin),
                           past_key_values=cache, use_cache=True)
        step_logits.append(model.lm_head(text.norm(hidden))[:, -1])
        token = step_logits[-1].argmax(-1)
    return logits, kept_visual, torch.cat(step_logits), cache


def test_fastv_prefill_and_decoding_match_a_reference_built_from_layers():
    model = deep_model("eager")
    batch = synthetic_batch(model.config, [SampleSpec(images=[(8, 12)])], seed=2)
    with torch.no_grad():
        expected_logits, expected_kept, expected_steps, reference_cache = fastv_reference(model, batch, 0.25, 5)
        vs.attach(model, method="fastv", retention=0.25, layer=LAYER)
        out = model(**batch, use_cache=True)
        assert vs.last_selection(model)[0].tolist() == expected_kept
        generated = model.generate(**batch, max_new_tokens=5, do_sample=False, output_logits=True,
                                   return_dict_in_generate=True)
    torch.testing.assert_close(out.logits, expected_logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.cat(generated.logits), expected_steps, atol=1e-5, rtol=1e-5)
    full, compact = batch["input_ids"].shape[1], out.logits.shape[1]
    lengths = [layer.keys.shape[-2] for layer in out.past_key_values.layers]
    assert lengths == [full] * (LAYER + 1) + [compact] * (len(lengths) - LAYER - 1)
    assert compact == full - 24 + 6  # 24 visual tokens, 6 kept


@pytest.mark.parametrize("method", ["fastv", "dart"])
def test_later_layers_cache_fewer_entries_under_sdpa(method):
    model = deep_model("sdpa")
    vs.attach(model, method=method, retention=0.2)
    batch = synthetic_batch(model.config, [SampleSpec(images=[(8, 8)])])
    with torch.no_grad():
        out = model(**batch, use_cache=True)
    lengths = [layer.keys.shape[-2] for layer in out.past_key_values.layers]
    full = batch["input_ids"].shape[1]
    assert lengths == [full] * 3 + [full - 16 + 3] * 2
    assert model.model.language_model.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("method", ["fastv", "dart"])
def test_retention_one_is_an_exact_no_op(method):
    model = deep_model()
    batch = synthetic_batch(model.config, [SampleSpec(images=[(8, 8)]), SampleSpec(images=[(4, 8)], prefix=6)])
    with torch.no_grad():
        expected = model(**batch).logits
        expected_ids = model.generate(**batch, max_new_tokens=4, do_sample=False)
        vs.attach(model, method=method, retention=1.0)
        assert torch.equal(model(**batch).logits, expected)
        assert torch.equal(model.generate(**batch, max_new_tokens=4, do_sample=False), expected_ids)
        vs.detach(model)
        assert all("forward" not in layer.__dict__ for layer in model.model.language_model.layers)


SAMPLES = [
    SampleSpec(images=[(8, 8)], prefix=2, suffix=3),
    SampleSpec(images=[(4, 12)], prefix=7, suffix=1),
    SampleSpec(images=[(4, 4), (8, 4)], prefix=3, suffix=5),
]


@pytest.mark.parametrize("method", ["fastv", "dart"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_batch_forward_equals_single_samples(method, attn, padding_side):
    model = deep_model(attn)
    vs.attach(model, method=method, retention=0.3)
    batch = synthetic_batch(model.config, SAMPLES, padding_side=padding_side, seed=7)
    with torch.no_grad():
        logits = model(**batch).logits
        valid = model._visionselector_state.last.token_valid
        selection = [s.tolist() for s in vs.last_selection(model)]
        for row in range(len(SAMPLES)):
            single_logits = model(**single_sample(batch, row, SAMPLES)).logits
            assert vs.last_selection(model)[0].tolist() == selection[row]
            torch.testing.assert_close(logits[row, valid[row]], single_logits[0], atol=2e-5, rtol=1e-4)
    assert [len(s) for s in selection] == [4, 3, 3]


@pytest.mark.parametrize("method", ["fastv", "dart"])
def test_batched_generate_equals_single_generates(method):
    model = deep_model()
    vs.attach(model, method=method, retention=0.3)
    batch = synthetic_batch(model.config, SAMPLES, padding_side="left", seed=9)
    kwargs = dict(max_new_tokens=5, do_sample=False)
    with torch.no_grad():
        batch_ids = model.generate(**batch, **kwargs)
        length = batch["input_ids"].shape[1]
        for row in range(len(SAMPLES)):
            single = single_sample(batch, row, SAMPLES)
            single_ids = model.generate(**single, **kwargs)
            assert single_ids[0, single["input_ids"].shape[1]:].tolist() == batch_ids[row, length:].tolist()


def test_prune_layer_must_leave_a_later_layer():
    with pytest.raises(ValueError, match="choose layer between 0 and 3"):
        vs.attach(deep_model(), method="fastv", layer=4)
