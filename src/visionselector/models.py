"""Loading a supported checkpoint and its processor, from a folder or a hub id.

The model loads through ``transformers``' Auto classes and the processor through
``AutoProcessor``. ``transformers`` 5 cannot build a Qwen-VL processor without
torchvision (its video processor needs it); the loader then builds the same processor
class without a video processor: images work exactly as before, and a sample with a
video fails with a message saying that video needs torchvision.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import torch

__all__ = ["SUPPORTED_MODEL_TYPES", "load_model", "load_processor", "supports_video", "greedy_settings",
           "cap_image_pixels", "REFERENCE_MODEL"]



def supported_model_types() -> dict[str, str]:
    """``config.model_type`` -> the class that loads it, for every family ``attach`` supports."""
    from .adapters import ADAPTERS

    return {name: adapter.class_names[0] for name, adapter in ADAPTERS.items()}


SUPPORTED_MODEL_TYPES = supported_model_types()
# The name under which commands take the shipped reference model.
REFERENCE_MODEL = "reference"
# Files a checkpoint's model and processor need; a hub id fetches only these.
CHECKPOINT_FILES = ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model", "*.tiktoken"]


def _checkpoint_folder(source: str | os.PathLike) -> Path:
    from .hub import resolve_folder
    from .reference import REFERENCE_DIR

    if str(source) == REFERENCE_MODEL:
        return REFERENCE_DIR
    folder = resolve_folder(source, what="checkpoint", allow_patterns=CHECKPOINT_FILES)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{source} is not a model checkpoint: config.json is missing in {folder}")
    return folder


def _checked_config(folder: Path) -> dict:
    """The checkpoint's ``config.json``; ``TypeError`` listing the supported classes for other families."""
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"cannot read {folder / 'config.json'}: {error}") from None
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise TypeError(f"{folder} holds a {model_type or 'model of unknown type'!s} checkpoint "
                        f"({', '.join(config.get('architectures') or []) if isinstance(config, dict) else ''}); "
                        f"supported classes: {', '.join(SUPPORTED_MODEL_TYPES.values())}")
    return config


def supports_video() -> bool:
    """Whether this environment can build video processors (they need torchvision)."""
    return importlib.util.find_spec("torchvision") is not None


def _image_only(processor_class):
    """``processor_class`` without its video processor: the same images and text, no videos."""

    class ImageOnlyProcessor(processor_class):
        # ProcessorMixin reads its sub-processors from this signature, so leaving the video
        # processor out of it is what makes the processor valid without one.
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            processor_class.__init__(self, image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

        def __call__(self, images=None, text=None, videos=None, **kwargs):
            if videos is not None:
                raise RuntimeError("this sample holds a video, and video needs torchvision, which is not installed "
                                   "(pip install torchvision matching your torch build); images work without it")
            return super().__call__(images=images, text=text, **kwargs)

    ImageOnlyProcessor.__name__ = ImageOnlyProcessor.__qualname__ = f"ImageOnly{processor_class.__name__}"
    return ImageOnlyProcessor


def load_processor(source: str | os.PathLike):
    """The checkpoint's processor: ``AutoProcessor``, or without torchvision the same class
    built from its image processor, tokenizer and chat template (images only)."""
    from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer

    folder = _checkpoint_folder(source)
    config = _checked_config(folder)
    if supports_video():
        return AutoProcessor.from_pretrained(folder)
    from transformers.models.auto.processing_auto import processor_class_from_name

    name = _processor_class_name(folder, config["model_type"])
    processor_class = processor_class_from_name(name)
    if processor_class is None:
        raise TypeError(f"{folder}: transformers has no processor class {name!r}")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    # The PIL backend is what transformers itself falls back to without torchvision.
    image_processor = AutoImageProcessor.from_pretrained(folder, backend="pil")
    chat_template = _chat_template(folder) or getattr(tokenizer, "chat_template", None)
    if chat_template is None:
        raise ValueError(f"{folder} has no chat template (chat_template.jinja, chat_template.json or in "
                         "tokenizer_config.json); prompts are built with the checkpoint's own template")
    import inspect

    # Settings the processor keeps beside its sub-processors (LLaVA's patch size, feature strategy).
    accepted = inspect.signature(processor_class.__init__).parameters
    settings = {key: value for key, value in _processor_settings(folder).items() if key in accepted}
    if "video_processor" not in accepted:  # a family without videos needs no torchvision
        return processor_class(image_processor=image_processor, tokenizer=tokenizer, chat_template=chat_template,
                               **settings)
    return _image_only(processor_class)(image_processor=image_processor, tokenizer=tokenizer,
                                        chat_template=chat_template, **settings)


def _processor_settings(folder: Path) -> dict:
    path = folder / "processor_config.json"
    if not path.is_file():
        return {}
    settings = json.loads(path.read_text())
    return {key: value for key, value in settings.items()
            if key not in ("processor_class", "image_processor", "tokenizer", "video_processor", "chat_template")}


def _processor_class_name(folder: Path, model_type: str) -> str:
    for name in ("processor_config.json", "preprocessor_config.json"):
        path = folder / name
        if path.is_file():
            value = json.loads(path.read_text()).get("processor_class")
            if value:
                return value
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES

    return PROCESSOR_MAPPING_NAMES[model_type]


def _chat_template(folder: Path) -> str | None:
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text()
    if (folder / "chat_template.json").is_file():
        return json.loads((folder / "chat_template.json").read_text()).get("chat_template")
    return None


def load_model(source: str | os.PathLike = REFERENCE_MODEL, *, dtype: torch.dtype | str = "auto",
               device: str | torch.device | None = None, attn_implementation: str | None = None,
               processor: bool = True):
    """``(model, processor)`` of a supported checkpoint: ``"reference"`` (the shipped model), a
    folder, or a hub id. ``dtype="auto"`` keeps the checkpoint's dtype on GPUs and uses float32
    on CPUs (which lack fast float16 kernels). The model is in eval mode. ``processor=False``
    loads the model alone (a folder without processor files) and returns ``(model, None)``."""
    from transformers import AutoModelForImageTextToText

    folder = _checkpoint_folder(source)
    _checked_config(folder)
    if device is not None:
        device = torch.device(device)
    if dtype == "auto" and (device is None or device.type == "cpu"):
        dtype = torch.float32
    options = {"dtype": dtype}
    if attn_implementation is not None:
        options["attn_implementation"] = attn_implementation
    model = AutoModelForImageTextToText.from_pretrained(folder, **options)
    if device is not None:
        model.to(device)
    return model.eval(), (load_processor(folder) if processor else None)


def cap_image_pixels(processor, max_pixels: int) -> None:
    """Resize images to at most ``max_pixels`` pixels (aspect kept) before encoding, in place.

    Only for image processors that size images by their pixel count (the Qwen families:
    ``size`` has ``shortest_edge`` and ``longest_edge`` as pixel counts); others are refused.
    A smaller floor (``shortest_edge``) comes down with the cap.
    """
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels < 1:
        raise ValueError(f"max_pixels must be a positive integer, got {max_pixels!r}")
    image_processor = processor.image_processor
    size = getattr(image_processor, "size", None)
    shortest = _size_entry(size, "shortest_edge")
    if shortest is None or _size_entry(size, "longest_edge") is None:
        raise ValueError(f"{type(image_processor).__name__} does not size images by their number of pixels, so "
                         "max_pixels cannot cap them (it applies to the Qwen families' image processors)")
    image_processor.size = {"shortest_edge": min(int(shortest), max_pixels), "longest_edge": max_pixels}


def _size_entry(size, name: str):
    if size is None:
        return None
    return size.get(name) if isinstance(size, dict) else getattr(size, name, None)


def greedy_settings(model, processor, max_new_tokens: int) -> dict:
    """``generate`` keyword arguments: the checkpoint's generation config, greedy."""
    generation = model.generation_config
    pad = generation.pad_token_id
    if pad is None:
        pad = processor.tokenizer.pad_token_id
    if pad is None:
        pad = generation.eos_token_id if isinstance(generation.eos_token_id, int) else generation.eos_token_id[0]
    return {"max_new_tokens": max_new_tokens, "do_sample": False, "num_beams": 1, "pad_token_id": pad,
            "temperature": None, "top_p": None, "top_k": None}
