"""Self-check of the tiny LLaVA families in ``tests/families/llava.py``, on the UNPATCHED models:
the processor layout, the reference inputs, the per-sample layout, the hand-driven decoding loop
and the positions of generated tokens must reproduce what the real ``transformers`` classes do.

``families`` is importable because ``tests/conftest.py`` puts ``tests/`` on ``sys.path``
(pytest's default ``prepend`` import mode), as for ``hub_cache``.
"""

from __future__ import annotations


import numpy as np
import pytest
import torch

from families import FAMILIES
from families.llava import (
    IMAGE_ID,
    IMAGE_SIZE,
    PAD_ID,
    PINPOINTS,
    VOCAB_SIZE,
    newline_mask,
    onevision_image_layout,
    onevision_num_patches,
)

NAMES = ["llava", "llava_onevision"]
# Different image sizes in one batch (AnyRes with unpadded rows, with unpadded columns and
# anyres_max downsampling, a single tile), a text-only row and a two-image sample.
SAMPLES = [(0,), (), (1,), (2, 0), (2,)]
NEW_TOKENS = 3

_models: dict = {}


def model_for(name, attn_implementation="sdpa"):
    key = (name, attn_implementation)
    if key not in _models:
        _models[key] = FAMILIES[name].build(attn_implementation=attn_implementation, seed=0)
    return _models[key]


def valid(batch):
    return batch["attention_mask"].bool()


def test_families_are_registered_and_built_as_specified():
    for name in NAMES:
        tiny = FAMILIES[name]
        assert tiny.name == name
        for attn in ("sdpa", "eager"):
            model = model_for(name, attn)
            assert model.config.model_type == name
            assert not model.training
            assert all(p.dtype == torch.float32 for p in model.parameters())
            assert model.config.text_config.num_hidden_layers == 4
            for sub in (model.config, model.config.text_config, model.config.vision_config):
                assert sub._attn_implementation == attn
            text = model.config.text_config
            assert text.vocab_size == VOCAB_SIZE and text.pad_token_id == PAD_ID
            assert all(0 <= i < text.vocab_size for i in tiny.placeholder_ids)
        batch = tiny.batch(SAMPLES)
        special = set(tiny.placeholder_ids) | {PAD_ID, text.bos_token_id, text.eos_token_id}
        text_ids = batch["input_ids"][valid(batch) & ~torch.isin(batch["input_ids"], torch.tensor(tiny.placeholder_ids))]
        assert not torch.isin(text_ids, torch.tensor(sorted(special))).any()
    llava = model_for("llava").config
    assert (llava.vision_feature_layer, llava.vision_feature_select_strategy) == (-2, "default")
    assert llava.vision_config.model_type == "clip_vision_model" and llava.text_config.model_type == "llama"
    ov = model_for("llava_onevision").config
    assert (ov.vision_feature_layer, ov.vision_feature_select_strategy) == (-1, "full")
    assert ov.vision_aspect_ratio == "anyres_max_9"
    assert ov.vision_config.model_type == "siglip_vision_model" and ov.text_config.model_type == "qwen2"


# --------------------------------------------------------------------------- processor layout
def _tokenizer():
    tokenizers = pytest.importorskip("tokenizers")
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(VOCAB_SIZE) if i not in (PAD_ID, IMAGE_ID, IMAGE_ID + 1)}
    vocab.update({"<pad>": PAD_ID, "<image>": IMAGE_ID, "<video>": IMAGE_ID + 1})
    model = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<pad>"))
    model.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=model, pad_token="<pad>",
                                        extra_special_tokens={"image_token": "<image>", "video_token": "<video>"})
    tokenizer.padding_side = "left"
    return tokenizer


def _prompts(batch):
    """Our rows as text with one ``<image>`` per image (runs of placeholders collapsed)."""
    prompts = []
    for ids in (batch["input_ids"][row, valid(batch)[row]].tolist() for row in range(len(batch["input_ids"]))):
        words = []
        for k, token in enumerate(ids):
            if token != IMAGE_ID:
                words.append(f"w{token}")
            elif k == 0 or ids[k - 1] != IMAGE_ID:
                words.append("<image>")
        prompts.append(" ".join(words))
    return prompts


def _images(sizes):
    image = pytest.importorskip("PIL.Image")
    rng = np.random.default_rng(0)
    return [image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for h, w in sizes]


def test_llava_batch_is_what_the_llava_processor_makes():
    from transformers import CLIPImageProcessorPil
    from transformers.models.llava.processing_llava import LlavaProcessor

    tiny = FAMILIES["llava"]
    config = model_for("llava").config
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessorPil(size={"shortest_edge": IMAGE_SIZE},
                                              crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}),
        tokenizer=_tokenizer(), patch_size=config.vision_config.patch_size,
        vision_feature_select_strategy=config.vision_feature_select_strategy, num_additional_image_tokens=1)
    batch = tiny.batch(SAMPLES)
    images = _images([tiny.image_sizes[i] for sample in SAMPLES for i in sample])
    out = processor(images=images, text=_prompts(batch), return_tensors="pt", padding=True)
    assert torch.equal(out["input_ids"], batch["input_ids"])
    assert torch.equal(out["attention_mask"], batch["attention_mask"])
    assert out["pixel_values"].shape == batch["pixel_values"].shape
    assert set(out.keys()) == set(batch.keys())
    _check_single_rows(tiny, processor, batch, nested=False)
    # Every original size gives the same count (resize + centre crop).
    counts = processor._get_num_multimodal_tokens(image_sizes=list(tiny.image_sizes))["num_image_tokens"]
    assert counts == [tiny.notes["tokens_per_image"]] * len(tiny.image_sizes)


def _onevision_processor(tokenizer=None):
    """``LlavaOnevisionProcessor`` without its video processor (which needs torchvision)."""
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )
    from transformers.models.llava_onevision.processing_llava_onevision import LlavaOnevisionProcessor

    config = model_for("llava_onevision").config
    processor = object.__new__(LlavaOnevisionProcessor)
    processor.__dict__.update(
        image_processor=LlavaOnevisionImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
                                                        image_grid_pinpoints=[list(p) for p in PINPOINTS]),
        tokenizer=tokenizer, chat_template=None, image_token="<image>", video_token="<video>",
        image_token_id=IMAGE_ID, video_token_id=IMAGE_ID + 1,
        num_image_tokens=(config.vision_config.image_size // config.vision_config.patch_size) ** 2,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        vision_aspect_ratio=config.vision_aspect_ratio)
    return processor


def test_onevision_token_counts_are_the_processors():
    tiny = FAMILIES["llava_onevision"]
    processor = _onevision_processor()
    counts = []
    for height, width in tiny.image_sizes:
        expected = processor._get_number_of_features(height, width, IMAGE_SIZE, IMAGE_SIZE)
        assert len(onevision_image_layout(height, width, multi=False)) == expected
        assert len(onevision_image_layout(height, width, multi=True)) == processor.num_image_tokens + 1
        counts.append(expected)
    assert counts == [94, 160, 36]  # rows unpadded / columns unpadded + anyres_max_9 / one tile


def test_onevision_batch_is_what_the_onevision_processor_makes():
    tiny = FAMILIES["llava_onevision"]
    processor = _onevision_processor(_tokenizer())
    batch = tiny.batch(SAMPLES)
    nested = [_images([tiny.image_sizes[i] for i in sample]) for sample in SAMPLES]
    out = processor(images=nested, text=_prompts(batch), return_tensors="pt", padding=True)
    assert torch.equal(out["input_ids"], batch["input_ids"])
    assert torch.equal(out["attention_mask"], batch["attention_mask"])
    assert out["pixel_values"].shape == batch["pixel_values"].shape
    assert torch.equal(out["image_sizes"], batch["image_sizes"])
    assert torch.equal(out["batch_num_images"], batch["batch_num_images"])
    assert set(out.keys()) == set(batch.keys())
    # The patch padding is where ours is (zero tiles).
    assert torch.equal(out["pixel_values"].flatten(2).abs().sum(-1) == 0,
                       batch["pixel_values"].flatten(2).abs().sum(-1) == 0)
    _check_single_rows(tiny, processor, batch, nested=True)


def _check_single_rows(tiny, processor, batch, nested):
    """``single`` of each row is what the processor makes of that sample alone."""
    prompts = _prompts(batch)
    for row, sample in enumerate(SAMPLES):
        single = tiny.single(batch, SAMPLES, row)
        images = _images([tiny.image_sizes[i] for i in sample]) or None
        if nested and images is not None:
            images = [images]
        out = processor(images=images, text=[prompts[row]], return_tensors="pt", padding=True)
        assert set(out.keys()) == set(single.keys())
        for key, value in out.items():
            if key == "pixel_values":
                assert value.shape == single[key].shape
            else:
                assert torch.equal(value, single[key]), key


# --------------------------------------------------------------------------- model checks
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("name", NAMES)
def test_reference_gives_the_models_logits(name, attn):
    """(a) the unpatched model with generate-style positions == run_text(reference)."""
    tiny = FAMILIES[name]
    model = model_for(name, attn)
    batch = tiny.batch(SAMPLES, padding_side="left")
    reference = tiny.reference(model, batch)
    positions = batch["attention_mask"].cumsum(-1) - 1
    assert torch.equal(reference.positions, positions.masked_fill(batch["attention_mask"] == 0, 0))
    assert torch.equal(reference.visual_mask, torch.isin(batch["input_ids"], torch.tensor(tiny.placeholder_ids)))
    assert reference.deepstack is None
    with torch.no_grad():
        expected = model(**batch, position_ids=reference.positions).logits
        logits, cache = tiny.run_text(model, reference.embeds, reference.positions, batch["attention_mask"], None)
    assert cache.get_seq_length() == batch["input_ids"].shape[1]
    torch.testing.assert_close(logits[valid(batch)], expected[valid(batch)], atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", NAMES)
def test_each_row_alone_is_the_same(name):
    """(b) a row of the padded batch == that sample alone (single), last token and all tokens."""
    tiny = FAMILIES[name]
    model = model_for(name)
    batch = tiny.batch(SAMPLES, padding_side="left")
    reference = tiny.reference(model, batch)
    with torch.no_grad():
        batched = model(**batch, position_ids=reference.positions).logits
        for row in range(len(SAMPLES)):
            single = tiny.single(batch, SAMPLES, row)
            assert single["input_ids"].shape[1] == int(batch["attention_mask"][row].sum())
            alone = model(**single).logits[0]
            torch.testing.assert_close(batched[row, -1], alone[-1], atol=1e-4, rtol=0)
            torch.testing.assert_close(batched[row, valid(batch)[row]], alone, atol=1e-4, rtol=0)
            own = tiny.reference(model, single)
            torch.testing.assert_close(own.embeds[0], reference.embeds[row, valid(batch)[row]], atol=1e-5, rtol=0)
            assert torch.equal(own.positions[0], reference.positions[row, valid(batch)[row]])
            assert torch.equal(own.visual_mask[0], reference.visual_mask[row, valid(batch)[row]])


class ForwardCalls:
    """Records the ``position_ids`` and ``input_ids`` of every forward ``generate`` makes."""

    def __init__(self, model):
        self.calls = []
        self.handle = model.register_forward_pre_hook(self.record, with_kwargs=True)

    def record(self, module, args, kwargs):
        self.calls.append({key: kwargs.get(key) for key in ("position_ids", "input_ids")})

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def _generate(model, batch):
    with torch.no_grad(), ForwardCalls(model) as calls:
        out = model.generate(**batch, max_new_tokens=NEW_TOKENS, do_sample=False)
    return out[:, batch["input_ids"].shape[1]:], calls.calls


def _decode_by_hand(tiny, model, batch):
    """Greedy decoding with run_text at next_positions, stopping rows at EOS as generate does."""
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
    pad = model.generation_config.pad_token_id
    reference = tiny.reference(model, batch)
    mask = batch["attention_mask"]
    with torch.no_grad():
        logits, cache = tiny.run_text(model, reference.embeds, reference.positions, mask, None)
        tokens, done = [], torch.zeros(mask.shape[0], dtype=torch.bool)
        for step in range(NEW_TOKENS):
            token = logits[:, -1].argmax(-1)
            token = torch.where(done, torch.full_like(token, pad if pad is not None else 0), token)
            tokens.append(token)
            done |= torch.isin(token, torch.tensor(sorted(eos) or [-1]))
            if step + 1 == NEW_TOKENS:
                break
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=-1)
            embeds = model.model.get_input_embeddings()(token[:, None])
            logits, cache = tiny.run_text(model, embeds, tiny.next_positions(reference, mask, step), mask, cache)
    return torch.stack(tokens, dim=1)


@pytest.mark.parametrize("name", NAMES)
def test_greedy_decoding_by_hand_is_generate(name):
    """(c) greedy decoding by hand (run_text at next_positions) == model.generate."""
    tiny = FAMILIES[name]
    model = model_for(name)
    batch = tiny.batch(SAMPLES, padding_side="left")
    generated, calls = _generate(model, batch)
    assert torch.equal(_decode_by_hand(tiny, model, batch), generated)
    # generate's own numbering: prefill = reference positions, then next_positions(step).
    reference = tiny.reference(model, batch)
    assert len(calls) == NEW_TOKENS
    assert torch.equal(calls[0]["position_ids"], reference.positions)
    for step, call in enumerate(calls[1:]):
        expected = tiny.next_positions(reference, batch["attention_mask"], step)
        assert torch.equal(call["position_ids"], expected)
        # left padding: number of valid prompt tokens + step
        assert torch.equal(expected, batch["attention_mask"].sum(-1, keepdim=True) + step)


@pytest.mark.parametrize("name", NAMES)
def test_next_positions_follow_generate_with_right_padding(name):
    """generate continues right-padded rows from their last (padding) column: position 0 + 1."""
    tiny = FAMILIES[name]
    model = model_for(name)
    batch = tiny.batch(SAMPLES, padding_side="right")
    reference = tiny.reference(model, batch)
    _, calls = _generate(model, batch)
    assert torch.equal(calls[0]["position_ids"], reference.positions)
    for step, call in enumerate(calls[1:]):
        assert torch.equal(call["position_ids"], tiny.next_positions(reference, batch["attention_mask"], step))


@pytest.mark.parametrize("name", NAMES)
def test_placeholders_match_feature_rows(name):
    """(d) per image size (alone and in a two-image sample) and per batch: placeholders == features."""
    tiny = FAMILIES[name]
    model = model_for(name)
    for index, (height, width) in enumerate(tiny.image_sizes):
        for sample in ((index,), (index, index)):
            batch = tiny.batch([sample])
            kwargs = {k: batch[k] for k in ("pixel_values", "image_sizes", "batch_num_images") if k in batch}
            with torch.no_grad():
                features = model.model.get_image_features(**kwargs, return_dict=True).pooler_output
            rows = [f.shape[0] for f in features]
            assert len(rows) == len(sample)
            assert sum(rows) == int((batch["input_ids"] == IMAGE_ID).sum())
            if name == "llava_onevision":
                multi = len(sample) > 1
                assert rows == [len(onevision_image_layout(height, width, multi))] * len(sample)
                assert batch["pixel_values"].shape[1] == onevision_num_patches(height, width, multi)
            else:
                assert rows == [tiny.notes["tokens_per_image"]] * len(sample)
    batch = tiny.batch(SAMPLES)
    reference = tiny.reference(model, batch)  # raises if the counts differ
    assert int(reference.visual_mask.sum()) == int(torch.isin(batch["input_ids"],
                                                                torch.tensor(tiny.placeholder_ids)).sum())


def test_onevision_newline_mask_marks_the_image_newline_rows():
    """(e) newline_mask == the placeholder rows whose embedding is ``image_newline``."""
    tiny = FAMILIES["llava_onevision"]
    model = model_for("llava_onevision")
    for padding_side in ("left", "right"):
        batch = tiny.batch(SAMPLES, padding_side=padding_side)
        reference = tiny.reference(model, batch)
        mask = newline_mask(model, batch)
        is_newline = (reference.embeds == model.model.image_newline.detach()).all(-1)
        assert torch.equal(mask, is_newline)
        assert not (mask & ~reference.visual_mask).any()
        counts = tiny.notes["newline_token_count"](batch)
        assert torch.equal(counts, mask.sum(-1))
        # 94-token image: 6 rows; text only: 0; two images: one each; 160: 12 rows; 36: 4 rows.
        assert counts.tolist() == [6, 0, 12, 2, 4]
        assert torch.equal(tiny.notes["newline_mask"](model, batch), mask)
