"""The reference benchmark: the DigitsVQA task, its small Qwen2.5-VL model and how it was trained.

``REFERENCE_DIR`` is the shipped model: an ordinary checkpoint folder (config, weights,
tokenizer, chat template, preprocessor config) that ``visionselector.load_model("reference")``
and the Auto classes load. ``SELECTORS_DIR`` holds the selectors trained for it, each a
folder that ``visionselector.attach(..., selector=shipped_selector(name))`` loads, with
``training.json``: the command, seed, steps, time and code version that made it.
"""

from pathlib import Path

REFERENCE_DIR = Path(__file__).resolve().parent / "checkpoint"
SELECTORS_DIR = Path(__file__).resolve().parent / "selectors"

__all__ = ["REFERENCE_DIR", "SELECTORS_DIR", "shipped_selectors", "shipped_selector"]


def shipped_selectors() -> list[str]:
    """Names of the selectors shipped for the reference model."""
    if not SELECTORS_DIR.is_dir():
        return []
    return sorted(p.name for p in SELECTORS_DIR.iterdir() if (p / "selector_config.json").is_file())


def shipped_selector(name: str) -> Path:
    """The folder of the shipped selector ``name`` (``visionselector``, ``visionselector_diversity``,
    ``visionselector_q``); ``ValueError`` listing the shipped ones otherwise."""
    names = shipped_selectors()
    if name not in names:
        raise ValueError(f"no shipped selector named {name!r}; shipped selectors: {', '.join(names) or 'none'}")
    return SELECTORS_DIR / name
