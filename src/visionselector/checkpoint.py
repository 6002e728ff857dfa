"""Saving and loading a selector: the method's weights (safetensors) and a small JSON config."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "FORMAT_VERSION", "write_selector", "read_selector"]

CONFIG_NAME = "selector_config.json"
WEIGHTS_NAME = "selector.safetensors"
FORMAT_VERSION = 1


def write_selector(directory: str | os.PathLike, config: dict, state_dict: dict[str, torch.Tensor]) -> Path:
    """Write ``config`` and ``state_dict`` under ``directory`` (created if needed)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {name: tensor.detach().to("cpu").contiguous() for name, tensor in state_dict.items()}
    save_file(tensors, str(directory / WEIGHTS_NAME), metadata={"format": "pt"})
    config = {"format_version": FORMAT_VERSION, **config}
    (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return directory


def read_selector(directory: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """Read a selector directory; errors name the file and what is wrong with it."""
    from safetensors.torch import load_file

    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"selector directory not found: {directory}")
    config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    for path in (config_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(f"selector file missing: {path} (a selector directory holds {CONFIG_NAME} "
                                    f"and {WEIGHTS_NAME}, written by visionselector.save_selector)")
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"corrupt selector config {config_path}: {error}") from None
    if not isinstance(config, dict) or "method" not in config:
        raise ValueError(f"corrupt selector config {config_path}: expected a JSON object with a 'method' field")
    version = config.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(f"selector config {config_path} has format_version {version!r}; "
                         f"this version of visionselector reads format_version {FORMAT_VERSION}")
    try:
        state_dict = load_file(str(weights_path))
    except Exception as error:  # safetensors raises several error types for damaged files
        raise ValueError(f"corrupt selector weights {weights_path}: {error}") from None
    return config, state_dict
