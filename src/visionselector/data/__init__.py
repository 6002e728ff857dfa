"""Data: LLaVA / Cambrian conversation JSONL through the checkpoint's processor and chat template."""

from .conversations import ConversationRecord, read_conversations

__all__ = ["ConversationRecord", "read_conversations"]
