"""Command line: ``visionselector demo | train | eval | show | methods | train-reference | bench | convert``."""

from __future__ import annotations

import argparse
import dataclasses
import sys


def _add_dataclass_arguments(parser: argparse.ArgumentParser, cls) -> None:
    for field in dataclasses.fields(cls):
        if field.metadata.get("positional"):
            # a required operand given in order without a flag (``convert SOURCE OUT``); strings only
            parser.add_argument(field.name, metavar=field.name.upper(), help=field.metadata.get("help", ""))
            continue
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
    from .commands.demo import DemoConfig, run_demo
    from .commands.evaluate import EvalConfig, run_eval
    from .commands.show import ShowConfig, run_show
    from .commands.train import TrainConfig, run_train
    from .commands.train_reference import ReferenceRunConfig, run_train_reference
    from .eval.bench import BenchConfig, run_bench
    from .selector_sources import ConvertConfig, run_convert

    return {
        "demo": ("the reference benchmark end to end: train a selector, evaluate every method, draw selections",
                 DemoConfig, run_demo),
        "train": ("train a VisionSelector scorer on a frozen model from conversation JSONL", TrainConfig, run_train),
        "eval": ("accuracy, tokens kept, prefill time and prefill FLOPs of methods and their variants "
                 "(fastv@layer=0) x retentions; tables, JSON and plots",
                 EvalConfig, run_eval),
        "show": ("draw the visual tokens a method keeps on an image (PNG)", ShowConfig, run_show),
        "train-reference": ("train the DigitsVQA reference model from scratch", ReferenceRunConfig,
                            run_train_reference),
        "bench": ("prefill speed, latency, memory and FLOPs per method and retention", BenchConfig, run_bench),
        "convert": ("write a selector (ours, a VisionSelector release or an AngelSlim scorer; folder or hub id) "
                    "in visionselector's format", ConvertConfig, run_convert),
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="visionselector", description="Visual token selection for multimodal LLMs.")
    commands = parser.add_subparsers(dest="command", required=True)
    methods = commands.add_parser("methods", help="list the selection methods")
    methods.add_argument("--matrix", action="store_true",
                         help="print which method runs on which model family (Markdown), with the reasons")
    for name, (help_text, config_class, _) in _commands().items():
        _add_dataclass_arguments(commands.add_parser(name, help=help_text, description=help_text), config_class)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "methods":
        import inspect

        from .methods import list_methods
        from .methods.base import get_method_class, method_options

        if args.matrix:
            from .adapters import support_matrix

            print(support_matrix())
            return 0
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
    except (ValueError, TypeError, OSError) as error:
        # What users get wrong (values, paths, files, permissions): one line, not a traceback.
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
                if name == "methods" and "@" in method:
                    from .eval.quality import parse_method_spec

                    parse_method_spec(method)  # a variant NAME@OPTION=VALUE,...: names what is wrong in it
                    continue
                raise ValueError(f"unknown method {method!r}; known methods: all, {', '.join(known)}")
    for name in ("retention", "retentions", "show_retention"):
        if name not in values or values[name] is None:
            continue
        for retention in values[name] if isinstance(values[name], tuple) else (values[name],):
            if not 0 < retention <= 1:
                raise ValueError(f"{name.replace('_', '-')} must be in (0, 1], got {retention}")


if __name__ == "__main__":
    sys.exit(main())
