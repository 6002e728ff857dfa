"""The reference benchmark: the DigitsVQA task, its small Qwen2.5-VL model and how it was trained.

``REFERENCE_DIR`` is the shipped model: an ordinary checkpoint folder (config, weights,
tokenizer, chat template, preprocessor config) that ``visionselector.load_model("reference")``
and the Auto classes load.
"""

from pathlib import Path

REFERENCE_DIR = Path(__file__).resolve().parent / "checkpoint"

__all__ = ["REFERENCE_DIR"]
