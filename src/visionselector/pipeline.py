"""The selector pipeline behind the command line: train a scorer, evaluate every method, show selections.

Each step reads a LLaVA / Cambrian conversation JSONL file and a model directory. The
model is the shipped reference model (``reference``) or a directory written by
``train_reference``: a Qwen2.5-VL checkpoint with the word-level ``vocab.json`` its
processor needs.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

__all__ = ["TrainConfig", "EvalConfig", "ShowConfig", "load_model", "run_train", "run_eval", "run_show"]

ALL_METHODS = "all"


def load_model(name: str):
    """``(model, processor)`` for ``reference`` (the shipped model) or a reference model directory."""
    from .data.reference_model import load_reference_model

    return load_reference_model(None if name == "reference" else name)


@dataclass
class TrainConfig:
    """Settings of ``visionselector train``."""

    data: str = field(default="", metadata={"help": "training conversations (LLaVA / Cambrian JSONL)"})
    out: str = field(default="selector", metadata={"help": "output directory of the selector"})
    model: str = field(default="reference", metadata={"help": "'reference' or a reference model directory"})
    retention: float = field(default=0.2, metadata={"help": "retention the scorer trains at"})
    epochs: float = field(default=1.0, metadata={"help": "passes over the data (ignored if --steps is set)"})
    steps: int | None = field(default=None, metadata={"help": "optimizer steps (default: from --epochs)"})
    batch_size: int = field(default=16, metadata={"help": "examples per step"})
    learning_rate: float = field(default=1e-3, metadata={"help": "peak AdamW learning rate of the scorer"})
    warmup_ratio: float = field(default=0.03, metadata={"help": "fraction of steps of linear warm-up"})
    lambda_start: float = field(default=0.1, metadata={"help": "selection-loss weight at the first step"})
    lambda_end: float = field(default=2.0, metadata={"help": "selection-loss weight at the last step"})
    hidden_dim: int | None = field(default=None, metadata={"help": "scorer width h (default: hidden size // 2)"})
    cache_features: bool = field(default=True, metadata={"help": "encode each image once and train on the cached features"})
    cache_dir: str | None = field(default=None, metadata={"help": "keep cached features here (default: OUT/cache)"})
    save_every: int = field(default=50, metadata={"help": "checkpoint every this many steps"})
    resume: bool = field(default=False, metadata={"help": "continue from the checkpoint in OUT/checkpoint"})
    limit: int | None = field(default=None, metadata={"help": "use only the first N examples"})
    seed: int = field(default=0, metadata={"help": "seed of the scorer's weights and the data order"})
    threads: int | None = field(default=None, metadata={"help": "torch CPU threads (default: torch's choice)"})
    progress: bool = field(default=True, metadata={"help": "show progress bars"})


def _check_file(path: str, what: str) -> Path:
    if not path:
        raise ValueError(f"{what}: give a conversation JSONL file")
    if not Path(path).is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    return Path(path)


def run_train(config: TrainConfig, *, model=None, processor=None, print_fn=print) -> dict:
    """Train a VisionSelector scorer on the frozen model; returns where it went and the loss history."""
    import visionselector as vs

    from .data.vqa import ExampleBatches, FeatureCache, load_examples
    from .ops.topk import validate_retention
    from .training import SelectorTrainingConfig, train_selector

    validate_retention(config.retention)
    for name in ("batch_size", "save_every"):
        if getattr(config, name) < (1 if name == "batch_size" else 0):
            raise ValueError(f"{name} must be {'at least 1' if name == 'batch_size' else 'non-negative'}, "
                             f"got {getattr(config, name)}")
    if config.steps is None and not config.epochs > 0:
        raise ValueError(f"epochs must be positive, got {config.epochs}")
    if config.threads:
        torch.set_num_threads(config.threads)
    data = _check_file(config.data, "training data")
    if model is None:
        model, processor = load_model(config.model)
    examples = load_examples(data, config.limit)
    out = Path(config.out)
    started = time.time()
    cache = None
    if config.cache_features:
        cache = FeatureCache(model, processor, examples, directory=config.cache_dir or out / "cache",
                             progress=config.progress)
    batches = ExampleBatches(examples, processor, batch_size=config.batch_size, cache=cache, with_answers=True,
                             shuffle_seed=config.seed)
    steps = config.steps or max(1, round(config.epochs * batches.batches_per_epoch()))
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    options = {} if config.hidden_dim is None else {"hidden_dim": config.hidden_dim}
    torch.manual_seed(config.seed)
    vs.attach(model, method="visionselector", retention=config.retention, **options)
    training = SelectorTrainingConfig(retention=config.retention, learning_rate=config.learning_rate,
                                      warmup_ratio=config.warmup_ratio, lambda_start=config.lambda_start,
                                      lambda_end=config.lambda_end, hidden_dim=config.hidden_dim,
                                      progress=config.progress)
    print_fn(f"training a selector at retention {config.retention:g} on {len(examples)} examples of {data}: "
             f"{steps} steps of {config.batch_size}" + (" (cached visual features)" if cache else ""))
    try:
        history = train_selector(model, batches, steps=steps, config=training, output_dir=str(out),
                                 checkpoint_dir=str(out / "checkpoint"), save_every=config.save_every,
                                 resume=config.resume)
    finally:
        vs.detach(model)
    seconds = time.time() - started
    (out / "training_log.json").write_text(json.dumps(
        {"config": asdict(config), "steps": steps, "seconds": round(seconds, 1), "history": history}, indent=1) + "\n")
    last = history[-10:]
    print_fn(f"selector saved to {out} after {seconds:.0f} s; mean loss of the last {len(last)} steps "
             f"{sum(h['loss'] for h in last) / max(1, len(last)):.4f}")
    return {"selector": out, "history": history, "seconds": seconds}


@dataclass
class EvalConfig:
    """Settings of ``visionselector eval``."""

    data: str = field(default="", metadata={"help": "evaluation conversations (LLaVA / Cambrian JSONL)"})
    out: str = field(default="results", metadata={"help": "output directory: results.json, results.md, accuracy.png"})
    model: str = field(default="reference", metadata={"help": "'reference' or a reference model directory"})
    selector: str | None = field(default=None, metadata={"help": "trained selector directory (for visionselector)"})
    methods: tuple[str, ...] = field(default=(ALL_METHODS,), metadata={"help": "methods to compare, or 'all'"})
    retentions: tuple[float, ...] = field(default=(0.05, 0.1, 0.2, 0.3, 0.5, 1.0), metadata={"help": "retentions"})
    method_options: tuple[str, ...] = field(default=(), metadata={
        "help": "options of the evaluated methods as METHOD.OPTION=VALUE, e.g. dart.layer=0 fastv.layer=0 "
                "(the decoder layer they prune after); 'visionselector methods' lists each method's options"})
    batch_size: int = field(default=32, metadata={"help": "examples per generate call"})
    limit: int | None = field(default=None, metadata={"help": "use only the first N examples"})
    cache_features: bool = field(default=True, metadata={"help": "encode each image once for all methods"})
    threads: int | None = field(default=None, metadata={"help": "torch CPU threads (default: torch's choice)"})
    progress: bool = field(default=True, metadata={"help": "show progress bars"})


def _method_list(methods, selector) -> list[str]:
    from .methods import list_methods

    names = list(methods)
    if ALL_METHODS in names:
        names = [m for m in list_methods() if m != "visionselector" or selector is not None]
        if selector is not None:
            names = ["visionselector"] + [m for m in names if m != "visionselector"]
    return names


def run_eval(config: EvalConfig, *, model=None, processor=None, print_fn=print) -> dict:
    """Evaluate methods x retentions; writes and returns the results."""
    from .data.vqa import FeatureCache, load_examples
    from .eval.quality import evaluate_methods, format_table, parse_method_options, write_results

    if config.batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {config.batch_size}")
    if config.threads:
        torch.set_num_threads(config.threads)
    data = _check_file(config.data, "evaluation data")
    methods = _method_list(config.methods, config.selector)
    method_options = parse_method_options(config.method_options, methods)
    if model is None:
        model, processor = load_model(config.model)
    examples = load_examples(data, config.limit)
    started = time.time()
    cache = FeatureCache(model, processor, examples, progress=config.progress) if config.cache_features else None
    encode_seconds = time.time() - started
    print_fn(f"evaluating {', '.join(methods)} at retentions {', '.join(f'{r:g}' for r in config.retentions)} "
             f"on {len(examples)} examples of {data}")
    records = evaluate_methods(model, processor, examples, methods=methods, retentions=config.retentions,
                               selector=config.selector, cache=cache, batch_size=config.batch_size,
                               progress=config.progress, print_fn=print_fn if not config.progress else None,
                               method_options=method_options)
    meta = {"data": str(data), "examples": len(examples), "model": config.model, "selector": config.selector,
            "method_options": method_options,
            "threads": torch.get_num_threads(), "encoder_ms_per_image": round(1000 * encode_seconds / len(examples), 2)
            if cache is not None else None, "seconds": round(time.time() - started, 1)}
    paths = write_results(records, config.out, meta=meta)
    print_fn("")
    print_fn("accuracy (%), by method and retention:")
    print_fn(format_table(records))
    print_fn("")
    print_fn("visual tokens kept per sample:")
    print_fn(format_table(records, "tokens_kept"))
    print_fn("")
    print_fn("prefill ms per sample (selection + language model; the vision encoder, "
             f"{meta['encoder_ms_per_image']} ms per image, is the same for every method):")
    print_fn(format_table(records, "prefill_ms"))
    print_fn("")
    print_fn(f"wrote {paths['json']}, {paths['table']} and {paths['plot']}")
    return {"records": records, "paths": paths, "meta": meta}


@dataclass
class ShowConfig:
    """Settings of ``visionselector show``."""

    out: str = field(default="kept_tokens.png", metadata={"help": "output PNG"})
    model: str = field(default="reference", metadata={"help": "'reference' or a reference model directory"})
    method: str = field(default="visionselector", metadata={"help": "selection method"})
    retention: float = field(default=0.1, metadata={"help": "fraction of visual tokens kept"})
    selector: str | None = field(default=None, metadata={"help": "trained selector directory (for visionselector)"})
    data: str | None = field(default=None, metadata={"help": "conversation JSONL to take the image and question from"})
    index: int = field(default=0, metadata={"help": "example of --data to show"})
    image: str | None = field(default=None, metadata={"help": "an image file (instead of --data)"})
    question: str | None = field(default=None, metadata={"help": "the question about --image"})


def run_show(config: ShowConfig, *, model=None, processor=None, print_fn=print) -> Path:
    """Write a PNG of the tokens ``method`` keeps at ``retention`` for one image and question."""
    from .data.vqa import VQAExample, load_examples
    from .ops.topk import validate_retention
    from .viz.show import show_selection

    validate_retention(config.retention)
    if config.method == "visionselector" and config.selector is None:
        raise ValueError("method 'visionselector' needs --selector (a directory written by 'visionselector train')")
    if (config.data is None) == (config.image is None):
        raise ValueError("give either --data (and --index) or --image and --question")
    if config.image is not None:
        if not config.question:
            raise ValueError("--image needs --question")
        if not Path(config.image).is_file():
            raise FileNotFoundError(f"image not found: {config.image}")
        example = VQAExample("image", Path(config.image), config.question, "", None)
    else:
        examples = load_examples(_check_file(config.data, "data"))
        if not 0 <= config.index < len(examples):
            raise ValueError(f"--index must be in [0, {len(examples)}), got {config.index}")
        example = examples[config.index]
    if model is None:
        model, processor = load_model(config.model)
    picture = show_selection(model, processor, example.load_image(), example.question, method=config.method,
                             retention=config.retention, selector=config.selector, answer=example.answer or None)
    out = Path(config.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    picture.save(out)
    print_fn(f"wrote {out}")
    return out
