"""Training the small Qwen2.5-VL reference model on DigitsVQA from scratch.

The model is the real ``Qwen2_5_VLForConditionalGeneration`` class at small widths,
with the task's word-level tokenizer (:mod:`.model`). Samples are generated on the fly from their
split and index (the generator is deterministic), so training needs no files.
"""

from __future__ import annotations

import functools
import json
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..adapters.qwen2_5_vl import Qwen2_5_VLAdapter
from ..data.encoding import collate, encode_conversation
from ..training import cosine_with_warmup
from .model import reference_tokenizer, write_processor_files
from .task import (
    COLOURS, LABEL_HEADS, QUESTION_TYPES, SHAPES, crop_quarter, digit_images, make_dense_scene, make_sample,
    scene_questions, token_labels,
)

__all__ = ["ReferenceConfig", "build_reference_model", "reference_processor", "fast_pixels", "train_reference",
           "evaluate_accuracy", "greedy_answers", "question_messages", "question_batch"]


@dataclass
class ReferenceConfig:
    """Widths and training settings of the reference model.

    Training has two stages. The vision encoder and its merger first learn, from a dense
    auxiliary loss, what lies under each visual token (:func:`token_labels`); the language
    model then learns to answer from those tokens with the encoder frozen. Without the first
    stage the answer loss alone teaches the encoder far too slowly for a CPU. The second
    stage alternates whole scenes with 224 x 224 quarters of scenes (64 visual tokens), where
    the language model finds the asked objects among a quarter of the tokens (it learns to
    count there) and each step costs a third.
    """

    hidden_size: int = field(default=192, metadata={"help": "language model width (and visual token width)"})
    text_layers: int = field(default=4, metadata={"help": "decoder layers"})
    text_heads: int = field(default=3, metadata={"help": "attention heads of the language model"})
    text_kv_heads: int = field(default=3, metadata={
        "help": "key-value heads of the language model (one per head lets each head match its own attribute)"})
    vision_hidden: int = field(default=96, metadata={"help": "vision encoder width"})
    vision_depth: int = field(default=4, metadata={"help": "vision blocks (the last uses full attention)"})
    rope_theta: float = field(default=1000.0, metadata={"help": "M-RoPE base of the language model"})
    mrope_section: tuple = field(default=(2, 6, 24), metadata={
        "help": "rotary frequency pairs of time, height and width, highest frequencies first; they sum to half "
                "the head width (Qwen's own 1:1.5:1.5 split is 8 12 12 at head width 64; () takes it)"})
    vision_steps: int = field(default=700, metadata={"help": "stage 1: optimizer steps of the dense token loss"})
    first_dense_scene: int = field(default=0, metadata={
        "help": "stage 1: index of its first crowded scene (a run that continues an encoder takes fresh ones)"})
    vision_learning_rate: float = field(default=2e-3, metadata={"help": "stage 1: peak AdamW learning rate"})
    quarter_steps: int = field(default=0, metadata={
        "help": "stage 2: optimizer steps on 224 x 224 quarters of training scenes, before the whole scenes"})
    steps: int = field(default=6000, metadata={"help": "stage 2: optimizer steps on whole scenes"})
    quarters_between: int = field(default=1, metadata={
        "help": "stage 2: after the quarter phase, one batch of quarters after every this many whole-scene batches "
                "(0: none); quarters teach counting, which whole scenes alone teach slowly"})
    position_loss: float = field(default=0.1, metadata={
        "help": "stage 2: weight of an auxiliary loss on the language model's visual tokens: whether each lies in "
                "the left or right half of its image (0: off); the model must work this out from M-RoPE to "
                "answer position questions, and the answer loss alone teaches it slowly"})
    shape_loss: float = field(default=0.0, metadata={
        "help": "stage 2: weight of an auxiliary loss on the same tokens: which shape of which colour lies under "
                "each, as one class (0: off); it asks the language model for the conjunction that presence "
                "questions need"})
    token_loss_layer: int = field(default=2, metadata={
        "help": "stage 2: decoder layer whose output the position and shape losses read (1 is the first)"})
    scenes: int = field(default=8000, metadata={
        "help": "stage 2: training scenes, encoded once by the frozen encoder and revisited every epoch"})
    quarter_scenes: int = field(default=4000, metadata={"help": "stage 2: training scenes whose quarters are used"})
    batch_size: int = field(default=16, metadata={"help": "samples per step, both stages"})
    learning_rate: float = field(default=1e-3, metadata={"help": "stage 2: peak AdamW learning rate"})
    warmup_steps: int = field(default=50, metadata={"help": "linear warm-up steps of each stage"})
    follow_ups: int = field(default=13, metadata={
        "help": "stage 2: extra questions about each image after its first (a scene has 8 to 21 in all; questions "
                "cost a few tokens against an image's 256, so more of them is more signal per step)"})
    bfloat16: bool = field(default=True, metadata={
        "help": "stage 2: run the language model under bfloat16 autocast (weights and optimizer stay float32); "
                "about 1.7x faster on CPUs with AVX512-BF16 or AMX, and on GPUs"})
    vision_from: str | None = field(default=None, metadata={
        "help": "start the vision encoder and merger from this reference checkpoint; stage 1 continues them for "
                "vision_steps (0 keeps them as they are)"})
    init_from: str | None = field(default=None, metadata={
        "help": "continue from this reference checkpoint: all its weights, no stage 1"})
    eval_samples: int = field(default=300, metadata={"help": "validation samples per evaluation"})
    eval_every: int = field(default=1000, metadata={
        "help": "evaluate every this many stage-2 steps (0: only at the end)"})
    seed: int = field(default=0, metadata={"help": "seed of the weights and of the sample order"})


# Where stage 2 draws its training scenes: blocks of the train split that nothing else uses
# (the demo trains selectors on samples from 100,000 on).
SCENES_FIRST, QUARTER_SCENES_FIRST = 200_000, 300_000


@functools.lru_cache(maxsize=None)
def reference_processor():
    """The reference model's processor (the checkpoint's tokenizer, chat template and image processor)."""
    import tempfile

    from ..models import load_processor

    with tempfile.TemporaryDirectory() as folder:
        write_processor_files(folder)
        (Path(folder) / "config.json").write_text(json.dumps({"model_type": "qwen2_5_vl"}))
        return load_processor(folder)


def question_messages(turns: list[tuple[str, str]], *, answered: bool = True) -> list[dict]:
    """Chat messages about one image: ``turns`` of ``(question, answer)``, the image before the first
    question; ``answered=False`` leaves out the answers (a prompt for the first question only)."""
    messages = []
    for index, (question, answer) in enumerate(turns):
        content = ([{"type": "image"}] if index == 0 else []) + [{"type": "text", "text": question}]
        messages.append({"role": "user", "content": content})
        if answered:
            messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return messages


def question_batch(processor, images: list, questions: list[str]) -> dict:
    """Left-padded generation prompts asking each image its question (pixels included)."""
    samples = [encode_conversation(processor, question_messages([(question, "")], answered=False), images=[image],
                                   generation_prompt=True) for image, question in zip(images, questions)]
    batch = collate(samples, processor.tokenizer.pad_token_id)
    batch.pop("labels")
    return batch


def build_reference_model(config: ReferenceConfig):
    from transformers import Qwen2_5_VLForConditionalGeneration

    from ..presets import qwen2_5_vl_config

    heads = config.text_heads
    if config.hidden_size % heads or heads % config.text_kv_heads:
        raise ValueError(f"hidden_size ({config.hidden_size}) must divide into text_heads ({heads}) and text_heads "
                         f"into text_kv_heads ({config.text_kv_heads})")
    overrides = {}
    if config.mrope_section:
        half = config.hidden_size // heads // 2
        if len(config.mrope_section) != 3 or sum(config.mrope_section) != half:
            raise ValueError(f"mrope_section must be three numbers summing to half the head width ({half}), "
                             f"got {tuple(config.mrope_section)}")
        overrides["rope_parameters"] = {"rope_type": "default", "rope_theta": config.rope_theta,
                                        "mrope_section": [int(n) for n in config.mrope_section]}
    tokenizer = reference_tokenizer()
    model_config = qwen2_5_vl_config(
        hidden_size=config.hidden_size, text_layers=config.text_layers, heads=heads, kv_heads=config.text_kv_heads,
        intermediate_size=3 * config.hidden_size, vocab_size=len(tokenizer), vision_depth=config.vision_depth,
        vision_hidden=config.vision_hidden, vision_heads=max(1, config.vision_hidden // 32), patch_size=14,
        window_size=112, rope_theta=config.rope_theta, **overrides,
    )
    for name in ("image", "video", "vision_start", "vision_end"):
        setattr(model_config, f"{name}_token_id", tokenizer.convert_tokens_to_ids(f"<{name}>"))
    for sub_config in (model_config, model_config.text_config):
        sub_config.pad_token_id, sub_config.bos_token_id, sub_config.eos_token_id = (
            tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id)
    torch.manual_seed(config.seed)
    return Qwen2_5_VLForConditionalGeneration(model_config)


def greedy_answers(model, processor, split: str, indices, *, batch_size: int = 16, digits=None):
    """Greedy answers (at most two tokens) to samples ``indices`` of ``split``, in order: yields
    ``(sample, layout, answer)`` with ``sample`` as :func:`make_sample` returns it and ``layout`` its objects."""
    from ..models import greedy_settings

    images, targets = digits if digits is not None else digit_images()
    indices = list(indices)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(indices), batch_size):
                layouts = [[] for _ in indices[start:start + batch_size]]
                samples = [make_sample(split, i, images, targets, layout=layout)
                           for i, layout in zip(indices[start:start + batch_size], layouts)]
                batch = question_batch(processor, [s[0] for s in samples], [s[1] for s in samples])
                out = model.generate(**batch, **greedy_settings(model, processor, 2))
                answers = processor.tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:],
                                                           skip_special_tokens=True)
                for sample, layout, answer in zip(samples, layouts, answers):
                    yield sample, layout, answer.strip()
    finally:
        model.train(was_training)


def evaluate_accuracy(model, processor, split: str, count: int, *, first: int = 0,
                      batch_size: int = 16, digits=None) -> dict[str, float]:
    """Exact-match accuracy of greedy answers on samples ``first`` to ``first + count - 1`` of ``split``,
    overall and per type."""
    correct = {kind: [0, 0] for kind in QUESTION_TYPES}
    for sample, _, answer in greedy_answers(model, processor, split, range(first, first + count),
                                            batch_size=batch_size, digits=digits):
        correct[sample[3]][0] += int(answer == sample[2])
        correct[sample[3]][1] += 1
    result = {kind: hits / total for kind, (hits, total) in correct.items() if total}
    result["all"] = sum(h for h, _ in correct.values()) / max(1, sum(t for _, t in correct.values()))
    return result


def _optimizer_step(optimizer, scheduler, parameters, loss) -> None:
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(parameters, 1.0)
    optimizer.step()
    scheduler.step()


class TokenLabelHeads(torch.nn.Module):
    """Linear classifiers of what lies under each visual token (stage 1 only; not saved)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.heads = torch.nn.ModuleList(torch.nn.Linear(width, classes) for _, classes in LABEL_HEADS)

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens (N, D), labels (N, heads) -> (summed cross-entropy, per-head accuracy on labelled tokens)."""
        loss, accuracy = tokens.new_zeros(()), []
        for index, head in enumerate(self.heads):
            logits = head(tokens)
            labelled = labels[:, index] > 0
            loss = loss + torch.nn.functional.cross_entropy(logits, labels[:, index])
            if labelled.any():  # objects cover few tokens: weigh them as much as all the background
                loss = loss + torch.nn.functional.cross_entropy(logits[labelled], labels[labelled, index])
            hits = (logits.argmax(-1) == labels[:, index])[labelled]
            accuracy.append(float(hits.float().mean()) if labelled.any() else float("nan"))
        return loss, torch.tensor(accuracy)


def _visual_tokens(model, batch) -> torch.Tensor:
    output = model.model.visual(batch["pixel_values"], grid_thw=batch["image_grid_thw"])
    tokens = getattr(output, "pooler_output", output)
    return torch.cat(list(tokens)) if isinstance(tokens, (list, tuple)) else tokens


@functools.lru_cache(maxsize=None)
def _image_processor(size: int):
    """An image processor that encodes ``size`` x ``size`` images at their own resolution."""
    from transformers import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(min_pixels=size * size, max_pixels=size * size)


def fast_pixels(image_processor, images: list) -> dict[str, torch.Tensor]:
    """``pixel_values`` and ``image_grid_thw`` for ``images``, exactly as ``image_processor`` makes
    them when it keeps their size. Same-size uint8 RGB images whose sides are multiples of 28 and
    whose area is the processor's pixel budget take a path that only normalises and lays out the
    patches, about twice as fast; others go through the image processor.
    """
    import numpy as np

    ip = image_processor
    unit = ip.patch_size * ip.merge_size
    arrays = [np.asarray(image) for image in images]
    shapes = {a.shape for a in arrays}
    shape = next(iter(shapes))
    budget = ip.size.get("shortest_edge") if hasattr(ip.size, "get") else None  # a dict or a SizeDict
    if (len(shapes) != 1 or len(shape) != 3 or shape[2] != 3 or arrays[0].dtype != np.uint8 or shape[0] % unit
            or shape[1] % unit or shape[0] * shape[1] != budget or budget != ip.size.get("longest_edge")):
        return image_processor(images=images, return_tensors="pt")
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


def _labelled_tokens(model, split: str, indices, digits) -> tuple[torch.Tensor, torch.Tensor]:
    """Visual tokens and their :func:`token_labels` for crowded pretraining scenes
    (``split="dense"``) or task samples: the first half of ``indices`` as whole 448 x 448
    scenes, the second as one 224 x 224 quarter of each (stage 2 also trains on quarters)."""
    indices = list(indices)
    half = len(indices) - len(indices) // 2
    tokens, labels = [], []
    for group, size in ((indices[:half], 448), (indices[half:], 224)):
        images = []
        for index in group:
            layout: list = []
            if split == "dense":
                image = make_dense_scene(index, *digits, layout=layout)
            else:
                image = make_sample(split, index, *digits, layout=layout)[0]
            if size == 224:
                image, layout = crop_quarter(image, layout, index % 4)
            images.append(image)
            labels.append(token_labels(layout, digits[1], size=size))
        if images:
            tokens.append(_visual_tokens(model, fast_pixels(_image_processor(size), images)))
    return torch.cat(tokens), torch.cat(labels)


def train_reference(config: ReferenceConfig, output_dir: str | Path | None = None, *, print_fn=print,
                    progress: bool = True):
    """Train from scratch on the train split; return the model, its processor and a log.

    Stage 1 trains the vision encoder and merger on :func:`token_labels` (``vision_steps``
    batches; from ``vision_from``'s encoder if given). Stage 2 freezes them, encodes its
    training images once, and trains the language model on the answers in the order of
    :func:`stage_two_schedule`: ``quarter_steps`` batches of scene quarters, then ``steps`` of
    whole scenes with quarter batches between them, plus the auxiliary token losses. Each
    stage draws its own training samples; validation is checked along the way.
    """
    from tqdm.auto import tqdm

    if not 1 <= config.token_loss_layer <= config.text_layers:
        raise ValueError(f"token_loss_layer must be a decoder layer, 1 to {config.text_layers}, "
                         f"got {config.token_loss_layer}")
    processor = reference_processor()
    model = build_reference_model(config)
    digits = digit_images()
    log, started = [], time.time()
    model.train()
    vision_steps = config.vision_steps
    if config.vision_from is not None and config.init_from is not None:
        raise ValueError("give vision_from or init_from, not both")
    if config.vision_from is not None:
        _load_weights(model, config.vision_from, whole=False)
    if config.init_from is not None:
        _load_weights(model, config.init_from, whole=True)
        vision_steps = 0

    heads = TokenLabelHeads(config.hidden_size)
    vision_parameters = list(model.model.visual.parameters()) + list(heads.parameters())
    optimizer = torch.optim.AdamW(vision_parameters, lr=config.vision_learning_rate, weight_decay=0.01)
    scheduler = cosine_with_warmup(optimizer, config.warmup_steps, vision_steps)
    bar = tqdm(range(vision_steps), desc="reference stage 1 (visual tokens)", disable=not progress)
    for step in bar:
        first = config.first_dense_scene + step * config.batch_size
        tokens, labels = _labelled_tokens(model, "dense", range(first, first + config.batch_size), digits)
        loss, accuracy = heads(tokens, labels)
        _optimizer_step(optimizer, scheduler, vision_parameters, loss)
        entry = {"stage": 1, "step": step + 1, "loss": round(float(loss.detach()), 4),
                 "token_accuracy": dict(zip((n for n, _ in LABEL_HEADS), accuracy.tolist())),
                 "seconds": round(time.time() - started, 1)}
        bar.set_postfix(loss=f"{entry['loss']:.3f}")
        log.append(entry)
    if vision_steps:
        with torch.no_grad():
            _, accuracy = heads(*_labelled_tokens(model, "validation", range(64), digits))
        log.append({"stage": 1, "validation_token_accuracy": dict(zip((n for n, _ in LABEL_HEADS), accuracy.tolist()))})
        print_fn(json.dumps(log[-1]))

    model.model.visual.requires_grad_(False)
    model.model.visual.eval()  # frozen: no dropout or training-mode behaviour
    scenes = (_encoded_samples(model, processor, digits, config.scenes, quarters=False, progress=progress)
              if config.steps else None)
    schedule = stage_two_schedule(config.quarter_steps, config.steps, config.quarters_between)
    quarters = (_encoded_samples(model, processor, digits, config.quarter_scenes, quarters=True, progress=progress)
                if "quarters" in {kind for kind, _ in schedule} else None)
    token_losses = TokenLosses(config.hidden_size, model.config.image_token_id, config.token_loss_layer)
    weights = {"side": config.position_loss, "shape": config.shape_loss}
    text_parameters = [p for p in model.parameters() if p.requires_grad]
    if any(weights.values()):
        text_parameters += list(token_losses.parameters())
    optimizer = torch.optim.AdamW(text_parameters, lr=config.learning_rate, weight_decay=0.01)
    total = len(schedule)
    scheduler = cosine_with_warmup(optimizer, config.warmup_steps, total)
    bar = tqdm(range(total), desc="reference stage 2 (answers)", disable=not progress)
    for step in bar:
        kind, index = schedule[step]
        samples = quarters if kind == "quarters" else scenes
        batch = samples.batch(index, config.batch_size, config.follow_ups, seed=config.seed)
        with torch.autocast(model.device.type, dtype=torch.bfloat16, enabled=config.bfloat16):
            output = model(**batch, output_hidden_states=any(weights.values()))
            loss = answer_loss = output.loss
            token_results = {}
            if any(weights.values()):
                shapes = (samples.shapes[samples.indices(index, config.batch_size, seed=config.seed)]
                          if weights["shape"] else None)
                token_results = token_losses(output.hidden_states, batch, shapes, sides=bool(weights["side"]))
            for name, (token_loss, _) in token_results.items():
                loss = loss + weights[name] * token_loss
        _optimizer_step(optimizer, scheduler, text_parameters, loss)
        entry = {"stage": 2, "step": step + 1, "images": kind, "loss": round(float(answer_loss.detach()), 4),
                 "seconds": round(time.time() - started, 1)}
        for name, (_, accuracy) in token_results.items():
            if weights[name]:
                entry[f"{name}_accuracy"] = round(accuracy, 4)
        bar.set_postfix(loss=f"{entry['loss']:.3f}")
        last = step + 1 == total
        if last or (config.eval_every and (step + 1) % config.eval_every == 0):
            entry["validation"] = evaluate_accuracy(model, processor, "validation", config.eval_samples,
                                                    digits=digits)
            print_fn(json.dumps(entry))
            if output_dir is not None and not last:  # a usable model at every evaluation
                _save(model, Path(output_dir) / "latest", config, log + [entry], started)
        log.append(entry)
    model.requires_grad_(True)
    model.eval()
    if output_dir is not None:
        _save(model, Path(output_dir), config, log, started)
    return model, processor, log


def stage_two_schedule(quarter_steps: int, scene_steps: int, quarters_between: int) -> list[tuple[str, int]]:
    """Stage 2's batches in order, as ("quarters" | "scenes", index of that kind's batch):
    ``quarter_steps`` quarter batches, then ``scene_steps`` scene batches with one more quarter
    batch after every ``quarters_between`` of them (0: none)."""
    if min(quarter_steps, scene_steps, quarters_between) < 0:
        raise ValueError(f"stage 2 steps must be 0 or more, got quarter_steps={quarter_steps}, "
                         f"steps={scene_steps}, quarters_between={quarters_between}")
    schedule = [("quarters", i) for i in range(quarter_steps)]
    quarter = quarter_steps
    for scene in range(scene_steps):
        schedule.append(("scenes", scene))
        if quarters_between and (scene + 1) % quarters_between == 0:
            schedule.append(("quarters", quarter))
            quarter += 1
    return schedule


def token_sides(image_grid_thw: torch.Tensor) -> torch.Tensor:
    """image_grid_thw (B, 3) patch grids -> (visual tokens,) 0 for a merged token in the left half
    of its image, 1 for the right half; images one after another, each in raster order."""
    sides = []
    for t, h, w in image_grid_thw.tolist():
        width = w // 2  # the merger joins 2 x 2 patches into a token
        columns = torch.arange(t * (h // 2) * width) % width
        sides.append((2 * columns >= width).long())
    return torch.cat(sides)


def shape_classes(labels: torch.Tensor) -> torch.Tensor:
    """:func:`token_labels` (tokens, heads) -> (tokens,) the shape and its colour under each token
    as one class: 0 for none, else 1 + shape * colours + colour."""
    names = [name for name, _ in LABEL_HEADS]
    shape, colour = labels[:, names.index("shape")], labels[:, names.index("colour")]
    return torch.where(shape > 0, 1 + (shape - 1) * len(COLOURS) + (colour - 1).clamp(min=0), 0)


class TokenLosses(torch.nn.Module):
    """Stage 2's auxiliary classifiers (not saved), on the language model's hidden state of each
    visual token after decoder layer ``layer``: whether the token lies in the left or right half of
    its image (visual tokens come in raster order, so this follows from the image grid), and which
    shape of which colour lies under it (:func:`shape_classes`)."""

    def __init__(self, width: int, image_token_id: int, layer: int) -> None:
        super().__init__()
        self.side = torch.nn.Linear(width, 2)
        self.shape = torch.nn.Linear(width, 1 + len(SHAPES) * len(COLOURS))
        self.image_token_id, self.layer = image_token_id, layer

    def forward(self, hidden_states: tuple, batch: dict, shapes: torch.Tensor | None = None, *,
                sides: bool = True) -> dict:
        """hidden_states: the model's (embeddings, layer 1, ...), each (B, L, D); shapes (B, tokens)
        -> {"side" | "shape": (cross-entropy, accuracy on the tokens that carry the label)}: the side
        loss if ``sides``, the shape loss if ``shapes`` is given."""
        visual = hidden_states[self.layer][batch["input_ids"] == self.image_token_id].float()
        result = {}
        if sides:
            targets = token_sides(batch["image_grid_thw"]).to(visual.device)
            logits = self.side(visual)
            result["side"] = (torch.nn.functional.cross_entropy(logits, targets),
                              float((logits.argmax(-1) == targets).float().mean()))
        if shapes is not None:
            classes = shapes.reshape(-1).to(visual.device)
            logits = self.shape(visual)
            on_shapes = classes > 0
            result["shape"] = (torch.nn.functional.cross_entropy(logits, classes),
                               float((logits.argmax(-1) == classes)[on_shapes].float().mean()))
        return result


class EncodedSamples:
    """Training samples whose images went through the frozen encoder once: ``features``
    (N, tokens, D) in float16, each image's grid, its questions (the first is asked first) and,
    optionally, ``shapes`` (N, tokens): the :func:`shape_classes` of its tokens."""

    def __init__(self, processor, features: torch.Tensor, grid: list[int],
                 questions: list[list[tuple[str, str]]], shapes: torch.Tensor | None = None) -> None:
        self.processor, self.features, self.grid, self.questions = processor, features, grid, questions
        self.shapes = shapes
        self._epoch, self._epoch_order = None, []

    def __len__(self) -> int:
        return len(self.questions)

    def _order(self, epoch: int, seed: int) -> list[int]:
        if self._epoch != (epoch, seed):
            self._epoch, self._epoch_order = (epoch, seed), list(range(len(self)))
            random.Random(seed * 1_000_003 + epoch).shuffle(self._epoch_order)
        return self._epoch_order

    def indices(self, step: int, batch_size: int, *, seed: int) -> list[int]:
        """Which samples the ``step``-th batch holds."""
        indices = []
        for position in range(step * batch_size, (step + 1) * batch_size):
            epoch, within = divmod(position, len(self))
            indices.append(self._order(epoch, seed)[within])
        return indices

    def batch(self, step: int, batch_size: int, follow_ups: int, *, seed: int) -> dict:
        """The ``step``-th training batch: epochs over the samples in an order shuffled per epoch,
        each sample with its first question and ``follow_ups`` others drawn afresh at every visit."""
        indices = self.indices(step, batch_size, seed=seed)
        rng = random.Random(seed * 1_000_003 + 7919 * step)
        turns = [self.questions[i][0:1] + rng.sample(self.questions[i][1:], min(follow_ups, len(self.questions[i]) - 1))
                 for i in indices]
        tokens = self.features.shape[1]
        batch = collate([encode_conversation(self.processor, question_messages(t), visual_counts=[tokens])
                         for t in turns], self.processor.tokenizer.pad_token_id, padding_side="right")
        batch["image_grid_thw"] = torch.tensor([self.grid] * len(indices))
        batch["mm_encoder_outputs"] = Qwen2_5_VLAdapter.encoder_outputs([self.features[i].float() for i in indices])
        return batch


def _encoded_samples(model, processor, digits, count: int, *, quarters: bool,
                     progress: bool) -> EncodedSamples:
    """Stage 2's training samples: ``count`` whole training scenes, each with its own question
    first and every other uniquely answerable question about it, or (``quarters``) the four
    quarters of ``count`` other scenes, each with its questions in random order."""
    from tqdm.auto import tqdm

    images, targets = digits
    first = QUARTER_SCENES_FIRST if quarters else SCENES_FIRST
    features, questions, shapes = [], [], []
    chunk = 8 if quarters else 32
    for start in tqdm(range(first, first + count, chunk), desc=f"encoding {'quarters of ' if quarters else ''}scenes",
                      disable=not progress):
        pictures = []
        for index in range(start, min(first + count, start + chunk)):
            layout: list = []
            image, question, answer, _ = make_sample("train", index, images, targets, layout=layout)
            if not quarters:
                others = scene_questions(layout, targets, random.Random(index))
                pictures.append(image)
                shapes.append(shape_classes(token_labels(layout, targets)))
                questions.append([(question, answer)] + [q[:2] for q in others if q[0] != question])
                continue
            for quarter in range(4):
                picture, inside = crop_quarter(image, layout, quarter)
                found = [q[:2] for q in scene_questions(inside, targets, random.Random(4 * index + quarter), width=224)]
                random.Random(4 * index + quarter).shuffle(found)
                pictures.append(picture)
                shapes.append(shape_classes(token_labels(inside, targets, size=224)))
                questions.append(found)
        pixels = fast_pixels(_image_processor(224 if quarters else 448), pictures)
        with torch.no_grad():
            tokens = _visual_tokens(model, pixels)
        features.append(tokens.reshape(len(pictures), -1, tokens.shape[-1]).half())
    grid = [int(v) for v in pixels["image_grid_thw"][0]]
    return EncodedSamples(processor, torch.cat(features), grid, questions, torch.stack(shapes))


def _load_weights(model, directory, *, whole: bool) -> None:
    """Copy the weights (``whole``) or the vision encoder and merger of a reference checkpoint into ``model``."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    if not (Path(directory) / "config.json").is_file():
        raise FileNotFoundError(f"no reference checkpoint in {directory} to take weights from")
    source = Qwen2_5_VLForConditionalGeneration.from_pretrained(directory, dtype=torch.float32)
    target, origin = (model, source) if whole else (model.model.visual, source.model.visual)
    try:
        target.load_state_dict(origin.state_dict(), strict=True)
    except RuntimeError as error:
        raise ValueError(f"{directory} holds a model of other widths: {error}") from None


def _save(model, directory: Path, config: ReferenceConfig, log: list, started: float) -> None:
    model.save_pretrained(directory)
    write_processor_files(directory)
    (directory / "training.json").write_text(json.dumps(
        {"config": asdict(config), "seconds": round(time.time() - started, 1), "log": log}, indent=1))
