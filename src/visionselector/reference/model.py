"""The reference model as an ordinary checkpoint: its tokenizer, chat template and processor files.

The model answers DigitsVQA questions from a closed vocabulary, so its tokenizer is
word-level (built with the ``tokenizers`` library): whitespace-separated, lower-cased
words after the special tokens. Its chat template writes the prompt the model was
trained on, ``<bos> <vision_start> <image> x n <vision_end> question-words <answer>``,
and each assistant turn as its answer words and ``<eos>``; the Auto classes load the
folder like any hub checkpoint.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["SPECIAL_TOKENS", "CHAT_TEMPLATE", "IMAGE_PIXELS", "reference_tokenizer", "write_processor_files",
           "load_reference_model", "export_reference"]

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>", "<image>", "<video>", "<vision_start>", "<vision_end>",
                  "<answer>")
# Each image is resized to this many pixels: 448 x 448, 16 x 16 = 256 merged visual tokens.
IMAGE_PIXELS = 448 * 448

CHAT_TEMPLATE = (
    "{%- macro render(content) -%}"
    "{%- if content is string -%}{{ ' ' + content }}"
    "{%- else -%}{%- for item in content -%}"
    "{%- if item['type'] == 'image' -%}<vision_start><image><vision_end>"
    "{%- elif item['type'] == 'video' -%}<vision_start><video><vision_end>"
    "{%- else -%}{{ ' ' + item['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- endmacro -%}"
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}<answer>{{- render(message['content']) -}}<eos>"
    "{%- elif message['role'] == 'user' -%}{{- render(message['content']) -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<answer>{%- endif -%}"
)


def reference_tokenizer(words: list[str] | None = None):
    """The word-level tokenizer of ``words`` (default: the task's vocabulary) after :data:`SPECIAL_TOKENS`."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from .task import vocabulary

    words = vocabulary() if words is None else list(words)
    tokens = list(SPECIAL_TOKENS) + words
    if len(set(tokens)) != len(tokens):
        raise ValueError(f"the vocabulary repeats a word or a special token: {sorted({t for t in tokens if tokens.count(t) > 1})}")
    backend = Tokenizer(models.WordLevel({token: index for index, token in enumerate(tokens)}, unk_token="<unk>"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with single spaces
    backend.add_special_tokens([AddedToken(token, normalized=False, special=True) for token in SPECIAL_TOKENS])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>",
        extra_special_tokens={"image_token": "<image>", "video_token": "<video>",
                              "vision_start_token": "<vision_start>", "vision_end_token": "<vision_end>"},
        chat_template=CHAT_TEMPLATE, padding_side="left")


def write_processor_files(directory: str | Path, words: list[str] | None = None) -> Path:
    """Write the tokenizer (``tokenizer.json``, ``tokenizer_config.json``), ``chat_template.jinja``
    and ``preprocessor_config.json`` of the reference model into ``directory``."""
    import json

    from transformers import Qwen2VLImageProcessorPil

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = reference_tokenizer(words)
    tokenizer.save_pretrained(directory)
    (directory / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    Qwen2VLImageProcessorPil(min_pixels=IMAGE_PIXELS, max_pixels=IMAGE_PIXELS).save_pretrained(directory)
    # The layout of hub checkpoints: the processor class and the image processor's usual name.
    path = directory / "preprocessor_config.json"
    config = json.loads(path.read_text())
    config.update(image_processor_type="Qwen2VLImageProcessor", processor_class="Qwen2_5_VLProcessor",
                  min_pixels=IMAGE_PIXELS, max_pixels=IMAGE_PIXELS)
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return directory


def load_reference_model(directory: str | Path | None = None):
    """``(model, processor)`` of the shipped reference model, or of a folder written by
    :func:`export_reference`, in float32 (the shipped weights are stored in float16)."""
    from ..models import REFERENCE_MODEL, load_model

    return load_model(REFERENCE_MODEL if directory is None else directory)


def export_reference(model, directory: str | Path, *, training: dict | None = None) -> Path:
    """Save ``model`` as a compact (float16) reference checkpoint with its processor files."""
    import copy
    import json

    import torch

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    half = copy.deepcopy(model).to(torch.float16)
    for sub_config in (half.config.text_config, half.config.vision_config):
        # A model loaded with an explicit dtype records it in each sub-config; the weights saved are float16.
        if getattr(sub_config, "dtype", None) is not None:
            sub_config.dtype = torch.float16
    half.save_pretrained(directory)
    write_processor_files(directory)
    if training is not None:
        (directory / "training.json").write_text(json.dumps(training, indent=1) + "\n")
    return directory
