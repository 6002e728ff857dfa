"""Pictures of what a method keeps: the image with its kept visual tokens highlighted."""

from __future__ import annotations

from pathlib import Path

import torch

__all__ = ["overlay_kept_tokens", "show_selection"]


def overlay_kept_tokens(image, kept: torch.Tensor, grid: tuple[int, int], *, caption: str | None = None):
    """``image`` with the tokens not in ``kept`` dimmed and the kept ones outlined.

    Args:
        image: RGB ``PIL.Image`` as the model saw it (after the processor's resizing).
        kept: indices into the image's visual tokens, row-major over ``grid``.
        grid: ``(rows, columns)`` of merged visual tokens.
        caption: text drawn in a strip under the image.
    Returns:
        A new ``PIL.Image``.
    """
    from PIL import Image, ImageDraw

    rows, columns = grid
    if kept.numel() and (int(kept.min()) < 0 or int(kept.max()) >= rows * columns):
        raise ValueError(f"kept token indices must lie in [0, {rows * columns}) for a {rows} x {columns} grid")
    image = image.convert("RGB")
    width, height = image.size
    cell_w, cell_h = width / columns, height / rows
    dimmed = Image.blend(image, Image.new("RGB", image.size, (25, 25, 25)), 0.72)
    mask = Image.new("L", image.size, 0)
    draw_mask = ImageDraw.Draw(mask)
    boxes = []
    for index in kept.tolist():
        row, column = divmod(int(index), columns)
        box = (round(column * cell_w), round(row * cell_h), round((column + 1) * cell_w) - 1,
               round((row + 1) * cell_h) - 1)
        boxes.append(box)
        draw_mask.rectangle(box, fill=255)
    result = Image.composite(image, dimmed, mask)
    draw = ImageDraw.Draw(result)
    for box in boxes:
        draw.rectangle(box, outline=(255, 210, 0), width=1)
    if caption:
        strip = 18 * (caption.count("\n") + 1) + 6
        framed = Image.new("RGB", (width, height + strip), (255, 255, 255))
        framed.paste(result, (0, 0))
        ImageDraw.Draw(framed).multiline_text((6, height + 3), caption, fill=(0, 0, 0), spacing=4)
        result = framed
    return result


def show_selection(model, processor, image, messages: list[dict], *, method: str, retention: float,
                   selector=None, answer: str | None = None, max_new_tokens: int = 16):
    """Run ``method`` at ``retention`` on one image and its chat ``messages`` (the prompt, with one
    image item); return the overlay picture.

    The caption names the method, the retention, the tokens kept, the question and the
    model's greedy answer (and the reference ``answer``, if given).
    """
    import visionselector as vs

    from ..data.encoding import collate, encode_conversation
    from ..models import greedy_settings

    sample = encode_conversation(processor, messages, images=[image], generation_prompt=True)
    tokenizer = processor.tokenizer
    batch = collate([sample], tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
    batch.pop("labels")
    from ..adapters import find_adapter

    shape = find_adapter(model).image_grid(model, batch)
    options = {"selector": selector} if selector is not None else {}
    device = model.get_input_embeddings().weight.device
    with vs.attached(model, method=method, retention=retention, **options):
        model.eval()
        with torch.no_grad():
            output = model.generate(**{k: v.to(device) for k, v in batch.items()},
                                    **greedy_settings(model, processor, max_new_tokens))
        kept = vs.last_selection(model)[0]
    said = tokenizer.decode(output[0, batch["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    question = " ".join(item["text"] for message in messages if message["role"] == "user"
                        for item in (message["content"] if isinstance(message["content"], list)
                                     else [{"type": "text", "text": message["content"]}]) if item["type"] == "text")
    caption = (f"{method} at retention {retention:g}: {len(kept)} of {shape[0] * shape[1]} tokens\n"
               f"Q: {question}   A: {said}" + (f"   (reference: {answer})" if answer is not None else ""))
    # The processor may resize within its pixel budget; token cells map proportionally onto the image.
    return overlay_kept_tokens(image, kept.cpu(), shape, caption=caption)
