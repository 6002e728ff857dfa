"""Conversation examples in batches for a model, and cached visual features.

A selector trains on a frozen model, and it sits after the vision encoder, so the
encoder's output for an image never changes during training or evaluation.
:class:`FeatureCache` computes it once per image (and can keep it on disk); batches
then carry ``mm_encoder_outputs`` instead of pixels and the model runs only its language
part. Methods that need the encoder's own attention (VisionZip) still need pixels:
:class:`ExampleBatches` gives them pixels when asked.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import torch

from .conversations import ConversationRecord, read_conversations
from .encoding import collate, encode_conversation

__all__ = ["load_examples", "load_image", "FeatureCache", "ExampleBatches", "FillerBatch"]


def load_image(path: Path, where: str = ""):
    """An RGB ``PIL.Image``; unreadable files raise ``ValueError`` naming the file (and record)."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, ValueError) as error:
        raise ValueError(f"{where + ': ' if where else ''}cannot read image {path}: {error}") from None


def load_examples(path: str | Path, limit: int | None = None, *, image_folder: str | Path | None = None
                  ) -> list[ConversationRecord]:
    """The first ``limit`` (all if ``None``) records of a conversation JSONL file (see
    :func:`~visionselector.data.conversations.read_conversations` for what each line holds)."""
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be an integer of at least 1, got {limit!r}")
    records = read_conversations(path, image_folder=image_folder)[:limit]
    if not records:
        raise ValueError(f"{path} holds no examples")
    return records


def _vision_side(model):
    """The model's adapter and its vision tower (data reaches a model only through its adapter)."""
    from ..adapters import find_adapter

    adapter = find_adapter(model)
    return adapter, adapter.vision_tower(adapter.core(model))


def _encoder_fingerprint(model) -> str:
    """A short digest of the vision encoder's weights: cached features are only valid for them."""
    from ..training.deepspeed import full_parameters

    digest = hashlib.sha256()
    tower = _vision_side(model)[1]
    with full_parameters(tower):  # weights partitioned by ZeRO-3 are read whole
        for name, tensor in tower.state_dict().items():
            digest.update(name.encode())
            digest.update(tensor.detach().float().cpu().flatten()[:: max(1, tensor.numel() // 4096)].numpy().tobytes())
            digest.update(str(tuple(tensor.shape)).encode())
    return digest.hexdigest()[:16]


def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


class FeatureCache:
    """The frozen vision encoder's output for every image of a list of examples.

    ``features[i]`` holds what the vision side made of example ``i``'s images, one item per
    image (a ``[tokens, D]`` tensor, or what the family's adapter needs), and ``side_inputs[i]``
    the image processor's other per-image outputs (``image_grid_thw``, ``image_sizes``, ...)
    that the model still needs beside them, as a dict of stacked rows. Examples with
    videos are not cached (:meth:`covers`).

    Args:
        model: a supported model; only its vision encoder runs.
        processor: the checkpoint's processor (its image processor makes the pixels).
        examples: what to encode.
        directory: if given, the features are saved there and reused when the same encoder
            weights and image contents come again (they are recomputed otherwise).
        batch_size: images per encoder call.
        progress: show a progress bar.
        group: the processes of a data-parallel run (``training.distributed.ProcessGroup``);
            each encodes its share of the images once, and all of them end with every
            feature. It needs ``directory``, on storage every process reads.
    """

    def __init__(self, model, processor, examples: list[ConversationRecord], *,
                 directory: str | Path | None = None, batch_size: int = 32, progress: bool = True,
                 group=None) -> None:
        self.examples = examples
        self.adapter = _vision_side(model)[0]
        key = hashlib.sha256(json.dumps(["side-inputs", _encoder_fingerprint(model),
                                         type(processor.image_processor).__name__,
                                         processor.image_processor.to_json_string()] + [
            [_file_digest(image) for image in e.images] for e in examples
        ]).encode()).hexdigest()[:20]
        path = None if directory is None else Path(directory) / f"features-{key}.pt"
        from ..training.distributed import ProcessGroup, barrier

        group = group or ProcessGroup()
        if group.active and path is None:
            raise ValueError("a feature cache shared by several processes needs a directory they all read")
        if self._load(path, key):
            return
        adapter = _vision_side(model)[0]
        jobs = [(i, image) for i, e in enumerate(examples) if not e.videos
                and (adapter.images_encode_alone or len(e.images) <= 1) for image in e.images]
        if not group.active:
            encoded = self._encode(model, processor, jobs, batch_size, progress)
        else:
            encoded = self._encode_shared(model, processor, jobs, batch_size, progress and group.main, path, group)
        self.features, self.side_inputs = self._gather(encoded)
        if path is not None and group.main:
            self._save(path, key)
        barrier(group)

    def _load(self, path: Path | None, key: str) -> bool:
        if path is None or not path.is_file():
            return False
        try:
            saved = torch.load(path, weights_only=True)
            if saved["key"] == key and len(saved["features"]) == len(self.examples):
                self.features, self.side_inputs = saved["features"], saved["side_inputs"]
                return True
        except Exception:  # a truncated or foreign file: recompute and overwrite it
            pass
        return False

    def _save(self, path: Path, key: str) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_suffix(".tmp")
        torch.save({"key": key, "features": self.features, "side_inputs": self.side_inputs}, temporary)
        temporary.replace(path)

    def _encode(self, model, processor, jobs: list, batch_size: int, progress: bool) -> list:
        """``(example index, features, side-input row)`` of each image of ``jobs``, in order."""
        from tqdm.auto import tqdm

        adapter, tower = _vision_side(model)
        encoded = []
        was_training = tower.training
        tower.eval()
        with torch.no_grad():
            for start in tqdm(range(0, len(jobs), batch_size), desc="encoding images", unit="batch",
                              disable=not progress):
                chunk = jobs[start:start + batch_size]
                images = [load_image(path, self.examples[i].where) for i, path in chunk]
                pixels = processor.image_processor(images=images, return_tensors="pt")
                side = {name: value for name, value in pixels.items()
                        if name != "pixel_values" and torch.is_tensor(value) and value.shape[:1] == (len(chunk),)}
                for position, ((i, _), item) in enumerate(zip(chunk, adapter.encode_images(model, pixels))):
                    encoded.append((i, item, {name: value[position] for name, value in side.items()}))
        tower.train(was_training)
        return encoded

    def _encode_shared(self, model, processor, jobs: list, batch_size: int, progress: bool, path: Path,
                       group) -> list:
        """Each process encodes its contiguous share of ``jobs`` into a part file; every process
        then reads all parts, in rank order, which is the order of ``jobs``."""
        from ..training.distributed import barrier, share

        part = path.with_name(f"{path.stem}.part{group.rank}of{group.size}.pt")
        part.parent.mkdir(parents=True, exist_ok=True)
        torch.save(self._encode(model, processor, share(jobs, group), batch_size, progress), part)
        barrier(group)
        encoded = []
        device = next(_vision_side(model)[1].parameters()).device  # where this process's encoder put its own
        for rank in range(group.size):
            encoded += torch.load(path.with_name(f"{path.stem}.part{rank}of{group.size}.pt"), weights_only=True,
                                  map_location=device)
        barrier(group)  # every part is read before it is deleted
        part.unlink()
        return encoded

    def _gather(self, encoded: list):
        features = [[] for _ in self.examples]
        rows: list[dict[str, list]] = [{} for _ in self.examples]
        for i, item, side in encoded:
            features[i].append(item)
            for name, value in side.items():
                rows[i].setdefault(name, []).append(value)
        return features, [{name: torch.stack(values) for name, values in per.items()} for per in rows]

    def covers(self, index: int) -> bool:
        """Whether example ``index``'s visual input is cached (all its images, and no video)."""
        example = self.examples[index]
        alone = self.adapter.images_encode_alone or len(example.images) <= 1
        return alone and not example.videos and len(self.features[index]) == len(example.images)

    def __len__(self) -> int:
        return len(self.features)


class FillerBatch(dict):
    """Model inputs that a process runs only to keep step with the others; they count for nothing
    (no loss, no gradient, no tokens in the step's counts)."""


class ExampleBatches:
    """Model inputs for examples, in batches, in order or shuffled per epoch by a seed.

    Prompts come from the checkpoint's chat template (:func:`encode_conversation`); rows are
    left-padded. With ``cache``, examples whose images are cached carry ``mm_encoder_outputs``
    instead of pixels; with ``pixels=True`` every batch carries pixels. ``with_answers``
    keeps the whole conversation with labels on its assistant turns (training); otherwise
    the prompt ends with the generation prompt before the last answer (evaluation).
    Iterating from ``start`` skips the first batches without building them, which is how a
    resumed run continues where it stopped.

    ``batch_size`` is the whole batch of a step. With ``group`` (the processes of a
    data-parallel run) or ``micro_batch_size``, iterating yields instead, per step, a list of
    this process's micro-batches: its contiguous share of the step's examples, cut into
    batches of at most ``micro_batch_size`` (an empty list when the share is empty). The
    steps' examples are the same whatever the number of processes. With ``lockstep`` every
    process gets the same number of micro-batches in every step, which a model sharded over
    the processes needs (each pass gathers weights from all of them): a process with fewer
    real ones gets :class:`FillerBatch` copies of the step's first example, which count for
    nothing.
    """

    def __init__(self, examples: list[ConversationRecord], processor, *, batch_size: int,
                 cache: FeatureCache | None = None, with_answers: bool = False, shuffle_seed: int | None = None,
                 pixels: bool = False, group=None, micro_batch_size: int | None = None,
                 lockstep: bool = False) -> None:
        self.adapter = cache.adapter if cache is not None else None
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if micro_batch_size is not None and (isinstance(micro_batch_size, bool) or not isinstance(micro_batch_size, int)
                                             or micro_batch_size < 1):
            raise ValueError(f"micro_batch_size must be None (a process's whole share) or an integer of at least 1, "
                             f"got {micro_batch_size!r}")
        self.group, self.micro_batch_size, self.lockstep = group, micro_batch_size, lockstep
        if cache is not None and cache.examples is not examples and len(cache) != len(examples):
            raise ValueError(f"the feature cache holds {len(cache)} examples, the batches {len(examples)}")
        self.examples, self.processor, self.batch_size = examples, processor, batch_size
        self.cache, self.with_answers, self.shuffle_seed, self.pixels = cache, with_answers, shuffle_seed, pixels
        tokenizer = processor.tokenizer
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.start = 0
        self._encoded: dict[int, dict] = {}  # cached examples' token rows: the same on every visit
        from ..models import supports_video

        if any(e.videos for e in examples) and not supports_video():
            first = next(e for e in examples if e.videos)
            raise ValueError(f"{first.where}: this sample holds a video, and video needs torchvision, which is not "
                             "installed (pip install torchvision matching your torch build); images work without it")

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

    def _messages(self, example: ConversationRecord) -> list[dict]:
        return example.messages() if self.with_answers else example.prompt_messages()

    def _sample(self, index: int, cached: bool) -> dict:
        example = self.examples[index]
        if cached:
            if index not in self._encoded:
                counts = [self.adapter.token_count(f) for f in self.cache.features[index]]
                self._encoded[index] = encode_conversation(self.processor, self._messages(example),
                                                           visual_counts=counts,
                                                           generation_prompt=not self.with_answers)
            return self._encoded[index]
        images = [load_image(path, example.where) for path in example.images]
        videos = [str(path) for path in example.videos]
        return encode_conversation(self.processor, self._messages(example), images=images, videos=videos,
                                   generation_prompt=not self.with_answers)

    def batch(self, indices: list[int]) -> dict:
        cached = self.cache is not None and not self.pixels and all(self.cache.covers(i) for i in indices)
        batch = collate([self._sample(i, cached) for i in indices], self.pad_id)
        if not self.with_answers:
            batch.pop("labels")
        if cached:
            features = [f for i in indices for f in self.cache.features[i]]
            if features:
                batch["mm_encoder_outputs"] = self.adapter.encoder_outputs(features)
                names = {name for i in indices for name in self.cache.side_inputs[i]}
                for name in sorted(names):
                    batch[name] = torch.cat([self.cache.side_inputs[i][name] for i in indices
                                             if name in self.cache.side_inputs[i]])
        return batch

    @property
    def in_parts(self) -> bool:
        """Whether iterating yields each step as a list of this process's micro-batches."""
        return self.micro_batch_size is not None or (self.group is not None and self.group.active)

    def parts(self, step: int) -> list[dict]:
        """This process's micro-batches of the ``step``-th batch."""
        from ..training.distributed import ProcessGroup, share

        group = self.group or ProcessGroup()
        everyone = self.indices(step)
        mine = share(everyone, group)
        largest = -(-len(everyone) // group.size)  # the first process's share is the largest
        size = self.micro_batch_size or max(1, largest)
        parts = [self.batch(mine[first:first + size]) for first in range(0, len(mine), size)]
        if not self.lockstep:
            return parts
        return parts + [FillerBatch(self.batch(everyone[:1])) for _ in range(-(-largest // size) - len(parts))]

    def __iter__(self):
        step, self.start = self.start, 0
        while True:
            yield self.parts(step) if self.in_parts else self.batch(self.indices(step))
            step += 1

    def epoch(self):
        """One pass in order (evaluation): ``(example indices, batch)`` pairs."""
        order = self.order(0)
        for first in range(0, len(order), self.batch_size):
            indices = order[first:first + self.batch_size]
            yield indices, self.batch(indices)
