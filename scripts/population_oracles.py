"""What a pruned reference model can still answer: kept sets built from the scene's ground truth.

    python scripts/population_oracles.py --retentions 0.1 0.2 --samples 480 \
        --selector src/visionselector/reference/selectors/visionselector_q --options focus=1.0 merge=false

For each validation sample (``--split``), the shipped reference model answers with the
selector's own kept set and with oracle sets of the same size built from the scene's
objects, which no method has: the selector's set less its tokens on objects the question
is not about; every token of the asked objects; the centre token of every object, or of
the asked ones. Each is topped up with background tokens (on no object) in a fixed random
order, or, for the asked objects, with an even grid of the image (the ``focus`` rule).
Prints accuracy per question type for each, then how the selector's own set fails on
counting questions: whether it kept every asked object and its centre token, and the
wrong answers against the true counts.
"""

import argparse
import collections

import torch

import visionselector as vs
from visionselector.eval.quality import parse_method_spec
from visionselector.methods.base import NoOptions, SelectionMethod, register_method
from visionselector.models import load_model
from visionselector.ops.context import fill_even_grid
from visionselector.reference.task import asked_objects, digit_images, make_sample, object_tokens, token_labels
from visionselector.reference.training import question_batch

_PRIORITY: dict[str, torch.Tensor] = {}


@register_method
class _GivenOrder(SelectionMethod):
    """Keeps the tokens of a given priority order (set per sample by this script)."""

    name = "oracle_given_order"
    description = "the kept set of a given priority order (scripts/population_oracles.py)"
    options_class = NoOptions

    def token_scores(self, tokens):
        return _PRIORITY["order"].to(tokens.features.device, tokens.features.dtype).unsqueeze(0)


def first_answer(model, processor, image, question) -> str:
    with torch.no_grad():
        logits = model(**question_batch(processor, [image], [question])).logits
    return processor.tokenizer.decode([int(logits[0, -1].argmax())]).strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--retentions", type=float, nargs="+", default=[0.1, 0.2])
    parser.add_argument("--samples", type=int, default=480)
    parser.add_argument("--split", default="validation")
    parser.add_argument("--method", default="visionselector_q")
    parser.add_argument("--selector", default="src/visionselector/reference/selectors/visionselector_q")
    parser.add_argument("--options", nargs="*", default=[], help="the method's options, NAME=VALUE (focus=1.0 merge=false)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    options = parse_method_spec(f"{args.method}@{','.join(args.options)}").options if args.options else {}
    model, processor = load_model("reference")
    images, targets = digit_images()
    samples = []
    for index in range(args.samples):
        layout = []
        image, question, answer, kind = make_sample(args.split, index, images, targets, layout=layout)
        samples.append((image, question, answer, kind, layout))
    kinds = list(dict.fromkeys(s[3] for s in samples))
    for retention in args.retentions:
        own = []
        with vs.attached(model, method=args.method, retention=retention, selector=args.selector, **options):
            model.eval()
            for image, question, *_ in samples:
                first_answer(model, processor, image, question)
                own.append(vs.last_selection(model)[0].tolist())
        generator = torch.Generator().manual_seed(0)
        correct, total = collections.Counter(), collections.Counter()
        counting, errors = collections.Counter(), collections.Counter()
        for (image, question, answer, kind, layout), kept in zip(samples, own):
            tokens = 256
            objects = [set(t) for t in object_tokens(layout)]
            asked = [objects[i] for i in asked_objects(question, kind, layout)]
            asked_tokens = set().union(*asked)
            on_objects = set().union(*objects)
            labels = token_labels(layout, targets)
            centres = {i for i in range(tokens) if labels[i, 4] == 1}
            background = [i for i in torch.randperm(tokens, generator=generator).tolist() if i not in on_objects]
            orders = {
                "the selector's own set": kept,
                "the same, less its tokens on objects not asked about": [i for i in kept if i in asked_tokens
                                                                          or i not in on_objects],
                "every token of the asked objects": sorted(asked_tokens),
                "the centre token of every object": sorted(centres),
                "the centre token of the asked objects": sorted(centres & asked_tokens),
            }
            budget = len(kept)
            for first in ("every token of the asked objects", "the centre token of the asked objects"):
                focus = orders[first][:budget]
                chosen = torch.zeros(1, tokens, dtype=torch.bool)
                chosen[0, focus] = True
                grid = fill_even_grid(chosen, torch.tensor([budget]), torch.ones(1, tokens, dtype=torch.bool),
                                      [[(1, 16, 16)]])
                orders[first + ", then an even grid"] = focus + torch.nonzero(grid[0] & ~chosen[0]).flatten().tolist()
            for name, order in orders.items():
                order = list(dict.fromkeys(order + background))[:budget]
                priority = torch.zeros(tokens)
                priority[order] = torch.arange(budget, 0, -1, dtype=torch.float32)
                _PRIORITY["order"] = priority
                with vs.attached(model, method="oracle_given_order", retention=retention):
                    model.eval()
                    predicted = first_answer(model, processor, image, question)
                correct[name, kind] += predicted == answer
                total[name, kind] += 1
                if kind == "count" and name == "the selector's own set":
                    counting["questions"] += 1
                    counting["every asked object kept"] += all(o & set(kept) for o in asked)
                    counting["every asked centre kept"] += all(o & set(kept) & centres for o in asked)
                    counting["right"] += predicted == answer
                    if predicted != answer:
                        errors[answer, predicted] += 1
        print(f"\nr={retention:g}, {args.split} samples 0..{args.samples - 1}, {args.method} {options or ''}\n")
        print("| kept set (then background, unless it says otherwise) | " + " | ".join(kinds) + " |")
        print("| --- |" + " ---: |" * len(kinds))
        for name in orders:
            print(f"| {name} | " + " | ".join(f"{100 * correct[name, k] / total[name, k]:.0f}" for k in kinds) + " |")
        print(f"\ncounting, the selector's own set: {dict(counting)}")
        print("wrong answers (true -> answered: times): "
              + ", ".join(f"{a} -> {p}: {n}" for (a, p), n in sorted(errors.items())))


if __name__ == "__main__":
    main()
