"""The Qwen2.5-VL adapter against the unpatched model and an independent reference."""

import math

import pytest
import torch

import visionselector as vs
from visionselector.presets import SampleSpec, synthetic_batch

from conftest import full_embeddings, make_model, randomise_scorer, single_sample

GENERATE = dict(max_new_tokens=6, do_sample=False)


def _run(model, batch, generate=True):
    with torch.no_grad():
        logits = model(**batch).logits
        ids = model.generate(**batch, **GENERATE) if generate else None
    return logits, ids


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_retention_one_is_an_exact_no_op_and_detach_restores(attn):
    model = make_model(attn)
    batch = synthetic_batch(model.config, [SampleSpec(images=[(8, 8)]), SampleSpec(images=[(4, 8)], prefix=6)])
    reference_logits, reference_ids = _run(model, batch)

    vs.attach(model, retention=1.0)
    logits, ids = _run(model, batch)
    assert torch.equal(logits, reference_logits)
    assert torch.equal(ids, reference_ids)
    assert [s.tolist() for s in vs.last_selection(model)] == [list(range(16)), list(range(8))]

    vs.set_retention(model, 0.25)
    pruned_logits, _ = _run(model, batch, generate=False)
    assert pruned_logits.shape[1] < reference_logits.shape[1]

    vs.detach(model)
    logits, ids = _run(model, batch)
    assert torch.equal(logits, reference_logits)
    assert torch.equal(ids, reference_ids)
    assert not vs.is_attached(model)
    assert "forward" not in model.__dict__ and "forward" not in model.model.__dict__
    assert not any("visual_token_selector" in name for name, _ in model.named_parameters())


def reference_prune_and_decode(model, batch, retention, steps):
    """Pruned prefill and greedy decoding for one sample, built from the definition.

    Embeds the full sequence, ranks the visual tokens with the attached scorer, keeps the
    top k = max(1, floor(r * N)) in order with every text token, feeds those embeddings
    with their original 3-D positions to the text model, then decodes token by token with
    positions continuing from the uncompressed sequence.
    """
    core = model.model
    input_ids = batch["input_ids"]
    assert input_ids.shape[0] == 1 and bool(batch["attention_mask"].all())
    embeds, positions, visual = full_embeddings(model, batch)
    visual_positions = torch.nonzero(visual[0]).flatten()
    n = len(visual_positions)
    k = max(1, math.floor(retention * n + 1e-9))
    scores = vs.get_scorer(model)(embeds[:, visual_positions])[0]
    order = sorted(range(n), key=lambda i: (-scores[i].item(), i))[:k]
    kept_visual = sorted(order)
    keep = ~visual[0]
    keep[visual_positions[kept_visual]] = True
    kept_positions = torch.nonzero(keep).flatten()

    text_model = core.language_model
    out = text_model(inputs_embeds=embeds[:, kept_positions], position_ids=positions[:, :, kept_positions],
                     use_cache=True)
    logits = model.lm_head(out.last_hidden_state)
    cache = out.past_key_values
    next_position = positions.max().item() + 1
    generated, step_logits = [], [logits[:, -1]]
    token = logits[:, -1].argmax(-1)
    for step in range(steps):
        generated.append(token.item())
        if step == steps - 1:
            break
        step_positions = torch.full((3, 1, 1), next_position + step)
        out = text_model(inputs_embeds=core.get_input_embeddings()(token[:, None]), position_ids=step_positions,
                         past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        step_logits.append(model.lm_head(out.last_hidden_state)[:, -1])
        token = step_logits[-1].argmax(-1)
    return logits, kept_visual, generated, torch.cat(step_logits)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize(
    "spec, retention",
    [
        (SampleSpec(images=[(8, 12)]), 0.2),
        (SampleSpec(images=[(8, 8), (4, 4)], prefix=5, suffix=3), 0.3),  # two images share one budget
        (SampleSpec(videos=[(4, 4, 8)]), 0.25),  # a short video: 2 temporal groups of 8 tokens
        (SampleSpec(images=[(4, 4)], videos=[(2, 4, 4)]), 0.5),
    ],
)
def test_pruned_prefill_and_decoding_match_an_independent_reference(attn, spec, retention):
    model = make_model(attn)
    vs.attach(model, retention=retention)
    randomise_scorer(model)
    batch = synthetic_batch(model.config, [spec], seed=4)
    with torch.no_grad():
        expected_logits, expected_kept, expected_ids, expected_step_logits = reference_prune_and_decode(
            model, batch, retention, 6)
        logits = model(**batch).logits
        assert vs.last_selection(model)[0].tolist() == expected_kept
        generated = model.generate(**batch, **GENERATE, output_logits=True, return_dict_in_generate=True)
    torch.testing.assert_close(logits, expected_logits, atol=1e-5, rtol=1e-5)
    assert generated.sequences[0, batch["input_ids"].shape[1]:].tolist() == expected_ids
    torch.testing.assert_close(torch.cat(generated.logits), expected_step_logits, atol=1e-5, rtol=1e-5)
    assert vs.last_selection(model)[0].tolist() == expected_kept


SAMPLES = [
    SampleSpec(images=[(8, 8)], prefix=2, suffix=3),
    SampleSpec(images=[(4, 12)], prefix=7, suffix=1),
    SampleSpec(images=[(4, 4), (8, 4)], prefix=3, suffix=5),
]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_batch_forward_equals_single_samples(attn, padding_side):
    model = make_model(attn)
    vs.attach(model, retention=0.3)
    randomise_scorer(model)
    batch = synthetic_batch(model.config, SAMPLES, padding_side=padding_side, seed=7)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    with torch.no_grad():
        batch_out = model(**batch, labels=labels)
        batch_selection = vs.last_selection(model)
        valid = model._visionselector_state.last.token_valid
        for row in range(len(SAMPLES)):
            single = single_sample(batch, row, SAMPLES)
            single_out = model(**single)
            assert vs.last_selection(model)[0].tolist() == batch_selection[row].tolist()
            torch.testing.assert_close(batch_out.logits[row, valid[row]], single_out.logits[0], atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_batched_generate_equals_single_generates_with_left_padding(attn):
    model = make_model(attn)
    vs.attach(model, retention=0.25)
    randomise_scorer(model)
    batch = synthetic_batch(model.config, SAMPLES, padding_side="left", seed=11)
    with torch.no_grad():
        batch_ids = model.generate(**batch, **GENERATE)
        batch_selection = vs.last_selection(model)
        length = batch["input_ids"].shape[1]
        for row in range(len(SAMPLES)):
            single = single_sample(batch, row, SAMPLES)
            single_ids = model.generate(**single, **GENERATE)
            assert single_ids[0, single["input_ids"].shape[1]:].tolist() == batch_ids[row, length:].tolist()
            assert vs.last_selection(model)[0].tolist() == batch_selection[row].tolist()


def test_budget_is_shared_by_all_images_of_a_sample():
    model = make_model()
    vs.attach(model, retention=0.2)
    randomise_scorer(model)
    batch = synthetic_batch(model.config, [SampleSpec(images=[(8, 8), (4, 4), (4, 8)])])
    with torch.no_grad():
        model(**batch)
    kept = vs.last_selection(model)[0]
    n = 16 + 4 + 8
    assert len(kept) == math.floor(0.2 * n)
    assert kept.tolist() == sorted(set(kept.tolist())) and kept.max() < n


def test_sdpa_and_eager_agree_after_pruning():
    outputs = []
    for attn in ("sdpa", "eager"):
        model = make_model(attn)
        vs.attach(model, retention=0.3)
        randomise_scorer(model)
        batch = synthetic_batch(model.config, SAMPLES, seed=2)
        with torch.no_grad():
            logits = model(**batch).logits
        valid = model._visionselector_state.last.token_valid
        assert not bool(valid.all())  # samples of different lengths: the compacted batch is padded
        outputs.append((logits[valid], vs.last_selection(model)))
    # Padding slots hold arbitrary values; every real token must agree.
    torch.testing.assert_close(outputs[0][0], outputs[1][0], atol=2e-5, rtol=1e-4)
    assert [s.tolist() for s in outputs[0][1]] == [s.tolist() for s in outputs[1][1]]


def test_text_only_batch_passes_through():
    model = make_model()
    batch = {"input_ids": torch.randint(4, 90, (2, 9)), "attention_mask": torch.ones(2, 9, dtype=torch.long)}
    with torch.no_grad():
        expected = model(**batch).logits
        vs.attach(model, retention=0.1)
        assert torch.equal(model(**batch).logits, expected)
    assert [s.numel() for s in vs.last_selection(model)] == [0, 0]


def test_labels_follow_the_kept_tokens():
    model = make_model()
    batch = synthetic_batch(model.config, SAMPLES[:2], padding_side="right", seed=5)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    vs.attach(model, retention=0.25)
    randomise_scorer(model)
    with torch.no_grad():
        out = model(**batch, labels=labels)
        record = model._visionselector_state.last
        compact_labels = labels.gather(1, record.token_index).masked_fill(~record.token_valid, -100)
        expected = torch.nn.functional.cross_entropy(
            out.logits[:, :-1].reshape(-1, out.logits.shape[-1]), compact_labels[:, 1:].reshape(-1), ignore_index=-100
        )
    torch.testing.assert_close(out.loss, expected)
    # Visual tokens were dropped from the labels too: only kept ones remain.
    image_id = model.config.image_token_id
    kept_counts = [len(s) for s in vs.last_selection(model)]
    assert (compact_labels == image_id).sum(1).tolist() == kept_counts


class _NotAVisionModel(torch.nn.Module):
    pass


def test_bad_input_errors_are_clear():
    model = make_model()
    with pytest.raises(TypeError, match="Qwen2_5_VLForConditionalGeneration"):
        vs.attach(_NotAVisionModel())
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        vs.attach(model, retention=1.5)
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        vs.attach(model, retention=float("nan"))
    with pytest.raises(ValueError, match="known methods: .*visionselector"):
        vs.attach(model, method="nope")
    with pytest.raises(TypeError, match="accepted options: hidden_dim"):
        vs.attach(model, bogus=3)
    with pytest.raises(RuntimeError, match="attach first"):
        vs.last_selection(model)
    vs.attach(model, retention=0.5)
    with pytest.raises(RuntimeError, match="already attached"):
        vs.attach(model)
    batch = synthetic_batch(model.config, [SampleSpec(images=[(8, 8)])])
    batch["input_ids"][0, 4] = 7  # one image placeholder too few
    with pytest.raises(ValueError, match="image placeholder mismatch: input_ids hold 15 .* 16"):
        model(**batch)
