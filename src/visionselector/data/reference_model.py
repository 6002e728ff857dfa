"""Training the small Qwen2.5-VL reference model on DigitsVQA from scratch.

The model is the real ``Qwen2_5_VLForConditionalGeneration`` class at small widths,
with the task's word-level tokenizer. Samples are generated on the fly from their
split and index (the generator is deterministic), so training needs no files.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .digits_vqa import (
    LABEL_HEADS, QUESTION_TYPES, _digits, make_dense_scene, make_sample, scene_questions, token_labels, vocabulary,
)
from ..training import _cosine_with_warmup
from .processor import VQAProcessor, WordTokenizer

__all__ = ["ReferenceConfig", "build_reference_model", "train_reference", "evaluate_accuracy"]


@dataclass
class ReferenceConfig:
    """Widths and training settings of the reference model.

    Training has two stages. The vision encoder and its merger first learn, from a dense
    auxiliary loss, what lies under each visual token (:func:`token_labels`); the language
    model then learns to answer from those tokens with the encoder frozen. Without the first
    stage the answer loss alone teaches the encoder far too slowly for a CPU.
    """

    hidden_size: int = field(default=192, metadata={"help": "language model width (and visual token width)"})
    text_layers: int = field(default=4, metadata={"help": "decoder layers"})
    vision_hidden: int = field(default=96, metadata={"help": "vision encoder width"})
    vision_depth: int = field(default=4, metadata={"help": "vision blocks (the last uses full attention)"})
    rope_theta: float = field(default=1e6, metadata={"help": "M-RoPE base of the language model"})
    vision_steps: int = field(default=700, metadata={"help": "stage 1: optimizer steps of the dense token loss"})
    vision_learning_rate: float = field(default=2e-3, metadata={"help": "stage 1: peak AdamW learning rate"})
    steps: int = field(default=1000, metadata={"help": "stage 2: optimizer steps of the answer loss"})
    batch_size: int = field(default=16, metadata={"help": "samples per step, both stages"})
    learning_rate: float = field(default=1e-3, metadata={"help": "stage 2: peak AdamW learning rate"})
    warmup_steps: int = field(default=50, metadata={"help": "linear warm-up steps of each stage"})
    follow_ups: int = field(default=5, metadata={"help": "stage 2: extra questions about each image after its own"})
    vision_from: str | None = field(default=None, metadata={
        "help": "take the trained vision encoder and merger from this reference checkpoint and skip stage 1"})
    init_from: str | None = field(default=None, metadata={
        "help": "continue from this reference checkpoint: all its weights, no stage 1"})
    eval_samples: int = field(default=300, metadata={"help": "validation samples per evaluation"})
    eval_every: int = field(default=250, metadata={"help": "evaluate every this many steps (0: only at the end)"})
    seed: int = field(default=0, metadata={"help": "seed of the weights"})


def build_reference_model(config: ReferenceConfig, tokenizer: WordTokenizer, processor: VQAProcessor):
    from transformers import Qwen2_5_VLForConditionalGeneration

    from ..presets import qwen2_5_vl_config

    heads = max(1, config.hidden_size // 64)  # head width 64
    model_config = qwen2_5_vl_config(
        hidden_size=config.hidden_size, text_layers=config.text_layers, heads=heads, kv_heads=max(1, heads // 2),
        intermediate_size=3 * config.hidden_size, vocab_size=len(tokenizer), vision_depth=config.vision_depth,
        vision_hidden=config.vision_hidden, vision_heads=max(1, config.vision_hidden // 32), patch_size=14,
        window_size=112, rope_theta=config.rope_theta,
    )
    for name, value in processor.model_token_ids().items():
        setattr(model_config, name, value)
    for sub_config in (model_config, model_config.text_config):
        sub_config.pad_token_id, sub_config.bos_token_id, sub_config.eos_token_id = (
            tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id)
    torch.manual_seed(config.seed)
    return Qwen2_5_VLForConditionalGeneration(model_config)


def evaluate_accuracy(model, processor: VQAProcessor, split: str, count: int, *, batch_size: int = 16,
                      digits=None) -> dict[str, float]:
    """Exact-match accuracy of greedy answers on the first ``count`` samples of ``split``, overall and per type."""
    images, targets = digits if digits is not None else _digits()
    correct = {kind: [0, 0] for kind in QUESTION_TYPES}
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for start in range(0, count, batch_size):
            samples = [make_sample(split, i, images, targets) for i in range(start, min(count, start + batch_size))]
            batch = processor([s[0] for s in samples], [s[1] for s in samples])
            out = model.generate(**batch, max_new_tokens=2, do_sample=False,
                                 eos_token_id=processor.tokenizer.eos_id, pad_token_id=processor.tokenizer.pad_id)
            for sample, row in zip(samples, out[:, batch["input_ids"].shape[1]:]):
                answer = processor.tokenizer.decode(row)
                correct[sample[3]][0] += int(answer == sample[2])
                correct[sample[3]][1] += 1
    model.train(was_training)
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


def _labelled_batch(split: str, indices, digits):
    """Images and their token labels: crowded pretraining scenes for ``split="dense"``, else task samples."""
    images, labels = [], []
    for index in indices:
        layout: list = []
        if split == "dense":
            images.append(make_dense_scene(index, *digits, layout=layout))
        else:
            images.append(make_sample(split, index, *digits, layout=layout)[0])
        labels.append(token_labels(layout, digits[1]))
    return images, torch.cat(labels)


def train_reference(config: ReferenceConfig, output_dir: str | Path | None = None, *, print_fn=print,
                    progress: bool = True):
    """Train from scratch on the train split; return the model, its processor and a log.

    Stage 1 trains the vision encoder and merger on :func:`token_labels` (``vision_steps``
    batches); stage 2 freezes them and trains the language model on the answers (``steps``
    batches). Each stage draws its own training samples; validation is checked along the way.
    """
    from tqdm.auto import tqdm

    tokenizer = WordTokenizer(vocabulary())
    processor = VQAProcessor(tokenizer)
    model = build_reference_model(config, tokenizer, processor)
    digits = _digits()
    log, started = [], time.time()
    model.train()
    vision_steps = config.vision_steps
    if config.vision_from is not None and config.init_from is not None:
        raise ValueError("give vision_from or init_from, not both")
    for source, whole in ((config.vision_from, False), (config.init_from, True)):
        if source is not None:
            _load_weights(model, source, whole=whole)
            vision_steps = 0

    heads = TokenLabelHeads(config.hidden_size)
    vision_parameters = list(model.model.visual.parameters()) + list(heads.parameters())
    optimizer = torch.optim.AdamW(vision_parameters, lr=config.vision_learning_rate, weight_decay=0.01)
    scheduler = _cosine_with_warmup(optimizer, config.warmup_steps, vision_steps)
    bar = tqdm(range(vision_steps), desc="reference stage 1 (visual tokens)", disable=not progress)
    for step in bar:
        first = step * config.batch_size
        images, labels = _labelled_batch("dense", range(first, first + config.batch_size), digits)
        loss, accuracy = heads(_visual_tokens(model, processor.pixels(images)), labels)
        _optimizer_step(optimizer, scheduler, vision_parameters, loss)
        entry = {"stage": 1, "step": step + 1, "loss": round(float(loss.detach()), 4),
                 "token_accuracy": dict(zip((n for n, _ in LABEL_HEADS), accuracy.tolist())),
                 "seconds": round(time.time() - started, 1)}
        bar.set_postfix(loss=f"{entry['loss']:.3f}")
        log.append(entry)
    if vision_steps:
        with torch.no_grad():
            images, labels = _labelled_batch("validation", range(64), digits)
            _, accuracy = heads(_visual_tokens(model, processor.pixels(images)), labels)
        log.append({"stage": 1, "validation_token_accuracy": dict(zip((n for n, _ in LABEL_HEADS), accuracy.tolist()))})
        print_fn(json.dumps(log[-1]))

    model.model.visual.requires_grad_(False)
    text_parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(text_parameters, lr=config.learning_rate, weight_decay=0.01)
    scheduler = _cosine_with_warmup(optimizer, config.warmup_steps, config.steps)
    # Where stage 2 starts in the train split. Stage 1 now draws crowded scenes, not train
    # samples; the offset stays so that the recorded runs reproduce.
    offset = config.vision_steps * config.batch_size
    bar = tqdm(range(config.steps), desc="reference stage 2 (answers)", disable=not progress)
    for step in bar:
        first = offset + step * config.batch_size
        samples, follow_ups = [], []
        for index in range(first, first + config.batch_size):
            layout: list = []
            samples.append(make_sample("train", index, *digits, layout=layout))
            others = [q for q in scene_questions(layout, digits[1], random.Random(index)) if q[0] != samples[-1][1]]
            follow_ups.append([q[:2] for q in random.Random(index).sample(others, min(config.follow_ups, len(others)))])
        batch = processor([s[0] for s in samples], [s[1] for s in samples], [s[2] for s in samples],
                          padding_side="right", follow_ups=follow_ups)
        model.model.visual.eval()  # frozen: no dropout or training-mode behaviour
        loss = model(**batch).loss
        _optimizer_step(optimizer, scheduler, text_parameters, loss)
        entry = {"stage": 2, "step": step + 1, "loss": round(float(loss.detach()), 4),
                 "seconds": round(time.time() - started, 1)}
        bar.set_postfix(loss=f"{entry['loss']:.3f}")
        last = step + 1 == config.steps
        if last or (config.eval_every and (step + 1) % config.eval_every == 0):
            entry["validation"] = evaluate_accuracy(model, processor, "validation", config.eval_samples,
                                                    digits=digits)
            print_fn(json.dumps(entry))
            if output_dir is not None and not last:  # a usable model at every evaluation
                _save(model, tokenizer, Path(output_dir) / "latest", config, log + [entry], started)
        log.append(entry)
    model.requires_grad_(True)
    model.eval()
    if output_dir is not None:
        _save(model, tokenizer, Path(output_dir), config, log, started)
    return model, processor, log


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


def _save(model, tokenizer, directory: Path, config: ReferenceConfig, log: list, started: float) -> None:
    model.save_pretrained(directory)
    tokenizer.save(directory / "vocab.json")
    (directory / "training.json").write_text(json.dumps(
        {"config": asdict(config), "seconds": round(time.time() - started, 1), "log": log}, indent=1))


REFERENCE_DIR = Path(__file__).resolve().parent.parent / "reference"


def load_reference_model(directory: str | Path | None = None, *, dtype: torch.dtype = torch.float32):
    """The reference model and its processor: the shipped one, or one written by :func:`train_reference`.

    The shipped weights are stored in float16 to keep the repository small; they are
    loaded as ``dtype`` (float32 by default: CPUs have no fast float16 kernels).
    """
    from transformers import Qwen2_5_VLForConditionalGeneration

    directory = Path(directory) if directory is not None else REFERENCE_DIR
    for name in ("config.json", "vocab.json"):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"{directory} is not a reference model directory: {name} is missing "
                                    "(train_reference / 'visionselector train-reference' writes one)")
    tokenizer = WordTokenizer.load(directory / "vocab.json")
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(directory, dtype=dtype)
    if model.config.text_config.vocab_size != len(tokenizer):
        raise ValueError(f"{directory}: the model's vocabulary has {model.config.text_config.vocab_size} entries, "
                         f"vocab.json {len(tokenizer)}")
    return model.eval(), VQAProcessor(tokenizer)


def export_reference(model, processor: VQAProcessor, directory: str | Path, *, training: dict | None = None) -> Path:
    """Save ``model`` as a compact (float16) reference checkpoint with its vocabulary."""
    import copy

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    half = copy.deepcopy(model).to(torch.float16)
    half.save_pretrained(directory)
    processor.tokenizer.save(directory / "vocab.json")
    if training is not None:
        (directory / "training.json").write_text(json.dumps(training, indent=1) + "\n")
    return directory
