"""Train the demo's selector with one setting changed at a time; score each at retentions 0.1 and 0.3.

    python scripts/selector_sweep.py --out /tmp/sweep --threads 1
    python scripts/selector_sweep.py --out /tmp/sweep --variants base seed1 lr3e-3

Every variant starts from the demo's settings (retention 0.2, 2,000 training samples,
one epoch, learning rate 1e-3, the default width) and is evaluated on the demo's 480
test samples. One JSON line per variant goes to the terminal and to OUT/results.jsonl.
"""

import argparse
import json
import time
from pathlib import Path

import torch

from visionselector.reference.task import write_split
from visionselector.commands.demo import SELECTOR_TRAIN_FIRST
from visionselector.commands.evaluate import EvalConfig, run_eval
from visionselector.commands.train import TrainConfig, run_train
from visionselector.models import load_model

VARIANTS = {
    "base": {},
    "seed1": {"seed": 1},
    "seed2": {"seed": 2},
    "data8000": {"limit": None},  # all 8,000 written samples: 500 steps
    "lr3e-3": {"learning_rate": 3e-3},
    "lr1e-2": {"learning_rate": 1e-2},
    "h384": {"hidden_dim": 384},
    "lr3e-3_h384": {"learning_rate": 3e-3, "hidden_dim": 384},
    "lambda_end8": {"lambda_end": 8.0},
    "train_r0.1": {"retention": 0.1},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--model", default="reference")
    parser.add_argument("--threads", type=int)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    root = Path(args.out)
    model, processor = load_model(args.model)
    train = write_split(root / "data", "train", 8000, first=SELECTOR_TRAIN_FIRST, name="selector_train")
    test = write_split(root / "data", "test", 480)
    for name in args.variants:
        settings = {"limit": 2000, "learning_rate": 1e-3, **VARIANTS[name]}  # the demo's learning rate
        started = time.time()
        out = root / name
        run_train(TrainConfig(data=str(train), out=str(out / "selector"), model=args.model,
                              cache_dir=str(root / "cache"), progress=False, **settings),
                  model=model, processor=processor, print_fn=lambda *_: None)
        evaluated = run_eval(EvalConfig(data=str(test), out=str(out), model=args.model, selector=str(out / "selector"),
                                        methods=("visionselector",), retentions=(0.1, 0.3), progress=False),
                             model=model, processor=processor, print_fn=lambda *_: None)
        records = {r.retention: r for r in evaluated["records"]}
        line = {"variant": name, **settings, "seconds": round(time.time() - started),
                "accuracy": {f"{r:g}": round(100 * records[r].accuracy, 1) for r in (0.1, 0.3)},
                "by_type_at_0.1": {k: round(100 * v, 1) for k, v in records[0.1].by_type.items()}}
        print(json.dumps(line), flush=True)
        with open(root / "results.jsonl", "a") as results:
            results.write(json.dumps(line) + "\n")


if __name__ == "__main__":
    main()
