"""Accuracy per question type of any rows on the validation split, to choose options without the test split.

    python scripts/validation_rows.py --samples 480 --retentions 0.05 0.1 0.2 0.3 \
        --selector src/visionselector/reference/selectors/visionselector_q \
        --methods visionselector_q visionselector_q@focus=1.0 visionselector_q@focus=0.03 divprune dart@layer=0

Rows are method names or variants ``NAME@OPTION=VALUE,...`` as ``visionselector eval`` takes
them; learned rows run with the selectors given. Prints one Markdown row per row and
retention (all questions, then each type). ``--split test --first 480`` checks a choice
on test samples beyond the benchmark's first 480.
"""

import argparse
import tempfile
from pathlib import Path

import torch

from visionselector.data.batches import FeatureCache, load_examples
from visionselector.eval.quality import evaluate_methods
from visionselector.models import load_model
from visionselector.reference.task import write_split


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", required=True)
    parser.add_argument("--retentions", type=float, nargs="+", default=[0.05, 0.1, 0.2, 0.3])
    parser.add_argument("--samples", type=int, default=480, help="samples FIRST .. FIRST + N - 1")
    parser.add_argument("--split", default="validation", help="validation, or test for a final check only")
    parser.add_argument("--first", type=int, default=0, help="the split's first sample")
    parser.add_argument("--selector", nargs="*", default=[], help="trained selectors for the learned rows")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, processor = load_model("reference")
    with tempfile.TemporaryDirectory() as folder:
        examples = load_examples(write_split(Path(folder), args.split, args.samples, first=args.first,
                                              progress=False))
        cache = FeatureCache(model, processor, examples, progress=False)
        rows = evaluate_methods(model, processor, examples, methods=args.methods, retentions=args.retentions,
                                cache=cache, selector=args.selector or None, progress=False)
    types = list(rows[0].by_type)
    print("| row | r | all | " + " | ".join(types) + " |")
    print("| --- |" + " ---: |" * (len(types) + 2))
    for row in rows:
        print(f"| {row.method} | {row.retention:g} | {100 * row.accuracy:.1f} | "
              + " | ".join(f"{100 * row.by_type[kind]:.0f}" for kind in types) + " |")


if __name__ == "__main__":
    main()
