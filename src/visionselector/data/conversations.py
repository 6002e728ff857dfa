"""LLaVA / Cambrian conversation JSONL: one JSON object per line, e.g.

    {"image": "images/1.png", "conversations": [{"from": "human", "value": "<image>\\nwhat ...?"},
                                                  {"from": "gpt", "value": "7"}]}

``image`` is relative to the JSONL file's folder (or absolute); ``image`` may also be a
list for multi-image samples, each with its own ``<image>`` placeholder.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

__all__ = ["ConversationRecord", "read_conversations", "IMAGE_PLACEHOLDER"]

IMAGE_PLACEHOLDER = "<image>"
_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


@dataclass
class ConversationRecord:
    """One sample: its images (absolute paths) and its turns as ``(role, text)``."""

    id: str
    images: list[Path]
    turns: list[tuple[str, str]]
    extra: dict


def read_conversations(path: str | Path) -> list[ConversationRecord]:
    """Read and validate a conversation JSONL file; errors name the file, line and problem."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"conversation file not found: {path}")
    records = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            raw = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{where}: not valid JSON ({error})") from None
        if not isinstance(raw, dict) or not isinstance(raw.get("conversations"), list) or not raw["conversations"]:
            raise ValueError(f"{where}: expected an object with a non-empty 'conversations' list")
        turns = []
        for turn in raw["conversations"]:
            role = _ROLES.get(turn.get("from")) if isinstance(turn, dict) else None
            if role is None or not isinstance(turn.get("value"), str):
                raise ValueError(f"{where}: each turn needs 'from' (one of {', '.join(_ROLES)}) and a string 'value'")
            turns.append((role, turn["value"]))
        images = raw.get("image", [])
        images = [images] if isinstance(images, str) else list(images)
        placeholders = sum(text.count(IMAGE_PLACEHOLDER) for _, text in turns)
        if placeholders != len(images):
            raise ValueError(f"{where}: {len(images)} image(s) but {placeholders} '{IMAGE_PLACEHOLDER}' placeholder(s)")
        resolved = [(path.parent / image) if not Path(image).is_absolute() else Path(image) for image in images]
        extra = {k: v for k, v in raw.items() if k not in ("id", "image", "conversations")}
        records.append(ConversationRecord(str(raw.get("id", number)), resolved, turns, extra))
    return records
