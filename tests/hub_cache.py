"""A ``huggingface_hub`` cache laid out by its rules, for loading hub ids offline in tests."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path


def add_to_hub_cache(cache: Path, repo_id: str, folder: Path, *, revision: str = "main") -> Path:
    """Copy every file of ``folder`` into ``cache`` as the snapshot of ``repo_id`` at ``revision``:
    ``models--owner--name/{blobs/<sha256>, snapshots/<commit>/<file> -> blob, refs/<revision>}``.
    Returns the snapshot folder."""
    repo = Path(cache) / ("models--" + repo_id.replace("/", "--"))
    commit = hashlib.sha1(f"{repo_id}@{revision}".encode()).hexdigest()
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    for file in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        digest = hashlib.sha256(file.read_bytes()).hexdigest()
        blob = repo / "blobs" / digest
        if not blob.exists():
            shutil.copyfile(file, blob)
        link = snapshot / file.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(Path("../" * (len(link.relative_to(snapshot).parts) + 1)) / "blobs" / digest)
    (repo / "refs" / revision).write_text(commit)
    return snapshot


def offline_hub(monkeypatch, cache: Path) -> None:
    """Point ``huggingface_hub`` (and so ``transformers``) at ``cache`` with the hub switched off."""
    import huggingface_hub.constants as constants

    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
