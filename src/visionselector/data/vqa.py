"""Question-answer examples from conversation JSONL, batches for a model, and cached visual features.

A selector trains on a frozen model, and it sits after the vision encoder, so the
encoder's output for an image never changes during training or evaluation.
:class:`FeatureCache` computes it once per example (and can keep it on disk);
batches then carry ``mm_encoder_outputs`` instead of pixels and the model runs only
its language part. Methods that need the encoder's own attention (VisionZip) still
need pixels: :class:`ExampleBatches` gives them pixels when asked.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from .conversations import IMAGE_PLACEHOLDER, read_conversations

__all__ = ["VQAExample", "load_examples", "FeatureCache", "ExampleBatches", "encoder_outputs"]


def encoder_outputs(features: list[torch.Tensor]) -> dict:
    """The ``mm_encoder_outputs`` model argument for already-encoded images: one ``(tokens, D)``
    tensor per image, in the batch's order, standing in for the vision encoder's output."""
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    return {"image": BaseModelOutputWithPooling(pooler_output=tuple(features))}


@dataclass
class VQAExample:
    """One question about one image, with its reference answer (``kind``: the question type, if known)."""

    id: str
    image: Path
    question: str
    answer: str
    kind: str | None = None

    def load_image(self):
        from PIL import Image

        try:
            with Image.open(self.image) as image:
                return image.convert("RGB")
        except (OSError, ValueError) as error:
            raise ValueError(f"example {self.id}: cannot read image {self.image}: {error}") from None


def load_examples(path: str | Path, limit: int | None = None) -> list[VQAExample]:
    """Single-image question-answer examples from a LLaVA / Cambrian conversation JSONL file.

    Each record gives one example: its first human turn (the ``<image>`` placeholder
    removed) and the assistant turn that answers it. Records with several images, or
    with no human turn followed by an answer, are errors that name the record.
    """
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be at least 1, got {limit}")
    examples = []
    for record in read_conversations(path):
        if len(record.images) != 1:
            raise ValueError(f"{path}, record {record.id}: {len(record.images)} images; "
                             "question-answer examples need exactly one image")
        pair = next(((q, a) for (rq, q), (ra, a) in zip(record.turns, record.turns[1:])
                     if rq == "user" and ra == "assistant"), None)
        if pair is None:
            raise ValueError(f"{path}, record {record.id}: no human turn followed by an answer")
        question = pair[0].replace(IMAGE_PLACEHOLDER, " ").strip()
        examples.append(VQAExample(record.id, record.images[0], question, pair[1].strip(), record.extra.get("type")))
        if limit is not None and len(examples) == limit:
            break
    if not examples:
        raise ValueError(f"{path} holds no examples")
    return examples


def _encoder_fingerprint(model) -> str:
    """A short digest of the vision encoder's weights: cached features are only valid for them."""
    digest = hashlib.sha256()
    for name, tensor in model.model.visual.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().flatten()[:: max(1, tensor.numel() // 4096)].numpy().tobytes())
        digest.update(str(tuple(tensor.shape)).encode())
    return digest.hexdigest()[:16]


class FeatureCache:
    """The frozen vision encoder's output (``[tokens, D]`` per example) for a list of examples.

    Args:
        model: a ``Qwen2_5_VLForConditionalGeneration``; only ``model.model.visual`` runs.
        processor: builds ``pixel_values`` from images (:class:`~.processor.VQAProcessor`).
        examples: what to encode.
        directory: if given, the features are saved there and reused when the same
            encoder weights and examples come again (they are recomputed otherwise).
        batch_size: images per encoder call.
        progress: show a progress bar.
    """

    def __init__(self, model, processor, examples: list[VQAExample], *, directory: str | Path | None = None,
                 batch_size: int = 32, progress: bool = True) -> None:
        self.examples = examples
        key = hashlib.sha256(json.dumps([_encoder_fingerprint(model)] + [
            [e.id, str(e.image), e.image.stat().st_size if e.image.exists() else -1] for e in examples
        ]).encode()).hexdigest()[:20]
        path = None if directory is None else Path(directory) / f"features-{key}.pt"
        if path is not None and path.is_file():
            try:
                saved = torch.load(path, weights_only=True)
                if saved["key"] == key and len(saved["features"]) == len(examples):
                    self.features, self.grids = saved["features"], saved["grids"]
                    return
            except Exception:  # a truncated or foreign file: recompute and overwrite it
                pass
        self.features, self.grids = self._encode(model, processor, batch_size, progress)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            temporary = path.with_suffix(".tmp")
            torch.save({"key": key, "features": self.features, "grids": self.grids}, temporary)
            temporary.replace(path)

    def _encode(self, model, processor, batch_size: int, progress: bool):
        from tqdm.auto import tqdm

        visual = model.model.visual
        device = next(visual.parameters()).device
        features, grids = [], []
        was_training = visual.training
        visual.eval()
        with torch.no_grad():
            for start in tqdm(range(0, len(self.examples), batch_size), desc="encoding images", unit="batch",
                              disable=not progress):
                chunk = self.examples[start:start + batch_size]
                pixels = processor.pixels([e.load_image() for e in chunk])
                grid = pixels["image_grid_thw"].to(device)
                output = model.model.get_image_features(pixels["pixel_values"].to(device, visual.dtype), grid,
                                                        return_dict=True)
                features.extend(t.detach().clone() for t in output.pooler_output)
                grids.extend(grid.cpu())
        visual.train(was_training)
        return features, grids

    def __len__(self) -> int:
        return len(self.features)


class ExampleBatches:
    """Model inputs for examples, in batches, in order or shuffled per epoch by a seed.

    With ``cache``, batches carry ``mm_encoder_outputs`` (no pixels); with ``pixels=True``
    they carry ``pixel_values`` even if a cache is given. ``with_answers`` adds the answer
    and its ``labels`` (training); otherwise the prompt ends where the answer begins
    (generation). Iterating from ``start`` skips the first batches without building them,
    which is how a resumed run continues where it stopped.
    """

    def __init__(self, examples: list[VQAExample], processor, *, batch_size: int, cache: FeatureCache | None = None,
                 with_answers: bool = False, shuffle_seed: int | None = None, pixels: bool = False,
                 padding_side: str | None = None) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if cache is not None and cache.examples is not examples and len(cache) != len(examples):
            raise ValueError(f"the feature cache holds {len(cache)} examples, the batches {len(examples)}")
        self.examples, self.processor, self.batch_size = examples, processor, batch_size
        self.cache, self.with_answers, self.shuffle_seed, self.pixels = cache, with_answers, shuffle_seed, pixels
        self.padding_side = padding_side or ("right" if with_answers else "left")
        self.start = 0

    def batches_per_epoch(self) -> int:
        return -(-len(self.examples) // self.batch_size)

    def order(self, epoch: int) -> list[int]:
        indices = list(range(len(self.examples)))
        if self.shuffle_seed is not None:
            random.Random(self.shuffle_seed * 1_000_003 + epoch).shuffle(indices)
        return indices

    def skip(self, count: int) -> None:
        """Start the next iteration ``count`` batches later (across epochs)."""
        self.start = count

    def indices(self, step: int) -> list[int]:
        """Example indices of the ``step``-th batch (0-based; epochs follow each other)."""
        epoch, within = divmod(step, self.batches_per_epoch())
        return self.order(epoch)[within * self.batch_size:(within + 1) * self.batch_size]

    def batch(self, indices: list[int]) -> dict:
        chunk = [self.examples[i] for i in indices]
        answers = [e.answer for e in chunk] if self.with_answers else None
        use_cache = self.cache is not None and not self.pixels
        images = [None] * len(chunk) if use_cache else [e.load_image() for e in chunk]
        grids = torch.stack([self.cache.grids[i] for i in indices]) if use_cache else None
        batch = self.processor(images, [e.question for e in chunk], answers, padding_side=self.padding_side,
                               image_grids=grids)
        if use_cache:
            batch["mm_encoder_outputs"] = encoder_outputs([self.cache.features[i] for i in indices])
        return batch

    def __iter__(self):
        step, self.start = self.start, 0
        while True:
            yield self.batch(self.indices(step))
            step += 1

    def epoch(self):
        """One pass in order (evaluation): ``(example indices, batch)`` pairs."""
        order = self.order(0)
        for first in range(0, len(order), self.batch_size):
            indices = order[first:first + self.batch_size]
            yield indices, self.batch(indices)
