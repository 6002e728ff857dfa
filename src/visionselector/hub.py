"""Local folders and hub ids: where a model, processor or selector's files are.

A source is a local folder, or a hub id (``owner/name``) that ``huggingface_hub``
resolves: from its cache when the hub cannot be reached or ``HF_HUB_OFFLINE=1`` is set.
Only the files asked for are fetched, so a selector can be read out of a 15 GB release
by downloading its index and one shard.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

__all__ = ["is_hub_id", "resolve_folder", "resolve_file"]

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


def is_hub_id(source: str | os.PathLike) -> bool:
    """``owner/name`` that is not an existing local path."""
    text = str(source)
    return bool(_HUB_ID.match(text)) and not Path(text).exists()


def _hub_error(repo_id: str, what: str, error: Exception) -> Exception:
    from huggingface_hub import constants

    reason = ("HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE
              else "the hub could not be reached or does not hold it")
    return FileNotFoundError(
        f"{what} {repo_id!r} is neither a local folder nor in the hub cache at {constants.HF_HUB_CACHE} "
        f"({reason}: {type(error).__name__}). Download it once where the hub is reachable "
        f"(huggingface-cli download {repo_id}) or give a local folder.")


def resolve_folder(source: str | os.PathLike, *, what: str = "checkpoint",
                   allow_patterns: list[str] | None = None) -> Path:
    """The local folder of ``source``: itself if it is a folder, else the hub snapshot of the id
    with the files matching ``allow_patterns`` (all files if ``None``)."""
    path = Path(source)
    if path.is_dir():
        return path
    if path.exists():
        raise NotADirectoryError(f"{what} {str(source)!r} is a file; give its folder or a hub id")
    if not is_hub_id(source):
        raise FileNotFoundError(f"{what} not found: {str(source)!r} is neither a local folder nor a hub id "
                                "(owner/name)")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(source), allow_patterns=allow_patterns))
    except Exception as error:  # offline, not found, gated: every failure means the files are not here
        try:
            return Path(snapshot_download(str(source), allow_patterns=allow_patterns, local_files_only=True))
        except Exception:
            raise _hub_error(str(source), what, error) from None


def resolve_file(source: str | os.PathLike, filename: str, *, what: str = "checkpoint") -> Path | None:
    """``filename`` inside ``source`` (a folder or a hub id), or ``None`` if the source lacks it.

    A missing hub id (or one absent from the cache when offline) raises ``FileNotFoundError``."""
    path = Path(source)
    if path.is_dir():
        return path / filename if (path / filename).is_file() else None
    if not is_hub_id(source):
        raise FileNotFoundError(f"{what} not found: {str(source)!r} is neither a local folder nor a hub id "
                                "(owner/name)")
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    try:
        return Path(hf_hub_download(str(source), filename))
    except Exception as error:
        if isinstance(error, EntryNotFoundError) and not isinstance(error, LocalEntryNotFoundError):
            return None  # the hub answered: the repository has no such file
        try:
            return Path(hf_hub_download(str(source), filename, local_files_only=True))
        except LocalEntryNotFoundError:
            if _repo_cached(str(source)):
                return None  # the repository is cached, without this file
            raise _hub_error(str(source), what, error) from None


def _repo_cached(repo_id: str) -> bool:
    from huggingface_hub import constants

    folder = Path(constants.HF_HUB_CACHE) / ("models--" + repo_id.replace("/", "--")) / "snapshots"
    return folder.is_dir() and any(folder.iterdir())
