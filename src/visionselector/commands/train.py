"""``visionselector train``: train a VisionSelector scorer on a frozen model from conversation JSONL."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

from ..training import SelectorTrainingConfig
from .common import MODEL_HELP, check_file, check_output_folder, model_and_processor, set_threads

__all__ = ["TrainConfig", "run_train"]


@dataclass
class TrainConfig(SelectorTrainingConfig):
    """Settings of ``visionselector train``: the training run's (inherited) and the data's."""

    data: str = field(default="", metadata={"help": "training conversations (LLaVA / Cambrian JSONL)"})
    image_folder: str | None = field(default=None, metadata={
        "help": "folder that relative image and video paths start from (default: the JSONL file's folder)"})
    out: str = field(default="selector", metadata={"help": "output directory of the selector"})
    model: str = field(default="reference", metadata={"help": MODEL_HELP})
    epochs: float = field(default=1.0, metadata={"help": "passes over the data (ignored if --steps is set)"})
    steps: int | None = field(default=None, metadata={"help": "optimizer steps (default: from --epochs)"})
    batch_size: int = field(default=16, metadata={"help": "examples per step"})
    cache_features: bool = field(default=True, metadata={"help": "encode each image once and train on the cached features"})
    cache_dir: str | None = field(default=None, metadata={"help": "keep cached features here (default: OUT/cache)"})
    save_every: int = field(default=50, metadata={"help": "checkpoint every this many steps"})
    resume: bool = field(default=False, metadata={"help": "continue from the checkpoint in OUT/checkpoint"})
    limit: int | None = field(default=None, metadata={"help": "use only the first N examples"})
    seed: int = field(default=0, metadata={"help": "seed of the scorer's weights and the data order"})
    threads: int | None = field(default=None, metadata={"help": "torch CPU threads (default: torch's choice)"})


def run_train(config: TrainConfig, *, model=None, processor=None, print_fn=print) -> dict:
    """Train a VisionSelector scorer on the frozen model; returns where it went and the loss history."""
    import visionselector as vs

    from ..data.batches import ExampleBatches, FeatureCache, load_examples
    from ..ops.topk import validate_retention
    from ..training import train_selector

    validate_retention(config.retention)
    for name, least in (("batch_size", 1), ("save_every", 0)):
        if getattr(config, name) < least:
            raise ValueError(f"{name} must be at least {least}, got {getattr(config, name)}")
    if config.steps is not None and config.steps < 1:
        raise ValueError(f"steps must be at least 1, got {config.steps}")
    if config.steps is None and not config.epochs > 0:
        raise ValueError(f"epochs must be positive, got {config.epochs}")
    set_threads(config.threads)
    data = check_file(config.data, "training data")
    out = check_output_folder(config.out)
    examples = load_examples(data, config.limit, image_folder=config.image_folder)
    model, processor = model_and_processor(config.model, model, processor)
    started = time.time()
    cache = None
    if config.cache_features:
        cache = FeatureCache(model, processor, examples, directory=config.cache_dir or out / "cache",
                             progress=config.progress)
    batches = ExampleBatches(examples, processor, batch_size=config.batch_size, cache=cache, with_answers=True,
                             shuffle_seed=config.seed)
    steps = config.steps or max(1, round(config.epochs * batches.batches_per_epoch()))
    options = {} if config.hidden_dim is None else {"hidden_dim": config.hidden_dim}
    training = SelectorTrainingConfig(**{f.name: getattr(config, f.name) for f in fields(SelectorTrainingConfig)})
    torch.manual_seed(config.seed)
    print_fn(f"training a selector at retention {config.retention:g} on {len(examples)} examples of {data}: "
             f"{steps} steps of {config.batch_size}" + (" (cached visual features)" if cache else ""))
    with vs.attached(model, method="visionselector", retention=config.retention, **options):
        history = train_selector(model, batches, steps=steps, config=training, output_dir=str(out),
                                 checkpoint_dir=str(out / "checkpoint"), save_every=config.save_every,
                                 resume=config.resume)
    seconds = time.time() - started
    (out / "training_log.json").write_text(json.dumps(
        {"config": asdict(config), "steps": steps, "seconds": round(seconds, 1), "history": history}, indent=1) + "\n")
    last = history[-10:]
    print_fn(f"selector saved to {out} after {seconds:.0f} s; mean loss of the last {len(last)} steps "
             f"{sum(h['loss'] for h in last) / max(1, len(last)):.4f}")
    return {"selector": out, "history": history, "seconds": seconds}
