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


def _json_text(value, limit: int = 60) -> str:
    """``value`` as it reads in the file (``null``, ``3``, ``{"a": 1}``), cut to ``limit`` characters."""
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _paths(raw: dict, key: str, where: str) -> list[str]:
    """The ``image`` / ``video`` field as a list of path strings (absent: none)."""
    valid = f"'{key}' must be a path string or a list of path strings (leave it out for none)"
    value = raw.get(key, [])
    if isinstance(value, str):
        value = [value]
    elif not isinstance(value, list):
        raise ValueError(f"{where}: {valid}, got {_json_text(value)}")
    for index, item in enumerate(value):
        if not isinstance(item, str) or not item.strip():
            raise ValueError(f"{where}: {valid}, got {_json_text(item)}"
                             + (f" as item {index} of the list" if isinstance(raw[key], list) else ""))
    return value


def _turns(raw, where: str) -> list[tuple[str, str]]:
    """The ``conversations`` field as ``(role, text)`` pairs."""
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: expected an object with a non-empty 'conversations' list, got {_json_text(raw)}")
    conversation = raw.get("conversations")
    if not isinstance(conversation, list) or not conversation:
        got = ("no 'conversations' field" if "conversations" not in raw
               else f"'conversations': {_json_text(conversation)}")
        raise ValueError(f"{where}: expected an object with a non-empty 'conversations' list, got {got}")
    turns = []
    for number, turn in enumerate(conversation, start=1):
        role = _ROLES.get(turn.get("from")) if isinstance(turn, dict) and isinstance(turn.get("from"), str) else None
        if role is None or not isinstance(turn.get("value"), str):
            raise ValueError(f"{where}: turn {number} of 'conversations' needs 'from' (one of {', '.join(_ROLES)}) "
                             f"and a string 'value', got {_json_text(turn)}")
        turns.append((role, turn["value"]))
    return turns


def _lines(path: Path):
    """``(line number, text)`` of each line of ``path``, which must be UTF-8 (a byte-order mark is dropped).

    Split on the bytes ``\\n``, ``\\r\\n`` and ``\\r`` only: a JSON string may hold U+2028 and
    other characters that ``str.splitlines`` would break a record at."""
    for number, line in enumerate(path.read_bytes().splitlines(), start=1):
        try:
            yield number, line.decode("utf-8-sig" if number == 1 else "utf-8")
        except UnicodeDecodeError as error:
            raise ValueError(f"{path}:{number}: not UTF-8 text (byte {line[error.start:error.start + 1]!r} at "
                             f"column {error.start + 1}); conversation files are UTF-8 JSONL") from None


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
    for number, line in _lines(path):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            raw = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{where}: not valid JSON ({error})") from None
        turns = _turns(raw, where)
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
