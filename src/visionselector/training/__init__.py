"""Training a selector on a frozen MLLM: soft selection with a curriculum-annealed loss.

The loss is ``cross_entropy + lambda(step) * BCE(soft_mask, hard_topk_mask)``, with
``lambda`` rising linearly from ``lambda_start`` to ``lambda_end`` over the run so the
soft mask the scorer trains with approaches the hard one it meets at inference.

Two ways to run it: :func:`train_selector`, a plain loop, or ``transformers``'
``Trainer`` with :class:`CurriculumCallback` (or :class:`SelectorTrainer`, which adds
the callback and saves only the selector), e.g. under ``torchrun``.
"""

from __future__ import annotations

import math
from pathlib import Path
from dataclasses import dataclass, field, fields
from typing import Iterable, Mapping

import torch

from ..api import attach, get_method, get_state, is_attached, save_selector, set_selection_loss_weight

__all__ = [
    "CurriculumSchedule",
    "SelectorTrainingConfig",
    "freeze_for_selector_training",
    "train_selector",
    "CurriculumCallback",
    "SelectorTrainer",
]


@dataclass(frozen=True)
class CurriculumSchedule:
    """Linear ramp of the selection-loss weight ``lambda`` over ``total_steps`` optimizer steps."""

    start: float = field(default=0.1, metadata={"help": "lambda at the first step"})
    end: float = field(default=2.0, metadata={"help": "lambda at the last step"})
    total_steps: int = field(default=1, metadata={"help": "number of optimizer steps of the run"})

    def __post_init__(self):
        if self.total_steps < 1:
            raise ValueError(f"total_steps must be at least 1, got {self.total_steps}")
        for name in ("start", "end"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"lambda {name} must be a finite non-negative number, got {value}")

    def weight(self, step: int) -> float:
        """``lambda`` at optimizer step ``step`` (0-based), clamped to the ramp's ends."""
        if self.total_steps == 1:
            return self.end
        progress = min(max(step / (self.total_steps - 1), 0.0), 1.0)
        return self.start + (self.end - self.start) * progress


@dataclass
class SelectorTrainingConfig:
    """Settings of :func:`train_selector`; the defaults are the paper's."""

    retention: float = field(default=0.2, metadata={"help": "retention the scorer trains at"})
    learning_rate: float = field(default=5e-5, metadata={"help": "peak learning rate of AdamW"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    warmup_ratio: float = field(default=0.03, metadata={"help": "fraction of steps of linear warm-up"})
    lambda_start: float = field(default=0.1, metadata={"help": "selection-loss weight at the start"})
    lambda_end: float = field(default=2.0, metadata={"help": "selection-loss weight at the end"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping norm (0 disables)"})
    hidden_dim: int | None = field(default=None, metadata={"help": "scorer width h; default: hidden size // 2"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar"})

    @classmethod
    def help(cls) -> dict[str, str]:
        return {f.name: f.metadata.get("help", "") for f in fields(cls)}


def freeze_for_selector_training(model) -> list[str]:
    """Freeze every parameter but the attached method's; return the trainable names.

    The MLLM goes to eval mode (no dropout) and the method to train mode, which makes
    ``mode="auto"`` use soft selection.
    """
    method = get_method(model)
    trainable = {id(p) for p in method.parameters()}
    names = []
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(id(parameter) in trainable)
        if id(parameter) in trainable:
            names.append(name)
    if not names:
        raise ValueError(f"method {get_state(model).method_name!r} has no trainable parameters")
    model.eval()
    method.train()
    return names


def cosine_with_warmup(optimizer, warmup_steps: int, total_steps: int):
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def train_selector(model, batches: Iterable[Mapping[str, torch.Tensor]], *, steps: int,
                   config: SelectorTrainingConfig | None = None, output_dir: str | None = None,
                   log_every: int = 0, checkpoint_dir: str | None = None, save_every: int = 0,
                   resume: bool = False) -> list[dict]:
    """Train a VisionSelector scorer on ``model`` (frozen) for ``steps`` optimizer steps.

    Args:
        model: a supported MLLM; a fresh ``visionselector`` method is attached unless one is.
        batches: an iterable of model inputs with ``labels`` (cycled if shorter than ``steps``).
        steps: number of optimizer steps.
        config: learning rate, curriculum ends and the rest (:class:`SelectorTrainingConfig`).
        output_dir: if given, the selector is saved there at the end.
        log_every: print a line every this many steps (0: never; the progress bar shows the loss).
        checkpoint_dir: where to keep a resumable checkpoint (the selector, optimizer,
            schedule and step), written every ``save_every`` steps and at the end.
        save_every: checkpoint interval in steps (0: only at the end).
        resume: continue from ``checkpoint_dir`` if it holds a checkpoint. The run then
            skips the batches already seen (``batches.skip(n)`` if the iterable has it,
            otherwise by drawing them) and ends exactly as an uninterrupted run would.

    Returns:
        One record per step: ``step``, ``loss``, ``language_loss``, ``selection_loss``,
        ``lambda``, ``lr``.
    """
    config = config or SelectorTrainingConfig()
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    if not is_attached(model):
        options = {} if config.hidden_dim is None else {"hidden_dim": config.hidden_dim}
        attach(model, method="visionselector", retention=config.retention, **options)
    state = get_state(model)
    if not state.method.trainable:
        raise ValueError(f"method {state.method_name!r} is training-free; attach 'visionselector' to train")
    state.retention = config.retention
    state.training_retention = config.retention
    freeze_for_selector_training(model)
    parameters = [p for p in state.method.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=config.learning_rate, weight_decay=config.weight_decay)
    scheduler = cosine_with_warmup(optimizer, int(round(config.warmup_ratio * steps)), steps)
    schedule = CurriculumSchedule(config.lambda_start, config.lambda_end, steps)
    device = model.get_input_embeddings().weight.device

    history, first_step = [], 0
    if resume and checkpoint_dir is not None and _checkpoint_file(checkpoint_dir).is_file():
        first_step, history = _load_checkpoint(checkpoint_dir, model, optimizer, scheduler, steps)
        if hasattr(batches, "skip"):
            batches.skip(first_step)
    progress = None
    if config.progress:
        from tqdm.auto import tqdm

        progress = tqdm(total=steps, initial=first_step, desc="training selector", unit="step")
    iterator = _cycle(batches)
    if first_step and not hasattr(batches, "skip"):
        for _ in range(first_step):
            next(iterator)
    try:
        for step in range(first_step, steps):
            batch = next(iterator)
            if "labels" not in batch:
                raise ValueError("training batches need 'labels' (the answer tokens; -100 elsewhere)")
            weight = schedule.weight(step)
            set_selection_loss_weight(model, weight)
            inputs = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}
            outputs = model(**inputs)
            optimizer.zero_grad(set_to_none=True)
            outputs.loss.backward()
            if config.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(parameters, config.max_grad_norm)
            optimizer.step()
            scheduler.step()
            losses = state.last_losses
            record = {
                "step": step + 1,
                "loss": float(outputs.loss.detach()),
                "language_loss": float(losses.get("language", float("nan"))),
                "selection_loss": float(losses.get("selection", float("nan"))),
                "lambda": weight,
                "lr": optimizer.param_groups[0]["lr"],
            }
            history.append(record)
            if progress is not None:
                progress.update(1)
                progress.set_postfix(loss=f"{record['loss']:.4f}", lam=f"{weight:.2f}")
            if log_every and (step + 1) % log_every == 0:
                print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()))
            if checkpoint_dir is not None and ((save_every and (step + 1) % save_every == 0) or step + 1 == steps):
                _save_checkpoint(checkpoint_dir, model, optimizer, scheduler, step + 1, steps, history)
    finally:
        if progress is not None:
            progress.close()
        state.method.eval()
    if output_dir is not None:
        save_selector(model, output_dir)
    return history


def _checkpoint_file(directory) -> Path:
    return Path(directory) / "trainer_state.pt"


def _save_checkpoint(directory, model, optimizer, scheduler, step: int, steps: int, history: list) -> None:
    directory = Path(directory)
    save_selector(model, directory)
    temporary = directory / "trainer_state.tmp"
    torch.save({"step": step, "steps": steps, "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "history": history}, temporary)
    temporary.replace(_checkpoint_file(directory))  # atomic: an interrupted save leaves the last good one


def _load_checkpoint(directory, model, optimizer, scheduler, steps: int) -> tuple[int, list]:
    from ..checkpoint import read_selector

    try:
        saved = torch.load(_checkpoint_file(directory), weights_only=True)
        step, saved_steps = int(saved["step"]), int(saved["steps"])
    except Exception as error:
        raise ValueError(f"cannot resume from {directory}: unreadable trainer state ({error})") from None
    if saved_steps != steps:
        raise ValueError(f"cannot resume from {directory}: it was a run of {saved_steps} steps, this one has {steps} "
                         "(the schedule depends on the length); start a fresh run or use the same length")
    _, state_dict = read_selector(directory)
    get_method(model).load_state_dict(state_dict, strict=True)
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    return step, list(saved["history"])


def _cycle(batches):
    """Yield batches forever: re-iterate a reusable iterable, replay a one-shot iterator."""
    reusable = iter(batches) is not batches
    cached = []
    while True:
        produced = False
        for batch in batches if (reusable or not cached) else cached:
            produced = True
            if not reusable:
                cached.append(batch)
            yield batch
        if not produced and not cached:
            raise ValueError("no training batches were given")
        if not reusable:
            batches = cached


def __getattr__(name: str):
    # The Trainer integration imports transformers' Trainer (and accelerate) on first use only.
    if name in ("CurriculumCallback", "SelectorTrainer"):
        from . import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
