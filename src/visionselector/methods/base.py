"""The interface every selection method implements, and the registry of methods."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..ops.topk import hard_topk

__all__ = ["InsideLLMMethod", "Selection", "SelectionMethod", "VisualTokens", "register_method", "get_method_class",
           "list_methods", "method_options"]

_NAME_PATTERN = re.compile(r"^[a-z][a-z0-9_]*$")
_REGISTRY: dict[str, type["SelectionMethod"]] = {}


@dataclass
class VisualTokens:
    """The visual tokens of a batch, as a method sees them.

    ``features`` ``[B, N, D]``: LLM-space embeddings, each sample's tokens left-aligned
    in their original order; ``valid`` ``[B, N]`` marks real tokens. ``segments[b]``
    lists sample ``b``'s visual blocks in order as ``(frames, height, width)`` grids of
    tokens, each frame row-major (so a block holds ``frames * height * width``
    consecutive tokens); ``None`` where the model family cannot say.

    Optional signals, present when a method asks for them in ``needs``:
    ``encoder_attention`` ``[B, N]``, the attention each token receives in the vision
    encoder; for methods that prune inside the language model (``prune_layer`` set),
    ``features`` are the hidden states after that layer, ``query_attention`` ``[B, N]``
    the attention the last token pays each visual token there (mean over heads) and
    ``key_norms`` ``[B, N]`` the norms of their keys.
    """

    features: torch.Tensor
    valid: torch.Tensor
    segments: list[list[tuple[int, int, int]]] | None = None
    encoder_attention: torch.Tensor | None = None
    query_attention: torch.Tensor | None = None
    key_norms: torch.Tensor | None = None


@dataclass
class Selection:
    """What a method keeps: ``keep`` ``BoolTensor[B, N]`` and, for methods that merge tokens,
    ``features`` ``[B, N, D]`` whose rows at kept slots replace those tokens' embeddings
    (each merged token sits at, and takes the position of, a representative original)."""

    keep: torch.Tensor
    features: torch.Tensor | None = None


class SelectionMethod(nn.Module):
    """Chooses which visual tokens of each sample reach the language model.

    A method sees only :class:`VisualTokens` and the per-sample budget
    ``LongTensor[B]``; it never knows which model it runs in. Simple methods implement
    :meth:`scores` (higher is kept); others override :meth:`select`. ``needs`` names the
    optional inputs a method requires (``"segments"``, ``"encoder_attention"``) so that
    adapters compute them only when asked. A method whose token count follows its own
    structure (pooling grids) sets ``exact_budget = False`` and documents its rule.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    trainable: ClassVar[bool] = False
    needs: ClassVar[frozenset[str]] = frozenset()
    exact_budget: ClassVar[bool] = True
    # Methods that prune inside the language model set inside_llm and, per instance,
    # prune_layer = K: decoder layers 0..K run on the full sequence, the method selects
    # from what layer K saw, and later layers run on the kept tokens.
    inside_llm: ClassVar[bool] = False
    prune_layer: int | None = None

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.hidden_size = hidden_size

    def scores(self, features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Importance of each visual token, ``[B, N]``; higher is kept."""
        raise NotImplementedError(f"method {self.name!r} does not define scores()")

    def select(self, tokens: VisualTokens, budget: torch.Tensor) -> Selection:
        """Keep exactly ``budget[b]`` valid tokens of each row ``b``."""
        return Selection(hard_topk(self.scores(tokens.features, tokens.valid), budget, mask=tokens.valid))

    def config_dict(self) -> dict:
        """Constructor options (besides the hidden size) that rebuild this method with its weights."""
        return {}


class InsideLLMMethod(SelectionMethod):
    """Base of methods that prune inside the language model, after decoder layer ``layer``."""

    inside_llm = True

    def __init__(self, hidden_size: int, layer: int = 2) -> None:
        super().__init__(hidden_size)
        if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0:
            raise ValueError(f"layer must be a non-negative decoder layer index, got {layer!r}")
        self.prune_layer = layer

    def config_dict(self) -> dict:
        return {"layer": self.prune_layer}


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


def method_options(method_class: type[SelectionMethod]) -> dict[str, object]:
    """The options a method's constructor takes after the hidden size, each with its default
    (``inspect.Parameter.empty`` where it has none)."""
    import inspect

    parameters = list(inspect.signature(method_class.__init__).parameters.values())[2:]
    return {parameter.name: parameter.default for parameter in parameters}


def list_methods() -> dict[str, str]:
    """Registered method names, each with its one-line description."""
    return {name: _REGISTRY[name].description for name in sorted(_REGISTRY)}
