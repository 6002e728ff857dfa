"""A word-level tokenizer and a processor that turn (image, question, answer) into
Qwen2.5-VL inputs, for small models trained from scratch on a closed-vocabulary task.

The image side uses ``transformers``' own Qwen2-VL image processor (resizing, CLIP
normalisation and the patch layout the vision encoder expects); nothing is downloaded.
A prompt is ``<bos> <vision_start> <image> x n <vision_end> question-words <answer>``
and, for training, the answer words and ``<eos>`` follow, with labels only on them.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

__all__ = ["WordTokenizer", "VQAProcessor", "SPECIAL_TOKENS"]

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>", "<image>", "<video>", "<vision_start>", "<vision_end>",
                  "<answer>")


class WordTokenizer:
    """Whitespace-separated, lower-cased words; the special tokens come first."""

    def __init__(self, words: list[str]) -> None:
        duplicates = sorted({w for w in words if words.count(w) > 1})
        if duplicates:
            raise ValueError(f"duplicate words in the vocabulary: {duplicates}")
        clash = sorted(set(words) & set(SPECIAL_TOKENS))
        if clash:
            raise ValueError(f"words may not be special tokens: {clash}")
        self.tokens = list(SPECIAL_TOKENS) + list(words)
        self.ids = {token: index for index, token in enumerate(self.tokens)}

    def __len__(self) -> int:
        return len(self.tokens)

    def __getattr__(self, name: str) -> int:
        # pad_id, bos_id, image_id, vision_start_id, ...: the id of "<name>" for special tokens.
        if name.endswith("_id") and f"<{name[:-3]}>" in SPECIAL_TOKENS:
            return self.ids[f"<{name[:-3]}>"]
        raise AttributeError(name)

    def encode(self, text: str) -> list[int]:
        return [self.ids.get(word, self.ids["<unk>"]) for word in text.lower().split()]

    def decode(self, ids, *, skip_special: bool = True) -> str:
        words = [self.tokens[int(i)] for i in ids]
        return " ".join(w for w in words if not (skip_special and w in SPECIAL_TOKENS))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps({"special_tokens": list(SPECIAL_TOKENS),
                                          "words": self.tokens[len(SPECIAL_TOKENS):]}, indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "WordTokenizer":
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise ValueError(f"cannot read tokenizer {path}: {error}") from None
        if data.get("special_tokens") != list(SPECIAL_TOKENS):
            raise ValueError(f"tokenizer {path} was written with other special tokens: {data.get('special_tokens')}")
        return cls(data["words"])


class VQAProcessor:
    """Builds batches for ``Qwen2_5_VLForConditionalGeneration`` from images and questions.

    Args:
        tokenizer: the task's :class:`WordTokenizer`.
        image_pixels: every image is resized to this many pixels (keeping its aspect ratio
            within the processor's multiple-of-28 rounding), so a 448 x 448 image gives 256 tokens.
    """

    def __init__(self, tokenizer: WordTokenizer, image_pixels: int = 448 * 448) -> None:
        try:
            from transformers import Qwen2VLImageProcessorPil as ImageProcessor
        except ImportError:  # older transformers name the PIL backend like this
            from transformers import Qwen2VLImageProcessor as ImageProcessor
        self.tokenizer = tokenizer
        self.image_pixels = image_pixels
        self.image_processor = ImageProcessor(min_pixels=image_pixels, max_pixels=image_pixels)
        self.merge_unit = self.image_processor.merge_size ** 2

    def pixels(self, images: list) -> dict[str, torch.Tensor]:
        """``pixel_values`` and ``image_grid_thw`` for ``images``, exactly as the image processor
        makes them. Images already at the target size (both sides multiples of 28) take a fast
        path that only normalises and lays out the patches, about twice as fast as the general one.
        """
        import numpy as np

        ip = self.image_processor
        unit = ip.patch_size * ip.merge_size
        arrays = [np.asarray(image) for image in images]
        sizes = {a.shape for a in arrays}
        if len(sizes) != 1:
            return self.image_processor(images=images, return_tensors="pt")
        shape = sizes.pop()
        if (len(shape) != 3 or shape[2] != 3 or arrays[0].dtype != np.uint8 or shape[0] % unit or shape[1] % unit
                or shape[0] * shape[1] != self.image_pixels):
            return self.image_processor(images=images, return_tensors="pt")
        height, width = shape[:2]
        pixels = torch.from_numpy(np.stack(arrays)).float().div_(255)
        pixels = (pixels - torch.tensor(ip.image_mean)) / torch.tensor(ip.image_std)
        count, p, m, t = len(arrays), ip.patch_size, ip.merge_size, ip.temporal_patch_size
        rows, columns = height // p, width // p
        # (B, C, rows/m, m, p, columns/m, m, p) -> merge blocks in raster order, each 2 x 2 patches
        # of (C, temporal, p, p) values, the image repeated over the temporal patch.
        patches = pixels.permute(0, 3, 1, 2).reshape(count, 3, rows // m, m, p, columns // m, m, p)
        patches = patches.permute(0, 2, 5, 3, 6, 1, 4, 7).unsqueeze(6)
        patches = patches.expand(count, rows // m, columns // m, m, m, 3, t, p, p)
        grid = torch.tensor([[1, rows, columns]] * count)
        return {"pixel_values": patches.reshape(count * rows * columns, 3 * t * p * p), "image_grid_thw": grid}

    def model_token_ids(self) -> dict[str, int]:
        """The config fields of a model that reads this processor's batches."""
        t = self.tokenizer
        return {"image_token_id": t.image_id, "video_token_id": t.video_id,
                "vision_start_token_id": t.vision_start_id, "vision_end_token_id": t.vision_end_id}

    def __call__(self, images, questions: list[str], answers: list[str] | None = None, *,
                 padding_side: str = "left", image_grids: torch.Tensor | None = None,
                 follow_ups: list[list[tuple[str, str]]] | None = None) -> dict[str, torch.Tensor]:
        """Inputs for ``images`` and ``questions`` (and ``answers``, with ``labels`` on them).

        With ``image_grids`` (``[B, 3]``, from encoded images) the images are not read and
        the batch has no ``pixel_values``: the caller supplies the encoder's output.
        ``follow_ups`` (training) appends more ``(question, answer)`` turns about the same
        image after the first answer, each labelled like it.
        """
        if follow_ups is not None and (answers is None or len(follow_ups) != len(questions)):
            raise ValueError("follow_ups need answers and one list of (question, answer) turns per sample")
        if len(images) != len(questions) or (answers is not None and len(answers) != len(questions)):
            raise ValueError(f"got {len(images)} images, {len(questions)} questions"
                             + ("" if answers is None else f" and {len(answers)} answers") + "; they must match")
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        if image_grids is not None:
            if len(image_grids) != len(questions):
                raise ValueError(f"got {len(image_grids)} image grids for {len(questions)} questions")
            vision = {"image_grid_thw": image_grids}
        else:
            vision = self.pixels(list(images))
        t = self.tokenizer
        rows, label_rows = [], []
        for index, (grid, question) in enumerate(zip(vision["image_grid_thw"], questions)):
            visual = int(grid.prod()) // self.merge_unit
            prompt = [t.bos_id, t.vision_start_id] + [t.image_id] * visual + [t.vision_end_id]
            prompt += t.encode(question) + [t.answer_id]
            target = [] if answers is None else t.encode(answers[index]) + [t.eos_id]
            row, label_row = prompt + target, [-100] * len(prompt) + target
            for question_words, answer_words in (follow_ups[index] if follow_ups is not None else ()):
                turn = t.encode(question_words) + [t.answer_id]
                reply = t.encode(answer_words) + [t.eos_id]
                row, label_row = row + turn + reply, label_row + [-100] * len(turn) + reply
            rows.append(row)
            label_rows.append(label_row)
        length = max(len(row) for row in rows)
        input_ids = torch.full((len(rows), length), t.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
        labels = torch.full((len(rows), length), -100, dtype=torch.long)
        for index, (row, label_row) in enumerate(zip(rows, label_rows)):
            span = slice(length - len(row), length) if padding_side == "left" else slice(0, len(row))
            input_ids[index, span] = torch.tensor(row)
            attention_mask[index, span] = 1
            labels[index, span] = torch.tensor(label_row)
        batch = {"input_ids": input_ids, "attention_mask": attention_mask,
                 "mm_token_type_ids": (input_ids == t.image_id).int(),
                 "image_grid_thw": vision["image_grid_thw"]}
        if "pixel_values" in vision:
            batch["pixel_values"] = vision["pixel_values"]
        if answers is not None:
            batch["labels"] = labels
        return batch
