"""``visionselector train``: train a selector's scorer on a frozen model from conversation JSONL."""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

from ..checkpoint import CONFIG_NAME, WEIGHTS_NAME
from ..training import SelectorTrainingConfig
from .common import MODEL_HELP, check_file, check_output_folder, model_and_processor, set_threads

__all__ = ["TrainConfig", "run_train"]


@dataclass
class TrainConfig(SelectorTrainingConfig):
    """Settings of ``visionselector train``: the training run's (inherited) and the data's."""

    method_options: tuple[str, ...] = field(default=(), metadata={
        "help": "options of the trained method as OPTION=VALUE, e.g. image_score=false for visionselector_q "
                "('visionselector methods' lists them)"})
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
    resume: bool = field(default=False, metadata={
        "help": "continue from the checkpoint in OUT/checkpoint (with the same settings)"})
    overwrite: bool = field(default=False, metadata={
        "help": "replace the selector and checkpoint OUT already holds (without it, such an OUT is refused)"})
    limit: int | None = field(default=None, metadata={"help": "use only the first N examples"})
    seed: int = field(default=0, metadata={"help": "seed of the scorer's weights and the data order"})
    threads: int | None = field(default=None, metadata={"help": "torch CPU threads (default: torch's choice)"})


def run_train(config: TrainConfig, *, model=None, processor=None, print_fn=print) -> dict:
    """Train a VisionSelector scorer on the frozen model; returns where it went and the loss history.

    ``OUT/checkpoint`` keeps a resumable checkpoint. Without ``resume``, an OUT that already
    holds a checkpoint or a selector is refused unless ``overwrite`` (which deletes them
    first); ``resume`` needs a checkpoint there, made with the same settings.
    """
    import visionselector as vs

    from ..data.batches import ExampleBatches, FeatureCache, load_examples
    from ..training import train_selector

    training = SelectorTrainingConfig(**{f.name: getattr(config, f.name) for f in fields(SelectorTrainingConfig)})
    training.validate()
    method_options = _method_options(config)
    for name, least in (("batch_size", 1), ("save_every", 0)):
        if getattr(config, name) < least:
            raise ValueError(f"{name} must be at least {least}, got {getattr(config, name)}")
    if config.steps is not None and config.steps < 1:
        raise ValueError(f"steps must be at least 1, got {config.steps}")
    if config.steps is None and not config.epochs > 0:
        raise ValueError(f"epochs must be positive, got {config.epochs}")
    if config.resume and config.overwrite:
        raise ValueError("--resume and --overwrite exclude each other: --resume continues the run in OUT, "
                         "--overwrite starts a new one in its place")
    set_threads(config.threads)
    data = check_file(config.data, "training data")
    out = check_output_folder(config.out)
    if config.cache_dir is not None:
        check_output_folder(config.cache_dir, "feature cache folder")
    checkpoint = out / "checkpoint"
    run_settings = _data_settings(config, data)
    _check_previous_run(out, checkpoint, config, training, run_settings)
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
    options = {**({} if config.hidden_dim is None else {"hidden_dim": config.hidden_dim}), **method_options}
    if config.overwrite:
        _remove_previous_run(out, checkpoint)
    torch.manual_seed(config.seed)
    print_fn(f"training a selector at retention {config.retention:g} on {len(examples)} examples of {data}: "
             f"{steps} steps of {config.batch_size}" + (" (cached visual features)" if cache else ""))
    with vs.attached(model, method=config.method, retention=config.retention, **options):
        history = train_selector(model, batches, steps=steps, config=training, output_dir=str(out),
                                 checkpoint_dir=str(checkpoint), save_every=config.save_every,
                                 resume=config.resume, run_settings=run_settings)
    seconds = time.time() - started
    (out / "training_log.json").write_text(json.dumps(
        {"config": asdict(config), "steps": steps, "seconds": round(seconds, 1), "history": history}, indent=1) + "\n")
    last = history[-10:]
    print_fn(f"selector saved to {out} after {seconds:.0f} s; mean loss of the last {len(last)} steps "
             f"{sum(h['loss'] for h in last) / max(1, len(last)):.4f}")
    return {"selector": out, "history": history, "seconds": seconds}


# What OUT holds after a run, besides the checkpoint: --overwrite deletes these (never the feature cache).
_RUN_FILES = (CONFIG_NAME, WEIGHTS_NAME, "training_log.json")


def _method_options(config: TrainConfig) -> dict:
    """``--method-options`` as checked values; ``hidden_dim`` has its own flag."""
    from ..eval.quality import parse_method_options

    items = [f"{config.method}.{item}" for item in config.method_options]
    options = parse_method_options(items, [config.method]).get(config.method, {})
    if "hidden_dim" in options:
        raise ValueError("give the scorer's width with --hidden-dim, not --method-options hidden_dim=...")
    return options


def _check_previous_run(out: Path, checkpoint: Path, config: TrainConfig, training: SelectorTrainingConfig,
                        run_settings: dict) -> None:
    """Before the model loads: refuse to resume without a checkpoint or with other settings, and to
    start over what OUT holds without --overwrite."""
    from ..training import check_resume, recover_checkpoint

    found = recover_checkpoint(checkpoint)
    if config.resume:
        if found is None:
            raise ValueError(f"--resume given but {checkpoint} holds no checkpoint; leave out --resume to start a run")
        check_resume(checkpoint, training, steps=config.steps, run_settings=run_settings)
        return
    held = (["a checkpoint (" + str(checkpoint) + ")"] if found is not None else []) + (
        ["a selector"] if any((out / name).exists() for name in (CONFIG_NAME, WEIGHTS_NAME)) else [])
    if held and not config.overwrite:
        raise ValueError(f"{out} already holds {' and '.join(held)} from an earlier run; --resume continues it, "
                         "--overwrite replaces it, or choose another --out")


def _remove_previous_run(out: Path, checkpoint: Path) -> None:
    from ..training import remove_checkpoint

    remove_checkpoint(checkpoint)
    for name in _RUN_FILES:
        (out / name).unlink(missing_ok=True)


def _data_settings(config: TrainConfig, data: Path) -> dict:
    """The command's settings a resumed run must share: the data (file and contents), its order and the model."""
    from ..models import REFERENCE_MODEL

    model = config.model
    if model != REFERENCE_MODEL and Path(model).is_dir():
        model = str(Path(model).resolve())
    image_folder = None if config.image_folder is None else str(Path(config.image_folder).resolve())
    return {"data": str(data.resolve()), "data_sha256": _file_sha256(data), "limit": config.limit,
            "image_folder": image_folder, "batch_size": config.batch_size, "seed": config.seed,
            "model": model, "cache_features": config.cache_features}


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
