"""A tiny Qwen2.5-VL checkpoint with every file a hub download of the family has, built offline.

``build_qwen2_5_vl_checkpoint(folder)`` writes a randomly initialised model together with a
real (small) byte-level BPE tokenizer, Qwen's special tokens, a chat template in Qwen2.5-VL's
format and the image/video preprocessor configs, so that the ``Auto*`` classes of
``transformers`` load it the way they load ``Qwen/Qwen2.5-VL-*-Instruct``.

Layouts:

* ``"hub"``: the current layout; the chat template is ``chat_template.jinja``.
* ``"legacy"``: the layout of repositories saved before the template got its own file; the
  template is in ``chat_template.json`` (read by processors) and inside
  ``tokenizer_config.json`` (read by tokenizers), and there is no ``chat_template.jinja``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

__all__ = ["SPECIAL_TOKENS", "CHAT_TEMPLATE", "LEARNED_VOCAB_SIZE", "build_qwen2_5_vl_checkpoint",
           "build_tokenizer"]

# Qwen2's added tokens, in the order they follow the learned vocabulary.
SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
)
# 256 byte symbols plus the merges learned from the corpus; with the 14 added tokens the
# vocabulary has 384 entries.
LEARNED_VOCAB_SIZE = 370

# Splits text before the byte-level mapping the way Qwen2's tokenizer does: contractions,
# runs of letters (with one leading non-letter), single digits, punctuation runs, newlines
# and other whitespace.
_PRETOKENIZE_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)"
    r"|[^\r\n\p{L}\p{N}]?\p{L}+"
    r"|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+"
    r"|\s+(?!\S)"
    r"|\s+"
)

_CORPUS = """\
The small robot walked across the kitchen and looked at the red apple on the table.
A young girl reads a book about mountains, rivers and the animals that live near them.
Two cats are sleeping on a blue sofa while the dog watches the street from the window.
What is in the picture? There is a man riding a bicycle next to a green park.
Describe the image in one sentence, please. The photo shows a busy market at noon.
How many people are standing in front of the old building? I can see four of them.
The weather today is sunny and warm, but tomorrow it will rain in the afternoon.
She bought three oranges, five bananas and a bottle of milk for the family dinner.
The train leaves the station at 9:45 and arrives in the city two hours later.
Please answer the question with a single word: yes or no.
He wrote 12 letters in 2024 and sent every one of them to his friends abroad.
The chart shows that sales grew by 37 percent between January and June.
Our team met on Monday to plan the next steps of the project and share new ideas.
The children played football in the garden until the sun went down behind the hills.
Can you tell me which color the car is? The car is white with a black roof.
A large ship sails slowly through the harbour while birds fly above the water.
The museum opens at 10 o'clock and closes at 6, except on Sundays and holidays.
I think the answer is correct, because the numbers add up to 100 in the end.
There are 7 days in a week, 24 hours in a day and 60 minutes in an hour.
The video begins with a woman cooking soup and ends with the family eating together.
Look at the left side of the image: a tall tree stands beside a small wooden house.
The teacher asked the students to count from 0 to 9 and then from 10 to 19.
We're going to visit our grandparents this weekend; they'll cook something special.
It's easy to learn new words when you read every day and write short stories.
The phone number on the sign is 555 0123, and the shop is open until 8 pm.
Scientists measured the temperature of the lake every morning for 365 days.
A person is holding an umbrella in the rain near a bus stop on a quiet road.
The map shows where the river meets the sea, close to the northern border.
Is the light on or off? The light in the room is on, and the door is closed.
Thank you for your help! I will send you the report as soon as it is finished.
"""

# Qwen2.5-VL's conversation format: a default system turn, ChatML turns, and one vision block
# per image or video in the order the content lists them.
CHAT_TEMPLATE = "\n".join([
    "{%- if not messages or messages[0]['role'] != 'system' -%}",
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' -}}",
    "{%- endif -%}",
    "{%- for message in messages -%}",
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}",
    "{%- if message['content'] is string -%}",
    "{{- message['content'] -}}",
    "{%- else -%}",
    "{%- for item in message['content'] -%}",
    "{%- if item['type'] == 'image' or item['type'] == 'image_url' -%}",
    "{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}",
    "{%- elif item['type'] == 'video' -%}",
    "{{- '<|vision_start|><|video_pad|><|vision_end|>' -}}",
    "{%- elif item['type'] == 'text' -%}",
    "{{- item['text'] -}}",
    "{%- endif -%}",
    "{%- endfor -%}",
    "{%- endif -%}",
    "{{- '<|im_end|>\\n' -}}",
    "{%- endfor -%}",
    "{%- if add_generation_prompt -%}",
    "{{- '<|im_start|>assistant\\n' -}}",
    "{%- endif -%}",
]) + "\n"

# Small pixel budgets so that a 56x56 to 112x112 image becomes a 4x4 to 8x8 grid of 14-pixel
# patches (4 to 16 tokens after the 2x2 merge).
PATCH_SIZE, MERGE_SIZE, TEMPORAL_PATCH_SIZE = 14, 2, 2
MIN_PIXELS, MAX_PIXELS = 56 * 56, 112 * 112
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def build_tokenizer():
    """A ``PreTrainedTokenizerFast`` with Qwen2's pre-tokenization, a byte-level BPE vocabulary
    learned from a short English corpus, and Qwen's special tokens after it."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from tokenizers import trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_PRETOKENIZE_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=LEARNED_VOCAB_SIZE, min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    backend.train_from_iterator(_CORPUS.splitlines(), trainer=trainer)
    if backend.get_vocab_size() != LEARNED_VOCAB_SIZE:
        raise RuntimeError(f"the corpus gave {backend.get_vocab_size()} tokens, expected {LEARNED_VOCAB_SIZE}")
    backend.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in SPECIAL_TOKENS])

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token=None,
        extra_special_tokens=list(SPECIAL_TOKENS[1:]),
        image_token="<|image_pad|>", video_token="<|video_pad|>",
        vision_start_token="<|vision_start|>", vision_end_token="<|vision_end|>",
        padding_side="left", model_max_length=32768, split_special_tokens=False,
        clean_up_tokenization_spaces=False, add_prefix_space=False, errors="replace",
    )
    return tokenizer


def _model_config(tokenizer):
    from visionselector.presets import qwen2_5_vl_config

    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in SPECIAL_TOKENS}
    bos = pad = ids["<|endoftext|>"]
    eos = ids["<|im_end|>"]
    config = qwen2_5_vl_config(
        hidden_size=64, text_layers=2, heads=4, kv_heads=2, intermediate_size=128, vocab_size=len(tokenizer),
        vision_depth=2, vision_hidden=32, vision_heads=2, patch_size=PATCH_SIZE, window_size=4 * PATCH_SIZE,
        rope_theta=10000.0, bos_token_id=bos, eos_token_id=eos, pad_token_id=pad,
    )
    config.image_token_id = ids["<|image_pad|>"]
    config.video_token_id = ids["<|video_pad|>"]
    config.vision_start_token_id = ids["<|vision_start|>"]
    config.vision_end_token_id = ids["<|vision_end|>"]
    config.bos_token_id, config.eos_token_id, config.pad_token_id = bos, eos, pad
    return config


def _generation_config(tokenizer) -> dict:
    end_of_text = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    return {
        "bos_token_id": end_of_text,
        "pad_token_id": end_of_text,
        "eos_token_id": [tokenizer.convert_tokens_to_ids("<|im_end|>"), end_of_text],
        "do_sample": False,
        "repetition_penalty": 1.0,
        "transformers_version": _transformers_version(),
    }


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


def _preprocessor_config() -> dict:
    return {
        "do_convert_rgb": True,
        "do_normalize": True,
        "do_rescale": True,
        "do_resize": True,
        "image_mean": CLIP_MEAN,
        "image_processor_type": "Qwen2VLImageProcessor",
        "image_std": CLIP_STD,
        "max_pixels": MAX_PIXELS,
        "merge_size": MERGE_SIZE,
        "min_pixels": MIN_PIXELS,
        "patch_size": PATCH_SIZE,
        "processor_class": "Qwen2_5_VLProcessor",
        "resample": 3,
        "rescale_factor": 1 / 255,
        "temporal_patch_size": TEMPORAL_PATCH_SIZE,
    }


def _video_preprocessor_config() -> dict:
    return {
        "do_convert_rgb": True,
        "do_normalize": True,
        "do_rescale": True,
        "do_resize": True,
        "do_sample_frames": False,
        "fps": None,
        "image_mean": CLIP_MEAN,
        "image_std": CLIP_STD,
        "max_frames": 16,
        "max_pixels": MAX_PIXELS * 4,
        "merge_size": MERGE_SIZE,
        "min_frames": 4,
        "min_pixels": MIN_PIXELS,
        "patch_size": PATCH_SIZE,
        "processor_class": "Qwen2_5_VLProcessor",
        "resample": 3,
        "rescale_factor": 1 / 255,
        "size": {"longest_edge": MAX_PIXELS * 4, "shortest_edge": MIN_PIXELS},
        "temporal_patch_size": TEMPORAL_PATCH_SIZE,
        "video_processor_type": "Qwen2VLVideoProcessor",
    }


def build_qwen2_5_vl_checkpoint(folder: Path, *, seed: int = 0, layout: str = "hub") -> Path:
    """Write a tiny Qwen2.5-VL checkpoint into ``folder`` (created if needed) and return it.

    Files: ``config.json``, ``model.safetensors``, ``generation_config.json``, ``tokenizer.json``,
    ``tokenizer_config.json``, ``preprocessor_config.json``, ``video_preprocessor_config.json`` and
    the chat template (``chat_template.jinja`` for ``layout="hub"``, ``chat_template.json`` plus a
    ``chat_template`` entry in ``tokenizer_config.json`` for ``layout="legacy"``). The weights are
    random, drawn with ``seed``; everything else is the same for every call.
    """
    from transformers import Qwen2_5_VLForConditionalGeneration

    if layout not in ("hub", "legacy"):
        raise ValueError(f"layout must be 'hub' or 'legacy', got {layout!r}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)

    tokenizer = build_tokenizer()
    tokenizer.save_pretrained(folder)
    tokenizer_config_path = folder / "tokenizer_config.json"
    tokenizer_config = json.loads(tokenizer_config_path.read_text(encoding="utf-8"))
    # Named the way the published checkpoints name it, so AutoTokenizer builds the same class.
    tokenizer_config["tokenizer_class"] = "Qwen2Tokenizer"
    if layout == "hub":
        (folder / "chat_template.jinja").write_text(CHAT_TEMPLATE, encoding="utf-8")
    else:
        tokenizer_config["chat_template"] = CHAT_TEMPLATE
        _write_json(folder / "chat_template.json", {"chat_template": CHAT_TEMPLATE})
    _write_json(tokenizer_config_path, tokenizer_config)

    config = _model_config(tokenizer)
    generator_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = Qwen2_5_VLForConditionalGeneration(config).eval()
    finally:
        torch.random.set_rng_state(generator_state)
    model.save_pretrained(folder)
    _write_json(folder / "generation_config.json", _generation_config(tokenizer))
    _write_json(folder / "preprocessor_config.json", _preprocessor_config())
    _write_json(folder / "video_preprocessor_config.json", _video_preprocessor_config())
    return folder
