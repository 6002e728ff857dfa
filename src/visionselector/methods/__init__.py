"""Selection methods, one file each, registered by name when imported."""

from .base import SelectionMethod, get_method_class, list_methods, register_method
from . import visionselector as _visionselector  # noqa: F401  (registers "visionselector")
from . import random as _random  # noqa: F401  (registers "random")
from .visionselector import ImportanceScorer

__all__ = ["ImportanceScorer", "SelectionMethod", "get_method_class", "list_methods", "register_method"]
