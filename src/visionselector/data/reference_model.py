"""Training the small Qwen2.5-VL reference model on DigitsVQA from scratch.

The model is the real ``Qwen2_5_VLForConditionalGeneration`` class at small widths,
with the task's word-level tokenizer. Samples are generated on the fly from their
split and index (the generator is deterministic), so training needs no files.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .digits_vqa import QUESTION_TYPES, _digits, make_sample, vocabulary
from .processor import VQAProcessor, WordTokenizer

__all__ = ["ReferenceConfig", "build_reference_model", "train_reference", "evaluate_accuracy"]


@dataclass
class ReferenceConfig:
    """Widths and training settings of the reference model."""

    hidden_size: int = field(default=256, metadata={"help": "language model width"})
    text_layers: int = field(default=4, metadata={"help": "decoder layers"})
    vision_hidden: int = field(default=128, metadata={"help": "vision encoder width"})
    vision_depth: int = field(default=4, metadata={"help": "vision blocks (the last uses full attention)"})
    steps: int = field(default=2000, metadata={"help": "optimizer steps"})
    batch_size: int = field(default=16, metadata={"help": "samples per step"})
    learning_rate: float = field(default=1e-3, metadata={"help": "peak AdamW learning rate"})
    warmup_steps: int = field(default=100, metadata={"help": "linear warm-up steps"})
    eval_samples: int = field(default=300, metadata={"help": "validation samples per evaluation"})
    eval_every: int = field(default=250, metadata={"help": "evaluate every this many steps (0: only at the end)"})
    seed: int = field(default=0, metadata={"help": "seed of the weights"})


def build_reference_model(config: ReferenceConfig, tokenizer: WordTokenizer, processor: VQAProcessor):
    from transformers import Qwen2_5_VLForConditionalGeneration

    from ..presets import qwen2_5_vl_config

    heads = max(1, config.hidden_size // 64)
    model_config = qwen2_5_vl_config(
        hidden_size=config.hidden_size, text_layers=config.text_layers, heads=heads, kv_heads=max(1, heads // 2),
        intermediate_size=3 * config.hidden_size, vocab_size=len(tokenizer), vision_depth=config.vision_depth,
        vision_hidden=config.vision_hidden, vision_heads=max(1, config.vision_hidden // 32), patch_size=14,
        window_size=112,
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


def train_reference(config: ReferenceConfig, output_dir: str | Path | None = None, *, print_fn=print):
    """Train from scratch on the train split; return the model, its processor and a log."""
    tokenizer = WordTokenizer(vocabulary())
    processor = VQAProcessor(tokenizer)
    model = build_reference_model(config, tokenizer, processor)
    digits = _digits()
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=0.01)

    def factor(step):
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    log, started = [], time.time()
    model.train()
    for step in range(config.steps):
        first = step * config.batch_size
        samples = [make_sample("train", i, *digits) for i in range(first, first + config.batch_size)]
        batch = processor([s[0] for s in samples], [s[1] for s in samples], [s[2] for s in samples],
                          padding_side="right")
        loss = model(**batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        entry = {"step": step + 1, "loss": float(loss.detach()), "seconds": round(time.time() - started, 1)}
        last = step + 1 == config.steps
        if last or (config.eval_every and (step + 1) % config.eval_every == 0):
            entry["validation"] = evaluate_accuracy(model, processor, "validation", config.eval_samples,
                                                    digits=digits)
            print_fn(json.dumps(entry))
        log.append(entry)
    model.eval()
    if output_dir is not None:
        output_dir = Path(output_dir)
        model.save_pretrained(output_dir)
        tokenizer.save(output_dir / "vocab.json")
        (output_dir / "training.json").write_text(json.dumps({"config": asdict(config), "log": log}, indent=1))
    return model, processor, log
