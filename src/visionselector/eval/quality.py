"""Quality harness: accuracy, visual tokens kept, prefill time and prefill FLOPs of every row at every retention.

A row is a method, or a variant of one with its own options (``fastv@layer=0``): the
method ``fastv`` with ``layer=0``, labelled ``fastv@layer=0``. All rows run on the same
model, the same examples, the same prompts and the same greedy decoding; only the
visual tokens the language model reads differ. At retention 1.0 every method is an
exact no-op (the tests check this against the unpatched model), so that run is made
once, on the unpatched model, and shared by all rows.

Prefill FLOPs are counted analytically per sample (:mod:`visionselector.eval.flops`):
the language model at the lengths each decoder layer actually runs, plus the method's
own work (:meth:`~visionselector.methods.base.SelectionMethod.selection_flops`), and
reported beside the full-token count of the same samples.
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

__all__ = ["QualityRecord", "MethodVariant", "parse_method_spec", "parse_method_specs", "parse_method_options",
           "selectors_by_method", "resolve_rows", "evaluate_methods", "write_results", "format_table", "plot_results",
           "plot_flops", "references"]

DEFAULT_RETENTIONS = (0.05, 0.1, 0.2, 0.3, 0.5, 1.0)
# Between a method's name and its options in a row spec, and between options.
VARIANT_SEPARATOR, OPTION_SEPARATOR = "@", ","


@dataclass
class QualityRecord:
    """One (row, retention) cell of the comparison."""

    method: str = field(metadata={"help": "the row: a method name, or a variant NAME@OPTION=VALUE,... as written"})
    retention: float = field(metadata={"help": "fraction of visual tokens kept"})
    accuracy: float = field(metadata={"help": "mean score of the metric, 0 to 1"})
    tokens_kept: float = field(metadata={"help": "mean visual tokens the language model keeps per sample"})
    visual_tokens: float = field(metadata={"help": "mean visual tokens per sample before selection"})
    prefill_ms: float = field(metadata={"help": "mean prefill time per sample (selection and language model)"})
    samples: int = field(metadata={"help": "examples evaluated"})
    by_type: dict = field(default_factory=dict, metadata={"help": "accuracy per question type, if known"})
    options: dict = field(default_factory=dict, metadata={"help": "options the method ran with, beyond its defaults"})
    metric: str = field(default="exact", metadata={"help": "answer metric: exact, contains or anls"})
    base_method: str = field(default="", metadata={
        "help": "the registered method the row runs (the row label up to '@')"})
    prefill_flops: float = field(default=math.nan, metadata={
        "help": "mean prefill FLOPs per sample: the language model at the lengths its layers run, plus "
                "selection_flops (NaN where the language model's layout is not counted)"})
    selection_flops: float = field(default=math.nan, metadata={
        "help": "mean FLOPs per sample of the method's own work (0 at retention 1)"})
    flops_ratio: float = field(default=math.nan, metadata={
        "help": "prefill_flops over the full-token prefill FLOPs of the same samples (full = 1.0)"})

    def __post_init__(self) -> None:
        if not self.base_method:
            self.base_method = self.method.partition(VARIANT_SEPARATOR)[0]


@dataclass
class MethodVariant:
    """A row of the comparison: the method ``method`` with ``options``, labelled ``label``."""

    label: str
    method: str
    options: dict = field(default_factory=dict)


def _known_method(name: str, where: str):
    from ..methods.base import get_method_class, list_methods

    if name not in list_methods():
        raise ValueError(f"unknown method {name!r}{where}; known methods: {', '.join(list_methods())}")
    return get_method_class(name)


def _checked_option(method_class, option: str, where: str) -> None:
    from ..methods.base import method_options

    accepted = list(method_options(method_class))
    if option not in accepted:
        raise ValueError(f"method {method_class.name!r} has no option {option!r}{where}; its options: "
                         f"{', '.join(accepted) or 'none'}")


def parse_method_spec(spec: str) -> MethodVariant:
    """``"fastv@layer=0"`` -> ``MethodVariant("fastv@layer=0", "fastv", {"layer": 0})``.

    A spec is ``NAME`` or ``NAME@OPTION=VALUE[,OPTION=VALUE...]``: a registered method and
    options of its (``visionselector methods`` lists them). Values read as int, float,
    ``true``/``false``, ``none`` or else text, and are checked for the option's type and
    range (:func:`~visionselector.methods.base.check_options`). ``ValueError`` naming the
    problem and what is valid otherwise. The label is the spec as written.
    """
    from ..methods.base import check_options

    if not isinstance(spec, str) or not spec:
        raise ValueError(f"a method row must be NAME or NAME{VARIANT_SEPARATOR}OPTION=VALUE[,OPTION=VALUE...] "
                         f"(for example fastv{VARIANT_SEPARATOR}layer=0), got {spec!r}")
    name, separator, settings = spec.partition(VARIANT_SEPARATOR)
    where = f" (in {spec!r})" if separator else ""
    method_class = _known_method(name, where)
    if not separator:
        return MethodVariant(spec, name, {})
    options: dict = {}
    for item in settings.split(OPTION_SEPARATOR):
        option, equals, value = item.partition("=")
        if not (option and equals and value):
            raise ValueError(f"method row {spec!r}: {item!r} is not OPTION=VALUE; a row is "
                             f"NAME{VARIANT_SEPARATOR}OPTION=VALUE[,OPTION=VALUE...] (for example "
                             f"dart{VARIANT_SEPARATOR}layer=0,num_pivots=4)")
        _checked_option(method_class, option, where)
        if option in options:
            raise ValueError(f"method row {spec!r} sets option {option!r} twice")
        options[option] = _option_value(value)
    try:
        options = check_options(method_class, options)
    except ValueError as error:
        raise ValueError(f"method row {spec!r}: {error}") from None
    return MethodVariant(spec, name, options)


def parse_method_specs(specs, method_options: Mapping[str, Mapping] | None = None) -> list[MethodVariant]:
    """Every row of ``specs`` (:func:`parse_method_spec`), each with its effective options: its
    method's entry of ``method_options`` (``{"dart": {"layer": 0}}``), overridden by the
    options in its spec. ``ValueError`` for a row given twice or options for a method no row runs."""
    from ..methods.base import check_options

    rows = [parse_method_spec(spec) for spec in specs]
    labels = [row.label for row in rows]
    twice = sorted({label for label in labels if labels.count(label) > 1})
    if twice:
        raise ValueError(f"method row(s) {', '.join(map(repr, twice))} given more than once; each row is evaluated "
                         "once (give variants different options)")
    bases = list(dict.fromkeys(row.method for row in rows))
    method_options = dict(method_options or {})
    stray = [m for m in method_options if m not in bases]
    if stray:
        raise ValueError(f"options given for {', '.join(map(repr, stray))}, which is not evaluated; "
                         f"evaluated methods: {', '.join(bases)}")
    checked = {}
    for method, chosen in method_options.items():
        try:
            checked[method] = check_options(_known_method(method, ""), chosen)
        except TypeError as error:  # an unknown option's name
            raise ValueError(str(error)) from None
    return [MethodVariant(row.label, row.method, {**checked.get(row.method, {}), **row.options}) for row in rows]


def parse_method_options(items, methods) -> dict[str, dict]:
    """``["dart.layer=0", "fastv.layer=0"]`` -> ``{"dart": {"layer": 0}, "fastv": {"layer": 0}}``.

    Values read as int, float, ``true``/``false``, ``none`` or else text. Each method must be
    the method of one of the rows ``methods`` (names or ``NAME@...`` variants), each option
    one of that method's options, and each value of the option's type and in its range
    (:func:`~visionselector.methods.base.check_options`), so that a mistake stops the run
    before any model loads.
    """
    from ..methods.base import check_options, get_method_class

    evaluated = list(dict.fromkeys(str(m).partition(VARIANT_SEPARATOR)[0] for m in methods))
    options: dict[str, dict] = {}
    for item in items:
        name, _, value = item.partition("=")
        method, _, option = name.partition(".")
        if not (method and option and value):
            raise ValueError(f"method option {item!r} is not METHOD.OPTION=VALUE (for example dart.layer=0)")
        if method not in evaluated:
            raise ValueError(f"method option {item!r} is for {method!r}, which is not evaluated; "
                             f"evaluated methods: {', '.join(evaluated)}")
        _checked_option(get_method_class(method), option, "")
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


def selectors_by_method(selector) -> dict[str, str | os.PathLike]:
    """Trained selectors by the method each was saved for: ``{method: source}``.

    ``selector``: ``None``; one source (a folder written by ``save_selector``, a
    VisionSelector release, an AngelSlim scorer folder or a hub id); a list of them; or a
    mapping ``{method: source}``. Each source's config names its method
    (:func:`~visionselector.selector_sources.load_selector`), which must be a trainable
    method; two selectors for one method are refused.
    """
    from ..selector_sources import load_selector

    if selector is None:
        return {}
    if isinstance(selector, Mapping):
        pairs = list(selector.items())
    else:
        sources = [selector] if isinstance(selector, (str, os.PathLike)) else list(selector)
        pairs = [(load_selector(source)[0]["method"], source) for source in sources]
    chosen: dict[str, str | os.PathLike] = {}
    for method, source in pairs:
        method_class = _known_method(method, f" (the method of selector {source})")
        if not method_class.trainable:
            raise ValueError(f"selector {source} is for method {method!r}, which is training-free; selectors are "
                             "for trainable methods")
        if method in chosen:
            raise ValueError(f"selectors {chosen[method]} and {source} are both for method {method!r}; give one "
                             "selector per trainable method")
        chosen[method] = source
    return chosen


def resolve_rows(methods, method_options: Mapping[str, Mapping] | None = None, selector=None
                 ) -> tuple[list[MethodVariant], dict[str, str | os.PathLike]]:
    """The rows of ``methods`` with their effective options (:func:`parse_method_specs`) and the
    selectors by method (:func:`selectors_by_method`); ``ValueError`` if a row's method is
    trainable and no selector is for it. Reads no model: call it before loading one."""
    from ..methods.base import get_method_class

    rows = parse_method_specs(methods, method_options)
    selectors = selectors_by_method(selector)
    for method in dict.fromkeys(row.method for row in rows):
        if get_method_class(method).trainable and method not in selectors:
            given = f"; the selectors given are for {', '.join(selectors)}" if selectors else ""
            raise ValueError(f"method {method!r} needs a trained selector (a directory written by save_selector, "
                             f"whose config names {method!r}){given}")
    return rows, selectors


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
    """Greedy answers of every example in ``batches``: predictions, scores, prefill seconds and, per
    sample in batch order, its text tokens, visual tokens and visual tokens kept."""
    import visionselector as vs

    from ..data.encoding import placeholder_ids
    from .metrics import score

    device = model.get_input_embeddings().weight.device
    placeholders = torch.tensor(placeholder_ids(processor))
    result = {"predictions": [None] * len(examples), "scores": [None] * len(examples), "kept": [], "visual": [],
              "text": [], "seconds": 0.0}
    timer = _PrefillTimer(model)
    try:
        with torch.no_grad():
            for indices, batch in batches.epoch():
                inputs = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}
                timer.arm()
                output = model.generate(**inputs, **generation)
                result["seconds"] += timer.seconds
                counts = torch.isin(batch["input_ids"], placeholders).sum(1).tolist()
                mask = batch.get("attention_mask")
                lengths = (mask.sum(1).tolist() if mask is not None
                           else [batch["input_ids"].shape[1]] * len(counts))
                result["visual"].extend(counts)
                result["text"].extend(length - count for length, count in zip(lengths, counts))
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


def _run_flops(text_config, run: dict, method=None, retention: float = 1.0) -> dict[str, float]:
    """Mean prefill FLOPs per sample of a run, its method's share and the ratio to the full-token run.

    Per sample: the language model with ``text + kept`` tokens (layers ``0..K`` at
    ``text + visual`` for a method with ``prune_layer = K``), plus the method's
    ``selection_flops``; ``method=None`` is the full-token run. ``text_config=None`` (a
    language model the count does not cover) gives NaN.
    """
    from ..methods.base import check_value
    from ..ops.topk import token_budget
    from .flops import decoder_widths, sample_prefill_flops

    if text_config is None or not run["visual"]:
        return {"prefill_flops": math.nan, "selection_flops": math.nan, "flops_ratio": math.nan}
    hidden = decoder_widths(text_config)["hidden"]
    prune_layer = getattr(method, "prune_layer", None)
    budgets = token_budget(retention, torch.tensor(run["visual"])).tolist()
    full, total, selection = 0, 0, 0
    for text, visual, kept, budget in zip(run["text"], run["visual"], run["kept"], budgets):
        full += sample_prefill_flops(text_config, text=text, visual=visual, kept=visual)
        if method is None:
            continue
        own = 0
        if visual:
            own = check_value(f"selection_flops of method {method.name!r}",
                              method.selection_flops(visual=visual, hidden=hidden, budget=budget, prompt=text),
                              int, at_least=0)
        selection += own
        total += own + sample_prefill_flops(text_config, text=text, visual=visual, kept=kept, prune_layer=prune_layer)
    if method is None:
        total = full
    count = len(run["visual"])
    return {"prefill_flops": total / count, "selection_flops": selection / count,
            "flops_ratio": total / full if full else math.nan}


def _countable_text_config(model):
    """The language model's config if :mod:`.flops` covers its layout, else ``None`` (with a warning)."""
    from .flops import decoder_widths

    text_config = model.config.get_text_config()
    try:
        decoder_widths(text_config)
    except ValueError as error:
        warnings.warn(f"prefill FLOPs are not reported: {error}", stacklevel=3)
        return None
    return text_config


def _record(row: MethodVariant, retention, examples, run: dict, metric: str, flops: dict) -> QualityRecord:
    scores = run["scores"]
    by_type: dict[str, list[float]] = {}
    for example, value in zip(examples, scores):
        kind = example.extra.get("type")
        if isinstance(kind, str):
            by_type.setdefault(kind, []).append(value)
    return QualityRecord(
        method=row.label, retention=retention, accuracy=sum(scores) / len(scores),
        tokens_kept=sum(run["kept"]) / len(run["kept"]), visual_tokens=sum(run["visual"]) / len(run["visual"]),
        prefill_ms=1000 * run["seconds"] / len(scores), samples=len(scores),
        by_type={kind: sum(v) / len(v) for kind, v in sorted(by_type.items())}, options=dict(row.options),
        metric=metric, base_method=row.method, **flops,
    )


def _predictions(method, retention, examples, run: dict) -> list[dict]:
    return [{"id": e.id, "method": method, "retention": retention, "prediction": p, "answer": e.answer,
             "correct": s} for e, p, s in zip(examples, run["predictions"], run["scores"])]


def evaluate_methods(model, processor, examples, *, methods: list[str], retentions=DEFAULT_RETENTIONS,
                     selector=None, cache=None, batch_size: int = 32,
                     max_new_tokens: int | None = None, metric: str = "exact", progress: bool = True,
                     print_fn=None, method_options: dict[str, dict] | None = None,
                     predictions: list | None = None) -> list[QualityRecord]:
    """Evaluate every row at every retention; returns one :class:`QualityRecord` per pair.

    Args:
        model: a supported model, without a method attached.
        processor: the checkpoint's processor; prompts come from its chat template.
        examples: :class:`~visionselector.data.ConversationRecord` list; each is asked its
            conversation up to the last assistant turn, whose text is the reference answer
            (or the record's ``answers`` list).
        methods: rows: registered method names, or variants ``NAME@OPTION=VALUE[,...]``
            (``fastv@layer=0``: ``fastv`` with ``layer=0``, its label as written); a
            trainable method's rows need a selector for it.
        retentions: values in (0, 1].
        selector: trained selectors (see :func:`selectors_by_method`): one source, a list
            of sources (each for the method its config names) or ``{method: source}``;
            every row of a trainable method runs with its method's selector.
        cache: a :class:`~visionselector.data.batches.FeatureCache` of ``examples``; methods
            that read the encoder's attention run from pixels regardless.
        max_new_tokens: answer length limit (default: the longest reference answer in
            tokens, plus one).
        metric: ``exact``, ``contains`` or ``anls`` (:mod:`visionselector.eval.metrics`).
        print_fn: called with each finished record's one-line summary.
        method_options: per method, options for its constructor (``{"dart": {"layer": 0}}``),
            under each row's own options; each record keeps its row's effective options.
        predictions: if given, a list that receives one dict per example, row and retention
            (``id``, ``method`` (the row label), ``retention``, ``prediction``, ``answer``, ``correct``).

    Each record's ``prefill_flops`` is the mean per sample of the language model's prefill
    FLOPs at the lengths its layers run plus the method's ``selection_flops``, and
    ``flops_ratio`` its ratio to the full-token count of the same samples
    (:mod:`visionselector.eval.flops`).
    """
    import visionselector as vs
    from tqdm.auto import tqdm

    from ..data.batches import ExampleBatches
    from ..models import greedy_settings
    from ..ops.topk import validate_retention
    from .metrics import METRICS

    # Checked now: each row is attached only after the full-token run.
    rows, selectors = resolve_rows(methods, method_options, selector)
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; metrics: {', '.join(METRICS)}")
    retentions = sorted({validate_retention(r) for r in retentions})
    if vs.is_attached(model):
        raise RuntimeError("detach the selection method first; the harness attaches each method itself")
    if max_new_tokens is None:
        max_new_tokens = 1 + max(len(processor.tokenizer(answer, add_special_tokens=False)["input_ids"])
                                 for e in examples for answer in references(e))
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    generation = greedy_settings(model, processor, max_new_tokens)
    text_config = _countable_text_config(model)
    model.eval()
    pruned = [r for r in retentions if r < 1]
    total = len(examples) * (len(rows) * len(pruned) + (1.0 in retentions))
    bar = tqdm(total=total, desc="evaluating", unit="answer", disable=not progress)
    records = []
    collected = predictions if predictions is not None else []

    def finish(record, run):
        records.append(record)
        collected.extend(_predictions(record.method, record.retention, examples, run))
        if print_fn is not None:
            print_fn(f"{record.method:>15} r={record.retention:<5g} {metric} {100 * record.accuracy:5.1f}%  "
                     f"tokens {record.tokens_kept:6.1f}  prefill {record.prefill_ms:7.2f} ms/sample  "
                     f"FLOPs {_finite(record.flops_ratio, lambda v: f'{100 * v:5.1f}%')} of full")

    try:
        cached = ExampleBatches(examples, processor, batch_size=batch_size, cache=cache)
        full = full_flops = None
        if 1.0 in retentions:
            bar.set_postfix(method="(all tokens)")
            full = _run(model, processor, examples, cached, generation=generation, metric=metric, attached=False,
                        progress_bar=bar)
            full_flops = _run_flops(text_config, full)
        for row in rows:
            options = dict(row.options)
            if row.method in selectors:
                options["selector"] = selectors[row.method]
            batches = cached
            if cache is not None and _needs_pixels(row.method):
                batches = ExampleBatches(examples, processor, batch_size=batch_size, cache=cache, pixels=True)
            with vs.attached(model, method=row.method, retention=pruned[0] if pruned else 1.0, **options):
                model.eval()
                method = vs.get_method(model)
                for retention in retentions:
                    if retention == 1.0:
                        finish(_record(row, 1.0, examples, full, metric, full_flops), full)
                        continue
                    vs.set_retention(model, retention)
                    bar.set_postfix(method=row.label, retention=retention)
                    run = _run(model, processor, examples, batches, generation=generation, metric=metric,
                               attached=True, progress_bar=bar)
                    finish(_record(row, retention, examples, run, metric,
                                   _run_flops(text_config, run, method, retention)), run)
    finally:
        bar.close()
    return records


def _flops_text(value: float) -> str:
    """``1.23e9`` -> ``"1.23 G"``: FLOPs with an SI prefix."""
    for scale, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.3g} {prefix}"
    return f"{value:.3g}"


def _finite(value: float, text) -> str:
    return text(value) if isinstance(value, (int, float)) and math.isfinite(value) else "n/a"


TABLE_VALUES = {
    "accuracy": lambda r: f"{100 * r.accuracy:.1f}",
    "tokens_kept": lambda r: f"{r.tokens_kept:.1f}",
    "prefill_ms": lambda r: f"{r.prefill_ms:.2f}",
    "flops_ratio": lambda r: _finite(r.flops_ratio, lambda v: f"{100 * v:.1f}"),
    "prefill_flops": lambda r: _finite(r.prefill_flops, _flops_text),
}


def format_table(records: list[QualityRecord], value: str = "accuracy") -> str:
    """A Markdown table: one row per method row, one column per retention.

    ``value``: ``accuracy`` (%), ``tokens_kept``, ``prefill_ms``, ``flops_ratio`` (prefill
    FLOPs as % of the full-token run) or ``prefill_flops`` (per sample, with an SI prefix).
    """
    retentions = sorted({r.retention for r in records})
    methods = list(dict.fromkeys(r.method for r in records))
    cells = {(r.method, r.retention): r for r in records}
    if value not in TABLE_VALUES:
        raise ValueError(f"value must be one of {', '.join(TABLE_VALUES)}, got {value!r}")
    lines = ["| method | " + " | ".join(f"r={r:g}" for r in retentions) + " |",
             "| --- |" + " ---: |" * len(retentions)]
    for method in methods:
        lines.append(f"| {method} | " + " | ".join(
            TABLE_VALUES[value](cells[method, r]) if (method, r) in cells else "" for r in retentions) + " |")
    return "\n".join(lines)


def _line_style(record: QualityRecord) -> dict:
    """Trainable methods' rows drawn bold, the rest thin."""
    from ..methods.base import get_method_class

    try:
        trainable = get_method_class(record.base_method).trainable
    except ValueError:  # records of a method not registered in this process
        trainable = False
    return dict(linewidth=2.5, marker="o") if trainable else dict(linewidth=1.2, marker=".")


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.5), dpi=120)
    return plt, figure, axis


def _save(plt, figure, axis, path) -> Path:
    axis.grid(alpha=0.3)
    if axis.get_legend_handles_labels()[0]:
        axis.legend(fontsize=8, loc="lower right")
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path)
    plt.close(figure)
    return path


def plot_results(records: list[QualityRecord], path: str | Path, title: str = "accuracy vs retention") -> Path:
    """Accuracy against retention, one line per row (PNG)."""
    plt, figure, axis = _figure()
    for method in dict.fromkeys(r.method for r in records):
        rows = [r for r in records if r.method == method]
        points = sorted((r.retention, 100 * r.accuracy) for r in rows)
        axis.plot([p[0] for p in points], [p[1] for p in points], label=method, **_line_style(rows[0]))
    axis.set_xscale("log")
    retentions = sorted({r.retention for r in records})
    axis.set_xticks(retentions, [f"{r:g}" for r in retentions])
    axis.minorticks_off()
    axis.set_xlabel("retention (fraction of visual tokens kept)")
    axis.set_ylabel("accuracy (%)")
    axis.set_title(title)
    return _save(plt, figure, axis, path)


def plot_flops(records: list[QualityRecord], path: str | Path,
               title: str = "accuracy vs prefill FLOPs") -> Path:
    """Accuracy against prefill FLOPs as % of the full-token run, one line per row through its
    retentions (PNG): the cost/quality trade-off, where up and to the left is better. Records
    without a FLOP count are left out."""
    plt, figure, axis = _figure()
    counted = [r for r in records if math.isfinite(r.flops_ratio)]
    for method in dict.fromkeys(r.method for r in counted):
        rows = [r for r in counted if r.method == method]
        points = sorted((100 * r.flops_ratio, 100 * r.accuracy) for r in rows)
        axis.plot([p[0] for p in points], [p[1] for p in points], label=method, **_line_style(rows[0]))
    if not counted:
        axis.text(0.5, 0.5, "no prefill FLOP count for this language model", ha="center", va="center",
                  transform=axis.transAxes)
    axis.set_xlim(0, 105)
    axis.set_xlabel("prefill FLOPs (% of the full-token run; language model and selection)")
    axis.set_ylabel("accuracy (%)")
    axis.set_title(title)
    return _save(plt, figure, axis, path)


def write_results(records: list[QualityRecord], directory: str | Path, *, meta: dict | None = None,
                  predictions: list[dict] | None = None) -> dict[str, Path]:
    """Write ``results.json`` (a list of records), ``results.md`` (tables), ``accuracy.png``
    (accuracy vs retention), ``accuracy_vs_flops.png`` (accuracy vs prefill FLOPs) and, given
    ``predictions``, ``predictions.jsonl`` (one line per example, row and retention).

    Returns the paths under the keys ``json``, ``table``, ``plot``, ``flops_plot`` and ``predictions``.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rows = [asdict(r) for r in records]
    for row in rows:
        row.update({k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()})
    paths = {"json": directory / "results.json", "table": directory / "results.md", "plot": directory / "accuracy.png",
             "flops_plot": directory / "accuracy_vs_flops.png"}
    paths["json"].write_text(json.dumps(rows, indent=1) + "\n")
    text = ["# Accuracy (%)", "", format_table(records), "", "# Visual tokens kept per sample", "",
            format_table(records, "tokens_kept"), "", "# Prefill time per sample (ms)", "",
            format_table(records, "prefill_ms"), "",
            "# Prefill FLOPs per sample (% of the full-token run; language model and selection)", "",
            format_table(records, "flops_ratio"), ""]
    if meta:
        text += ["# Run", "", "```json", json.dumps(meta, indent=1), "```", ""]
    paths["table"].write_text("\n".join(text))
    plot_results(records, paths["plot"])
    plot_flops(records, paths["flops_plot"])
    if predictions is not None:
        paths["predictions"] = directory / "predictions.jsonl"
        paths["predictions"].write_text("".join(json.dumps(p) + "\n" for p in predictions))
    return paths
