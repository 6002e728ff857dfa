"""``visionselector train``: train a selector's scorer on a frozen model from conversation JSONL."""

from __future__ import annotations

import hashlib
import json
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

from ..checkpoint import CONFIG_NAME, WEIGHTS_NAME
from ..training import SelectorTrainingConfig
from ..training.distributed import join_launched_group, launched_world_size, local_device, shard_language_model
from .common import MODEL_HELP, check_file, check_output_folder, model_and_processor, parse_dtype, set_threads

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
    max_pixels: int | None = field(default=None, metadata={
        "help": "resize images to at most this many pixels before encoding (Qwen families; the paper trains at "
                "50176, 224 x 224); default: the checkpoint's processor settings"})
    out: str = field(default="selector", metadata={"help": "output directory of the selector"})
    model: str = field(default="reference", metadata={"help": MODEL_HELP})
    device: str = field(default="auto", metadata={
        "help": "cpu, cuda, cuda:N or auto (cuda when available); under torchrun / accelerate launch, auto and "
                "cuda mean each process's own GPU (LOCAL_RANK)"})
    dtype: str = field(default="auto", metadata={
        "help": "weights of the frozen model: auto (the checkpoint's on GPUs, float32 on CPUs), float32, bfloat16 "
                "or float16; the scorer always trains in float32"})
    epochs: float = field(default=1.0, metadata={"help": "passes over the data (ignored if --steps is set)"})
    steps: int | None = field(default=None, metadata={"help": "optimizer steps (default: from --epochs)"})
    batch_size: int = field(default=16, metadata={
        "help": "examples per optimizer step, over all processes together (a run's result does not depend on "
                "how many processes share it)"})
    micro_batch_size: int | None = field(default=None, metadata={
        "help": "examples per forward pass on each process; gradients of a step's micro-batches add up "
                "(default: each process's whole share of the step)"})
    shard_model: bool = field(default=False, metadata={
        "help": "split the frozen language model's weights over the processes (PyTorch FSDP2), for models too "
                "large for one device; needs torchrun / accelerate launch (the result does not change)"})
    deepspeed: str | None = field(default=None, metadata={
        "help": "a DeepSpeed config file (JSON): ZeRO-3 partitions the frozen model's weights over the processes "
                "(and can offload them); its bf16/fp16, micro-batch, batch and clipping settings must agree with "
                "these flags. Under accelerate launch, the DeepSpeed config file of its config is used"})
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
    training = SelectorTrainingConfig(**{f.name: getattr(config, f.name) for f in fields(SelectorTrainingConfig)})
    training.validate()
    method_options = _method_options(config)
    for name, least in (("batch_size", 1), ("save_every", 0)):
        if getattr(config, name) < least:
            raise ValueError(f"{name} must be at least {least}, got {getattr(config, name)}")
    shard_model = config.shard_model or _accelerate_asks_for_fsdp()
    if shard_model and launched_world_size() == 1:
        raise ValueError("--shard-model splits the model over several processes; start them with torchrun "
                         "--nproc_per_node N or accelerate launch")
    if config.micro_batch_size is not None and config.micro_batch_size < 1:
        raise ValueError(f"micro_batch_size must be at least 1 (or unset), got {config.micro_batch_size}")
    if config.steps is not None and config.steps < 1:
        raise ValueError(f"steps must be at least 1, got {config.steps}")
    if config.steps is None and not config.epochs > 0:
        raise ValueError(f"epochs must be positive, got {config.epochs}")
    if config.resume and config.overwrite:
        raise ValueError("--resume and --overwrite exclude each other: --resume continues the run in OUT, "
                         "--overwrite starts a new one in its place")
    set_threads(config.threads)
    plan = _deepspeed_plan(config)
    if shard_model and plan is not None and plan.partitions_model:
        raise ValueError("--shard-model and a ZeRO-3 DeepSpeed config both partition the model; choose one")
    dtype = parse_dtype(plan.dtype if plan is not None and plan.dtype and config.dtype == "auto" else config.dtype)
    device = local_device(config.device)
    group, joined = join_launched_group(device)
    try:
        return _run(config, training, method_options, model, processor, print_fn, device, dtype, group, plan,
                    shard_model)
    finally:
        if joined:
            import torch.distributed as dist

            dist.destroy_process_group()


def _deepspeed_plan(config: TrainConfig):
    """The DeepSpeed config of ``--deepspeed``, or of ``accelerate launch``'s config; ``None`` without one."""
    import os

    from ..training.deepspeed import DeepSpeedPlan

    path = config.deepspeed
    if path is None and os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() in ("1", "true"):
        path = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
        if not path:
            raise ValueError("accelerate launch asks for DeepSpeed but its config names no deepspeed_config_file; "
                             "name one there, or pass --deepspeed ds.json")
    if path is None:
        return None
    return DeepSpeedPlan.read(path, batch_size=config.batch_size, micro_batch_size=config.micro_batch_size,
                              dtype=config.dtype, max_grad_norm=config.max_grad_norm)


def _accelerate_asks_for_fsdp() -> bool:
    """Whether ``accelerate launch`` runs this with an FSDP config (it says so in the environment)."""
    import os

    return os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true")


def _run(config: TrainConfig, training: SelectorTrainingConfig, method_options: dict, model, processor, print_fn,
         device, dtype, group, plan, shard_model: bool) -> dict:
    import visionselector as vs

    from ..data.batches import ExampleBatches, FeatureCache, load_examples
    from ..training import train_selector
    from ..training.distributed import barrier, main_process_first

    data = check_file(config.data, "training data")
    out = check_output_folder(config.out)
    if config.cache_dir is not None:
        check_output_folder(config.cache_dir, "feature cache folder")
    checkpoint = out / "checkpoint"
    run_settings = _data_settings(config, data)
    with main_process_first(group):  # rank 0 may finish a save that was cut off
        _check_previous_run(out, checkpoint, config, training, run_settings)
    examples = load_examples(data, config.limit, image_folder=config.image_folder)
    say = print_fn if group.main else (lambda *_: None)
    if plan is not None:
        for note in plan.notes:
            say(f"DeepSpeed config {plan.path}: {note}")
        if model is not None and plan.partitions_model:
            raise ValueError("a ZeRO-3 DeepSpeed config partitions the model as it loads; give the checkpoint, "
                             "not a loaded model")
    with plan.loading() if plan is not None else nullcontext():
        model, processor = model_and_processor(config.model, model, processor, device=device, dtype=dtype)
    engine = plan.partition(model) if plan is not None else None  # ZeRO-3 lives as long as its engine
    run_settings.update(_dtype_setting(model))
    if config.max_pixels is not None:
        from ..models import cap_image_pixels

        cap_image_pixels(processor, config.max_pixels)
    if engine is not None:
        held, total = _partitioned_counts(model)
        say(f"DeepSpeed ZeRO-3 over {group.size} processes: this one holds {held:,} of the model's {total:,} "
            "weights")
    if shard_model:
        held, total = shard_language_model(model, group)
        say(f"language model sharded over {group.size} processes: this one holds {held:,} of its {total:,} "
            "sharded weights")
    started = time.time()
    cache = None
    if config.cache_features:
        cache = FeatureCache(model, processor, examples, directory=config.cache_dir or out / "cache",
                             progress=config.progress and group.main, group=group)
    batches = ExampleBatches(examples, processor, batch_size=config.batch_size, cache=cache, with_answers=True,
                             shuffle_seed=config.seed, group=group, micro_batch_size=config.micro_batch_size,
                             lockstep=shard_model or (plan is not None and plan.partitions_model))
    steps = config.steps or max(1, round(config.epochs * batches.batches_per_epoch()))
    options = {**({} if config.hidden_dim is None else {"hidden_dim": config.hidden_dim}), **method_options}
    if config.overwrite and group.main:
        _remove_previous_run(out, checkpoint)
    barrier(group)
    torch.manual_seed(config.seed)
    say(f"training a selector at retention {config.retention:g} on {len(examples)} examples of {data}: "
        f"{steps} steps of {config.batch_size}" + (" (cached visual features)" if cache else "")
        + (f" on {group.size} processes" if group.active else ""))
    with vs.attached(model, method=config.method, retention=config.retention, **options):
        history = train_selector(model, batches, steps=steps, config=training, output_dir=str(out),
                                 checkpoint_dir=str(checkpoint), save_every=config.save_every,
                                 resume=config.resume, run_settings=run_settings)
    seconds = time.time() - started
    if group.main:
        (out / "training_log.json").write_text(json.dumps(
            {"config": asdict(config), "steps": steps, "processes": group.size, "seconds": round(seconds, 1),
             "history": history}, indent=1) + "\n")
    last = history[-10:]
    say(f"selector saved to {out} after {seconds:.0f} s; mean loss of the last {len(last)} steps "
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


def _partitioned_counts(model) -> tuple[int, int]:
    """Weights this process holds of those ZeRO-3 partitioned, and their total."""
    parameters = [p for p in model.parameters() if hasattr(p, "ds_numel")]
    return sum(p.ds_tensor.numel() for p in parameters), sum(p.ds_numel for p in parameters)


def _dtype_setting(model) -> dict:
    """The dtype of the frozen model's weights, which a resumed run must share; float32 runs carry no
    entry, as before the dtype could be chosen, so that their checkpoints still resume."""
    dtype = model.get_input_embeddings().weight.dtype
    return {} if dtype == torch.float32 else {"dtype": str(dtype).removeprefix("torch.")}


def _data_settings(config: TrainConfig, data: Path) -> dict:
    """The command's settings a resumed run must share: the data (file and contents), its order and the
    model. The number of processes and the micro-batch size are not among them: they do not change
    what a step computes."""
    from ..models import REFERENCE_MODEL

    model = config.model
    if model != REFERENCE_MODEL and Path(model).is_dir():
        model = str(Path(model).resolve())
    image_folder = None if config.image_folder is None else str(Path(config.image_folder).resolve())
    return {"data": str(data.resolve()), "data_sha256": _file_sha256(data), "limit": config.limit,
            "image_folder": image_folder, "batch_size": config.batch_size, "seed": config.seed,
            "model": model, "cache_features": config.cache_features,
            # unset leaves no entry, as before images could be capped, so such checkpoints still resume
            **({} if config.max_pixels is None else {"max_pixels": config.max_pixels})}


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
