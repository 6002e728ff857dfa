"""Command line: ``visionselector demo`` and ``visionselector methods``."""

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
            kind = str if default and isinstance(default[0], str) else float
            parser.add_argument(flag, type=kind, nargs="+", default=default, help=help_text)
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


def build_parser() -> argparse.ArgumentParser:
    from .demo import DemoConfig

    parser = argparse.ArgumentParser(prog="visionselector", description="Visual token selection for multimodal LLMs.")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="attach to a random Qwen2.5-VL, generate, and time prefill")
    _add_dataclass_arguments(demo, DemoConfig)
    commands.add_parser("methods", help="list the selection methods")
    from .eval.bench import BenchConfig

    bench = commands.add_parser("bench", help="prefill speed, latency, memory and FLOPs per method and retention")
    _add_dataclass_arguments(bench, BenchConfig)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "methods":
        from .methods import list_methods

        for name, description in list_methods().items():
            print(f"{name:16} {description}")
        return 0
    if args.command == "demo":
        from .demo import DemoConfig, run_demo

        values = {f.name: getattr(args, f.name) for f in dataclasses.fields(DemoConfig)}
        from .methods import list_methods

        if values["method"] not in list_methods():
            print(f"error: unknown method {values['method']!r}; known methods: {', '.join(list_methods())}",
                  file=sys.stderr)
            return 2
        values["retentions"] = tuple(values["retentions"])
        for retention in values["retentions"]:
            if not 0 < retention <= 1:
                print(f"error: retention must be in (0, 1], got {retention}", file=sys.stderr)
                return 2
        run_demo(DemoConfig(**values))
        return 0
    if args.command == "bench":
        from .eval.bench import BenchConfig, run_bench

        values = {f.name: getattr(args, f.name) for f in dataclasses.fields(BenchConfig)}
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
        try:
            run_bench(BenchConfig(**values))
        except ValueError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
