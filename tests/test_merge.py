"""Option ``merge``: dropped tokens merged into their most similar kept token, attention weighed
by each kept token's size.

The references here are written from the definition, independently of the compaction: the
whole sequence runs, the dropped visual tokens masked out of attention, each kept one
replaced by the mean of its group and given ``log(size)`` on its attention logits.
"""

import copy
import math

import pytest
import torch
import torch.nn.functional as F

import visionselector as vs
from visionselector.adapters.base import output_cache, pruned_prompt
from visionselector.api import get_state
from visionselector.adapters import ADAPTERS
from visionselector.methods.base import get_method_class
from visionselector.ops.merge import TIE, absorb_dropped, additive_mask, merge_flops, size_bias

from families import FAMILIES

SAMPLES = [(1,), (0, 2), (), (2,)]
MERGING = ["divprune", "cdpruner", "visionselector", "visionselector_q"]


def _reference_groups(features, keep, valid):
    """Per row, with Python loops: owner of every valid token, group sizes and means."""
    merged, sizes = features.clone(), torch.zeros(keep.shape)
    for row in range(features.shape[0]):
        kept = [i for i in range(features.shape[1]) if keep[row, i] and valid[row, i]]
        groups = {i: [i] for i in kept}
        for j in range(features.shape[1]):
            if not valid[row, j] or keep[row, j] or not kept:
                continue
            similarity = [float(F.cosine_similarity(features[row, j], features[row, i], dim=0)) for i in kept]
            best = next(n for n in range(len(kept)) if similarity[n] >= max(similarity) - TIE)  # ties: the earlier
            groups[kept[best]].append(j)
        for i, members in groups.items():
            merged[row, i] = features[row, members].float().mean(0).to(features.dtype)
            sizes[row, i] = len(members)
    return merged, sizes


def test_absorb_dropped_on_a_known_input():
    e1, e2, e3 = torch.eye(3)
    features = torch.stack([e1, 0.9 * e1 + 0.1 * e2, 2 * e2, e3]).unsqueeze(0)  # e3 is as far from both: tie
    keep = torch.tensor([[True, False, True, False]])
    merged, sizes = absorb_dropped(features, keep, torch.ones_like(keep))
    assert sizes.tolist() == [[3.0, 0.0, 1.0, 0.0]]
    torch.testing.assert_close(merged[0, 0], (e1 + 0.9 * e1 + 0.1 * e2 + e3) / 3)
    torch.testing.assert_close(merged[0, 2], 2 * e2)
    torch.testing.assert_close(merged[0, [1, 3]], features[0, [1, 3]])  # dropped slots stay as they were


def test_absorb_dropped_equals_the_definition_on_a_padded_batch():
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(3, 11, 6, generator=generator)
    valid = torch.ones(3, 11, dtype=torch.bool)
    valid[1, 8:] = False
    valid[2, 5:] = False
    keep = torch.rand(3, 11, generator=generator) < 0.4
    keep[:, 0] = True
    keep &= valid
    merged, sizes = absorb_dropped(features, keep, valid)
    expected_merged, expected_sizes = _reference_groups(features, keep, valid)
    assert torch.equal(sizes, expected_sizes)
    torch.testing.assert_close(merged[keep], expected_merged[keep])
    assert torch.equal(merged[~keep], features[~keep])
    assert torch.equal(sizes.sum(1), valid.sum(1).float())  # every valid token is in one group


def test_absorb_dropped_is_a_no_op_when_nothing_or_everything_is_kept():
    features = torch.randn(2, 5, 4)
    valid = torch.ones(2, 5, dtype=torch.bool)
    merged, sizes = absorb_dropped(features, valid.clone(), valid)
    assert merged is features and torch.equal(sizes, torch.ones(2, 5))
    merged, sizes = absorb_dropped(features, torch.zeros_like(valid), valid)
    assert merged is features and not sizes.any()


def test_additive_mask_and_size_bias_follow_the_definition():
    valid = torch.tensor([[False, True, True, True, True]])
    bias = torch.tensor([[0.0, math.log(3), 0.0, 0.5, 0.0]])
    mask = additive_mask(valid, bias, 2, torch.float32)
    lowest = torch.finfo(torch.float32).min
    assert mask.shape == (1, 1, 2, 5)
    third = bias[0, 1].item()
    assert mask[0, 0].tolist() == [[lowest, third, 0.0, 0.5, lowest], [lowest, third, 0.0, 0.5, 0.0]]
    assert torch.equal(size_bias(torch.tensor([[0.0, 1.0, 4.0]])), torch.tensor([[0.0, 0.0, math.log(4.0)]]))


def test_merge_flops_counts_the_similarity_and_the_sums():
    assert merge_flops(100, 8, 10) == 2 * 100 * 10 * 8 + 90 * 8
    assert merge_flops(100, 8, 100) == 0
    for name in MERGING:
        method = get_method_class(name)(16, merge=True)
        plain = get_method_class(name)(16)
        assert method.selection_flops(100, 16, 10, 5) - plain.selection_flops(100, 16, 10, 5) == merge_flops(100, 16, 10)


def _cases():
    cases = []
    for name, family in sorted(FAMILIES.items()):
        for method in ("divprune", "visionselector_q"):
            refusal = ADAPTERS[name].refusal(get_method_class(method)(8, merge=True))
            marks = [pytest.mark.skip(reason=f"refused on {name}: {refusal}")] if refusal else []
            cases.append(pytest.param(family, method, id=f"{name}-{method}", marks=marks))
    return cases


def _merged_model(family, method, attn="sdpa"):
    torch.manual_seed(0)
    model = family.build(attn_implementation=attn, seed=0)
    vs.attach(model, method=method, retention=0.3, merge=True)
    if get_state(model).method.trainable:
        generator = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for parameter in vs.get_scorer(model).parameters():
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
    return model


def _reference_run(family, model, batch, kept, steps):
    """The whole sequence, dropped visual tokens masked out, kept ones merged and weighed; then
    greedy decoding one token at a time against that cache."""
    reference = family.reference(model, batch)
    valid = batch["attention_mask"].bool()
    batch_size, length = valid.shape
    embeds = reference.embeds.clone()
    visible = valid.clone()
    bias = torch.zeros(batch_size, length)
    for row, indices in enumerate(kept):
        positions = torch.nonzero(reference.visual_mask[row] & valid[row]).flatten()
        if len(positions) == 0:
            continue
        keep = torch.zeros(1, len(positions), dtype=torch.bool)
        keep[0, indices] = True
        merged, sizes = _reference_groups(reference.embeds[row, positions].unsqueeze(0), keep,
                                          torch.ones_like(keep))
        embeds[row, positions] = merged[0]
        visible[row, positions[~keep[0]]] = False
        bias[row, positions[keep[0]]] = torch.log(sizes[0, keep[0]])
    lowest = torch.finfo(embeds.dtype).min

    def mask_for(columns_visible, columns_bias, queries):
        keys = columns_visible.shape[1]
        causal = torch.arange(keys).unsqueeze(0) <= torch.arange(keys - queries, keys).unsqueeze(1)
        allowed = causal.unsqueeze(0) & columns_visible.unsqueeze(1)
        return torch.where(allowed, columns_bias.unsqueeze(1), torch.tensor(lowest)).unsqueeze(1)

    deepstack = reference.deepstack
    visual = reference.visual_mask & valid
    logits, cache = family.run_text(model, embeds, reference.positions, mask_for(visible, bias, length), None,
                                    deepstack=deepstack, visual_mask=visual)
    token = logits[:, -1].argmax(-1, keepdim=True)
    first, generated = logits[:, -1], [token]
    for step in range(1, steps):
        visible = torch.cat([visible, torch.ones(batch_size, 1, dtype=torch.bool)], dim=1)
        bias = torch.cat([bias, torch.zeros(batch_size, 1)], dim=1)
        positions = family.next_positions(reference, batch["attention_mask"], step - 1)
        step_logits, cache = family.run_text(model, model.get_input_embeddings()(token), positions,
                                             mask_for(visible, bias, 1), cache)
        token = step_logits[:, -1].argmax(-1, keepdim=True)
        generated.append(token)
    return first, torch.cat(generated, dim=1)


@pytest.mark.parametrize("family, method", _cases())
def test_merged_prefill_and_decoding_equal_the_definition(family, method):
    model = _merged_model(family, method)
    batch = family.batch(SAMPLES)
    with torch.no_grad():
        logits = model(**batch).logits[:, -1]
        kept = vs.last_selection(model)
        ids = model.generate(**batch, max_new_tokens=4, do_sample=False)[:, -4:]
        vs.detach(model)
        unmerged = model(**batch).logits[:, -1]
        expected_logits, expected_ids = _reference_run(family, model, batch, kept, 4)
    torch.testing.assert_close(logits, expected_logits, atol=1e-5, rtol=1e-4)
    assert torch.equal(ids, expected_ids)
    assert not torch.allclose(logits, unmerged, atol=1e-3)  # merging changed what the model reads


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("family, method", _cases())
def test_a_merged_padded_batch_equals_each_sample_alone(family, method, attn):
    model = _merged_model(family, method, attn)
    batch = family.batch(SAMPLES)
    with torch.no_grad():
        logits = model(**batch).logits[:, -1]
        ids = model.generate(**batch, max_new_tokens=3, do_sample=False)[:, -3:]
        for row in range(len(SAMPLES)):
            alone = family.single(batch, SAMPLES, row)
            torch.testing.assert_close(model(**alone).logits[0, -1], logits[row], atol=1e-4, rtol=1e-4)
            assert torch.equal(model.generate(**alone, max_new_tokens=3, do_sample=False)[0, -3:], ids[row])


def test_a_copied_cache_carries_the_weights():
    family = FAMILIES["qwen2_5_vl"]
    model = _merged_model(family, "divprune")
    batch = family.batch([(1,), (2,)])
    with torch.no_grad():
        prompt = model(**batch, use_cache=True)
        cache = output_cache(prompt)
        branch = copy.deepcopy(cache)
        token = prompt.logits[:, -1:].argmax(-1)
        mask = torch.cat([batch["attention_mask"], torch.ones_like(token)], dim=1)
        first = model(input_ids=token, attention_mask=mask, cache=cache).logits
        again = model(input_ids=token, attention_mask=mask, cache=branch).logits
    torch.testing.assert_close(first, again, atol=0, rtol=0)
    memory = pruned_prompt(branch)
    assert memory is not None and memory.key_bias is not None and bool((memory.key_bias > 0).any())


def test_merge_is_refused_where_attention_takes_no_additive_mask():
    for name in ("qwen3_5", "qwen3_5_moe"):
        model = FAMILIES[name].build(attn_implementation="sdpa", seed=0)
        with pytest.raises(ValueError, match="linear-attention"):
            vs.attach(model, method="divprune", retention=0.3, merge=True)
    model = FAMILIES["qwen2_5_vl"].build(attn_implementation="sdpa", seed=0)
    text_config = model.model.language_model.config
    text_config._attn_implementation_internal = "flash_attention_2"
    with pytest.raises(ValueError, match="flash_attention_2.*sdpa"):
        vs.attach(model, method="divprune", retention=0.3, merge=True)
    vs.attach(model, method="divprune", retention=0.3)  # without merging it runs on any attention


def test_merge_round_trips_through_a_saved_selector(tmp_path):
    family = FAMILIES["qwen2_5_vl"]
    model = _merged_model(family, "visionselector_q")
    batch = family.batch([(1,)])
    with torch.no_grad():
        expected = model(**batch).logits
    vs.save_selector(model, tmp_path / "selector")
    vs.detach(model)
    vs.attach(model, method="visionselector_q", retention=0.3, selector=tmp_path / "selector")
    assert get_state(model).method.merges
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, expected)
    vs.detach(model)
    vs.attach(model, method="visionselector_q", retention=0.3, selector=tmp_path / "selector", merge=False)
    with torch.no_grad():
        assert not torch.equal(model(**batch).logits, expected)
