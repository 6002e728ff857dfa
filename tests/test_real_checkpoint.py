"""The tiny Qwen2.5-VL checkpoint of ``real_checkpoint`` loads through the ``Auto*`` classes
like a downloaded one."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from real_checkpoint import CHAT_TEMPLATE, LEARNED_VOCAB_SIZE, SPECIAL_TOKENS, build_qwen2_5_vl_checkpoint

HAS_TORCHVISION = importlib.util.find_spec("torchvision") is not None

IMAGE_QUESTION = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in the picture?"}]}]
IMAGE_QUESTION_PROMPT = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What is in the picture?<|im_end|>\n"
    "<|im_start|>assistant\n"
)
COMMON_FILES = {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
                "tokenizer_config.json", "preprocessor_config.json", "video_preprocessor_config.json"}


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen2_5_vl_checkpoints")
    return {layout: build_qwen2_5_vl_checkpoint(root / layout, layout=layout) for layout in ("hub", "legacy")}


@pytest.fixture(scope="session")
def hub(checkpoints):
    return checkpoints["hub"]


@pytest.fixture(params=["hub", "legacy"])
def folder(request, checkpoints):
    return checkpoints[request.param]


def _config(folder):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(folder)


def test_files_of_each_layout(checkpoints):
    assert {p.name for p in checkpoints["hub"].iterdir()} == COMMON_FILES | {"chat_template.jinja"}
    assert {p.name for p in checkpoints["legacy"].iterdir()} == COMMON_FILES | {"chat_template.json"}
    legacy_template = json.loads((checkpoints["legacy"] / "chat_template.json").read_text())["chat_template"]
    assert legacy_template == (checkpoints["hub"] / "chat_template.jinja").read_text()
    assert json.loads((checkpoints["legacy"] / "tokenizer_config.json").read_text())["chat_template"] == legacy_template


def test_unknown_layout_is_refused(tmp_path):
    with pytest.raises(ValueError, match="layout"):
        build_qwen2_5_vl_checkpoint(tmp_path, layout="flat")


def test_tokenizer_ids_match_the_config(folder):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    config = _config(folder)
    ids = tokenizer.convert_tokens_to_ids(list(SPECIAL_TOKENS))
    assert ids == list(range(LEARNED_VOCAB_SIZE, LEARNED_VOCAB_SIZE + len(SPECIAL_TOKENS)))
    assert len(tokenizer) == config.text_config.vocab_size == LEARNED_VOCAB_SIZE + len(SPECIAL_TOKENS)

    assert tokenizer.image_token == "<|image_pad|>" and tokenizer.image_token_id == config.image_token_id
    assert tokenizer.video_token == "<|video_pad|>" and tokenizer.video_token_id == config.video_token_id
    assert tokenizer.vision_start_token_id == config.vision_start_token_id
    assert tokenizer.vision_end_token_id == config.vision_end_token_id
    assert tokenizer.convert_tokens_to_ids("<|vision_start|>") == config.vision_start_token_id

    end_of_text = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert tokenizer.bos_token is None
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
    for sub_config in (config, config.text_config):
        assert sub_config.eos_token_id == tokenizer.eos_token_id
        assert sub_config.pad_token_id == tokenizer.pad_token_id == end_of_text
        assert sub_config.bos_token_id == end_of_text
    assert tokenizer.padding_side == "left"
    assert set(SPECIAL_TOKENS) <= set(tokenizer.all_special_tokens)


def test_tokenizer_round_trip(hub):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(hub)
    sentence = "The train leaves at 9:45 with 37 passengers; it's café time for Zoë!\n  Next line."
    ids = tokenizer(sentence)["input_ids"]
    assert len(ids) < len(sentence.encode())  # merges were learned
    assert all(i < LEARNED_VOCAB_SIZE for i in ids)
    assert tokenizer.decode(ids) == sentence
    # Digits are single tokens, as in Qwen2's pre-tokenization.
    assert tokenizer.tokenize("2024") == ["2", "0", "2", "4"]
    # Special tokens are never split, and are dropped by skip_special_tokens.
    text = "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Hello<|im_end|>"
    ids = tokenizer(text)["input_ids"]
    assert ids[0] == tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert ids.count(tokenizer.image_token_id) == 1 and ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(ids) == text
    assert tokenizer.decode(ids, skip_special_tokens=True) == "user\nHello"


def test_left_padding(hub):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(hub)
    batch = tokenizer(["a short one", "a much longer sentence than the other"], padding=True, return_tensors="pt")
    assert batch["input_ids"][0, 0] == tokenizer.pad_token_id and batch["attention_mask"][0, 0] == 0
    assert batch["attention_mask"][1].all()


def _module_name(checkpoint_name: str) -> str:
    if checkpoint_name.startswith("visual."):
        return "model." + checkpoint_name
    if checkpoint_name.startswith("model."):
        return "model.language_model." + checkpoint_name.removeprefix("model.")
    return checkpoint_name


def test_model_reloads_with_the_saved_weights(checkpoints, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForImageTextToText, Qwen2_5_VLForConditionalGeneration

    hub = checkpoints["hub"]
    model, info = AutoModelForImageTextToText.from_pretrained(hub, output_loading_info=True)
    assert type(model) is Qwen2_5_VLForConditionalGeneration
    assert not info["missing_keys"] and not info["unexpected_keys"]
    saved = load_file(hub / "model.safetensors")
    # The file uses the published checkpoints' names (``model.layers.*``, ``visual.*``), which
    # transformers maps onto its module tree (``model.language_model.*``, ``model.visual.*``).
    assert {name.split(".")[0] for name in saved} == {"model", "visual", "lm_head"}
    state = model.state_dict()
    assert {_module_name(name) for name in saved} == set(state)
    for name, tensor in saved.items():
        assert torch.equal(state[_module_name(name)], tensor), name
    assert model.config.vision_config.patch_size == 14 and model.config.vision_config.spatial_merge_size == 2

    # The same seed gives the same weights; another seed does not.
    legacy = load_file(checkpoints["legacy"] / "model.safetensors")
    assert all(torch.equal(legacy[name], tensor) for name, tensor in saved.items())
    other = load_file(build_qwen2_5_vl_checkpoint(tmp_path / "seed1", seed=1) / "model.safetensors")
    assert not torch.equal(other["lm_head.weight"], saved["lm_head.weight"])


def test_generation_config(hub):
    from transformers import AutoTokenizer, GenerationConfig

    tokenizer = AutoTokenizer.from_pretrained(hub)
    generation = GenerationConfig.from_pretrained(hub)
    end_of_text = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert generation.eos_token_id == [tokenizer.convert_tokens_to_ids("<|im_end|>"), end_of_text]
    assert generation.pad_token_id == end_of_text and generation.bos_token_id == end_of_text
    assert generation.do_sample is False


def test_chat_template(folder):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    rendered = tokenizer.apply_chat_template(IMAGE_QUESTION, tokenize=False, add_generation_prompt=True)
    assert rendered == IMAGE_QUESTION_PROMPT

    conversation = [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": [{"type": "text", "text": "Compare "}, {"type": "video"},
                                     {"type": "text", "text": " and "}, {"type": "image"}]},
        {"role": "assistant", "content": "They match."},
    ]
    assert tokenizer.apply_chat_template(conversation, tokenize=False) == (
        "<|im_start|>system\nAnswer briefly.<|im_end|>\n"
        "<|im_start|>user\nCompare <|vision_start|><|video_pad|><|vision_end|> and "
        "<|vision_start|><|image_pad|><|vision_end|><|im_end|>\n"
        "<|im_start|>assistant\nThey match.<|im_end|>\n"
    )


def test_processors_read_the_chat_template_of_either_layout(folder):
    from transformers import Qwen2_5_VLProcessor

    processor_dict, _ = Qwen2_5_VLProcessor.get_processor_dict(str(folder))
    assert processor_dict["chat_template"] == CHAT_TEMPLATE


def test_image_processor(hub):
    from PIL import Image
    from transformers import AutoImageProcessor

    processor = AutoImageProcessor.from_pretrained(hub)
    assert type(processor).__name__.startswith("Qwen2VLImageProcessor")
    config = _config(hub).vision_config
    assert processor.patch_size == config.patch_size and processor.merge_size == config.spatial_merge_size
    assert processor.temporal_patch_size == config.temporal_patch_size

    image = Image.new("RGB", (84, 84), (200, 30, 30))
    out = processor(images=image, return_tensors="pt")
    assert out["image_grid_thw"].tolist() == [[1, 6, 6]]
    assert out["pixel_values"].shape == (36, 3 * 2 * 14 * 14)
    assert int(out["image_grid_thw"].prod()) // processor.merge_size ** 2 == 9
    for side, tokens in ((56, 4), (112, 16), (224, 16), (20, 4)):
        grid = processor(images=Image.new("RGB", (side, side)), return_tensors="pt")["image_grid_thw"]
        assert int(grid.prod()) // 4 == tokens, side


def test_prompt_image_and_model_fit_together(hub):
    from PIL import Image
    from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(hub)
    images = AutoImageProcessor.from_pretrained(hub)(images=Image.new("RGB", (84, 112)), return_tensors="pt")
    tokens = int(images["image_grid_thw"].prod()) // 4
    prompt = tokenizer.apply_chat_template(IMAGE_QUESTION, tokenize=False, add_generation_prompt=True)
    batch = tokenizer([prompt.replace("<|image_pad|>", "<|image_pad|>" * tokens)], return_tensors="pt")
    mm_token_type_ids = (batch["input_ids"] == tokenizer.image_token_id).int()
    model = AutoModelForImageTextToText.from_pretrained(hub).eval()
    with torch.no_grad():
        logits = model(**batch, **images, mm_token_type_ids=mm_token_type_ids).logits
    assert logits.shape == (1, batch["input_ids"].shape[1], len(tokenizer))
    assert torch.isfinite(logits).all()


def test_auto_processor_needs_torchvision(hub):
    from transformers import AutoProcessor

    if HAS_TORCHVISION:
        processor = AutoProcessor.from_pretrained(hub)
        assert processor.image_token_id == _config(hub).image_token_id
        assert processor.video_token_id == _config(hub).video_token_id
        return
    with pytest.raises(ImportError, match="(?i)torchvision"):
        AutoProcessor.from_pretrained(hub)
