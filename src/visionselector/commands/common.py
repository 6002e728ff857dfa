"""What the commands share: checking inputs and loading the model."""

from __future__ import annotations

from pathlib import Path

import torch

__all__ = ["check_file", "check_output_folder", "set_threads", "model_and_processor", "MODEL_HELP"]

MODEL_HELP = "'reference' (the shipped model), a checkpoint folder or a hub id"


def check_file(path: str, what: str) -> Path:
    if not path:
        raise ValueError(f"{what}: give a conversation JSONL file")
    if not Path(path).is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    return Path(path)


def check_output_folder(path: str | Path, what: str = "output folder") -> Path:
    """``path`` as a folder to write into: refused if it, or a parent, is a file."""
    path = Path(path)
    for parent in (path, *path.parents):
        if parent.exists() and not parent.is_dir():
            raise ValueError(f"{what} {path}: {parent} is a file, not a folder")
    return path


def set_threads(threads: int | None) -> None:
    if threads is None:
        return
    if threads < 1:
        raise ValueError(f"threads must be at least 1, got {threads}")
    torch.set_num_threads(threads)


def model_and_processor(source: str, model=None, processor=None):
    """The given model and processor, or both loaded from ``source``."""
    if model is not None:
        if processor is None:
            raise ValueError("a model given without its processor")
        return model, processor
    from ..models import load_model

    return load_model(source)
