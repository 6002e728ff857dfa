"""DigitsVQA: a visual question answering task built from data that packages bundle.

Each 448 x 448 image (16 x 16 = 256 visual tokens for Qwen2.5-VL's 14-pixel patches
merged 2 x 2) is a cluttered scene: real handwritten digits from scikit-learn's
``load_digits``, some framed by coloured boxes, and coloured shapes, over random lines
and dots. A question is about a small part of the scene, so most visual tokens are
irrelevant to it and the few relevant ones differ from question to question. That is
the regime of text-, chart- and document-VQA, where token compression hurts most.
The six question types need different evidence, so no single trick wins:

==============  ==========================================  =====================
type            question                                    answers
==============  ==========================================  =====================
read_digit      what digit is in the red box ?              0 .. 9
colour          what colour is the triangle ?               six colours
shape           what shape is the blue object ?             circle/square/triangle
count           how many squares are there ?                0 .. 4 (several regions)
presence        is there a green circle ?                   yes / no (balanced)
position        is the red square on the left or the right? left / right
==============  ==========================================  =====================

Each scene is built for its question so that the answer is unique (one box of the
asked colour, one shape of the asked kind or colour). Splits are fixed by seed.
``load_digits`` carries no writer ids, so the test split draws its digits from a
disjoint block of digit images (the last 497 of 1797) that training never sees.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

__all__ = ["COLOURS", "SHAPES", "QUESTION_TYPES", "SPLITS", "Scene", "make_sample", "write_split", "vocabulary",
           "token_labels", "object_tokens", "asked_objects"]

IMAGE_SIZE = 448
CELLS = 4  # the canvas is a 4 x 4 grid of 112-pixel cells; each object gets its own cell
CELL = IMAGE_SIZE // CELLS
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (230, 200, 30),
           "purple": (150, 60, 190), "orange": (240, 130, 20)}
BOX_COLOURS = ("red", "green", "blue")
SHAPES = ("circle", "square", "triangle")
QUESTION_TYPES = ("read_digit", "colour", "shape", "count", "presence", "position")
# name -> (seed offset, digit image indices)
SPLITS = {"train": (0, range(0, 1300)), "validation": (1_000_000, range(0, 1300)), "test": (2_000_000, range(1300, 1797))}


@dataclass
class Scene:
    """Objects in grid cells: ``digits`` as (cell, digit image index, box colour or None),
    ``shapes`` as (cell, shape, colour)."""

    digits: list
    shapes: list


def digit_images():
    from sklearn.datasets import load_digits

    data = load_digits()
    return data.images, data.target


def _free_cells(rng, count, exclude=(), columns=None):
    cells = [c for c in range(CELLS * CELLS) if c not in exclude and (columns is None or c % CELLS in columns)]
    return rng.sample(cells, count)


def _scene_for(rng: random.Random, kind: str, pool: range, targets) -> tuple[Scene, str, str]:
    """A scene, a question and its answer, with the answer unique by construction."""
    n_digits, n_shapes = rng.randint(2, 4), rng.randint(3, 6)
    cells = _free_cells(rng, n_digits + n_shapes)
    digit_cells, shape_cells = cells[:n_digits], cells[n_digits:]
    digits = [(cell, rng.choice(pool), None) for cell in digit_cells]
    box_colours = rng.sample(BOX_COLOURS, rng.randint(1, min(len(BOX_COLOURS), n_digits)))
    for index, colour in enumerate(box_colours):
        cell, image, _ = digits[index]
        digits[index] = (cell, image, colour)
    shapes = [(cell, rng.choice(SHAPES), rng.choice(list(COLOURS))) for cell in shape_cells]

    if kind == "read_digit":
        cell, image, colour = digits[rng.randrange(len(box_colours))]
        return Scene(digits, shapes), f"what digit is in the {colour} box ?", str(int(targets[image]))
    if kind == "colour":
        shape = rng.choice(SHAPES)
        shapes = [s for s in shapes if s[1] != shape]
        colour = rng.choice(list(COLOURS))
        shapes.append((_extra_cell(rng, digits, shapes), shape, colour))
        return Scene(digits, shapes), f"what colour is the {shape} ?", colour
    if kind == "shape":
        colour = rng.choice(list(COLOURS))
        shapes = [s for s in shapes if s[2] != colour]
        shape = rng.choice(SHAPES)
        shapes.append((_extra_cell(rng, digits, shapes), shape, colour))
        return Scene(digits, shapes), f"what shape is the {colour} object ?", shape
    if kind == "count":
        shape = rng.choice(SHAPES)
        wanted = rng.randint(0, 4)
        others = [s for s in shapes if s[1] != shape][: max(0, n_shapes - wanted)]
        shapes = others[:]
        for _ in range(wanted):
            shapes.append((_extra_cell(rng, digits, shapes), shape, rng.choice(list(COLOURS))))
        return Scene(digits, shapes), f"how many {shape}s are there ?", str(wanted)
    if kind == "presence":
        shape, colour = rng.choice(SHAPES), rng.choice(list(COLOURS))
        shapes = [s for s in shapes if (s[1], s[2]) != (shape, colour)]
        present = rng.random() < 0.5
        if present:
            shapes.append((_extra_cell(rng, digits, shapes), shape, colour))
        return Scene(digits, shapes), f"is there a {colour} {shape} ?", "yes" if present else "no"
    if kind == "position":
        shape, colour = rng.choice(SHAPES), rng.choice(list(COLOURS))
        shapes = [s for s in shapes if (s[1], s[2]) != (shape, colour)]
        side = rng.choice(("left", "right"))
        columns = (0, 1) if side == "left" else (2, 3)
        used = {c for c, *_ in digits} | {c for c, *_ in shapes}
        while all(c in used for c in range(CELLS * CELLS) if c % CELLS in columns):
            # That half is full (at most 4 digits, so shapes fill it): move one shape out of the way.
            victim = next(s for s in shapes if s[0] % CELLS in columns)
            shapes.remove(victim)
            used.discard(victim[0])
        cell = _free_cells(rng, 1, exclude=used, columns=columns)[0]
        shapes.append((cell, shape, colour))
        return Scene(digits, shapes), f"is the {colour} {shape} on the left or the right ?", side
    raise ValueError(f"unknown question type {kind!r}; known: {', '.join(QUESTION_TYPES)}")


def _extra_cell(rng, digits, shapes):
    used = {c for c, *_ in digits} | {c for c, *_ in shapes}
    return _free_cells(rng, 1, exclude=used)[0]


def render(scene: Scene, rng: random.Random, images, layout: list | None = None):
    """Draw ``scene`` with clutter; returns an RGB ``PIL.Image``.

    If ``layout`` is a list, each object's pixel box and attributes are appended to it as
    ``(left, top, right, bottom, attributes)`` (see :func:`token_labels`).
    """
    from PIL import Image, ImageDraw

    canvas = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), (236, 236, 232))
    draw = ImageDraw.Draw(canvas)
    for _ in range(rng.randint(10, 20)):  # clutter: grey lines and dots
        shade = rng.randint(150, 210)
        x0, y0 = rng.randrange(IMAGE_SIZE), rng.randrange(IMAGE_SIZE)
        if rng.random() < 0.5:
            draw.line((x0, y0, rng.randrange(IMAGE_SIZE), rng.randrange(IMAGE_SIZE)), fill=(shade,) * 3, width=2)
        else:
            radius = rng.randint(2, 5)
            draw.ellipse((x0 - radius, y0 - radius, x0 + radius, y0 + radius), fill=(shade,) * 3)
    for cell, image_index, box in scene.digits:
        left, top = _corner(cell, rng, 64)
        pixels = (255 - images[image_index] * 15).clip(0, 255).astype("uint8")
        glyph = Image.fromarray(pixels, mode="L").resize((56, 56), Image.BILINEAR).convert("RGB")
        canvas.paste(glyph, (left + 4, top + 4))
        if box is not None:
            draw.rectangle((left, top, left + 63, top + 63), outline=COLOURS[box], width=4)
        if layout is not None:
            layout.append((left, top, left + 64, top + 64, {"digit": image_index, "box": box}))
    for cell, shape, colour in scene.shapes:
        size = rng.randint(34, 50)
        left, top = _corner(cell, rng, size)
        box = (left, top, left + size, top + size)
        if shape == "circle":
            draw.ellipse(box, fill=COLOURS[colour])
        elif shape == "square":
            draw.rectangle(box, fill=COLOURS[colour])
        else:
            draw.polygon([(left + size / 2, top), (left, top + size), (left + size, top + size)], fill=COLOURS[colour])
        if layout is not None:
            layout.append((left, top, left + size, top + size, {"shape": shape, "colour": colour}))
    return canvas


def _corner(cell: int, rng: random.Random, size: int) -> tuple[int, int]:
    row, column = divmod(cell, CELLS)
    slack = CELL - size - 4
    return column * CELL + 2 + rng.randint(0, slack), row * CELL + 2 + rng.randint(0, slack)


def make_sample(split: str, index: int, images=None, targets=None, *, layout: list | None = None
                ) -> tuple[object, str, str, str]:
    """The ``index``-th sample of ``split``: ``(PIL image, question, answer, question type)``.

    Deterministic: the same split and index always give the same sample. Pass a list as
    ``layout`` to receive the objects' boxes (for :func:`token_labels`).
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; splits: {', '.join(SPLITS)}")
    if images is None:
        images, targets = digit_images()
    offset, pool = SPLITS[split]
    rng = random.Random(offset + index)
    kind = QUESTION_TYPES[index % len(QUESTION_TYPES)]
    scene, question, answer = _scene_for(rng, kind, pool, targets)
    return render(scene, rng, images, layout), question, answer, kind


def make_dense_scene(index: int, images=None, targets=None, *, layout: list | None = None):
    """The ``index``-th crowded scene for pretraining a vision encoder: 6 to 12 digits (each
    boxed with probability 0.4) and shapes in most other cells, drawn like the task's scenes,
    with digits from the training block only. Returns a ``PIL.Image``; ``layout`` as in
    :func:`make_sample`. A task scene holds 2 to 4 digits; these hold several times more, so
    an encoder learns to read digits from fewer images.
    """
    if images is None:
        images, targets = digit_images()
    rng = random.Random(3_000_000 + index)
    pool = SPLITS["train"][1]
    n_digits = rng.randint(6, 12)
    cells = _free_cells(rng, min(CELLS * CELLS, n_digits + rng.randint(2, CELLS * CELLS - n_digits)))
    digits = [(cell, rng.choice(pool), rng.choice(BOX_COLOURS) if rng.random() < 0.4 else None)
              for cell in cells[:n_digits]]
    shapes = [(cell, rng.choice(SHAPES), rng.choice(list(COLOURS))) for cell in cells[n_digits:]]
    return render(Scene(digits, shapes), rng, images, layout)


def scene_questions(layout: list, targets, rng: random.Random, *, width: int = IMAGE_SIZE
                    ) -> list[tuple[str, str, str]]:
    """Every question of the task's six types that has a unique answer in the scene drawn
    as ``layout`` (see :func:`make_sample`), as ``(question, answer, type)``: more
    supervision per image when training a model. Presence questions are drawn at random,
    half of them about objects that are there. ``width`` is the image's width in pixels
    (left and right are its halves).
    """
    digits = [(box, a["digit"]) for *box, a in layout if "digit" in a]
    shapes = [(box, a["shape"], a["colour"]) for *box, a in layout if "shape" in a]
    found = []
    for (left, top, right, bottom), image_index in digits:
        box_colour = next(a["box"] for *b, a in layout if "digit" in a and a["digit"] == image_index
                          and b == [left, top, right, bottom])
        if box_colour is not None:
            found.append((f"what digit is in the {box_colour} box ?", str(int(targets[image_index])), "read_digit"))
    for shape in SHAPES:
        same = [s for s in shapes if s[1] == shape]
        if len(same) == 1:
            found.append((f"what colour is the {shape} ?", same[0][2], "colour"))
        if len(same) <= 9:
            found.append((f"how many {shape}s are there ?", str(len(same)), "count"))
    for colour in COLOURS:
        same = [s for s in shapes if s[2] == colour]
        if len(same) == 1:
            found.append((f"what shape is the {colour} object ?", same[0][1], "shape"))
    pairs = {}
    for box, shape, colour in shapes:
        pairs.setdefault((shape, colour), []).append(box)
    for (shape, colour), boxes in pairs.items():
        if len(boxes) == 1:
            side = "left" if (boxes[0][0] + boxes[0][2]) / 2 < width / 2 else "right"
            found.append((f"is the {colour} {shape} on the left or the right ?", side, "position"))
    present = list(pairs)
    absent = [(s, c) for s in SHAPES for c in COLOURS if (s, c) not in pairs]
    for group, answer in ((present, "yes"), (absent, "no")):
        if group:
            shape, colour = rng.choice(group)
            found.append((f"is there a {colour} {shape} ?", answer, "presence"))
    return found


def crop_quarter(image, layout: list, quarter: int):
    """Quarter ``quarter`` of a 448 x 448 task scene (0 top left, 1 top right, 2 bottom left,
    3 bottom right) as a 224 x 224 image, and the layout of the objects inside it in the
    quarter's own coordinates. No object straddles two quarters: each lies inside one
    112-pixel cell. Returns ``(PIL image, layout)``.
    """
    if quarter not in range(4):
        raise ValueError(f"quarter must be 0, 1, 2 or 3, got {quarter!r}")
    half = IMAGE_SIZE // 2
    left, top = (quarter % 2) * half, (quarter // 2) * half
    inside = [(l - left, t - top, r - left, b - top, attributes) for l, t, r, b, attributes in layout
              if left <= l and r <= left + half and top <= t and b <= top + half]
    return image.crop((left, top, left + half, top + half)), inside


# Per-token label heads of the reference model's dense auxiliary loss: (name, classes);
# class 0 is "nothing of this kind under the token". "anchor" marks the one token under each
# object's centre, so that objects can be counted from tokens (an object covers 4 to 9 of
# them). "side" is the token's half of the image (1 left, 2 right); the encoder cannot learn
# it (its attention sees only relative positions), so it stays at chance, and it is kept
# because the shipped encoder was trained with it (docs/reference-task.md).
LABEL_HEADS = (("digit", 11), ("box", 1 + len(BOX_COLOURS)), ("shape", 1 + len(SHAPES)), ("colour", 1 + len(COLOURS)),
               ("anchor", 2), ("side", 3))
TOKEN_PIXELS = 28  # a merged Qwen2.5-VL token covers 28 x 28 pixels
_MIN_OVERLAP = 0.2  # an object labels a token when it covers at least this share of the token


def token_labels(layout: list, targets, *, size: int = IMAGE_SIZE):
    """What lies under each visual token of a ``size`` x ``size`` scene, from ``make_sample(..., layout=...)``.

    Returns a ``(tokens, 6)`` long tensor in the model's token order (row-major over the
    token grid, 16 x 16 for a whole scene), one column per entry of ``LABEL_HEADS``: digit
    class + 1 (the box around a digit counts as the digit's), box colour + 1, shape + 1 and
    shape colour + 1, each 0 where nothing of that kind covers at least a fifth of the token;
    1 on the token under an object's centre; and the token's half of the image (1 left,
    2 right). Objects never overlap, so labels are unique.
    """
    import torch

    if size % (2 * TOKEN_PIXELS):
        raise ValueError(f"size must be a multiple of {2 * TOKEN_PIXELS} pixels, got {size}")
    side = size // TOKEN_PIXELS
    labels = torch.zeros(side, side, len(LABEL_HEADS), dtype=torch.long)
    labels[:, : side // 2, 5], labels[:, side // 2:, 5] = 1, 2
    colours, boxes = list(COLOURS), list(BOX_COLOURS)
    for (left, top, right, bottom, attributes), cells in zip(layout, object_tokens(layout, size=size)):
        values = ([int(targets[attributes["digit"]]) + 1, 0 if attributes["box"] is None else boxes.index(attributes["box"]) + 1, 0, 0]
                  if "digit" in attributes else [0, 0, SHAPES.index(attributes["shape"]) + 1, colours.index(attributes["colour"]) + 1])
        for cell in cells:
            labels[cell // side, cell % side, :4] = torch.tensor(values)
        centre_row, centre_column = (top + bottom) // 2 // TOKEN_PIXELS, (left + right) // 2 // TOKEN_PIXELS
        labels[min(side - 1, centre_row), min(side - 1, centre_column), 4] = 1
    return labels.reshape(side * side, len(LABEL_HEADS))


def object_tokens(layout: list, *, size: int = IMAGE_SIZE) -> list[list[int]]:
    """Per object of ``layout`` (from ``make_sample(..., layout=...)``), the indices of the
    visual tokens it labels in :func:`token_labels` (row-major over the token grid): those
    it covers at least a fifth of. Objects never overlap, so no token is in two lists."""
    side = size // TOKEN_PIXELS
    tokens = []
    for left, top, right, bottom, _ in layout:
        cells = []
        for row in range(top // TOKEN_PIXELS, min(side, (bottom - 1) // TOKEN_PIXELS + 1)):
            for column in range(left // TOKEN_PIXELS, min(side, (right - 1) // TOKEN_PIXELS + 1)):
                height = min(bottom, (row + 1) * TOKEN_PIXELS) - max(top, row * TOKEN_PIXELS)
                width = min(right, (column + 1) * TOKEN_PIXELS) - max(left, column * TOKEN_PIXELS)
                if height * width >= _MIN_OVERLAP * TOKEN_PIXELS ** 2:
                    cells.append(row * side + column)
        tokens.append(cells)
    return tokens


def asked_objects(question: str, kind: str, layout: list) -> list[int]:
    """Indices into ``layout`` of the objects ``question`` (of type ``kind``) is about: the
    digit in the named box, the named shape (every one of them, to count), the object of
    the named colour, or the one of the named colour and shape (none for a "no" presence)."""
    if kind not in QUESTION_TYPES:
        raise ValueError(f"unknown question type {kind!r}; known: {', '.join(QUESTION_TYPES)}")
    words = set(question.replace("?", " ").split())
    words |= {word[:-1] for word in words if word.endswith("s")}  # "how many squares"

    def about(attributes) -> bool:
        if kind == "read_digit":
            return attributes.get("box") is not None and attributes["box"] in words
        if "shape" not in attributes:
            return False
        if kind in ("colour", "count"):
            return attributes["shape"] in words
        if kind == "shape":
            return attributes["colour"] in words
        return attributes["shape"] in words and attributes["colour"] in words

    return [index for index, (*_, attributes) in enumerate(layout) if about(attributes)]


def write_split(directory: str | Path, split: str, count: int, *, first: int = 0, progress: bool = True,
                name: str | None = None) -> Path:
    """Write samples ``first .. first + count - 1`` of ``split`` as PNGs and a LLaVA-style
    ``{name}.jsonl`` (``name`` defaults to the split)."""
    directory = Path(directory)
    (directory / "images" / split).mkdir(parents=True, exist_ok=True)
    images, targets = digit_images()
    if count < 1 or first < 0:
        raise ValueError(f"count must be at least 1 and first non-negative, got count={count}, first={first}")
    path = directory / f"{name or split}.jsonl"
    indices = range(first, first + count)
    if progress:
        from tqdm.auto import tqdm

        indices = tqdm(indices, desc=f"writing {split}", unit="image")
    with path.open("w") as out:
        for index in indices:
            image, question, answer, kind = make_sample(split, index, images, targets)
            relative = f"images/{split}/{index:06d}.png"
            image.save(directory / relative)
            record = {"id": f"{split}-{index}", "image": relative, "type": kind,
                      "conversations": [{"from": "human", "value": f"<image>\n{question}"},
                                        {"from": "gpt", "value": answer}]}
            out.write(json.dumps(record) + "\n")
    return path


def vocabulary() -> list[str]:
    """Every word the task's questions and answers use."""
    words = {"what", "digit", "is", "in", "the", "box", "?", "colour", "shape", "object", "how", "many", "are",
             "there", "a", "on", "left", "or", "right", "yes", "no"}
    words |= set(COLOURS) | set(SHAPES) | {f"{s}s" for s in SHAPES} | {str(d) for d in range(10)}
    return sorted(words)
