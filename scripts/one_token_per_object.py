"""Diagnostic: does the trained scorer lose at low retention because it covers objects unevenly?

    python scripts/one_token_per_object.py --selector DEMO_OUT/selector --retention 0.1 --samples 480

Answers the test samples twice with the scorer attached: as trained (its top-k), and
with its own ranking forced to keep first the best-scored token of every object in
the scene (objects ordered by their best score, from the scene's ground truth), then
the rest of the budget by score. The second uses knowledge no method has; it only
shows what coverage alone is worth. Prints accuracy overall and per question type.
"""

import argparse
import types

import torch

import visionselector as vs
from visionselector.api import get_state
from visionselector.reference.task import digit_images, make_sample, object_tokens
from visionselector.models import greedy_settings
from visionselector.reference.model import load_reference_model
from visionselector.reference.training import question_batch
from visionselector.eval.metrics import normalise_answer
from visionselector.methods.base import Selection


def covering_select(objects):
    """A ``select`` for a one-sample batch: one token per object of ``objects()``, then by score."""

    def select(self, tokens, budget):
        if tokens.features.shape[0] != 1:
            raise ValueError("the covering selection runs one sample at a time")
        scores = self.scores(tokens.features, tokens.valid)[0]
        budget = int(budget[0])
        keep = torch.zeros_like(tokens.valid)
        ranked = sorted((o for o in objects() if len(o)), key=lambda o: -float(scores[o].max()))
        for cells in ranked[:budget]:
            keep[0, cells[int(scores[cells].argmax())]] = True
        missing = budget - int(keep.sum())
        if missing > 0:
            rest = scores.masked_fill(keep[0] | ~tokens.valid[0], -torch.inf)
            keep[0, rest.topk(missing).indices] = True
        return Selection(keep)

    return select


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--selector", required=True, help="trained selector directory")
    parser.add_argument("--retention", type=float, default=0.1)
    parser.add_argument("--samples", type=int, default=480, help="test samples 0 .. N-1")
    parser.add_argument("--threads", type=int)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, processor = load_reference_model()
    images, targets = digit_images()
    scene = {}
    for covering in (False, True):
        vs.attach(model, method="visionselector", retention=args.retention, selector=args.selector)
        if covering:
            method = get_state(model).method
            method.select = types.MethodType(covering_select(lambda: scene["objects"]), method)
        hits: dict[str, list[bool]] = {}
        for index in range(args.samples):
            layout = []
            image, question, answer, kind = make_sample("test", index, images, targets, layout=layout)
            scene["objects"] = [torch.tensor(cells, dtype=torch.long) for cells in object_tokens(layout)]
            batch = question_batch(processor, [image], [question])
            with torch.no_grad():
                out = model.generate(**batch, **greedy_settings(model, processor, 2))
            said = processor.tokenizer.decode(out[0, batch["input_ids"].shape[1]:], skip_special_tokens=True)
            hits.setdefault(kind, []).append(normalise_answer(said) == normalise_answer(answer))
        vs.detach(model)
        every = [hit for kind_hits in hits.values() for hit in kind_hits]
        by_type = ", ".join(f"{kind} {100 * sum(v) / len(v):.1f}" for kind, v in sorted(hits.items()))
        name = "one token per object first" if covering else "the scorer's top-k        "
        print(f"{name}: {100 * sum(every) / len(every):.1f}%  ({by_type})", flush=True)


if __name__ == "__main__":
    main()
