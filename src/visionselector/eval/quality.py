"""Quality harness: accuracy, visual tokens kept and prefill time of every method at every retention.

All methods run on the same model, the same examples, the same prompts and the same
greedy decoding; only the visual tokens the language model reads differ. At retention
1.0 every method is an exact no-op (the tests check this against the unpatched model),
so that row is measured once, on the unpatched model, and shared by all methods.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

__all__ = ["QualityRecord", "parse_method_options", "evaluate_methods", "write_results", "format_table",
           "plot_results", "references"]

DEFAULT_RETENTIONS = (0.05, 0.1, 0.2, 0.3, 0.5, 1.0)


@dataclass
class QualityRecord:
    """One (method, retention) cell of the comparison."""

    method: str = field(metadata={"help": "selection method"})
    retention: float = field(metadata={"help": "fraction of visual tokens kept"})
    accuracy: float = field(metadata={"help": "mean score of the metric, 0 to 1"})
    tokens_kept: float = field(metadata={"help": "mean visual tokens the language model keeps per sample"})
    visual_tokens: float = field(metadata={"help": "mean visual tokens per sample before selection"})
    prefill_ms: float = field(metadata={"help": "mean prefill time per sample (selection and language model)"})
    samples: int = field(metadata={"help": "examples evaluated"})
    by_type: dict = field(default_factory=dict, metadata={"help": "accuracy per question type, if known"})
    options: dict = field(default_factory=dict, metadata={"help": "options the method ran with, beyond its defaults"})
    metric: str = field(default="exact", metadata={"help": "answer metric: exact, contains or anls"})


def parse_method_options(items, methods) -> dict[str, dict]:
    """``["dart.layer=0", "fastv.layer=0"]`` -> ``{"dart": {"layer": 0}, "fastv": {"layer": 0}}``.

    Values read as int, float, ``true``/``false``, ``none`` or else text. Each method must be
    among ``methods``, each option one of that method's options, and each value of the
    option's type and in its range (:func:`~visionselector.methods.base.check_options`), so
    that a mistake stops the run before any model loads.
    """
    from ..methods.base import check_options, get_method_class, method_options

    options: dict[str, dict] = {}
    for item in items:
        name, _, value = item.partition("=")
        method, _, option = name.partition(".")
        if not (method and option and value):
            raise ValueError(f"method option {item!r} is not METHOD.OPTION=VALUE (for example dart.layer=0)")
        if method not in methods:
            raise ValueError(f"method option {item!r} is for {method!r}, which is not evaluated; "
                             f"evaluated methods: {', '.join(methods)}")
        accepted = list(method_options(get_method_class(method)))
        if option not in accepted:
            raise ValueError(f"method {method!r} has no option {option!r}; its options: {', '.join(accepted) or 'none'}")
        options.setdefault(method, {})[option] = _option_value(value)
    for method, values in options.items():
        options[method] = check_options(get_method_class(method), values)
    return options


def _option_value(text: str):
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    if text.lower() == "none":
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


class _PrefillTimer:
    """Times the first forward of each ``generate`` call (the prefill) with module hooks."""

    def __init__(self, model) -> None:
        self.pending, self.started, self.seconds = False, 0.0, 0.0
        self.handles = [model.register_forward_pre_hook(self._before), model.register_forward_hook(self._after)]

    def arm(self) -> None:
        self.pending, self.seconds = True, 0.0

    def _before(self, module, args):
        if self.pending:
            self.started = time.perf_counter()

    def _after(self, module, args, output):
        if self.pending:
            self.seconds, self.pending = time.perf_counter() - self.started, False

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _needs_pixels(method: str) -> bool:
    from ..methods import get_method_class

    return "encoder_attention" in get_method_class(method).needs


def references(example) -> list[str]:
    """The accepted answers of an example: its ``answers`` field if given, else its last assistant turn."""
    answers = example.extra.get("answers")
    if isinstance(answers, list) and answers and all(isinstance(a, str) for a in answers):
        return answers
    return [example.answer]


def _run(model, processor, examples, batches, *, generation: dict, metric: str, attached: bool,
         progress_bar=None) -> dict:
    """Greedy answers of every example in ``batches``: predictions, scores, tokens kept and prefill seconds."""
    import visionselector as vs

    from ..data.encoding import placeholder_ids
    from .metrics import score

    device = model.get_input_embeddings().weight.device
    placeholders = torch.tensor(placeholder_ids(processor))
    result = {"predictions": [None] * len(examples), "scores": [None] * len(examples), "kept": [], "visual": [],
              "seconds": 0.0}
    timer = _PrefillTimer(model)
    try:
        with torch.no_grad():
            for indices, batch in batches.epoch():
                inputs = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}
                timer.arm()
                output = model.generate(**inputs, **generation)
                result["seconds"] += timer.seconds
                counts = torch.isin(batch["input_ids"], placeholders).sum(1).tolist()
                result["visual"].extend(counts)
                result["kept"].extend([len(k) for k in vs.last_selection(model)] if attached else counts)
                texts = processor.tokenizer.batch_decode(output[:, batch["input_ids"].shape[1]:],
                                                         skip_special_tokens=True)
                for index, text in zip(indices, texts):
                    result["predictions"][index] = text.strip()
                    result["scores"][index] = score(metric, text, references(examples[index]))
                if progress_bar is not None:
                    progress_bar.update(len(indices))
    finally:
        timer.remove()
    return result


def _record(method, retention, examples, run: dict, metric: str, options=None) -> QualityRecord:
    scores = run["scores"]
    by_type: dict[str, list[float]] = {}
    for example, value in zip(examples, scores):
        kind = example.extra.get("type")
        if isinstance(kind, str):
            by_type.setdefault(kind, []).append(value)
    return QualityRecord(
        method=method, retention=retention, accuracy=sum(scores) / len(scores),
        tokens_kept=sum(run["kept"]) / len(run["kept"]), visual_tokens=sum(run["visual"]) / len(run["visual"]),
        prefill_ms=1000 * run["seconds"] / len(scores), samples=len(scores),
        by_type={kind: sum(v) / len(v) for kind, v in sorted(by_type.items())}, options=dict(options or {}),
        metric=metric,
    )


def _predictions(method, retention, examples, run: dict) -> list[dict]:
    return [{"id": e.id, "method": method, "retention": retention, "prediction": p, "answer": e.answer,
             "correct": s} for e, p, s in zip(examples, run["predictions"], run["scores"])]


def evaluate_methods(model, processor, examples, *, methods: list[str], retentions=DEFAULT_RETENTIONS,
                     selector: str | Path | None = None, cache=None, batch_size: int = 32,
                     max_new_tokens: int | None = None, metric: str = "exact", progress: bool = True,
                     print_fn=None, method_options: dict[str, dict] | None = None,
                     predictions: list | None = None) -> list[QualityRecord]:
    """Evaluate every method at every retention; returns one :class:`QualityRecord` per pair.

    Args:
        model: a supported model, without a method attached.
        processor: the checkpoint's processor; prompts come from its chat template.
        examples: :class:`~visionselector.data.ConversationRecord` list; each is asked its
            conversation up to the last assistant turn, whose text is the reference answer
            (or the record's ``answers`` list).
        methods: registered method names; ``visionselector`` needs ``selector``.
        retentions: values in (0, 1].
        selector: a trained selector (see :func:`visionselector.attach`), for ``visionselector``.
        cache: a :class:`~visionselector.data.batches.FeatureCache` of ``examples``; methods
            that read the encoder's attention run from pixels regardless.
        max_new_tokens: answer length limit (default: the longest reference answer in
            tokens, plus one).
        metric: ``exact``, ``contains`` or ``anls`` (:mod:`visionselector.eval.metrics`).
        print_fn: called with each finished record's one-line summary.
        method_options: per method, options for its constructor (``{"dart": {"layer": 0}}``);
            they are recorded in each of its records.
        predictions: if given, a list that receives one dict per example, method and retention
            (``id``, ``method``, ``retention``, ``prediction``, ``answer``, ``correct``).
    """
    import visionselector as vs
    from tqdm.auto import tqdm

    from ..data.batches import ExampleBatches
    from ..methods import list_methods
    from ..methods.base import check_options, get_method_class
    from ..models import greedy_settings
    from ..ops.topk import validate_retention
    from .metrics import METRICS

    known = list_methods()
    unknown = [m for m in methods if m not in known]
    if unknown:
        raise ValueError(f"unknown method(s) {', '.join(map(repr, unknown))}; known methods: {', '.join(known)}")
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; metrics: {', '.join(METRICS)}")
    retentions = sorted({validate_retention(r) for r in retentions})
    method_options = dict(method_options or {})
    stray = [m for m in method_options if m not in methods]
    if stray:
        raise ValueError(f"options given for {', '.join(map(repr, stray))}, which is not evaluated; "
                         f"evaluated methods: {', '.join(methods)}")
    # Checked now: each method is attached only after the full-token run.
    method_options = {method: check_options(get_method_class(method), chosen)
                      for method, chosen in method_options.items()}
    if "visionselector" in methods and selector is None:
        raise ValueError("method 'visionselector' needs a trained selector (a directory written by save_selector)")
    if vs.is_attached(model):
        raise RuntimeError("detach the selection method first; the harness attaches each method itself")
    if max_new_tokens is None:
        max_new_tokens = 1 + max(len(processor.tokenizer(answer, add_special_tokens=False)["input_ids"])
                                 for e in examples for answer in references(e))
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    generation = greedy_settings(model, processor, max_new_tokens)
    model.eval()
    pruned = [r for r in retentions if r < 1]
    total = len(examples) * (len(methods) * len(pruned) + (1.0 in retentions))
    bar = tqdm(total=total, desc="evaluating", unit="answer", disable=not progress)
    records = []
    collected = predictions if predictions is not None else []

    def finish(record, run):
        records.append(record)
        collected.extend(_predictions(record.method, record.retention, examples, run))
        if print_fn is not None:
            print_fn(f"{record.method:>15} r={record.retention:<5g} {metric} {100 * record.accuracy:5.1f}%  "
                     f"tokens {record.tokens_kept:6.1f}  prefill {record.prefill_ms:7.2f} ms/sample")

    try:
        cached = ExampleBatches(examples, processor, batch_size=batch_size, cache=cache)
        full = None
        if 1.0 in retentions:
            bar.set_postfix(method="(all tokens)")
            full = _run(model, processor, examples, cached, generation=generation, metric=metric, attached=False,
                        progress_bar=bar)
        for method in methods:
            chosen = dict(method_options.get(method, {}))
            options = {**chosen, **({"selector": selector} if method == "visionselector" else {})}
            batches = cached
            if cache is not None and _needs_pixels(method):
                batches = ExampleBatches(examples, processor, batch_size=batch_size, cache=cache, pixels=True)
            with vs.attached(model, method=method, retention=pruned[0] if pruned else 1.0, **options):
                model.eval()
                for retention in retentions:
                    if retention == 1.0:
                        finish(_record(method, 1.0, examples, full, metric, chosen), full)
                        continue
                    vs.set_retention(model, retention)
                    bar.set_postfix(method=method, retention=retention)
                    run = _run(model, processor, examples, batches, generation=generation, metric=metric,
                               attached=True, progress_bar=bar)
                    finish(_record(method, retention, examples, run, metric, chosen), run)
    finally:
        bar.close()
    return records


def format_table(records: list[QualityRecord], value: str = "accuracy") -> str:
    """A Markdown table: one row per method, one column per retention."""
    retentions = sorted({r.retention for r in records})
    methods = list(dict.fromkeys(r.method for r in records))
    cells = {(r.method, r.retention): r for r in records}
    formats = {"accuracy": lambda r: f"{100 * r.accuracy:.1f}", "tokens_kept": lambda r: f"{r.tokens_kept:.1f}",
               "prefill_ms": lambda r: f"{r.prefill_ms:.2f}"}
    if value not in formats:
        raise ValueError(f"value must be one of {', '.join(formats)}, got {value!r}")
    lines = ["| method | " + " | ".join(f"r={r:g}" for r in retentions) + " |",
             "| --- |" + " ---: |" * len(retentions)]
    for method in methods:
        lines.append(f"| {method} | " + " | ".join(
            formats[value](cells[method, r]) if (method, r) in cells else "" for r in retentions) + " |")
    return "\n".join(lines)


def plot_results(records: list[QualityRecord], path: str | Path, title: str = "accuracy vs retention") -> Path:
    """Accuracy against retention, one line per method (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.5), dpi=120)
    for method in dict.fromkeys(r.method for r in records):
        points = sorted((r.retention, 100 * r.accuracy) for r in records if r.method == method)
        style = dict(linewidth=2.5, marker="o") if method == "visionselector" else dict(linewidth=1.2, marker=".")
        axis.plot([p[0] for p in points], [p[1] for p in points], label=method, **style)
    axis.set_xscale("log")
    retentions = sorted({r.retention for r in records})
    axis.set_xticks(retentions, [f"{r:g}" for r in retentions])
    axis.minorticks_off()
    axis.set_xlabel("retention (fraction of visual tokens kept)")
    axis.set_ylabel("accuracy (%)")
    axis.set_title(title)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8, loc="lower right")
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path)
    plt.close(figure)
    return path


def write_results(records: list[QualityRecord], directory: str | Path, *, meta: dict | None = None,
                  predictions: list[dict] | None = None) -> dict[str, Path]:
    """Write ``results.json`` (a list of records), ``results.md`` (tables), ``accuracy.png`` and,
    given ``predictions``, ``predictions.jsonl`` (one line per example, method and retention)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rows = [asdict(r) for r in records]
    for row in rows:
        row.update({k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()})
    paths = {"json": directory / "results.json", "table": directory / "results.md", "plot": directory / "accuracy.png"}
    paths["json"].write_text(json.dumps(rows, indent=1) + "\n")
    text = ["# Accuracy (%)", "", format_table(records), "", "# Visual tokens kept per sample", "",
            format_table(records, "tokens_kept"), "", "# Prefill time per sample (ms)", "",
            format_table(records, "prefill_ms"), ""]
    if meta:
        text += ["# Run", "", "```json", json.dumps(meta, indent=1), "```", ""]
    paths["table"].write_text("\n".join(text))
    plot_results(records, paths["plot"])
    if predictions is not None:
        paths["predictions"] = directory / "predictions.jsonl"
        paths["predictions"].write_text("".join(json.dumps(p) + "\n" for p in predictions))
    return paths
