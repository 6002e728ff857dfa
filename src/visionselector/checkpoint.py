"""Saving and loading a selector: the method's weights (safetensors) and a small JSON config."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import torch

__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "FORMAT_VERSION", "write_selector", "read_selector"]

CONFIG_NAME = "selector_config.json"
WEIGHTS_NAME = "selector.safetensors"
FORMAT_VERSION = 1


def write_selector(directory: str | os.PathLike, config: dict, state_dict: dict[str, torch.Tensor]) -> Path:
    """Write ``config`` and ``state_dict`` under ``directory`` (created if needed).

    Each file is written under a temporary name, flushed to disk and renamed over the old
    one, so an interrupted save never leaves a truncated file. The two renames are two
    steps: a kill between them pairs the new weights with the previous config, which still
    loads if the method's options are the same (and fails naming the mismatch if not).
    Training checkpoints, which must stay whole, swap complete folders instead.
    """
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {name: tensor.detach().to("cpu").contiguous() for name, tensor in state_dict.items()}
    config = {"format_version": FORMAT_VERSION, **config}
    weights_path, config_path = directory / WEIGHTS_NAME, directory / CONFIG_NAME
    staged = [temporary_name(weights_path), temporary_name(config_path)]
    try:
        save_file(tensors, str(staged[0]), metadata={"format": "pt"})
        sync_path(staged[0])
        write_synced(staged[1], (json.dumps(config, indent=2, sort_keys=True) + "\n").encode())
        os.replace(staged[0], weights_path)
        os.replace(staged[1], config_path)
    except BaseException:
        for path in staged:  # a failed save (a full disk, say) leaves no stray files behind
            with contextlib.suppress(OSError):
                path.unlink(missing_ok=True)
        raise
    sync_path(directory)
    return directory


def temporary_name(path: Path) -> Path:
    """Where ``path`` is written before it is renamed into place (a leftover is overwritten next time)."""
    return path.with_name(path.name + ".tmp")


def write_synced(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` and flush it to disk before returning."""
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def sync_path(path: Path) -> None:
    """Flush a file, or a folder's entries (renames), to disk.

    Without it a power cut can leave a renamed file empty even though the rename happened.
    Some systems cannot open a folder for this; there the rename is as durable as they allow.
    """
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except OSError:
        if Path(path).is_dir():
            return
        raise
    try:
        os.fsync(descriptor)
    except OSError:
        if not Path(path).is_dir():
            raise
    finally:
        os.close(descriptor)


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
