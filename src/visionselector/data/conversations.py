"""LLaVA / Cambrian conversation JSONL: one JSON object per line, e.g.

    {"id": "q1", "image": "images/1.png", "conversations": [{"from": "human", "value": "<image>\\nwhat ...?"},
                                                              {"from": "gpt", "value": "7"}]}

``image`` is one path or a list (one ``<image>`` tag each, in order); ``video`` likewise
with ``<video>`` tags. Relative paths are resolved against ``image_folder`` (default: the
JSONL file's folder). Conversations may have many turns; each record becomes chat
messages whose content places the images and videos where their tags stood.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from .encoding import IMAGE_TAG, VIDEO_TAG, content_items

__all__ = ["ConversationRecord", "read_conversations", "IMAGE_PLACEHOLDER"]

IMAGE_PLACEHOLDER = IMAGE_TAG
_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


@dataclass
class ConversationRecord:
    """One sample: its images and videos (absolute paths), its turns as ``(role, text)``, where
    it came from (``file:line``) and the record's other fields (``extra``; e.g. ``type``)."""

    id: str
    images: list[Path]
    turns: list[tuple[str, str]]
    extra: dict
    videos: list[Path] = field(default_factory=list)
    where: str = ""

    def messages(self) -> list[dict]:
        """The turns as chat messages; user and assistant content as lists of items."""
        return [{"role": role, "content": content_items(text) if role != "system" else text}
                for role, text in self.turns]

    @property
    def answer(self) -> str:
        """The last assistant turn's text, stripped ("" if the conversation has none)."""
        return next((text.strip() for role, text in reversed(self.turns) if role == "assistant"), "")

    def prompt_messages(self) -> list[dict]:
        """The messages before the last assistant turn: what the model answers (evaluation)."""
        messages = self.messages()
        while messages and messages[-1]["role"] == "assistant":
            messages = messages[:-1]
        return messages


def _paths(raw, key: str, where: str) -> list[str]:
    value = raw.get(key, [])
    value = [value] if isinstance(value, str) else value
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{where}: '{key}' must be a path or a list of paths")
    return value


def read_conversations(path: str | Path, *, image_folder: str | Path | None = None,
                       check_files: bool = True) -> list[ConversationRecord]:
    """Read and validate a conversation JSONL file; errors name the file, line and problem.

    ``check_files``: every image and video must exist (the error names the file and the line).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"conversation file not found: {path}")
    folder = Path(image_folder) if image_folder is not None else path.parent
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder not found: {folder}")
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
        media = {}
        for key, tag in (("image", IMAGE_TAG), ("video", VIDEO_TAG)):
            files = _paths(raw, key, where)
            tags = sum(text.count(tag) for role, text in turns if role != "system")
            if tags != len(files):
                raise ValueError(f"{where}: {len(files)} {key}(s) but {tags} '{tag}' tag(s) in the conversation; "
                                 f"each {key} needs one tag where it belongs")
            resolved = [Path(f) if Path(f).is_absolute() else folder / f for f in files]
            if check_files:
                for file in resolved:
                    if not file.is_file():
                        raise FileNotFoundError(f"{where}: {key} file not found: {file}"
                                                + ("" if image_folder is not None else
                                                   " (relative paths are read from the JSONL file's folder; "
                                                   "--image-folder sets another)"))
            media[key] = resolved
        extra = {k: v for k, v in raw.items() if k not in ("id", "image", "video", "conversations")}
        records.append(ConversationRecord(str(raw.get("id", number)), media["image"], turns, extra,
                                          media["video"], where))
    return records
