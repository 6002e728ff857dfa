"""Conversations to model inputs through the checkpoint's own processor and chat template.

A conversation becomes chat messages whose content lists its images and videos where
their ``<image>`` / ``<video>`` tags stood; the checkpoint's chat template writes the
prompt, and the processor expands each placeholder into the image's visual tokens.
For training, the labels cover every assistant turn (as the template writes it, end
token included) and nothing else.

Visual features cached from an earlier encoder pass stand in for pixels: the prompt is
then expanded from the cached features' token counts, and the result equals what the
processor gives for the images themselves.
"""

from __future__ import annotations

import re

import torch

__all__ = ["IMAGE_TAG", "VIDEO_TAG", "content_items", "assistant_spans", "encode_conversation", "collate",
           "placeholder_ids"]

IMAGE_TAG, VIDEO_TAG = "<image>", "<video>"
IGNORE_INDEX = -100
_TAGS = re.compile(f"({re.escape(IMAGE_TAG)}|{re.escape(VIDEO_TAG)})")


def content_items(text: str) -> list[dict]:
    """``"<image>\\nWhat is this?"`` -> ``[{"type": "image"}, {"type": "text", "text": "What is this?"}]``:
    the tags in place, the text between them stripped (LLaVA data puts a newline after a tag)."""
    items = []
    for piece in _TAGS.split(text):
        if piece == IMAGE_TAG:
            items.append({"type": "image"})
        elif piece == VIDEO_TAG:
            items.append({"type": "video"})
        elif piece.strip():
            items.append({"type": "text", "text": piece.strip()})
    return items


def placeholder_ids(processor) -> tuple[int, ...]:
    """Token ids the processor expands into visual tokens (image, then video if it has one)."""
    ids = [getattr(processor, "image_token_id", None), getattr(processor, "video_token_id", None)]
    if ids[0] is None:
        raise TypeError(f"{type(processor).__name__} names no image token id; it is not a vision-language processor")
    return tuple(i for i in ids if i is not None)


def _render(processor, messages: list[dict], generation_prompt: bool) -> str:
    return processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def assistant_spans(processor, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of its assistant turns.

    An assistant turn's span is what the template adds after the generation prompt of the
    messages before it: its content and end-of-turn tokens, which the model must learn to
    produce.
    """
    text = _render(processor, messages, False)
    spans = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _render(processor, messages[:index], True)
        through = _render(processor, messages[:index + 1], False)
        if not (through.startswith(before) and text.startswith(through)):
            raise ValueError("the checkpoint's chat template does not write a conversation as the continuation of "
                             "its earlier turns, so the assistant turns cannot be located for labels")
        spans.append((len(before), len(through)))
    return text, spans


def _expand(ids: list[int], labels: list[int], placeholders: tuple[int, ...], counts: list[int]):
    """Repeat the ``k``-th placeholder token ``counts[k]`` times (labels ignored there)."""
    out_ids, out_labels, used = [], [], 0
    for token, label in zip(ids, labels):
        if token in placeholders:
            if used == len(counts):
                raise ValueError(f"the prompt holds more visual placeholders than the {len(counts)} given features")
            out_ids += [token] * counts[used]
            out_labels += [IGNORE_INDEX] * counts[used]
            used += 1
        else:
            out_ids.append(token)
            out_labels.append(label)
    if used != len(counts):
        raise ValueError(f"the prompt holds {used} visual placeholders for {len(counts)} given features")
    return out_ids, out_labels


def encode_conversation(processor, messages: list[dict], *, images=None, videos=None, visual_counts=None,
                        generation_prompt: bool = False) -> dict:
    """One sample's model inputs, unpadded.

    Args:
        processor: the checkpoint's processor.
        messages: chat messages; image and video items in order of ``images`` / ``videos``.
        images, videos: the sample's pixels (opened images; video paths or frames).
        visual_counts: instead of pixels, the number of visual tokens of each image, from
            cached encoder features.
        generation_prompt: end with the template's generation prompt (for ``generate``);
            otherwise the conversation is labelled for training.

    Returns:
        ``input_ids``, ``labels`` (``[L]``; ``-100`` except on assistant turns),
        ``mm_token_type_ids`` (``[L]``: 1 image, 2 video, 0 text) and, with pixels, the
        processor's visual tensors (``pixel_values``, ``image_grid_thw``, ...).
    """
    if generation_prompt:
        text, spans = _render(processor, messages, True), []
    else:
        text, spans = assistant_spans(processor, messages)
    tokenizer = processor.tokenizer
    plain = tokenizer(text, return_offsets_mapping=True)
    ids, offsets = plain["input_ids"], plain["offset_mapping"]
    labels = [token if any(start <= begin < stop for start, stop in spans) else IGNORE_INDEX
              for token, (begin, _) in zip(ids, offsets)]
    placeholders = placeholder_ids(processor)
    visual: dict = {}
    if visual_counts is not None:
        ids, labels = _expand(ids, labels, placeholders, list(visual_counts))
    else:
        options = {}
        if images:
            options["images"] = list(images)
        if videos:
            options["videos"] = list(videos)
        processed = processor(text=[text], return_tensors="pt", **options)
        expanded = processed["input_ids"][0].tolist()
        text_only = [t for t in ids if t not in placeholders]
        if [t for t in expanded if t not in placeholders] != text_only:
            raise ValueError("the processor tokenized the prompt differently from its own tokenizer; cannot place labels")
        ids, labels = expanded, _spread_labels(expanded, ids, labels, placeholders)
        visual = {k: v for k, v in processed.items()
                  if k not in ("input_ids", "attention_mask", "mm_token_type_ids") and torch.is_tensor(v)}
    ids_tensor = torch.tensor(ids, dtype=torch.long)
    kinds = torch.zeros_like(ids_tensor)
    for kind, token in enumerate(placeholders, start=1):
        kinds[ids_tensor == token] = kind
    return {"input_ids": ids_tensor, "labels": torch.tensor(labels, dtype=torch.long), "mm_token_type_ids": kinds,
            **visual}


def _spread_labels(expanded: list[int], ids: list[int], labels: list[int], placeholders) -> list[int]:
    """Labels of the unexpanded tokens moved onto the expanded sequence (placeholders never labelled)."""
    text_labels = iter(label for token, label in zip(ids, labels) if token not in placeholders)
    return [IGNORE_INDEX if token in placeholders else next(text_labels) for token in expanded]


def collate(samples: list[dict], pad_id: int, *, padding_side: str = "left") -> dict:
    """Pad samples of :func:`encode_conversation` into a batch; visual tensors are concatenated
    in sample order (the processors' own batch layout)."""
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    length = max(len(s["input_ids"]) for s in samples)
    fills = {"input_ids": pad_id, "labels": IGNORE_INDEX, "mm_token_type_ids": 0, "attention_mask": 0}
    batch = {name: torch.full((len(samples), length), fill, dtype=torch.long) for name, fill in fills.items()}
    for row, sample in enumerate(samples):
        size = len(sample["input_ids"])
        span = slice(length - size, length) if padding_side == "left" else slice(0, size)
        for name in ("input_ids", "labels", "mm_token_type_ids"):
            batch[name][row, span] = sample[name]
        batch["attention_mask"][row, span] = 1
    for name in dict.fromkeys(k for s in samples for k in s if k not in fills):
        parts = [s[name] for s in samples if name in s]
        batch[name] = torch.cat(parts)
    return batch
