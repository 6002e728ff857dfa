"""The interface every selection method implements, and the registry of methods."""

from __future__ import annotations

import re
from typing import ClassVar

import torch
from torch import nn

from ..ops.topk import hard_topk

__all__ = ["SelectionMethod", "register_method", "get_method_class", "list_methods"]

_NAME_PATTERN = re.compile(r"^[a-z][a-z0-9_]*$")
_REGISTRY: dict[str, type["SelectionMethod"]] = {}


class SelectionMethod(nn.Module):
    """Chooses which visual tokens of each sample reach the language model.

    A method sees only the visual tokens of a batch, as LLM-space embeddings
    ``features`` ``[B, N, D]`` with a validity ``mask`` ``[B, N]`` (samples have
    different numbers of visual tokens), and the per-sample budget ``LongTensor[B]``.
    It never knows which model it runs in. Subclasses implement :meth:`scores`
    (higher is kept) or override :meth:`select`.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    trainable: ClassVar[bool] = False

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.hidden_size = hidden_size

    def scores(self, features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Importance of each visual token, ``[B, N]``; higher is kept."""
        raise NotImplementedError(f"method {self.name!r} does not define scores()")

    def select(self, features: torch.Tensor, mask: torch.Tensor, budget: torch.Tensor) -> torch.Tensor:
        """``BoolTensor[B, N]`` with exactly ``budget[b]`` valid tokens kept in row ``b``."""
        return hard_topk(self.scores(features, mask), budget, mask=mask)

    def config_dict(self) -> dict:
        """Constructor options (besides the hidden size) that rebuild this method with its weights."""
        return {}


def register_method(cls: type[SelectionMethod]) -> type[SelectionMethod]:
    """Add a :class:`SelectionMethod` subclass to the registry under ``cls.name``."""
    if not (isinstance(cls, type) and issubclass(cls, SelectionMethod)):
        raise TypeError(f"only SelectionMethod subclasses can be registered, got {cls!r}")
    name = cls.name
    if not isinstance(name, str) or not _NAME_PATTERN.match(name):
        raise ValueError(f"method name must be lower-case letters, digits and '_', starting with a letter; got {name!r}")
    if not cls.description or "\n" in cls.description:
        raise ValueError(f"method {name!r} needs a one-line description")
    if name in _REGISTRY and _REGISTRY[name] is not cls:
        raise ValueError(f"a method named {name!r} is already registered ({_REGISTRY[name].__qualname__})")
    _REGISTRY[name] = cls
    return cls


def get_method_class(name: str) -> type[SelectionMethod]:
    """The registered class for ``name``; ``ValueError`` listing the known names otherwise."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        known = ", ".join(sorted(_REGISTRY))
        raise ValueError(f"unknown method {name!r}; known methods: {known}") from None


def list_methods() -> dict[str, str]:
    """Registered method names, each with its one-line description."""
    return {name: _REGISTRY[name].description for name in sorted(_REGISTRY)}
