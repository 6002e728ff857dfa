"""``visionselector demo``: the reference benchmark, end to end, on a CPU.

1. Load the shipped reference model (a small Qwen2.5-VL trained on DigitsVQA).
2. Write a DigitsVQA training set and the test split as conversation JSONL.
3. Train a VisionSelector scorer at retention 0.2 on the frozen model, to show the pipeline.
4. Evaluate the shipped selectors (the paper's VisionSelector, with and without MMR
   diversity, and the question-aware VisionSelector-Q), the one trained in step 3 and every
   training-free method (FastV and DART also at the depth-matched layer 0) at every
   retention on the test split: accuracy, tokens kept, prefill time and FLOPs.
5. Draw what a few methods keep on a few test images.

Everything lands in one folder: ``results.md``, ``results.json``, ``accuracy.png``, the
``show/`` pictures, the selector and the data.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field

import torch

from .common import check_count, check_output_folder, check_positive, set_threads

__all__ = ["DemoConfig", "run_demo"]

# The reference model trained on train-split samples below this index; the selector's
# training set starts here so that it draws samples the model has not seen.
SELECTOR_TRAIN_FIRST = 100_000


@dataclass
class DemoConfig:
    """Settings of :func:`run_demo`."""

    out: str = field(default="demo-output", metadata={"help": "output folder"})
    train_samples: int = field(default=2000, metadata={"help": "DigitsVQA training examples for the selector"})
    test_samples: int = field(default=480, metadata={"help": "test-split examples to evaluate on"})
    retention: float = field(default=0.2, metadata={"help": "retention the selector trains at"})
    epochs: float = field(default=1.0, metadata={"help": "selector training passes over its examples"})
    learning_rate: float = field(default=1e-3, metadata={"help": "selector learning rate"})
    batch_size: int = field(default=16, metadata={"help": "selector training batch"})
    retentions: tuple[float, ...] = field(default=(0.05, 0.1, 0.2, 0.3, 0.5, 1.0), metadata={"help": "retentions to evaluate"})
    show_examples: int = field(default=2, metadata={"help": "test examples drawn with their kept tokens"})
    show_methods: tuple[str, ...] = field(default=("visionselector_q", "visionselector", "divprune", "cdpruner"),
                                          metadata={"help": "methods drawn (learned ones with their shipped selector)"})
    show_retention: float = field(default=0.1, metadata={"help": "retention of the drawings"})
    model: str = field(default="reference", metadata={"help": "'reference' or a reference checkpoint folder"})
    threads: int | None = field(default=None, metadata={"help": "torch CPU threads (default: torch's choice)"})
    seed: int = field(default=0, metadata={"help": "seed of the selector's weights and data order"})
    progress: bool = field(default=True, metadata={"help": "show progress bars"})


def run_demo(config: DemoConfig | None = None, *, print_fn=print) -> dict:
    """Run the whole benchmark; returns the result records and the paths written."""
    from ..models import load_model
    from ..reference.task import write_split
    from ..eval.quality import write_results
    from .evaluate import EvalConfig, run_eval
    from .show import ShowConfig, run_show
    from .train import TrainConfig, run_train

    config = config or DemoConfig()
    _check(config)
    set_threads(config.threads)
    started = time.time()
    out = check_output_folder(config.out)
    data = out / "data"
    model, processor = load_model(config.model)
    parameters = sum(p.numel() for p in model.parameters())
    print_fn(f"reference model: Qwen2.5-VL, {parameters / 1e6:.2f}M parameters, "
             f"{model.config.text_config.num_hidden_layers} decoder layers of width {model.config.text_config.hidden_size}; "
             f"{torch.get_num_threads()} CPU threads")

    print_fn(f"[1/4] writing {config.train_samples} training and {config.test_samples} test examples to {data}")
    train_file = write_split(data, "train", config.train_samples, first=SELECTOR_TRAIN_FIRST, name="selector_train",
                             progress=config.progress)
    test_file = write_split(data, "test", config.test_samples, progress=config.progress)

    print_fn("[2/4] training the selector")
    selector = out / "selector"
    trained = run_train(TrainConfig(data=str(train_file), out=str(selector), model=config.model,
                                    retention=config.retention, epochs=config.epochs, batch_size=config.batch_size,
                                    learning_rate=config.learning_rate, seed=config.seed, progress=config.progress,
                                    overwrite=True),
                        model=model, processor=processor, print_fn=print_fn)

    print_fn("[3/4] evaluating every method at every retention")
    shipped = _shipped(config.model)
    rows = [*(["visionselector_q", "visionselector_q@merge=false"] if "visionselector_q" in shipped else []),
            *(["visionselector", "visionselector@diversity=0.5"] if "visionselector" in shipped else []),
            *TRAINING_FREE_ROWS]
    evaluated = run_eval(EvalConfig(data=str(test_file), out=str(out / "shipped"), model=config.model,
                                    selector=tuple(str(shipped[m]) for m in shipped), methods=tuple(rows),
                                    retentions=config.retentions, progress=config.progress),
                         model=model, processor=processor, print_fn=print_fn)
    fresh = run_eval(EvalConfig(data=str(test_file), out=str(out / "trained"), model=config.model,
                                selector=str(selector), methods=("visionselector",), retentions=config.retentions,
                                progress=config.progress),
                     model=model, processor=processor, print_fn=lambda *_: None)
    records = list(evaluated["records"])
    for record in fresh["records"]:
        record.method = TRAINED_ROW
        records.append(record)
    paths = write_results(records, out, meta={**evaluated["meta"], "trained_selector": str(selector),
                                              "shipped_selectors": {m: str(p) for m, p in shipped.items()}})

    print_fn(f"[4/4] drawing kept tokens at retention {config.show_retention:g}")
    pictures = []
    for index in range(config.show_examples):
        for method in config.show_methods:
            path = out / "show" / f"test{index}_{method}_r{config.show_retention:g}.png"
            pictures.append(run_show(ShowConfig(out=str(path), model=config.model, method=method,
                                                retention=config.show_retention,
                                                selector=str(shipped[method]) if method in shipped else None,
                                                data=str(test_file), index=index),
                                     model=model, processor=processor, print_fn=lambda *_: None))
    seconds = time.time() - started
    summary = _targets(records)
    (out / "demo.json").write_text(json.dumps({"config": asdict(config), "seconds": round(seconds, 1),
                                               "threads": torch.get_num_threads(),
                                               "selector_training_seconds": round(trained["seconds"], 1),
                                               "targets": summary}, indent=1) + "\n")
    print_fn("")
    for line in summary["lines"]:
        print_fn(line)
    print_fn("")
    print_fn(f"done in {seconds / 60:.1f} min. In {out}:")
    print_fn("  results.md      the tables              results.json  one record per row and retention")
    print_fn("  accuracy.png    accuracy vs retention   accuracy_vs_flops.png  accuracy vs prefill FLOPs")
    print_fn(f"  show/           kept tokens of {len(pictures)} runs   selector/     the selector trained now")
    print_fn("  shipped/, trained/  each run's own tables and every answer (predictions.jsonl)   data/  the examples")
    return {"records": records, "paths": paths, "pictures": pictures, "seconds": seconds, "targets": summary}


def _check(config: DemoConfig) -> None:
    """Every setting, before minutes of data writing and training."""
    from ..methods import list_methods
    from ..ops.topk import validate_retention

    for name in ("train_samples", "test_samples", "batch_size"):
        check_count(name, getattr(config, name))
    check_count("show_examples", config.show_examples, 0)
    if config.show_examples > config.test_samples:
        raise ValueError(f"show_examples ({config.show_examples}) must be at most test_samples "
                         f"({config.test_samples}): the drawings are of test examples")
    check_positive("epochs", config.epochs)
    check_positive("learning_rate", config.learning_rate)
    if isinstance(config.seed, bool) or not isinstance(config.seed, int) or not 0 <= config.seed < 2**64:
        raise ValueError(f"seed must be an integer in [0, 2**64), got {config.seed!r}")
    for retention in (config.retention, config.show_retention, *config.retentions):
        validate_retention(retention)
    for method in config.show_methods:
        if method not in list_methods():
            raise ValueError(f"unknown method {method!r} in show_methods; known methods: {', '.join(list_methods())}")


def _shipped(model: str) -> dict:
    """Method -> shipped selector folder, for the shipped reference model only (another
    checkpoint's hidden size would not fit them)."""
    from ..models import REFERENCE_MODEL
    from ..reference import shipped_selector, shipped_selectors

    if model != REFERENCE_MODEL:
        return {}
    names = shipped_selectors()
    return {method: shipped_selector(method) for method in ("visionselector_q", "visionselector") if method in names}


def _targets(records) -> dict:
    """How the question-aware selector fares against full tokens, the paper's method and the best
    training-free row at its depth-matched setting (rows that prune before layer 1)."""
    cells = {(r.method, r.retention): r.accuracy for r in records}
    full = next((r.accuracy for r in records if r.retention == 1.0), None)
    lines, result = [], {"full_accuracy": full}
    learned = "visionselector_q"
    if (learned, 0.3) in cells and full:
        share = cells[learned, 0.3] / full
        result["share_of_full_at_0.3"] = share
        lines.append(f"{learned} at retention 0.3 keeps {100 * share:.1f}% of the full-token accuracy "
                     f"({100 * cells[learned, 0.3]:.1f}% vs {100 * full:.1f}%)")
    matched = [m for m in dict.fromkeys(r.method for r in records)
               if m in TRAINING_FREE_ROWS and m not in ("fastv", "dart")]
    for retention in (0.05, 0.1, 0.2):
        if (learned, retention) not in cells:
            continue
        best = max((m for m in matched if (m, retention) in cells), key=lambda m: cells[m, retention], default=None)
        if best is None:
            continue
        margin = cells[learned, retention] - cells[best, retention]
        result[f"margin_at_{retention:g}"] = {"best_training_free": best, "points": 100 * margin}
        paper = cells.get(("visionselector", retention))
        lines.append(f"at retention {retention:g} {learned} scores {100 * cells[learned, retention]:.1f}%: "
                     f"{100 * margin:+.1f} points against the best depth-matched training-free row ({best}, "
                     f"{100 * cells[best, retention]:.1f}%)" + (f", the paper's scorer {100 * paper:.1f}%"
                                                                 if paper is not None else ""))
    result["lines"] = lines
    return result


# Every training-free method, FastV and DART also at layer 0: on the 4-layer reference model that
# is the fraction of depth their default layer 2 is of Qwen2.5-VL-7B's 28 layers. DivPrune and
# CDPruner also merge, as the shipped VisionSelector-Q does, so that no row wins by merging alone.
TRAINING_FREE_ROWS = ("cdpruner", "divprune", "cdpruner@merge=true", "divprune@merge=true", "dart", "dart@layer=0",
                      "fastv", "fastv@layer=0", "visionzip", "random", "uniform", "pool")
TRAINED_ROW = "visionselector (trained now)"
