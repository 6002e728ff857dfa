"""Which half of merging helps: the merged embeddings, the attention weights, or both.

    python scripts/merge_parts.py --retentions 0.1 0.2 --samples 480 \
        --rows visionselector_q visionselector_q@focus=1.0 divprune

For each validation sample (``--split``) and row, the shipped reference model answers the
question (its first answer token) with the row's kept set, then four times more from a run
of the *whole* sequence in which the dropped visual tokens are masked out of attention,
written here from the definition and independently of the package's compaction:

- ``dropped``: the package's own pruned run (without merging, whatever a selector was saved with);
- ``masked``: nothing else changed (equals ``dropped``: a check of this script);
- ``weights``: each kept token's attention logits get ``log(size)``, the size of its group
  (itself and the dropped tokens whose most similar kept token it is, by cosine similarity);
- ``means``: each kept token's embedding is the mean of its group, no weights;
- ``both``: means and weights, which is what option ``merge`` does.

Prints accuracy, all questions and per type, for each row, part and retention.
"""

import argparse
import collections

import torch
import torch.nn.functional as F

import visionselector as vs
from visionselector.eval.quality import parse_method_spec
from visionselector.methods.base import get_method_class, method_options
from visionselector.models import load_model
from visionselector.reference import shipped_selector
from visionselector.reference.task import digit_images, make_sample
from visionselector.reference.training import question_batch

PARTS = ("dropped", "masked", "weights", "means", "both")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--retentions", type=float, nargs="+", default=[0.1, 0.2])
    parser.add_argument("--samples", type=int, default=480)
    parser.add_argument("--split", default="validation")
    parser.add_argument("--rows", nargs="+", default=["visionselector_q", "visionselector_q@focus=1.0", "divprune"],
                        help="methods or NAME@OPTION=VALUE,... variants; learned ones use the shipped selectors")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, processor = load_model("reference")
    model.eval()
    text_model = model.model.language_model
    images, targets = digit_images()
    samples = [make_sample(args.split, i, images, targets) for i in range(args.samples)]
    image_id = model.config.image_token_id
    replaced, seen = {}, {}

    def replace_inputs(module, positional, keywords):
        if replaced:
            keywords["attention_mask"] = replaced["mask"]
            keywords["inputs_embeds"] = replaced["embeds"]
        return positional, keywords

    def remember_inputs(module, positional, keywords, output):
        seen["embeds"] = keywords.get("inputs_embeds")

    text_model.register_forward_pre_hook(replace_inputs, with_kwargs=True)
    text_model.register_forward_hook(remember_inputs, with_kwargs=True)

    def answer(batch) -> str:
        with torch.no_grad():
            logits = model(**batch).logits
        return processor.tokenizer.decode([int(logits[0, -1].argmax())]).strip()

    for retention in args.retentions:
        correct, total = collections.Counter(), collections.Counter()
        for row in args.rows:
            variant = parse_method_spec(row)
            method = variant.method
            # The kept set is the row's own, dropped: a selector saved with merge=True does not merge here.
            options = {**({"merge": False} if "merge" in method_options(get_method_class(method)) else {}),
                       **variant.options}
            if method in ("visionselector", "visionselector_q"):
                options["selector"] = shipped_selector(method)
            for image, question, truth, kind in samples:
                batch = question_batch(processor, [image], [question])
                with vs.attached(model, method=method, retention=retention, **options):
                    model.eval()
                    predicted = answer(batch)
                    kept = vs.last_selection(model)[0]
                correct[row, "dropped", kind] += predicted == truth
                total[row, "dropped", kind] += 1
                answer(batch)  # the unpatched run, for its input embeddings
                embeds, ids = seen["embeds"][0], batch["input_ids"][0]
                visual = torch.nonzero(ids == image_id).flatten()
                features = embeds[visual].float()
                keep = torch.zeros(len(visual), dtype=torch.bool)
                keep[kept] = True
                unit = F.normalize(features, dim=-1)
                owner = (unit[~keep] @ unit[keep].T).argmax(1)
                size = torch.ones(int(keep.sum()))
                size.index_add_(0, owner, torch.ones(len(owner)))
                length = len(ids)
                for part in PARTS[1:]:
                    bias = torch.zeros(length)
                    bias[visual[~keep]] = float("-inf")
                    bias[visual[keep]] = torch.log(size) if part in ("weights", "both") else 0.0
                    causal = torch.full((length, length), float("-inf")).triu(1)
                    replaced["mask"] = (causal + bias[None, :]).to(embeds.dtype)[None, None]
                    replaced["embeds"] = embeds[None]
                    if part in ("means", "both"):
                        merged = embeds.clone()
                        sums = features[keep].clone()
                        sums.index_add_(0, owner, features[~keep])
                        merged[visual[keep]] = (sums / size[:, None]).to(merged.dtype)
                        replaced["embeds"] = merged[None]
                    predicted = answer(batch)
                    replaced.clear()
                    correct[row, part, kind] += predicted == truth
                    total[row, part, kind] += 1
        kinds = list(dict.fromkeys(sample[3] for sample in samples))
        print(f"\nr={retention:g}, {args.split} samples 0..{args.samples - 1}\n")
        print("| row | part | all | " + " | ".join(kinds) + " |")
        print("| --- | --- | ---: |" + " ---: |" * len(kinds))
        for row in args.rows:
            for part in PARTS:
                overall = sum(correct[row, part, k] for k in kinds) / sum(total[row, part, k] for k in kinds)
                print(f"| {row} | {part} | {100 * overall:.1f} | "
                      + " | ".join(f"{100 * correct[row, part, k] / total[row, part, k]:.0f}" for k in kinds) + " |",
                      flush=True)


if __name__ == "__main__":
    main()
