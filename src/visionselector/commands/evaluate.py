"""``visionselector eval``: accuracy, tokens kept, prefill time and prefill FLOPs of rows (methods and
their variants, ``fastv@layer=0``) x retentions."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import torch

from .common import MODEL_HELP, check_file, check_output_folder, model_and_processor, set_threads

__all__ = ["EvalConfig", "run_eval", "ALL_METHODS"]

ALL_METHODS = "all"


@dataclass
class EvalConfig:
    """Settings of ``visionselector eval``."""

    data: str = field(default="", metadata={"help": "evaluation conversations (LLaVA / Cambrian JSONL)"})
    image_folder: str | None = field(default=None, metadata={
        "help": "folder that relative image and video paths start from (default: the JSONL file's folder)"})
    out: str = field(default="results", metadata={
        "help": "output directory: results.json, results.md, accuracy.png, accuracy_vs_flops.png, predictions.jsonl"})
    model: str = field(default="reference", metadata={"help": MODEL_HELP})
    selector: tuple[str, ...] | str | None = field(default=(), metadata={
        "help": "trained selectors, one per trainable method: our folder, a VisionSelector release folder or a hub "
                "id; each selector's config names its method, and every row of that method uses it"})
    methods: tuple[str, ...] = field(default=(ALL_METHODS,), metadata={
        "help": "rows to compare: method names, variants NAME@OPTION=VALUE[,OPTION=VALUE...] (e.g. fastv "
                "fastv@layer=0 dart@layer=0,num_pivots=4; a variant is labelled as written), or 'all': every "
                "trainable method given a --selector, then every training-free method"})
    retentions: tuple[float, ...] = field(default=(0.05, 0.1, 0.2, 0.3, 0.5, 1.0), metadata={"help": "retentions"})
    method_options: tuple[str, ...] = field(default=(), metadata={
        "help": "options of the evaluated methods as METHOD.OPTION=VALUE, e.g. dart.layer=0 fastv.layer=0 "
                "(the decoder layer they prune after), for every row of that method; a variant's own options "
                "override them; 'visionselector methods' lists each method's options"})
    metric: str = field(default="exact", metadata={
        "help": "answer metric: exact (after normalising case, outer whitespace and final punctuation), "
                "contains (the reference occurs in the answer) or anls (DocVQA's)"})
    max_new_tokens: int | None = field(default=None, metadata={
        "help": "answer length limit in tokens (default: the longest reference answer plus one)"})
    batch_size: int = field(default=32, metadata={"help": "examples per generate call"})
    limit: int | None = field(default=None, metadata={"help": "use only the first N examples"})
    cache_features: bool = field(default=True, metadata={"help": "encode each image once for all methods"})
    threads: int | None = field(default=None, metadata={"help": "torch CPU threads (default: torch's choice)"})
    progress: bool = field(default=True, metadata={"help": "show progress bars"})


def _selector_sources(selector) -> list[str]:
    """``--selector`` as a list: one path (as the API and older callers give it) or several."""
    if selector is None:
        return []
    if isinstance(selector, (str, os.PathLike)):
        return [str(selector)]
    return [str(source) for source in selector]


def _method_list(methods, selectors) -> list[str]:
    """The rows to evaluate: ``methods`` with ``all`` expanded to every trainable method that has a
    selector in ``selectors`` (``{method: source}``, in that order), then every training-free
    method; each row once, in order."""
    from ..methods import list_methods
    from ..methods.base import get_method_class

    rows = []
    for spec in methods:
        if spec == ALL_METHODS:
            rows += [m for m in selectors if get_method_class(m).trainable]
            rows += [m for m in list_methods() if not get_method_class(m).trainable]
        else:
            rows.append(spec)
    return list(dict.fromkeys(rows))


def run_eval(config: EvalConfig, *, model=None, processor=None, print_fn=print) -> dict:
    """Evaluate methods x retentions; writes and returns the results."""
    from ..data.batches import FeatureCache, load_examples
    from ..eval.metrics import METRICS
    from ..eval.quality import (evaluate_methods, format_table, parse_method_options, resolve_rows,
                                selectors_by_method, write_results)

    if config.batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {config.batch_size}")
    if config.metric not in METRICS:
        raise ValueError(f"unknown metric {config.metric!r}; metrics: {', '.join(METRICS)}")
    if config.max_new_tokens is not None and config.max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {config.max_new_tokens}")
    set_threads(config.threads)
    data = check_file(config.data, "evaluation data")
    out = check_output_folder(config.out)
    selectors = selectors_by_method(_selector_sources(config.selector))
    methods = _method_list(config.methods, selectors)
    method_options = parse_method_options(config.method_options, methods)
    resolve_rows(methods, method_options, selectors)  # every row and its selector checked before the model loads
    examples = load_examples(data, config.limit, image_folder=config.image_folder)
    model, processor = model_and_processor(config.model, model, processor)
    started = time.time()
    cache = FeatureCache(model, processor, examples, progress=config.progress) if config.cache_features else None
    images = sum(len(e.images) for e in examples)
    encode_seconds = time.time() - started
    print_fn(f"evaluating {', '.join(methods)} at retentions {', '.join(f'{r:g}' for r in config.retentions)} "
             f"on {len(examples)} examples of {data} ({config.metric})")
    predictions: list[dict] = []
    records = evaluate_methods(model, processor, examples, methods=methods, retentions=config.retentions,
                               selector=selectors, cache=cache, batch_size=config.batch_size,
                               max_new_tokens=config.max_new_tokens, metric=config.metric,
                               progress=config.progress, print_fn=print_fn if not config.progress else None,
                               method_options=method_options, predictions=predictions)
    meta = {"data": str(data), "examples": len(examples), "model": config.model,
            "selectors": {method: str(source) for method, source in selectors.items()},
            "metric": config.metric, "method_options": method_options, "threads": torch.get_num_threads(),
            "encoder_ms_per_image": round(1000 * encode_seconds / images, 2) if cache is not None and images else None,
            "seconds": round(time.time() - started, 1)}
    paths = write_results(records, out, meta=meta, predictions=predictions)
    print_fn("")
    print_fn(f"{config.metric} accuracy (%), by method and retention:")
    print_fn(format_table(records))
    print_fn("")
    print_fn("visual tokens kept per sample:")
    print_fn(format_table(records, "tokens_kept"))
    print_fn("")
    print_fn("prefill ms per sample (selection + language model; the vision encoder, "
             f"{meta['encoder_ms_per_image']} ms per image, is the same for every method):")
    print_fn(format_table(records, "prefill_ms"))
    print_fn("")
    print_fn("prefill FLOPs per sample, % of the full-token run (language model at the lengths its layers run, "
             "plus the selection's own work):")
    print_fn(format_table(records, "flops_ratio"))
    print_fn("")
    print_fn(f"wrote {paths['json']}, {paths['table']}, {paths['plot']} (accuracy vs retention), "
             f"{paths['flops_plot']} (accuracy vs prefill FLOPs) and {paths['predictions']}")
    return {"records": records, "paths": paths, "meta": meta}
