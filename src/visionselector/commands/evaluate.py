"""``visionselector eval``: accuracy, tokens kept and prefill time of methods x retentions."""

from __future__ import annotations

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
        "help": "output directory: results.json, results.md, accuracy.png, predictions.jsonl"})
    model: str = field(default="reference", metadata={"help": MODEL_HELP})
    selector: str | None = field(default=None, metadata={
        "help": "trained selector for visionselector: our folder, a VisionSelector release folder or a hub id"})
    methods: tuple[str, ...] = field(default=(ALL_METHODS,), metadata={"help": "methods to compare, or 'all'"})
    retentions: tuple[float, ...] = field(default=(0.05, 0.1, 0.2, 0.3, 0.5, 1.0), metadata={"help": "retentions"})
    method_options: tuple[str, ...] = field(default=(), metadata={
        "help": "options of the evaluated methods as METHOD.OPTION=VALUE, e.g. dart.layer=0 fastv.layer=0 "
                "(the decoder layer they prune after); 'visionselector methods' lists each method's options"})
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


def _method_list(methods, selector) -> list[str]:
    from ..methods import list_methods

    names = list(methods)
    if ALL_METHODS in names:
        names = [m for m in list_methods() if m != "visionselector" or selector is not None]
        if selector is not None:
            names = ["visionselector"] + [m for m in names if m != "visionselector"]
    return names


def run_eval(config: EvalConfig, *, model=None, processor=None, print_fn=print) -> dict:
    """Evaluate methods x retentions; writes and returns the results."""
    from ..data.batches import FeatureCache, load_examples
    from ..eval.metrics import METRICS
    from ..eval.quality import evaluate_methods, format_table, parse_method_options, write_results

    if config.batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {config.batch_size}")
    if config.metric not in METRICS:
        raise ValueError(f"unknown metric {config.metric!r}; metrics: {', '.join(METRICS)}")
    if config.max_new_tokens is not None and config.max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {config.max_new_tokens}")
    set_threads(config.threads)
    data = check_file(config.data, "evaluation data")
    out = check_output_folder(config.out)
    methods = _method_list(config.methods, config.selector)
    method_options = parse_method_options(config.method_options, methods)
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
                               selector=config.selector, cache=cache, batch_size=config.batch_size,
                               max_new_tokens=config.max_new_tokens, metric=config.metric,
                               progress=config.progress, print_fn=print_fn if not config.progress else None,
                               method_options=method_options, predictions=predictions)
    meta = {"data": str(data), "examples": len(examples), "model": config.model, "selector": config.selector,
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
    print_fn(f"wrote {paths['json']}, {paths['table']}, {paths['plot']} and {paths['predictions']}")
    return {"records": records, "paths": paths, "meta": meta}
