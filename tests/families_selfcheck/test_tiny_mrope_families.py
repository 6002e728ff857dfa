"""Self-check of the tiny M-RoPE Qwen families in ``tests/families``, on the UNPATCHED models:
the reference inputs, the per-sample layout, the hand-driven decoding loop and the positions of
generated tokens must reproduce what the real ``transformers`` classes do by themselves.

``families`` is importable because ``tests/conftest.py`` puts ``tests/`` on ``sys.path``
(pytest's default ``prepend`` import mode), as for ``hub_cache``.
"""

from __future__ import annotations

import pytest
import torch

from families import FAMILIES

MROPE = [name for name in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "qwen3_5", "qwen3_5_moe")]
DEEPSTACK = {"qwen3_vl", "qwen3_vl_moe"}
# Different image sizes in one batch, a two-image sample and a text-only row.
SAMPLES = [(1,), (0, 2), (), (2,)]
NEW_TOKENS = 3

_models: dict = {}


def model_for(name: str, attn_implementation: str = "sdpa"):
    key = (name, attn_implementation)
    if key not in _models:
        _models[key] = FAMILIES[name].build(attn_implementation=attn_implementation, seed=0)
    model = _models[key]
    model.model.rope_deltas = None  # state left by an earlier generate/forward
    return model


class TextModelCalls:
    """Records the ``position_ids`` and sequence length of every call to the text model."""

    def __init__(self, model):
        self.calls = []
        self.handle = model.model.language_model.register_forward_pre_hook(self.record, with_kwargs=True)

    def record(self, module, args, kwargs):
        positions = kwargs.get("position_ids")
        self.calls.append(None if positions is None else positions.detach().clone())

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def spatial(positions):
    """The three rotary rows of what the text model got (``generate`` prepends a text row)."""
    return positions[1:] if positions.shape[0] == 4 else positions


def test_all_mrope_families_are_registered():
    assert set(MROPE) <= set(FAMILIES)


@pytest.mark.parametrize("name", MROPE)
def test_tiny_model_shape(name):
    family = FAMILIES[name]
    model = model_for(name)
    text = model.config.text_config
    assert model.config.model_type == name
    assert not model.training and next(model.parameters()).dtype == torch.float32
    assert text.num_hidden_layers == 4 and text.num_attention_heads == 4 and text.num_key_value_heads == 2
    assert model.config.vision_config.spatial_merge_size == 2
    assert len({h * w for h, w in family.image_sizes}) == len(family.image_sizes)
    if name.startswith("qwen3_5"):
        assert text.layer_types == ["linear_attention"] * 3 + ["full_attention"]
    if name == "qwen2_5_vl":
        assert list(model.config.vision_config.fullatt_block_indexes) == [1, 3]
    if name in DEEPSTACK:
        assert len(model.config.vision_config.deepstack_visual_indexes) == 3


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("name", MROPE)
def test_forward_equals_reference_text_run(name, padding_side, attn):
    """(a) ``model(**batch)`` equals the text model run on the reference inputs."""
    family = FAMILIES[name]
    model = model_for(name, attn)
    batch = family.batch(SAMPLES, padding_side=padding_side, seed=1)
    valid = batch["attention_mask"].bool()
    with torch.no_grad(), TextModelCalls(model) as calls:
        expected = model(**batch).logits
    reference = family.reference(model, batch)
    assert reference.positions.shape == (3, *batch["input_ids"].shape)
    # The positions the model computed for itself are the reference's (at valid tokens).
    assert torch.equal(spatial(calls.calls[0])[:, valid], reference.positions[:, valid])
    assert (reference.deepstack is not None) == (name in DEEPSTACK)
    with torch.no_grad():
        logits, _ = family.run_text(model, reference.embeds, reference.positions, batch["attention_mask"], None,
                                    deepstack=reference.deepstack, visual_mask=reference.visual_mask)
    torch.testing.assert_close(logits[valid], expected[valid], atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", MROPE)
def test_each_row_equals_its_sample_alone(name):
    """(b) every row of a left-padded batch gives the logits of its sample run alone."""
    family = FAMILIES[name]
    model = model_for(name)
    batch = family.batch(SAMPLES, padding_side="left", seed=2)
    with torch.no_grad():
        batched = model(**batch).logits[:, -1]
        for row in range(len(SAMPLES)):
            single = family.single(batch, SAMPLES, row)
            assert single["input_ids"].shape[1] == int(batch["attention_mask"][row].sum())
            if SAMPLES[row]:
                patches = sum(h * w for h, w in (family.image_sizes[i] for i in SAMPLES[row]))
                assert single["pixel_values"].shape[0] == patches
            else:
                assert "pixel_values" not in single
            model.model.rope_deltas = None
            alone = model(**single).logits[0, -1]
            torch.testing.assert_close(batched[row], alone, atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", MROPE)
def test_greedy_decoding_by_hand_reproduces_generate(name):
    """(c) prefill with ``run_text`` on the reference, then feed each greedy token back at
    ``next_positions``: the same ids as ``generate``, and the same positions it uses."""
    family = FAMILIES[name]
    model = model_for(name)
    batch = family.batch(SAMPLES, padding_side="left", seed=3)
    prompt = batch["input_ids"].shape[1]
    with torch.no_grad(), TextModelCalls(model) as calls:
        generated = model.generate(**batch, max_new_tokens=NEW_TOKENS, do_sample=False)[:, prompt:]

    reference = family.reference(model, batch)
    mask = batch["attention_mask"]
    # What generate handed the text model: the reference positions at the prompt, then
    # ``next_positions`` for every fed-back token.
    valid = mask.bool()
    assert len(calls.calls) == NEW_TOKENS
    assert torch.equal(spatial(calls.calls[0])[:, valid], reference.positions[:, valid])
    # M-RoPE numbers a sample with images below its token count: not a plain running index.
    assert (family.next_positions(reference, mask, 0)[0, :, 0] < mask.sum(1)).any()
    for step, positions in enumerate(calls.calls[1:]):
        assert torch.equal(spatial(positions), family.next_positions(reference, mask, step)), step

    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos]) - {None}
    pad = model.generation_config.pad_token_id
    finished = torch.zeros(mask.shape[0], dtype=torch.bool)
    tokens = []
    with torch.no_grad():
        logits, cache = family.run_text(model, reference.embeds, reference.positions, mask, None,
                                        deepstack=reference.deepstack, visual_mask=reference.visual_mask)
        for step in range(NEW_TOKENS):
            token = logits[:, -1].argmax(-1)
            token = torch.where(finished, torch.full_like(token, pad), token)
            tokens.append(token)
            finished |= torch.isin(token, torch.tensor(sorted(eos), dtype=token.dtype))
            if step == NEW_TOKENS - 1:
                break
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            embeds = model.get_input_embeddings()(token[:, None])
            logits, cache = family.run_text(model, embeds, family.next_positions(reference, batch["attention_mask"],
                                                                                  step), mask, cache)
    assert torch.equal(torch.stack(tokens, dim=1), generated)


@pytest.mark.parametrize("name", MROPE)
def test_placeholders_match_feature_rows(name):
    """(d) one placeholder per merged feature row, in processor layout."""
    family = FAMILIES[name]
    model = model_for(name)
    batch = family.batch(SAMPLES, padding_side="left", seed=4)
    ids = batch["input_ids"]
    config = model.config
    merge = config.vision_config.spatial_merge_size
    placeholders = torch.isin(ids, torch.tensor(family.placeholder_ids))
    with torch.no_grad():
        features = torch.cat(model.model.get_image_features(batch["pixel_values"], batch["image_grid_thw"],
                                                            return_dict=True).pooler_output)
    assert int(placeholders.sum()) == features.shape[0] == int((batch["image_grid_thw"].prod(-1) // merge ** 2).sum())
    patches = sum(h * w for sample in SAMPLES for h, w in (family.image_sizes[i] for i in sample))
    assert batch["pixel_values"].shape[0] == patches
    assert torch.equal(batch["mm_token_type_ids"] == 1, ids == config.image_token_id)
    assert int((ids == config.vision_start_token_id).sum()) == sum(len(sample) for sample in SAMPLES)
    for row, sample in enumerate(SAMPLES):
        tokens = ids[row, batch["attention_mask"][row].bool()].tolist()
        assert tokens.count(config.vision_start_token_id) == tokens.count(config.vision_end_token_id) == len(sample)
        if sample:
            assert tokens[3] == config.vision_start_token_id and tokens[-5] == config.vision_end_token_id
        assert not set(tokens) & {config.text_config.pad_token_id, config.text_config.bos_token_id,
                                  config.text_config.eos_token_id}
    reference = family.reference(model, batch)
    assert torch.equal(reference.visual_mask, placeholders)
    torch.testing.assert_close(reference.embeds[placeholders], features, atol=0, rtol=0)
    if name in DEEPSTACK:
        assert len(reference.deepstack) == len(config.vision_config.deepstack_visual_indexes)
        for layer in reference.deepstack:
            assert layer.shape == reference.embeds.shape
            assert not layer[~placeholders].any() and layer[placeholders].abs().sum() > 0
