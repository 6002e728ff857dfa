"""Training a selector on a frozen MLLM: soft selection with a curriculum-annealed loss.

The loss is ``cross_entropy + lambda(step) * BCE(soft_mask, hard_topk_mask)``, with
``lambda`` rising linearly from ``lambda_start`` to ``lambda_end`` over the run so the
soft mask the scorer trains with approaches the hard one it meets at inference.

Two ways to run it: :func:`train_selector`, a plain loop, or ``transformers``'
``Trainer`` with :class:`CurriculumCallback` (or :class:`SelectorTrainer`, which adds
the callback and saves only the selector), e.g. under ``torchrun``.
"""

from __future__ import annotations

import hashlib
import json
import math
import numbers
import os
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Iterable, Mapping

import torch

from ..api import attach, detach, get_method, get_state, is_attached, save_selector, set_selection_loss_weight
from ..checkpoint import CONFIG_NAME, WEIGHTS_NAME, read_selector, sync_path, temporary_name
from ..ops.topk import validate_retention
from .distributed import (barrier, broadcast_parameters, check_same_weights, current_group, main_process_first,
                          sum_across, sum_gradients)

__all__ = [
    "CurriculumSchedule",
    "SelectorTrainingConfig",
    "freeze_for_selector_training",
    "train_selector",
    "check_resume",
    "recover_checkpoint",
    "remove_checkpoint",
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

    method: str = field(default="visionselector", metadata={
        "help": "trainable method to train (visionselector, or the question-aware visionselector_q)"})
    retention: float = field(default=0.2, metadata={"help": "retention the scorer trains at"})
    learning_rate: float = field(default=5e-5, metadata={"help": "peak learning rate of AdamW"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    warmup_ratio: float = field(default=0.03, metadata={"help": "fraction of steps of linear warm-up"})
    lambda_start: float = field(default=0.1, metadata={"help": "selection-loss weight at the start"})
    lambda_end: float = field(default=2.0, metadata={"help": "selection-loss weight at the end"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping norm (0 disables)"})
    hidden_dim: int | None = field(default=None, metadata={"help": "scorer width h; default: hidden size // 2"})
    training_forward: str = field(default="soft", metadata={
        "help": "soft: every visual token reaches the frozen model scaled by its soft mask (the paper's); hard: only "
                "the top-k tokens do, as at inference, and the gradient reaches the scores through the soft mask "
                "(straight-through)"})
    gradient_checkpointing: bool = field(default=False, metadata={
        "help": "recompute the frozen language model's layers in the backward pass instead of keeping their "
                "activations (less memory, about a third more time; the same result)"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar"})

    @classmethod
    def help(cls) -> dict[str, str]:
        return {f.name: f.metadata.get("help", "") for f in fields(cls)}

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first setting out of its range (and the range)."""
        from ..methods import get_method_class, list_methods

        trainable = [name for name in list_methods() if get_method_class(name).trainable]
        if not isinstance(self.method, str) or self.method not in trainable:
            raise ValueError(f"method must be a trainable method ({', '.join(trainable)}), got {self.method!r}")
        validate_retention(self.retention)
        for name, least, strict in (("learning_rate", 0.0, True), ("weight_decay", 0.0, False),
                                    ("lambda_start", 0.0, False), ("lambda_end", 0.0, False),
                                    ("max_grad_norm", 0.0, False)):
            value = getattr(self, name)
            if not _is_number(value) or not math.isfinite(value) or value < least or (strict and value == least):
                raise ValueError(f"{name} must be a finite number {'>' if strict else '>='} {least:g}, got {value!r}")
        if not _is_number(self.warmup_ratio) or not 0.0 <= self.warmup_ratio <= 1.0:
            raise ValueError(f"warmup_ratio must be a number in [0, 1] (the fraction of steps that warm up), "
                             f"got {self.warmup_ratio!r}")
        if self.training_forward not in ("soft", "hard"):
            raise ValueError(f"training_forward must be 'soft' (the paper's) or 'hard' (straight-through), "
                             f"got {self.training_forward!r}")
        if self.hidden_dim is not None and (not isinstance(self.hidden_dim, int) or isinstance(self.hidden_dim, bool)
                                            or self.hidden_dim < 1):
            raise ValueError(f"hidden_dim must be None (hidden size // 2) or an integer of at least 1, "
                             f"got {self.hidden_dim!r}")


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


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
                   resume: bool = False, run_settings: Mapping | None = None,
                   method_options: Mapping | None = None) -> list[dict]:
    """Train a selector's scorer on ``model`` (frozen) for ``steps`` optimizer steps.

    Args:
        model: a supported MLLM; a fresh method ``config.method`` is attached unless one is.
        batches: an iterable of model inputs with ``labels`` (cycled if shorter than ``steps``). An
            item may also be a list of such inputs: micro-batches whose gradients add up to one
            optimizer step (an empty list contributes nothing). Under ``torch.distributed`` each
            process gives its own share of every step; losses are normalised by the whole
            step's counts, so the run equals one process training on the whole batches.
        steps: number of optimizer steps.
        config: learning rate, curriculum ends and the rest (:class:`SelectorTrainingConfig`).
        output_dir: if given, the selector is saved there at the end.
        log_every: print a line every this many steps (0: never; the progress bar shows the loss).
        checkpoint_dir: a folder of its own for a resumable checkpoint (the selector,
            optimizer, schedule, step and the run's settings), written every ``save_every``
            steps and at the end. Each save writes a complete new folder beside it and swaps
            it in, so a run killed at any moment leaves the previous checkpoint or the new
            one, whole.
        save_every: checkpoint interval in steps (0: only at the end).
        resume: continue from the checkpoint in ``checkpoint_dir`` (an error if there is
            none). The run then skips the batches already seen (``batches.skip(n)`` if the
            iterable has it, otherwise by drawing them) and ends exactly as an
            uninterrupted run would. Settings that change the result (``config`` but
            ``progress``, ``steps``, the method's options, the model's hidden size and
            ``run_settings``) must be the checkpoint's; an error lists those that differ.
        run_settings: more settings of the run that a resumed run must share (the data,
            the batch size, a seed, ...); JSON values.
        method_options: options of the method this function attaches (beyond
            ``config.hidden_dim``), e.g. ``{"image_score": False}`` for ``visionselector_q``.

    The model is left as it was found: every parameter's ``requires_grad``, every module's
    train/eval mode and, if a method was attached, its retention, training retention and
    selection-loss weight are restored, also when training fails. Only the trained weights
    stay. A method this function attached itself stays attached in eval mode (hard
    selection) once training has begun, so an interrupted run keeps what it learned; an
    error before that detaches it again.

    Returns:
        One record per step: ``step``, ``loss``, ``language_loss``, ``selection_loss``,
        ``lambda``, ``lr``.
    """
    config = config or SelectorTrainingConfig()
    config.validate()
    _check_run_arguments(steps, log_every, save_every, checkpoint_dir, resume)
    if checkpoint_dir is not None:
        _check_checkpoint_folder(checkpoint_dir)
    if is_attached(model):
        _check_attached_method(model, config)
        if method_options:
            raise ValueError("method_options are for the method train_selector attaches; this model already has "
                             f"{get_state(model).method_name!r} attached with its own options")
    restore = _remember_user_state(model)
    attached_here = not is_attached(model)
    if attached_here:
        options = {**({} if config.hidden_dim is None else {"hidden_dim": config.hidden_dim}), **(method_options or {})}
        attach(model, method=config.method, retention=config.retention, **options)
    started = False
    try:
        state = get_state(model)
        settings = _run_settings(model, config, steps, run_settings)
        saved = None
        if resume:
            with main_process_first(current_group()):  # rank 0 finishes a cut-off save before the others read
                saved = _read_checkpoint(checkpoint_dir, settings)
        state.retention = config.retention
        state.training_retention = config.retention
        state.training_forward = config.training_forward
        freeze_for_selector_training(model)
        started = True
        with _checkpointed_layers(model, config.gradient_checkpointing):
            history = _train(model, batches, steps, config, log_every, checkpoint_dir, save_every, settings, saved)
        group = current_group()
        if output_dir is not None and group.main:
            save_selector(model, output_dir)
        barrier(group)
        return history
    finally:
        get_method(model).eval()
        restore()
        if attached_here and not started:
            detach(model)


def _check_run_arguments(steps, log_every, save_every, checkpoint_dir, resume) -> None:
    for name, value, least in (("steps", steps, 1), ("log_every", log_every, 0), ("save_every", save_every, 0)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < least:
            raise ValueError(f"{name} must be an integer of at least {least}, got {value!r}")
    if resume and checkpoint_dir is None:
        raise ValueError("resume=True needs checkpoint_dir, the folder that holds the checkpoint to continue")


def _check_attached_method(model, config: SelectorTrainingConfig) -> None:
    state = get_state(model)
    if not state.method.trainable:
        raise ValueError(f"method {state.method_name!r} is training-free; attach a trainable method "
                         f"({config.method!r}, say) to train")
    if state.method_name != config.method:
        raise ValueError(f"the attached method is {state.method_name!r} but config.method is {config.method!r}; "
                         "set config.method to the attached method, or detach it")
    width = state.method.config_dict().get("hidden_dim")
    if config.hidden_dim is not None and width != config.hidden_dim:
        raise ValueError(f"config.hidden_dim is {config.hidden_dim}, but the attached scorer has hidden_dim {width}; "
                         "leave hidden_dim unset to train the attached scorer, or attach one of that width")


def _remember_user_state(model):
    """What training changes on ``model``, and a function that puts it back.

    Each parameter's ``requires_grad`` and each module's own training flag (set one by
    one: ``Module.train`` would spread one flag over all submodules), and the attached
    method's retention and loss weight, which the run sets to its own.
    """
    gradients = [(parameter, parameter.requires_grad) for parameter in model.parameters()]
    modes = [(module, module.training) for module in model.modules()]
    state = get_state(model) if is_attached(model) else None
    values = None if state is None else (state.retention, state.training_retention, state.selection_loss_weight,
                                         state.training_forward)

    def restore() -> None:
        for parameter, requires_grad in gradients:
            parameter.requires_grad_(requires_grad)
        for module, training in modes:
            module.training = training
        if state is not None:
            state.retention, state.training_retention, state.selection_loss_weight, state.training_forward = values

    return restore


def _train(model, batches, steps: int, config: SelectorTrainingConfig, log_every: int, checkpoint_dir,
           save_every: int, settings: dict, saved: dict | None) -> list[dict]:
    """The training loop, from the start or from the checkpoint ``saved``."""
    state = get_state(model)
    group = current_group()
    parameters = [p for p in state.method.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=config.learning_rate, weight_decay=config.weight_decay)
    scheduler = cosine_with_warmup(optimizer, int(round(config.warmup_ratio * steps)), steps)
    schedule = CurriculumSchedule(config.lambda_start, config.lambda_end, steps)
    device = model.get_input_embeddings().weight.device

    history, first_step = [], 0
    if saved is not None:
        state.method.load_state_dict(saved["selector"], strict=True)
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        first_step, history = int(saved["step"]), list(saved["history"])
        if hasattr(batches, "skip"):
            batches.skip(first_step)
    broadcast_parameters(parameters, group)
    progress = None
    if config.progress and group.main:
        from tqdm.auto import tqdm

        progress = tqdm(total=steps, initial=first_step, desc="training selector", unit="step")
    iterator = _cycle(batches)
    if first_step and not hasattr(batches, "skip"):
        for _ in range(first_step):
            next(iterator)
    try:
        for step in range(first_step, steps):
            batch = next(iterator)
            weight = schedule.weight(step)
            optimizer.zero_grad(set_to_none=True)
            if isinstance(batch, (list, tuple)) or group.active:
                parts = list(batch) if isinstance(batch, (list, tuple)) else [batch]
                loss, language, selection = _shared_step(model, state, parts, weight, group, device, parameters)
            else:
                _check_labels(batch)
                set_selection_loss_weight(model, weight)
                inputs = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}
                outputs = model(**inputs)
                outputs.loss.backward()
                losses = state.last_losses
                loss = float(outputs.loss.detach())
                language = float(losses.get("language", float("nan")))
                selection = float(losses.get("selection", float("nan")))
            if config.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(parameters, config.max_grad_norm)
            optimizer.step()
            scheduler.step()
            record = {"step": step + 1, "loss": loss, "language_loss": language, "selection_loss": selection,
                      "lambda": weight, "lr": optimizer.param_groups[0]["lr"]}
            history.append(record)
            if progress is not None:
                progress.update(1)
                progress.set_postfix(loss=f"{record['loss']:.4f}", lam=f"{weight:.2f}")
            if log_every and (step + 1) % log_every == 0 and group.main:
                print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()))
            if checkpoint_dir is not None and ((save_every and (step + 1) % save_every == 0) or step + 1 == steps):
                if group.main:
                    _save_checkpoint(checkpoint_dir, model, optimizer, scheduler, step + 1, history, settings)
                barrier(group)
    finally:
        if progress is not None:
            progress.close()
    check_same_weights(parameters, group)
    return history


def _is_filler(batch) -> bool:
    from ..data.batches import FillerBatch

    return isinstance(batch, FillerBatch)


def _check_labels(batch) -> None:
    if "labels" not in batch:
        raise ValueError("training batches need 'labels' (the answer tokens; -100 elsewhere)")


def _shared_step(model, state, parts: list, weight: float, group, device, parameters) -> tuple[float, float, float]:
    """Forward and backward of this process's micro-batches of one step, and the step's gradient
    summed over the processes.

    Each part's losses are normalised by the whole step's counts: the language loss is its sum
    over answer tokens divided by all the step's answer tokens (``num_items_in_batch``), the
    selection loss its mean over its visual tokens weighted by their share of all the step's
    visual tokens. The sum over parts and processes is the loss of the whole batch in one
    forward, so are its gradients. Returns the step's loss, language loss and selection loss.
    """
    for part in parts:
        _check_labels(part)
    # A filler part (a process keeping step with the others) counts for nothing.
    real = [not _is_filler(part) for part in parts]
    # Labels are shifted inside the loss: the first position of a row never counts.
    answers = [int((part["labels"][:, 1:] != -100).sum()) * keep for part, keep in zip(parts, real)]
    visuals = [int(state.adapter.visual_mask(model, part["input_ids"]).sum()) * keep
               for part, keep in zip(parts, real)]
    totals = sum_across(torch.tensor([sum(answers), sum(visuals)], dtype=torch.float64, device=device), group)
    all_answers, all_visual = int(totals[0]), int(totals[1])
    sums = torch.zeros(3, dtype=torch.float64)
    for part, visual, keep in zip(parts, visuals, real):
        share = visual / all_visual if all_visual else 0.0
        set_selection_loss_weight(model, weight * share)
        inputs = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in part.items()}
        outputs = model(**inputs, num_items_in_batch=max(1, all_answers))
        if not keep:
            # The pass still runs backward (a sharded model gathers weights in it), with no effect.
            (outputs.loss * 0.0).backward()
            continue
        outputs.loss.backward()
        losses = state.last_losses
        sums += torch.tensor([float(outputs.loss.detach()), float(losses.get("language", 0.0)),
                              float(losses.get("selection", 0.0)) * share], dtype=torch.float64)
    sums = sum_gradients(parameters, group, sums)
    if not all_visual:  # no visual token in the whole step: there was no selection to learn
        sums[2] = float("nan")
    return float(sums[0]), float(sums[1]), float(sums[2])


@contextmanager
def _checkpointed_layers(model, enabled: bool):
    """Recompute the language model's decoder layers in the backward pass while the block runs.

    ``transformers`` checkpoints a layer only while the layer is in training mode, and the frozen
    model trains in eval mode (no dropout): only the layer modules themselves are switched, not
    their submodules, so nothing else changes. Everything is put back afterwards.
    """
    if not enabled:
        yield
        return
    from transformers.modeling_layers import GradientCheckpointingLayer

    state = get_state(model)
    text_model = state.adapter.text_model(state.adapter.core(model))
    if not getattr(text_model, "supports_gradient_checkpointing", False):
        raise ValueError(f"{type(text_model).__name__} does not support gradient checkpointing")
    layers = [m for m in text_model.modules() if isinstance(m, GradientCheckpointingLayer)]
    modes = [(layer, layer.training) for layer in layers]
    already = any(layer.gradient_checkpointing for layer in layers)  # the caller's own setting stays
    if not already:
        _call_either(text_model, "activation_checkpointing_enable", "gradient_checkpointing_enable",
                     {"use_reentrant": False})
    for layer in layers:
        layer.training = True
    try:
        yield
    finally:
        for layer, training in modes:
            layer.training = training
        if not already:
            _call_either(text_model, "activation_checkpointing_disable", "gradient_checkpointing_disable")


def _call_either(module, name: str, older_name: str, *args):
    """``module.name(*args)``, or the older method of the same meaning where ``name`` does not exist yet."""
    method = getattr(module, name, None)
    return (method if method is not None else getattr(module, older_name))(*args)


# Settings that do not change what a run computes, so a resumed run may change them.
_FREE_SETTINGS = ("progress", "gradient_checkpointing")


def _run_settings(model, config: SelectorTrainingConfig, steps: int, extra: Mapping | None) -> dict:
    """Everything a resumed run must share with the checkpoint, as JSON values."""
    state = get_state(model)
    # The scorer's resolved width stands for hidden_dim: unset and its default value are the same run.
    return _settings(config, extra, steps=steps, method=state.method_name, method_config=state.method.config_dict(),
                     hidden_size=state.adapter.hidden_size(model))


def _settings(config: SelectorTrainingConfig, extra: Mapping | None, **own) -> dict:
    settings = {f.name: getattr(config, f.name) for f in fields(SelectorTrainingConfig)
                if f.name not in _FREE_SETTINGS and f.name != "hidden_dim"}
    if settings.get("training_forward") == "soft":
        del settings["training_forward"]  # the paper's: no entry, as before it could be chosen, so such runs resume
    settings.update(own)
    extra = dict(extra or {})
    clash = sorted(set(extra) & set(settings))
    if clash:
        raise ValueError(f"run_settings may not redefine the run's own settings: {', '.join(clash)}")
    settings.update(extra)
    try:
        return json.loads(json.dumps(settings, sort_keys=True, allow_nan=False))
    except (TypeError, ValueError) as error:
        raise ValueError(f"run_settings must hold JSON values (numbers, strings, lists, ...): {error}") from None


def _changed_settings(saved: dict, current: dict) -> list[str]:
    """``name: checkpoint value -> this run's value`` for each setting that differs."""
    missing = object()  # a setting only one side has (one added to run_settings, say)
    lines = []
    for name in sorted(set(saved) | set(current)):
        before, after = saved.get(name, missing), current.get(name, missing)
        if before == after:
            continue
        line = f"{name}: " + " -> ".join("(not set)" if v is missing else repr(v) for v in (before, after))
        if name == "steps":
            line += f" (a run of {before} steps cannot go on as one of {after}: the schedule depends on the length)"
        lines.append(line)
    return lines


# A checkpoint folder holds the selector files and the trainer state; nothing else is
# ever written or deleted there.
STATE_NAME = "trainer_state.pt"
# (trainer_state.tmp: what earlier versions wrote the trainer state to before renaming it.)
_CHECKPOINT_FILES = (CONFIG_NAME, WEIGHTS_NAME, STATE_NAME, "trainer_state.tmp")


def _checkpoint_file(directory) -> Path:
    return Path(directory) / STATE_NAME


def _swap_folders(directory) -> tuple[Path, Path]:
    """The folders beside a checkpoint: the next one being written, and the last one moved aside."""
    directory = Path(os.path.abspath(directory))
    return directory.with_name(directory.name + ".tmp"), directory.with_name(directory.name + ".old")


def _check_checkpoint_folder(directory) -> None:
    """Refuse a checkpoint folder that holds other files: each save replaces the whole folder."""
    for folder in (Path(directory), *_swap_folders(directory)):
        if not folder.exists():
            continue
        if not folder.is_dir():
            raise ValueError(f"checkpoint folder {folder} is a file")
        allowed = {*_CHECKPOINT_FILES, *(temporary_name(Path(name)).name for name in _CHECKPOINT_FILES)}
        foreign = sorted(path.name for path in folder.iterdir() if path.name not in allowed)
        if foreign:
            raise ValueError(f"checkpoint folder {folder} holds other files ({', '.join(foreign[:5])}); every save "
                             "replaces the whole folder, so give the checkpoint a folder of its own")


def _remove_folder(folder: Path) -> None:
    """Delete a checkpoint folder file by file (only the files a checkpoint holds), then the folder."""
    if not folder.exists():
        return
    for name in _CHECKPOINT_FILES:
        for path in (folder / name, temporary_name(folder / name)):
            path.unlink(missing_ok=True)
    folder.rmdir()


def recover_checkpoint(directory) -> Path | None:
    """The complete checkpoint in ``directory``, or ``None``; finishes a save that was cut off.

    A save writes ``DIR.tmp``, renames ``DIR`` to ``DIR.old`` and ``DIR.tmp`` to ``DIR``,
    then deletes ``DIR.old``. ``DIR`` is therefore always complete when it exists; a kill
    between the two renames leaves only ``DIR.old``, which is the last checkpoint.
    """
    directory = Path(directory)
    _, previous = _swap_folders(directory)
    if not directory.exists() and previous.is_dir():
        previous.rename(directory)
        sync_path(directory.parent)
    elif previous.exists():
        _remove_folder(previous)
    return directory if _checkpoint_file(directory).is_file() else None


def remove_checkpoint(directory) -> None:
    """Delete the checkpoint in ``directory`` and any half-finished save beside it."""
    _check_checkpoint_folder(directory)
    for folder in (Path(directory), *_swap_folders(directory)):
        _remove_folder(folder)


def _save_checkpoint(directory, model, optimizer, scheduler, step: int, history: list, settings: dict) -> None:
    directory = Path(directory)
    temporary, previous = _swap_folders(directory)
    recover_checkpoint(directory)
    _remove_folder(temporary)  # a save cut off before its swap
    save_selector(model, temporary)
    trainer_state = {"step": step, "steps": settings["steps"], "optimizer": optimizer.state_dict(),
                     "scheduler": scheduler.state_dict(), "history": history, "settings": settings,
                     "selector_sha256": _selector_digest(temporary)}
    torch.save(trainer_state, temporary / STATE_NAME)
    sync_path(temporary / STATE_NAME)
    sync_path(temporary)
    if directory.exists():
        directory.rename(previous)
    temporary.rename(directory)
    sync_path(directory.parent)
    _remove_folder(previous)


def _selector_digest(directory: Path) -> str:
    """sha256 of the selector files, stored with the trainer state to prove they belong together."""
    digest = hashlib.sha256()
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        digest.update((directory / name).read_bytes())
    return digest.hexdigest()


def check_resume(checkpoint_dir, config: SelectorTrainingConfig, *, steps: int | None = None,
                 run_settings: Mapping | None = None) -> None:
    """Raise ``ValueError`` unless ``checkpoint_dir`` holds a checkpoint that these settings may resume.

    A cheap early look (before a model loads): it compares the settings it is given, while
    :func:`train_selector` compares them all (the method's options, the hidden size and,
    here only if given, ``steps``).
    """
    config.validate()
    own = {} if steps is None else {"steps": steps}
    _, saved = _trainer_state(checkpoint_dir)
    _compare_settings(checkpoint_dir, saved, _settings(config, run_settings, **own), every=False)


def _trainer_state(directory) -> tuple[Path, dict]:
    """The checkpoint folder in ``directory`` and its trainer state; ``ValueError`` if there is none."""
    found = recover_checkpoint(directory)
    if found is None:
        raise ValueError(f"resume=True but {directory} holds no checkpoint (it is written there during a run "
                         "given checkpoint_dir); start a fresh run with resume=False")
    try:
        saved = torch.load(_checkpoint_file(found), weights_only=True)
        saved["step"], saved["steps"] = int(saved["step"]), int(saved["steps"])
    except Exception as error:
        raise ValueError(f"cannot resume from {directory}: unreadable trainer state ({error})") from None
    return found, saved


def _compare_settings(directory, saved: dict, settings: dict, every: bool = True) -> None:
    """``ValueError`` listing the settings that differ; ``every=False`` compares only those in ``settings``."""
    # A checkpoint written before the settings were stored can only be checked for its length.
    stored = saved.get("settings", {"steps": saved["steps"]})
    if not every or "settings" not in saved:
        stored = {name: value for name, value in stored.items() if name in settings}
        settings = {name: value for name, value in settings.items() if name in stored}
    changed = _changed_settings(stored, settings)
    if changed:
        raise ValueError(f"cannot resume from {directory}: this run's settings differ from the checkpoint's:\n  "
                         + "\n  ".join(changed) + "\nresume with the checkpoint's settings, or start a fresh run "
                         "in another checkpoint folder (visionselector train: another --out, or --overwrite)")


def _read_checkpoint(directory, settings: dict) -> dict:
    """The checkpoint in ``directory`` (trainer state plus ``selector`` weights), checked against this run."""
    found, saved = _trainer_state(directory)
    _compare_settings(directory, saved, settings)
    if "selector_sha256" in saved and _selector_digest(found) != saved["selector_sha256"]:
        raise ValueError(f"cannot resume from {directory}: its selector files are not the ones its trainer state "
                         "was saved with (they were changed after the save); start a fresh run")
    _, saved["selector"] = read_selector(found)
    return saved


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
