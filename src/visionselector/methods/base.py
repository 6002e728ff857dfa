"""The interface every selection method implements, and the registry of methods."""

from __future__ import annotations

import dataclasses
import inspect
import math
import numbers
import re
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from ..ops.merge import absorb_dropped
from ..ops.topk import hard_topk

__all__ = ["InsideLLMMethod", "LayerOptions", "NoOptions", "Selection", "SelectionMethod", "VisualTokens",
           "merge_option", "merged_selection", "register_method", "get_method_class", "list_methods",
           "method_options", "option_help", "check_options", "check_value"]

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
    encoder; ``prompt`` ``[B, T, D]`` with ``prompt_valid`` ``[B, T]``, the input
    embeddings (the language model's embedding table) of each sample's text tokens, in
    order and left-aligned: every valid token that is not visual, less the answer tokens
    when the forward is given ``labels`` (those with a label other than -100), so that a
    question-aware method never reads the answer it is trained on; for methods that prune inside the language model (``prune_layer`` set),
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
    prompt: torch.Tensor | None = None
    prompt_valid: torch.Tensor | None = None


@dataclass
class Selection:
    """What a method keeps: ``keep`` ``BoolTensor[B, N]`` and, for methods that merge tokens,
    ``features`` ``[B, N, D]`` whose rows at kept slots replace those tokens' embeddings
    (each merged token sits at, and takes the position of, a representative original)."""

    keep: torch.Tensor
    features: torch.Tensor | None = None
    # [B, N]: how many of the input's tokens each kept token stands for (0 at the others),
    # for methods that merge the dropped tokens into the kept ones (option ``merge``); the
    # language model then weighs its attention to each kept token by log(size).
    sizes: torch.Tensor | None = None


# ---------------------------------------------------------------- options
#
# Each method declares its constructor options as a dataclass (``options_class``): one
# field per option with its type, default and ``metadata={"help": ...}``, plus its range
# as ``at_least`` / ``above`` / ``at_most`` / ``below``. The constructor keeps explicit
# keyword arguments of the same names and defaults (register_method checks they agree),
# and everything that builds a method checks the values here first, so a bad value fails
# at attach, named, instead of at the first forward or by silent truncation.

_RANGE_KEYS = ("at_least", "above", "at_most", "below")
# Integers go to torch as int64 unless an option's own range says otherwise.
_INT64_RANGE = {"at_least": -2**63, "below": 2**63}


@dataclass
class NoOptions:
    """Options of a method that takes none."""


@dataclass
class LayerOptions:
    """Options of a method that prunes inside the language model."""

    layer: int = field(default=2, metadata={
        "help": "decoder layer K: layers 0..K run on every visual token, later layers on the kept ones",
        "at_least": 0})


def _bound_text(bound) -> str:
    # 2**64 reads better than 18446744073709551616.
    if isinstance(bound, int) and abs(bound) >= 2**32 and (abs(bound) & (abs(bound) - 1)) == 0:
        return ("-" if bound < 0 else "") + f"2**{abs(bound).bit_length() - 1}"
    return f"{bound:g}" if isinstance(bound, float) else str(bound)


def _range_text(bounds: dict) -> str:
    """``[0, 2**64)``, ``>= 1``, ``> 0`` ... for the bounds that are set."""
    low = ("[", bounds["at_least"]) if bounds.get("at_least") is not None else (
        ("(", bounds["above"]) if bounds.get("above") is not None else None)
    high = ("]", bounds["at_most"]) if bounds.get("at_most") is not None else (
        (")", bounds["below"]) if bounds.get("below") is not None else None)
    if low and high:
        return f"in {low[0]}{_bound_text(low[1])}, {_bound_text(high[1])}{high[0]}"
    if low:
        return (">= " if low[0] == "[" else "> ") + _bound_text(low[1])
    if high:
        return ("<= " if high[0] == "]" else "< ") + _bound_text(high[1])
    return ""


def _shown(value) -> str:
    return f"{value!r} ({type(value).__name__})"


def _accepted(kind: type, optional: bool, bounds: dict) -> tuple[dict, str]:
    """The bounds that apply (int64's for ints, where the option sets none) and the text
    saying what is valid, e.g. ``an integer in [0, 2**64)``."""
    unknown = set(bounds) - set(_RANGE_KEYS)
    if unknown:
        raise TypeError(f"unknown bound(s) {', '.join(sorted(unknown))}; bounds: {', '.join(_RANGE_KEYS)}")
    names = {int: "an integer", float: "a finite number", bool: "true or false", str: "a string"}
    if kind not in names:
        raise TypeError(f"unsupported option type {kind!r}; options are int, float, bool or str")
    bounds = {key: value for key, value in bounds.items() if value is not None}
    if kind is int:
        if "at_least" not in bounds and "above" not in bounds:
            bounds["at_least"] = _INT64_RANGE["at_least"]
        if "at_most" not in bounds and "below" not in bounds:
            bounds["below"] = _INT64_RANGE["below"]
    text = " ".join(part for part in (names[kind], _range_text(bounds)) if part)
    return bounds, text + (" or None" if optional else "")


def check_value(what: str, value, kind: type, *, optional: bool = False, **bounds):
    """``value`` as a plain Python ``kind`` (``int``, ``float``, ``bool`` or ``str``); ``ValueError``
    naming ``what`` and what it accepts otherwise.

    ``int`` takes Python and NumPy integers, never bools or floats (which would be
    truncated), within ``bounds`` and int64; ``float`` takes any finite real number
    (ints and NumPy scalars included); ``None`` passes only if ``optional``. ``bounds``:
    ``at_least``, ``above``, ``at_most``, ``below``.
    """
    bounds, valid = _accepted(kind, optional, bounds)
    if value is None and optional:
        return None
    if kind is int:
        ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    elif kind is float:
        ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    else:
        ok = isinstance(value, kind)
    if not ok:
        raise ValueError(f"{what} must be {valid}, got {_shown(value)}")
    if kind is float:
        try:
            value = float(value)
        except OverflowError:  # an int too large for a float
            raise ValueError(f"{what} must be {valid}, got {_shown(value)}") from None
        if not math.isfinite(value):
            raise ValueError(f"{what} must be {valid}, got {value!r}")
    elif kind is int:
        value = int(value)  # NumPy integers become Python ints: JSON and torch.Generator take only those
    inside = (value >= bounds.get("at_least", value) and value <= bounds.get("at_most", value)
              and ("above" not in bounds or value > bounds["above"])
              and ("below" not in bounds or value < bounds["below"]))
    if not inside:
        raise ValueError(f"{what} must be {valid}, got {value!r}")
    return value


def _field_kind(options_class, option: dataclasses.Field) -> tuple[type, bool]:
    """``(kind, optional)`` of a field typed ``int``, ``float | None`` ..."""
    hint = typing.get_type_hints(options_class)[option.name]
    arguments = typing.get_args(hint)
    optional = type(None) in arguments
    kinds = [a for a in arguments if a is not type(None)] if arguments else [hint]
    if len(kinds) != 1 or kinds[0] not in (int, float, bool, str):
        raise TypeError(f"option {option.name!r} of {options_class.__qualname__} is typed {hint}; an option is "
                        "int, float, bool or str, or one of them | None")
    return kinds[0], optional


def _option_fields(method_class) -> dict[str, dataclasses.Field]:
    return {option.name: option for option in dataclasses.fields(method_class.options_class)}


def check_options(method_class: type["SelectionMethod"], options: Mapping[str, object]) -> dict[str, object]:
    """``options`` for ``method_class``'s constructor, checked against its ``options_class``.

    Unknown names raise ``TypeError`` listing the accepted ones (as a constructor would);
    a value of the wrong type or out of range raises ``ValueError`` naming the option and
    what it accepts (:func:`check_value`). Returns the values as plain Python numbers.
    """
    fields = _option_fields(method_class)
    unknown = [name for name in options if name not in fields]
    if unknown:
        raise TypeError(f"invalid options for method {method_class.name!r}: unknown option(s) "
                        f"{', '.join(map(repr, unknown))}; accepted options: {', '.join(fields) or 'none'}")
    checked = {}
    for name, value in options.items():
        kind, optional = _field_kind(method_class.options_class, fields[name])
        bounds = {key: fields[name].metadata.get(key) for key in _RANGE_KEYS}
        checked[name] = check_value(f"option {name!r} of method {method_class.name!r}", value, kind,
                                    optional=optional, **bounds)
    return checked


def _check_declared_options(cls) -> None:
    """The constructor's options and ``options_class``'s fields agree in names, order and defaults;
    every field has help and a valid default."""
    options_class = cls.options_class
    if not dataclasses.is_dataclass(options_class) or not isinstance(options_class, type):
        raise TypeError(f"method {cls.name!r}: options_class must be a dataclass, got {options_class!r}")
    fields = dataclasses.fields(options_class)
    declared = [(f.name, inspect.Parameter.empty if f.default is dataclasses.MISSING else f.default) for f in fields]
    parameters = list(inspect.signature(cls.__init__).parameters.values())[2:]
    taken = [(p.name, p.default) for p in parameters]
    if declared != taken:
        raise TypeError(f"method {cls.name!r}: its constructor takes {taken} after the hidden size, but its "
                        f"options_class {options_class.__qualname__} declares {declared}; declare every option in "
                        "both, in the same order and with the same default")
    for option in fields:
        if not option.metadata.get("help"):
            raise TypeError(f"method {cls.name!r}: option {option.name!r} needs metadata={{'help': ...}}")
        if option.default is not dataclasses.MISSING:
            check_options(cls, {option.name: option.default})


class SelectionMethod(nn.Module):
    """Chooses which visual tokens of each sample reach the language model.

    A method sees only :class:`VisualTokens` and the per-sample budget
    ``LongTensor[B]``; it never knows which model it runs in. Simple methods implement
    :meth:`scores` (higher is kept), or :meth:`token_scores` when they read more than the
    visual tokens; others override :meth:`select`. ``needs`` names the optional inputs a
    method requires (``"segments"``, ``"encoder_attention"``, ``"prompt"``) so that
    adapters compute them only when asked and the other methods pay nothing. A method whose token count follows its own
    structure (pooling grids) sets ``exact_budget = False`` and documents its rule.
    A method with options declares them in ``options_class`` (a dataclass; see
    :func:`check_options`) and takes the same keyword arguments in its constructor.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    trainable: ClassVar[bool] = False
    needs: ClassVar[frozenset[str]] = frozenset()
    exact_budget: ClassVar[bool] = True
    options_class: ClassVar[type] = NoOptions
    # Methods that prune inside the language model set inside_llm and, per instance,
    # prune_layer = K: decoder layers 0..K run on the full sequence, the method selects
    # from what layer K saw, and later layers run on the kept tokens.
    inside_llm: ClassVar[bool] = False
    prune_layer: int | None = None
    # Set per instance by methods with the ``merge`` option: their selections carry sizes, and
    # the language model must take an additive attention mask (sdpa or eager attention).
    merges: bool = False

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.hidden_size = hidden_size

    def scores(self, features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Importance of each visual token, ``[B, N]``; higher is kept."""
        raise NotImplementedError(f"method {self.name!r} does not define scores()")

    def token_scores(self, tokens: VisualTokens) -> torch.Tensor:
        """Importance of each visual token, ``[B, N]``, from everything the method asked for;
        the scores that soft selection (training) makes differentiable. By default :meth:`scores`
        of the features."""
        return self.scores(tokens.features, tokens.valid)

    def select(self, tokens: VisualTokens, budget: torch.Tensor) -> Selection:
        """Keep exactly ``budget[b]`` valid tokens of each row ``b``."""
        return Selection(hard_topk(self.token_scores(tokens), budget, mask=tokens.valid))

    def selection_flops(self, visual: int, hidden: int, budget: int, prompt: int) -> int:
        """FLOPs of this method's own work for one sample at prefill, beyond the language model's layers.

        Args:
            visual: the sample's visual tokens ``N`` before selection.
            hidden: their width ``D`` (the language model's hidden size).
            budget: the tokens to keep, ``max(1, floor(r * N))``, as :meth:`select` receives it.
            prompt: the sample's text tokens (every token of its prompt that is not visual).

        Counted as :mod:`visionselector.eval.flops` counts the language model: 2 FLOPs per
        multiply-add of a matrix product; averaging or merging tokens counts 1 per added
        element; elementwise scoring, norms, softmax, sorting and top-k count 0. The work of
        signals computed inside the model for this method (a probe of a decoder layer's
        queries and keys) belongs here; the vision encoder's is not counted. The default, 0,
        is right for a method that only ranks precomputed values.
        """
        return 0

    def config_dict(self) -> dict:
        """Constructor options (besides the hidden size) that rebuild this method with its weights."""
        return {}


def merge_option():
    """The ``merge`` option of methods that prune before the language model (:mod:`~visionselector.ops.merge`)."""
    return field(default=False, metadata={
        "help": "merge each dropped token into its most similar kept token (mean embedding) and weigh attention "
                "to each kept token by log of the tokens it stands for (proportional attention); the language "
                "model must use sdpa or eager attention"})


def merged_selection(keep: torch.Tensor, tokens: VisualTokens, merge: bool) -> Selection:
    """``keep`` ``[B, N]`` as a :class:`Selection`, with the dropped tokens merged into the kept ones
    (:func:`~visionselector.ops.merge.absorb_dropped`) when ``merge``."""
    if not merge:
        return Selection(keep)
    features, sizes = absorb_dropped(tokens.features, keep, tokens.valid)
    return Selection(keep, features, sizes)


class InsideLLMMethod(SelectionMethod):
    """Base of methods that prune inside the language model, after decoder layer ``layer``."""

    inside_llm = True
    options_class = LayerOptions

    def __init__(self, hidden_size: int, layer: int = 2) -> None:
        super().__init__(hidden_size)
        self.prune_layer = check_options(type(self), {"layer": layer})["layer"]

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
    _check_declared_options(cls)
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
    return {name: inspect.Parameter.empty if option.default is dataclasses.MISSING else option.default
            for name, option in _option_fields(method_class).items()}


def option_help(method_class: type[SelectionMethod]) -> dict[str, str]:
    """Each option of a method with its help text, type and range, e.g. ``"seed"`` ->
    ``"seed of the generator ... (an integer in [0, 2**64))"``."""
    helps = {}
    for name, option in _option_fields(method_class).items():
        kind, optional = _field_kind(method_class.options_class, option)
        _, valid = _accepted(kind, optional, {key: option.metadata.get(key) for key in _RANGE_KEYS})
        helps[name] = f"{option.metadata.get('help', '')} ({valid})"
    return helps


def list_methods() -> dict[str, str]:
    """Registered method names, each with its one-line description."""
    return {name: _REGISTRY[name].description for name in sorted(_REGISTRY)}
