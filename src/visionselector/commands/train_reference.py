"""``visionselector train-reference``: train the DigitsVQA reference model from scratch."""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

from ..reference.training import ReferenceConfig
from .common import check_output_folder, set_threads

__all__ = ["ReferenceRunConfig", "run_train_reference"]


@dataclasses.dataclass
class ReferenceRunConfig(ReferenceConfig):
    """Settings of ``visionselector train-reference``: the model's, and where the result goes."""

    out: str = dataclasses.field(default="reference-model", metadata={"help": "output directory"})
    test_samples: int = dataclasses.field(default=600, metadata={"help": "test examples for the final accuracy"})
    threads: int | None = dataclasses.field(default=None, metadata={"help": "torch CPU threads"})


def run_train_reference(config: ReferenceRunConfig, *, print_fn=print) -> Path:
    """Train the reference model as ``config`` says; save it as a checkpoint folder, test and record it."""
    from ..reference.model import export_reference
    from ..reference.training import evaluate_accuracy, train_reference

    set_threads(config.threads)
    out = check_output_folder(config.out)
    started = time.time()
    reference = ReferenceConfig(**{f.name: getattr(config, f.name) for f in dataclasses.fields(ReferenceConfig)})
    model, processor, log = train_reference(reference, out / "checkpoints", print_fn=lambda line: print_fn(line))
    seconds = time.time() - started
    test = evaluate_accuracy(model, processor, "test", config.test_samples)
    print_fn(json.dumps({"test": test}))
    export_reference(model, out, training={
        "command": "visionselector " + " ".join(sys.argv[1:]), "config": dataclasses.asdict(reference),
        "threads": torch.get_num_threads(), "training_seconds": round(seconds, 1),
        "test_accuracy": test, "test_samples": config.test_samples, "log": log})
    print_fn(f"wrote {out} ({seconds / 60:.1f} min of training; test accuracy {100 * test['all']:.1f}%)")
    return out
