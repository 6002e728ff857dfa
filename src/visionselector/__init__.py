"""visionselector: drop most visual tokens before a multimodal LLM reads them.

``import visionselector`` is cheap: submodules (and torch, transformers) load on
first use of a name.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "attach": "api",
    "attached": "api",
    "load_model": "models",
    "load_processor": "models",
    "detach": "api",
    "is_attached": "api",
    "get_scorer": "api",
    "get_method": "api",
    "save_selector": "api",
    "last_selection": "api",
    "set_retention": "api",
    "set_selection_loss_weight": "api",
    "soft_topk": "ops.topk",
    "hard_topk": "ops.topk",
    "token_budget": "ops.topk",
    "ImportanceScorer": "methods.visionselector",
    "SelectionMethod": "methods.base",
    "register_method": "methods.base",
    "list_methods": "methods",
    "CurriculumSchedule": "training",
    "CurriculumCallback": "training",
    "SelectorTrainer": "training",
    "train_selector": "training",
    "freeze_for_selector_training": "training",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str):
    module_name = _EXPORTS.get(name)
    if module_name is None:
        raise AttributeError(f"module 'visionselector' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module_name}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return __all__
