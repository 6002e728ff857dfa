"""Answer metrics: a prediction against one or more reference answers, scored in [0, 1].

``exact``: equal after :func:`normalise_answer`. ``contains``: some normalised reference
occurs in the normalised prediction (for models that answer in sentences). ``anls``: the
Average Normalized Levenshtein Similarity of DocVQA, ``1 - distance / max(length)`` on
lower-cased, whitespace-trimmed text when that distance ratio is below 0.5, else 0.
With several references each metric takes the best.
"""

from __future__ import annotations

import string

__all__ = ["METRICS", "normalise_answer", "exact_match", "contains", "anls", "levenshtein", "score"]

ANLS_THRESHOLD = 0.5


def normalise_answer(text: str) -> str:
    """Lower case, outer whitespace and final punctuation removed: ``" Yes."`` -> ``"yes"``."""
    return text.strip().lower().rstrip(string.punctuation + " ").strip()


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions) between ``a`` and ``b``."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, char_a in enumerate(a, start=1):
        current = [i]
        for j, char_b in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (char_a != char_b)))
        previous = current
    return previous[-1]


def exact_match(prediction: str, reference: str) -> float:
    return float(normalise_answer(prediction) == normalise_answer(reference))


def contains(prediction: str, reference: str) -> float:
    wanted = normalise_answer(reference)
    return float(bool(wanted) and wanted in normalise_answer(prediction))


def anls(prediction: str, reference: str) -> float:
    predicted, wanted = " ".join(prediction.lower().split()), " ".join(reference.lower().split())
    longest = max(len(predicted), len(wanted))
    if longest == 0:
        return 1.0
    distance = levenshtein(predicted, wanted) / longest
    return 1.0 - distance if distance < ANLS_THRESHOLD else 0.0


METRICS = {"exact": exact_match, "contains": contains, "anls": anls}


def score(metric: str, prediction: str, references: str | list[str]) -> float:
    """``metric`` (one of :data:`METRICS`) of ``prediction``, the best over ``references``."""
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; metrics: {', '.join(METRICS)}")
    references = [references] if isinstance(references, str) else list(references)
    if not references:
        raise ValueError("score needs at least one reference answer")
    return max(METRICS[metric](prediction, reference) for reference in references)
