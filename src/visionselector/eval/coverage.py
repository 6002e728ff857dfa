"""Which DigitsVQA objects a method's kept tokens cover: a diagnostic for the reference benchmark.

Accuracy says how much a method loses; this says why. For each test sample it compares
the tokens a method keeps with the tokens under each object of the scene
(:func:`~visionselector.reference.task.object_tokens`) and under the objects the question
is about (:func:`~visionselector.reference.task.asked_objects`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

__all__ = ["ObjectCoverage", "kept_object_coverage"]


@dataclass
class ObjectCoverage:
    """Shares (0 to 1) over the evaluated samples; ``by_type`` splits the first two by question type."""

    method: str = field(metadata={"help": "selection method"})
    retention: float = field(metadata={"help": "fraction of visual tokens kept"})
    asked_tokens_kept: float = field(metadata={"help": "share of the asked objects' tokens that are kept"})
    asked_objects_seen: float = field(metadata={"help": "share of the asked objects with at least one token kept"})
    objects_seen: float = field(metadata={"help": "share of all objects with at least one token kept"})
    kept_on_objects: float = field(metadata={"help": "share of the kept tokens that lie on an object"})
    samples: int = field(metadata={"help": "samples evaluated"})
    by_type: dict = field(default_factory=dict, metadata={
        "help": "question type -> (asked_tokens_kept, asked_objects_seen)"})


def kept_object_coverage(model, processor, *, method: str, retention: float, samples: int, selector=None,
                         options: dict | None = None, split: str = "test") -> ObjectCoverage:
    """Run one prefill per sample ``0 .. samples - 1`` of ``split`` with ``method`` attached
    at ``retention`` and measure which objects its kept tokens cover.

    Methods that prune inside the language model choose after their layer has read the
    question; the others see only the image. ``options`` go to the method (``{"layer": 0}``).
    """
    import visionselector as vs

    from ..reference.training import question_batch
    from ..reference.task import digit_images, asked_objects, make_sample, object_tokens
    from ..ops.topk import validate_retention

    validate_retention(retention)
    if retention == 1.0:
        raise ValueError("retention 1.0 keeps every token; coverage is measured below 1.0")
    if samples < 1:
        raise ValueError(f"samples must be at least 1, got {samples}")
    if vs.is_attached(model):
        raise RuntimeError("detach the selection method first; kept_object_coverage attaches it itself")
    images, targets = digit_images()
    attach_options = dict(options or {})
    if method == "visionselector":
        if selector is None:
            raise ValueError("method 'visionselector' needs a trained selector (a directory written by save_selector)")
        attach_options["selector"] = selector
    totals = dict.fromkeys(("asked_kept", "asked", "asked_seen", "asked_objects", "seen", "objects",
                            "on_objects", "kept"), 0)
    per_type: dict[str, list[int]] = {}
    with vs.attached(model, method=method, retention=retention, **attach_options):
        model.eval()
        for index in range(samples):
            layout = []
            image, question, _, kind = make_sample(split, index, images, targets, layout=layout)
            batch = question_batch(processor, [image], [question])
            with torch.no_grad():
                model(**batch)
            kept = set(vs.last_selection(model)[0].tolist())
            objects = [set(tokens) for tokens in object_tokens(layout)]
            asked = [objects[i] for i in asked_objects(question, kind, layout)]
            asked_tokens = set().union(*asked)
            counts = {"asked_kept": len(asked_tokens & kept), "asked": len(asked_tokens),
                      "asked_seen": sum(bool(o & kept) for o in asked), "asked_objects": len(asked),
                      "seen": sum(bool(o & kept) for o in objects), "objects": len(objects),
                      "on_objects": len(kept & set().union(*objects)), "kept": len(kept)}
            for name, value in counts.items():
                totals[name] += value
            row = per_type.setdefault(kind, [0, 0, 0, 0])
            for position, name in enumerate(("asked_kept", "asked", "asked_seen", "asked_objects")):
                row[position] += counts[name]

    def share(part, whole):
        return part / whole if whole else float("nan")

    return ObjectCoverage(
        method=method, retention=retention, asked_tokens_kept=share(totals["asked_kept"], totals["asked"]),
        asked_objects_seen=share(totals["asked_seen"], totals["asked_objects"]),
        objects_seen=share(totals["seen"], totals["objects"]), kept_on_objects=share(totals["on_objects"], totals["kept"]),
        samples=samples,
        by_type={kind: (share(row[0], row[1]), share(row[2], row[3])) for kind, row in sorted(per_type.items())})
