"""What the commands share: checking inputs and loading the model."""

from __future__ import annotations

import math
from pathlib import Path

import torch

__all__ = ["check_file", "check_output_folder", "check_count", "check_positive", "set_threads", "parse_device",
           "parse_dtype", "model_and_processor", "MODEL_HELP"]

DEVICES = "cpu, cuda, cuda:N (a GPU index) or auto (cuda when available, else cpu)"

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


def check_count(name: str, value, minimum: int = 1) -> int:
    """``value`` if it is an integer of at least ``minimum``; ``ValueError`` naming ``name`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer of at least {minimum}, got {value!r}")
    return value


def check_positive(name: str, value) -> float:
    """``value`` as a float if it is a finite number > 0; ``ValueError`` naming ``name`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def set_threads(threads: int | None) -> None:
    """Use ``threads`` torch CPU threads (``None``: torch's choice); ``ValueError`` unless a positive integer."""
    if threads is None:
        return
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads must be an integer of at least 1, got {threads!r}")
    torch.set_num_threads(threads)


def parse_device(text: str) -> torch.device:
    """``text`` as a ``torch.device``: ``cpu``, ``cuda``, ``cuda:N`` or ``auto``; ``ValueError`` saying
    what is valid otherwise, and when the CUDA device asked for is not there."""
    if not isinstance(text, str):
        raise ValueError(f"device must be {DEVICES}; got {text!r}")
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):  # torch's own message lists every device type it was built with
        raise ValueError(f"device must be {DEVICES}; got {text!r}") from None
    if device.type not in ("cpu", "cuda") or (device.type == "cpu" and device.index not in (None, 0)):
        raise ValueError(f"device must be {DEVICES}; got {text!r}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {text!r} requested but CUDA is not available")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ValueError(f"device {text!r} requested but this machine has {count} CUDA device(s): "
                             f"cuda:0 to cuda:{count - 1}")
    return device


DTYPES = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(text: str):
    """``text`` as what ``load_model`` takes for ``dtype``; ``ValueError`` listing the valid names otherwise."""
    if text not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}; got {text!r}")
    return DTYPES[text]


def model_and_processor(source: str, model=None, processor=None, **options):
    """The given model and processor, or both loaded from ``source`` (``options`` go to ``load_model``)."""
    if model is not None:
        if processor is None:
            raise ValueError("a model given without its processor")
        return model, processor
    from ..models import load_model

    return load_model(source, **options)
