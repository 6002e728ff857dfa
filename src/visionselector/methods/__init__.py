"""Selection methods, one file each, registered by name when imported."""

from .base import Selection, SelectionMethod, VisualTokens, get_method_class, list_methods, register_method
from . import visionselector as _visionselector  # noqa: F401  (registers "visionselector")
from . import random as _random  # noqa: F401  (registers "random")
from . import uniform as _uniform  # noqa: F401  (registers "uniform")
from . import pool as _pool  # noqa: F401  (registers "pool")
from . import divprune as _divprune  # noqa: F401  (registers "divprune")
from . import visionzip as _visionzip  # noqa: F401  (registers "visionzip")
from . import fastv as _fastv  # noqa: F401  (registers "fastv")
from . import dart as _dart  # noqa: F401  (registers "dart")
from . import cdpruner as _cdpruner  # noqa: F401  (registers "cdpruner")
from . import visionselector_q as _visionselector_q  # noqa: F401  (registers "visionselector_q")
from .visionselector import ImportanceScorer

__all__ = ["ImportanceScorer", "Selection", "SelectionMethod", "VisualTokens", "get_method_class", "list_methods", "register_method"]
