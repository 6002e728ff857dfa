"""Which DigitsVQA objects each method's kept tokens cover, on the shipped reference model.

    python scripts/kept_objects.py --selector DEMO_OUT/selector --retention 0.1 --samples 480 \
        --methods visionselector dart dart@layer=0 fastv divprune uniform

A method may carry options after ``@`` (``dart@layer=0,num_pivots=4``). Prints one
Markdown row per method: the share of the asked objects' tokens kept, of the asked
objects with at least one token kept (overall and per question type), of all objects
seen, and of the kept tokens that lie on an object.
"""

import argparse

import torch

from visionselector.reference.model import load_reference_model
from visionselector.eval.coverage import kept_object_coverage
from visionselector.eval.quality import parse_method_spec


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", default=["visionselector", "dart", "fastv", "divprune", "uniform"])
    parser.add_argument("--selector", help="trained selector directory (for visionselector)")
    parser.add_argument("--retention", type=float, default=0.1)
    parser.add_argument("--samples", type=int, default=480, help="test samples 0 .. N-1")
    parser.add_argument("--threads", type=int)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, processor = load_reference_model()
    types = None
    for spec in args.methods:
        row = parse_method_spec(spec)
        result = kept_object_coverage(model, processor, method=row.method, retention=args.retention,
                                      samples=args.samples, selector=args.selector, options=row.options)
        if types is None:
            types = list(result.by_type)
            print(f"retention {args.retention:g}, {args.samples} test samples; per type: asked tokens kept / "
                  "asked objects seen (%)\n")
            print("| method | asked tokens kept | asked objects seen | " + " | ".join(types)
                  + " | all objects seen | kept tokens on objects |")
            print("| --- |" + " ---: |" * (len(types) + 4))
        cells = [f"{100 * result.by_type[t][0]:.0f} / {100 * result.by_type[t][1]:.0f}" for t in types]
        print(f"| {spec} | {100 * result.asked_tokens_kept:.0f} | {100 * result.asked_objects_seen:.0f} | "
              + " | ".join(cells) + f" | {100 * result.objects_seen:.0f} | {100 * result.kept_on_objects:.0f} |",
              flush=True)


if __name__ == "__main__":
    main()
