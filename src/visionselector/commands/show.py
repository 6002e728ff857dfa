"""``visionselector show``: draw the visual tokens a method keeps on an image (PNG)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .common import MODEL_HELP, check_file, check_output_folder, model_and_processor

__all__ = ["ShowConfig", "run_show"]


@dataclass
class ShowConfig:
    """Settings of ``visionselector show``."""

    out: str = field(default="kept_tokens.png", metadata={"help": "output PNG"})
    model: str = field(default="reference", metadata={"help": MODEL_HELP})
    method: str = field(default="visionselector", metadata={"help": "selection method"})
    retention: float = field(default=0.1, metadata={"help": "fraction of visual tokens kept"})
    selector: str | None = field(default=None, metadata={
        "help": "trained selector for a learned method: our folder, a VisionSelector release folder or a hub id"})
    data: str | None = field(default=None, metadata={"help": "conversation JSONL to take the image and question from"})
    image_folder: str | None = field(default=None, metadata={
        "help": "folder that relative image paths start from (default: the JSONL file's folder)"})
    index: int = field(default=0, metadata={"help": "example of --data to show"})
    image: str | None = field(default=None, metadata={"help": "an image file (instead of --data)"})
    question: str | None = field(default=None, metadata={"help": "the question about --image"})
    max_new_tokens: int = field(default=16, metadata={"help": "answer length limit in tokens"})


def run_show(config: ShowConfig, *, model=None, processor=None, print_fn=print) -> Path:
    """Write a PNG of the tokens ``method`` keeps at ``retention`` for one image and question."""
    from ..data.batches import load_examples, load_image
    from ..data.conversations import ConversationRecord
    from ..ops.topk import validate_retention
    from ..viz.show import show_selection

    from ..methods import get_method_class

    validate_retention(config.retention)
    if get_method_class(config.method).trainable and config.selector is None:
        raise ValueError(f"method {config.method!r} is learned and needs --selector (a folder written by "
                         "'visionselector train', a VisionSelector release or a hub id)")
    if (config.data is None) == (config.image is None):
        raise ValueError("give either --data (and --index) or --image and --question")
    if config.max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {config.max_new_tokens}")
    if Path(config.out).is_dir():
        raise ValueError(f"output {config.out} is a folder; give the PNG file to write "
                         f"(e.g. {Path(config.out) / 'kept_tokens.png'})")
    out = check_output_folder(Path(config.out).parent, "output folder") / Path(config.out).name
    if config.image is not None:
        if not config.question:
            raise ValueError("--image needs --question")
        if not Path(config.image).is_file():
            raise FileNotFoundError(f"image not found: {config.image}")
        example = ConversationRecord("image", [Path(config.image)], [("user", "<image>\n" + config.question)], {},
                                     where=config.image)
    else:
        examples = load_examples(check_file(config.data, "data"), image_folder=config.image_folder)
        if not 0 <= config.index < len(examples):
            raise ValueError(f"--index must be in [0, {len(examples)}), got {config.index}")
        example = examples[config.index]
        if len(example.images) != 1 or example.videos:
            raise ValueError(f"{example.where}: show draws one image; this example has {len(example.images)} "
                             f"image(s) and {len(example.videos)} video(s)")
    model, processor = model_and_processor(config.model, model, processor)
    picture = show_selection(model, processor, load_image(example.images[0], example.where),
                             example.prompt_messages(), method=config.method, retention=config.retention,
                             selector=config.selector, answer=example.answer or None,
                             max_new_tokens=config.max_new_tokens)
    out.parent.mkdir(parents=True, exist_ok=True)
    picture.save(out)
    print_fn(f"wrote {out}")
    return out
