"""VisionSelector-Q trained with the hard forward (straight-through) instead of the paper's soft one.

    python scripts/training_forward_ablation.py --out /tmp/hard --seeds 0 1 2

The same settings as ``scripts/learned_selectors.py`` (DigitsVQA training split from sample
100,000, 4,000 samples, learning rate 1e-3, batch 16, retention 0.2, ``diversity=0.5``),
except ``training_forward``; evaluated on the first 480 test samples at retentions 0.05 to 0.3.
"""

import argparse
import time
from pathlib import Path

import torch

from visionselector.commands.demo import SELECTOR_TRAIN_FIRST
from visionselector.commands.train import TrainConfig, run_train
from visionselector.data.batches import FeatureCache, load_examples
from visionselector.eval.quality import evaluate_methods
from visionselector.models import load_model
from visionselector.reference.task import write_split


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--training-forward", default="hard", choices=("soft", "hard"))
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    root = Path(args.out)
    model, processor = load_model("reference")
    train = write_split(root / "data", "train", 4000, first=SELECTOR_TRAIN_FIRST, name="selector_train",
                        progress=False)
    examples = load_examples(write_split(root / "data", "test", 480, progress=False))
    cache = FeatureCache(model, processor, examples, progress=False)
    for seed in args.seeds:
        folder = root / f"visionselector_q-{args.training_forward}-seed{seed}"
        started = time.time()
        run_train(TrainConfig(data=str(train), out=str(folder), method="visionselector_q",
                              method_options=("diversity=0.5",), learning_rate=1e-3, seed=seed,
                              cache_dir=str(root / "cache"), progress=False, overwrite=True,
                              training_forward=args.training_forward),
                  model=model, processor=processor, print_fn=lambda *_: None)
        print(f"seed {seed}: trained in {time.time() - started:.0f} s", flush=True)
        for row in evaluate_methods(model, processor, examples, methods=["visionselector_q"],
                                    retentions=(0.05, 0.1, 0.2, 0.3), selector=[str(folder)], cache=cache,
                                    progress=False):
            print(f"{args.training_forward} seed {seed} r={row.retention:<5g} {100 * row.accuracy:5.1f}", flush=True)


if __name__ == "__main__":
    main()
