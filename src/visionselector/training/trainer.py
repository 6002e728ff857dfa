"""``transformers.Trainer`` integration: the curriculum as a callback, and a selector-only trainer."""

from __future__ import annotations

import os

import torch
from transformers import Trainer, TrainerCallback

from ..api import get_state, save_selector, set_selection_loss_weight
from ..checkpoint import read_selector
from . import CurriculumSchedule, freeze_for_selector_training

__all__ = ["CurriculumCallback", "SelectorTrainer"]


class CurriculumCallback(TrainerCallback):
    """Sets ``lambda`` from the Trainer's global step before every optimizer step.

    Args:
        lambda_start: weight of the selection loss at the first step.
        lambda_end: weight at the last step (``state.max_steps``).
    """

    def __init__(self, lambda_start: float = 0.1, lambda_end: float = 2.0) -> None:
        self.lambda_start = lambda_start
        self.lambda_end = lambda_end

    def _schedule(self, state) -> CurriculumSchedule:
        return CurriculumSchedule(self.lambda_start, self.lambda_end, max(1, int(state.max_steps)))

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if model is not None:
            set_selection_loss_weight(_unwrap(model), self._schedule(state).weight(state.global_step))

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.on_step_begin(args, state, control, model=model, **kwargs)


def _unwrap(model):
    while hasattr(model, "module") and not hasattr(model, "_visionselector_state"):
        model = model.module
    return model


class SelectorTrainer(Trainer):
    """A ``Trainer`` that trains only the attached selector and saves only its weights.

    The MLLM is frozen on construction; checkpoints hold the selector directory format
    (``selector_config.json`` and ``selector.safetensors``), and resuming reads it back.
    Extra keyword: ``lambda_start``/``lambda_end`` for the curriculum.
    """

    def __init__(self, *args, lambda_start: float = 0.1, lambda_end: float = 2.0, **kwargs):
        super().__init__(*args, **kwargs)
        freeze_for_selector_training(self.model)
        self.add_callback(CurriculumCallback(lambda_start, lambda_end))

    def _save(self, output_dir: str | None = None, state_dict=None):
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        os.makedirs(output_dir, exist_ok=True)
        save_selector(_unwrap(self.model), output_dir)
        torch.save(self.args, os.path.join(output_dir, "training_args.bin"))

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        model = _unwrap(model if model is not None else self.model)
        _, weights = read_selector(resume_from_checkpoint)
        get_state(model).method.load_state_dict(weights, strict=True)

    def train(self, *args, **kwargs):
        result = super().train(*args, **kwargs)
        # Trainer leaves the model in train mode; inference should use hard selection.
        _unwrap(self.model).eval()
        return result
