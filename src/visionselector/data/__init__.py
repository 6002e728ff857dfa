"""Data: LLaVA / Cambrian conversation JSONL, and the DigitsVQA reference task."""

from .conversations import ConversationRecord, read_conversations

__all__ = ["ConversationRecord", "read_conversations"]
