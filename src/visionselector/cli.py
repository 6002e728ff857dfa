"""Command line: ``visionselector demo | train | eval | show | methods | train-reference | bench | speed``."""

from __future__ import annotations

import argparse
import dataclasses
import sys


def _add_dataclass_arguments(parser: argparse.ArgumentParser, cls) -> None:
    for field in dataclasses.fields(cls):
        default = field.default
        flag = "--" + field.name.replace("_", "-")
        help_text = field.metadata.get("help", "") + f" (default: {default})"
        if isinstance(default, tuple):
            kind = (str if str(field.type).startswith("tuple[str") or default and isinstance(default[0], str)
                    else int if default and type(default[0]) is int else float)
            parser.add_argument(flag, type=kind, nargs="*" if not default else "+", default=default, help=help_text)
        elif isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help_text)
        else:
            kind = int if field.type in ("int", "int | None") else float if field.type == "float" else str
            if field.type == "int | None" or field.type == "str | None":
                kind = _optional(kind)
            parser.add_argument(flag, type=kind, default=default, help=help_text)


def _optional(kind):
    def parse(text: str):
        return None if text.lower() == "none" else kind(text)

    parse.__name__ = kind.__name__
    return parse


def _commands():
    """name -> (help, config class, runner), imported lazily so ``--help`` stays fast."""
    from .demo import DemoConfig, run_demo
    from .eval.bench import BenchConfig, run_bench
    from .eval.speed import SpeedConfig, run_speed
    from .pipeline import EvalConfig, ShowConfig, TrainConfig, run_eval, run_show, run_train

    return {
        "demo": ("the reference benchmark end to end: train a selector, evaluate every method, draw selections",
                 DemoConfig, run_demo),
        "train": ("train a VisionSelector scorer on a frozen model from conversation JSONL", TrainConfig, run_train),
        "eval": ("accuracy, tokens kept and prefill time of methods x retentions; table, JSON and plot",
                 EvalConfig, run_eval),
        "show": ("draw the visual tokens a method keeps on an image (PNG)", ShowConfig, run_show),
        "train-reference": ("train the DigitsVQA reference model from scratch", _reference_run_config(),
                            _run_train_reference),
        "bench": ("prefill speed, latency, memory and FLOPs per method and retention", BenchConfig, run_bench),
        "speed": ("attach a method to a random Qwen2.5-VL, generate, and time prefill", SpeedConfig, run_speed),
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="visionselector", description="Visual token selection for multimodal LLMs.")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("methods", help="list the selection methods")
    for name, (help_text, config_class, _) in _commands().items():
        _add_dataclass_arguments(commands.add_parser(name, help=help_text, description=help_text), config_class)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "methods":
        import inspect

        from .methods import list_methods
        from .methods.base import get_method_class, method_options

        for name, description in list_methods().items():
            options = ", ".join(f"{option}={default}" for option, default in method_options(get_method_class(name)).items()
                                if default is not inspect.Parameter.empty)
            print(f"{name:16} {description}" + (f" (options: {options})" if options else ""))
        return 0
    _, config_class, runner = _commands()[args.command]
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(config_class)}
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    try:
        _check_common(values)
        runner(config_class(**values))
    except (ValueError, FileNotFoundError, TypeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


def _check_common(values: dict) -> None:
    from .methods import list_methods

    known = list_methods()
    for name in ("method",):
        if name in values and values[name] not in known:
            raise ValueError(f"unknown method {values[name]!r}; known methods: {', '.join(known)}")
    for name in ("methods", "show_methods"):
        for method in values.get(name) or ():
            if method not in known and method != "all":
                raise ValueError(f"unknown method {method!r}; known methods: all, {', '.join(known)}")
    for name in ("retention", "retentions", "show_retention"):
        if name not in values or values[name] is None:
            continue
        for retention in values[name] if isinstance(values[name], tuple) else (values[name],):
            if not 0 < retention <= 1:
                raise ValueError(f"{name.replace('_', '-')} must be in (0, 1], got {retention}")


def _reference_run_config():
    from .data.reference_model import ReferenceConfig

    @dataclasses.dataclass
    class ReferenceRunConfig(ReferenceConfig):
        """Settings of ``visionselector train-reference``: the model's, and where the result goes."""

        out: str = dataclasses.field(default="reference-model", metadata={"help": "output directory"})
        test_samples: int = dataclasses.field(default=600, metadata={"help": "test examples for the final accuracy"})
        threads: int | None = dataclasses.field(default=None, metadata={"help": "torch CPU threads"})

    return ReferenceRunConfig


def _run_train_reference(config) -> None:
    """Train the reference model as ``config`` (a ``ReferenceRunConfig``) says; save, test and record it."""
    import json
    import time
    from pathlib import Path

    import torch

    from .data.reference_model import ReferenceConfig, evaluate_accuracy, export_reference, train_reference

    if config.threads:
        torch.set_num_threads(config.threads)
    started = time.time()
    reference = ReferenceConfig(**{f.name: getattr(config, f.name) for f in dataclasses.fields(ReferenceConfig)})
    model, processor, log = train_reference(reference, Path(config.out) / "checkpoints",
                                            print_fn=lambda line: print(line, flush=True))
    seconds = time.time() - started
    test = evaluate_accuracy(model, processor, "test", config.test_samples)
    print(json.dumps({"test": test}))
    export_reference(model, processor, config.out, training={
        "command": "visionselector " + " ".join(sys.argv[1:]), "config": dataclasses.asdict(reference),
        "threads": torch.get_num_threads(), "training_seconds": round(seconds, 1),
        "test_accuracy": test, "test_samples": config.test_samples, "log": log})
    print(f"wrote {config.out} ({seconds / 60:.1f} min of training; test accuracy {100 * test['all']:.1f}%)")


if __name__ == "__main__":
    sys.exit(main())
