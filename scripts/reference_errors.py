"""Where the reference model's answers go wrong, with all visual tokens.

    python scripts/reference_errors.py --samples 300 [--model DIR]

Prints Markdown tables:

1. accuracy per question type on scenes stage 2 trained on (their first question), on
   training-split scenes it never saw, and on the test split (held-out digit writers):
   remembering versus generalising, and the cost of new handwriting;
2. for shape questions ("what shape is the blue object ?"), how often a wrong answer
   names the shape of another object in the scene (the model found the wrong object)
   and how accuracy depends on a box of the asked colour being there and on the colour;
3. for presence questions ("is there a green circle ?"), accuracy split by what the
   scene holds: objects of the asked colour, of the asked shape, both or neither.
"""

import argparse
from collections import Counter

import torch

from visionselector.reference.task import COLOURS, QUESTION_TYPES, SHAPES, digit_images
from visionselector.reference.model import load_reference_model
from visionselector.reference.training import SCENES_FIRST, evaluate_accuracy, greedy_answers


def percent(hits: int, total: int) -> str:
    return f"{100 * hits / total:.1f} ({total})" if total else "-"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="reference model directory (default: the shipped one)")
    parser.add_argument("--samples", type=int, default=300, help="samples per split (table 1) and per type (2, 3)")
    parser.add_argument("--threads", type=int)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, processor = load_reference_model(args.model)
    digits = digit_images()

    print("| scenes | " + " | ".join(QUESTION_TYPES) + " | all |")
    print("| --- |" + " ---: |" * (len(QUESTION_TYPES) + 1))
    splits = (("trained on (train split from %d)" % SCENES_FIRST, "train", SCENES_FIRST),
              ("unseen, train split (from 500,000)", "train", 500_000), ("test split", "test", 0))
    for name, split, first in splits:
        accuracy = evaluate_accuracy(model, processor, split, args.samples, first=first, digits=digits)
        print(f"| {name} | " + " | ".join(f"{100 * accuracy[t]:.0f}" for t in QUESTION_TYPES)
              + f" | {100 * accuracy['all']:.1f} |", flush=True)

    def of_type(kind: str) -> list[int]:  # make_sample cycles through the types by index
        offset = QUESTION_TYPES.index(kind)
        return [offset + len(QUESTION_TYPES) * n for n in range(args.samples)]

    wrong_elsewhere, wrong, by_box, by_colour, found_colours = 0, 0, Counter(), Counter(), Counter()
    for (_, question, truth, _), layout, answer in greedy_answers(model, processor, "test", of_type("shape"),
                                                                  digits=digits):
        colour = question.split()[4]  # "what shape is the <colour> object ?"
        shapes = [a["shape"] for *_, a in layout if "shape" in a]
        boxed = any(a.get("box") == colour for *_, a in layout)
        by_box[boxed, answer == truth] += 1
        by_colour[colour, answer == truth] += 1
        if answer != truth:
            wrong += 1
            wrong_elsewhere += answer in shapes
            for found in {a["colour"] for *_, a in layout if a.get("shape") == answer}:
                found_colours[colour, found] += 1
    print(f"\nshape questions, test split: {wrong} of {args.samples} wrong; {wrong_elsewhere} of the wrong answers "
          "name the shape of another object in the scene\n")
    print("| a box of the asked colour | accuracy (samples) |\n| --- | ---: |")
    for boxed in (False, True):
        hits = by_box[boxed, True]
        print(f"| {'yes' if boxed else 'no'} | {percent(hits, hits + by_box[boxed, False])} |")

    print("\n| asked colour | accuracy (samples) | colours of the objects whose shape a wrong answer named |\n"
          "| --- | ---: | --- |")
    for colour in COLOURS:
        named = ", ".join(f"{c} {n}" for (asked, c), n in found_colours.most_common() if asked == colour)
        print(f"| {colour} | {percent(by_colour[colour, True], by_colour[colour, True] + by_colour[colour, False])} "
              f"| {named} |")

    groups = Counter()
    for (_, question, truth, _), layout, answer in greedy_answers(model, processor, "test", of_type("presence"),
                                                                  digits=digits):
        colour, shape = question.split()[3:5]  # "is there a <colour> <shape> ?"
        assert shape in SHAPES, question
        objects = [a for *_, a in layout if "shape" in a]
        key = (truth, any(a["colour"] == colour for a in objects), any(a["shape"] == shape for a in objects))
        groups[key + (answer == truth,)] += 1
    print("\npresence questions, test split\n\n| answer | asked colour in scene | asked shape in scene | "
          "accuracy (samples) |\n| --- | --- | --- | ---: |")
    for key in sorted({k[:3] for k in groups}, reverse=True):
        print(f"| {key[0]} | {'yes' if key[1] else 'no'} | {'yes' if key[2] else 'no'} | "
              f"{percent(groups[key + (True,)], groups[key + (True,)] + groups[key + (False,)])} |")


if __name__ == "__main__":
    main()
