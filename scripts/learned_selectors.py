"""Train the learned selectors over several seeds and benchmark them against every training-free row.

    python scripts/learned_selectors.py --out /tmp/learned --seeds 0 1 2 --threads 2 \
        --ship src/visionselector/reference/selectors

For each seed: the paper's ``visionselector`` and the question-aware ``visionselector_q``
(saved with ``diversity=0.5``, ``focus=0.05`` and ``merge=true``), each trained once at retention 0.2 on
the frozen reference model (DigitsVQA training split from sample 100,000, learning rate
1e-3, batch 16, the curriculum from 0.1 to 2.0; ``--epochs 2`` trains twice as long on the
same samples). Every learned row (the paper's scorer with and without MMR diversity and the
context grid; VisionSelector-Q with and without each) is evaluated on the first test
samples at every retention, and reported as the mean and range over the seeds; the training-free rows,
with FastV and DART also at the depth-matched layer 0, once. ``--ship`` copies seed 0's
selectors, with their training records, into the package.

Writes OUT/results.md (tables), OUT/results.json (every record, per seed),
OUT/loss_curves.png and one folder per seed and method.
"""

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

import visionselector as vs
from visionselector.commands.demo import SELECTOR_TRAIN_FIRST
from visionselector.commands.train import TrainConfig, run_train
from visionselector.data.batches import FeatureCache, load_examples
from visionselector.eval.quality import evaluate_methods
from visionselector.models import load_model
from visionselector.reference.task import write_split

TRAINING_FREE = ["cdpruner", "divprune", "cdpruner@merge=true", "divprune@merge=true", "dart", "dart@layer=0",
                 "fastv", "fastv@layer=0", "visionzip", "random", "uniform", "pool"]
LEARNED = {"visionselector": (), "visionselector_q": ("diversity=0.5", "focus=0.05", "merge=true")}
LEARNED_ROWS = ["visionselector", "visionselector@diversity=0.5", "visionselector@diversity=0.5,focus=0.05",
                "visionselector@diversity=0.5,focus=0.05,merge=true",
                "visionselector_q", "visionselector_q@context=diverse", "visionselector_q@focus=1.0",
                "visionselector_q@merge=false", "visionselector_q@focus=1.0,merge=false",
                "visionselector_q@diversity=0,merge=false", "visionselector_q@diversity=0,focus=1.0,merge=false"]
RETENTIONS = (0.05, 0.1, 0.2, 0.3, 0.5, 1.0)


def code_version() -> str | None:
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).resolve().parent).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=Path(__file__).resolve().parent).stdout.strip()
        return head + ("+changes" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def summarise(records_by_seed: dict, fixed: list) -> tuple[str, list]:
    """Markdown tables: accuracy (learned rows: mean [min, max] over seeds) and FLOPs % of full."""
    retentions = sorted({r["retention"] for seed in records_by_seed.values() for r in seed})
    lines = ["| method | " + " | ".join(f"r={r:g}" for r in retentions) + " |",
             "| --- |" + " ---: |" * len(retentions)]
    rows = []
    for label in LEARNED_ROWS:
        cells = []
        for retention in retentions:
            values = [100 * r["accuracy"] for seed in records_by_seed.values() for r in seed
                      if r["method"] == label and r["retention"] == retention]
            mean = sum(values) / len(values)
            rows.append({"method": label, "retention": retention, "mean": mean, "min": min(values),
                         "max": max(values), "seeds": len(values)})
            cells.append(f"{mean:.1f} [{min(values):.1f}, {max(values):.1f}]" if len(values) > 1 else f"{mean:.1f}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    for label in dict.fromkeys(r["method"] for r in fixed):
        cells = {r["retention"]: r for r in fixed if r["method"] == label}
        lines.append(f"| {label} | " + " | ".join(f"{100 * cells[r]['accuracy']:.1f}" for r in retentions) + " |")
    flops = ["| method | " + " | ".join(f"r={r:g}" for r in retentions) + " |", "| --- |" + " ---: |" * len(retentions)]
    first = next(iter(records_by_seed.values()))
    for label in list(LEARNED_ROWS) + list(dict.fromkeys(r["method"] for r in fixed)):
        cells = {r["retention"]: r for r in (first + fixed) if r["method"] == label}
        flops.append(f"| {label} | " + " | ".join(f"{100 * cells[r]['flops_ratio']:.1f}" for r in retentions) + " |")
    text = ["# Accuracy (%)", "", "Learned rows: mean [min, max] over the seeds.", ""] + lines + [
        "", "# Prefill FLOPs (% of all tokens, language model and selection)", ""] + flops + [""]
    return "\n".join(text), rows


def plot_losses(histories: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(11, 4), dpi=110)
    for (method, seed), history in sorted(histories.items()):
        steps = [h["step"] for h in history]
        window = 10  # a running mean: single batches of 16 are noisy
        smooth = [sum(h["language_loss"] for h in history[max(0, i - window + 1):i + 1]) / min(window, i + 1)
                  for i in range(len(history))]
        style = "-" if method == "visionselector_q" else "--"
        axes[0].plot(steps, smooth, style, label=f"{method} seed {seed}")
        axes[1].plot(steps, [h["selection_loss"] for h in history], style, label=f"{method} seed {seed}")
    axes[0].set_title("answer loss (running mean of 10 steps)")
    axes[1].set_title("selection loss (BCE of soft vs hard mask)")
    for axis in axes:
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--train-samples", type=int, default=4000)
    parser.add_argument("--test-samples", type=int, default=480)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--ship", default=None, help="copy seed 0's selectors here, with training records")
    parser.add_argument("--epochs", type=float, default=1.0, help="passes over the training samples")
    parser.add_argument("--no-training-free", action="store_true", help="evaluate the learned rows only")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    command = " ".join(["python", "scripts/learned_selectors.py", *sys.argv[1:]])
    version = code_version()
    root = Path(args.out)
    model, processor = load_model("reference")
    train = write_split(root / "data", "train", args.train_samples, first=SELECTOR_TRAIN_FIRST,
                        name="selector_train", progress=False)
    test = write_split(root / "data", "test", args.test_samples, progress=False)
    examples = load_examples(test)
    cache = FeatureCache(model, processor, examples, progress=False)

    started = time.time()
    fixed = [] if args.no_training_free else [
        r.__dict__ for r in evaluate_methods(model, processor, examples, methods=TRAINING_FREE,
                                             retentions=RETENTIONS, cache=cache, progress=False)]
    print(f"training-free rows in {time.time() - started:.0f} s", flush=True)
    records, histories, trainings = {}, {}, {}
    for seed in args.seeds:
        folders = {}
        for method, options in LEARNED.items():
            folder = root / f"seed{seed}" / method
            result = run_train(TrainConfig(data=str(train), out=str(folder), method=method, method_options=options,
                                           learning_rate=1e-3, seed=seed, epochs=args.epochs,
                                           cache_dir=str(root / "cache"), progress=False, overwrite=True),
                               model=model, processor=processor, print_fn=lambda *_: None)
            histories[method, seed] = result["history"]
            trainings[method, seed] = {"seconds": round(result["seconds"], 1), "steps": len(result["history"])}
            folders[method] = str(folder)
            print(f"seed {seed}: {method} trained in {result['seconds']:.0f} s", flush=True)
        rows = evaluate_methods(model, processor, examples, methods=LEARNED_ROWS, retentions=RETENTIONS,
                                selector=list(folders.values()), cache=cache, progress=False)
        records[seed] = [r.__dict__ for r in rows]
        for r in rows:
            print(f"seed {seed} {r.method:32} r={r.retention:<5g} {100 * r.accuracy:5.1f}", flush=True)
    table, summary = summarise(records, fixed)
    (root / "results.md").write_text(table)
    (root / "results.json").write_text(json.dumps({"command": command, "code_version": version,
                                                   "training_free": fixed, "learned": records, "summary": summary,
                                                   "training": {f"{m} seed {s}": v for (m, s), v in trainings.items()}},
                                                  indent=1) + "\n")
    plot_losses(histories, root / "loss_curves.png")
    print(table)
    if args.ship:
        ship(Path(args.ship), root, args.seeds[0], model, command, version, trainings, histories)


def ship(target: Path, root: Path, seed: int, model, command: str, version, trainings: dict, histories: dict) -> None:
    """Copy the seed's selectors into ``target`` with a training record each; the diversity
    variant is the paper's scorer saved with ``diversity=0.5``."""
    target.mkdir(parents=True, exist_ok=True)
    entries = {"visionselector": ("visionselector", {}), "visionselector_diversity": ("visionselector", {"diversity": 0.5}),
               "visionselector_q": ("visionselector_q", {})}
    for name, (method, options) in entries.items():
        destination = target / name
        if destination.exists():
            shutil.rmtree(destination)
        source = root / f"seed{seed}" / method
        with vs.attached(model, method=method, retention=0.2, selector=source, **options):
            vs.save_selector(model, destination)
        history = histories[method, seed]
        record = {"command": command, "code_version": version, "method": method, "options": options, "seed": seed,
                  "retention": 0.2, "learning_rate": 1e-3, "batch_size": 16, **trainings[method, seed],
                  "first_loss": history[0]["loss"], "last_loss": history[-1]["loss"],
                  "log": [h for h in history if h["step"] % 10 == 0 or h["step"] == len(history)]}
        (destination / "training.json").write_text(json.dumps(record, indent=1) + "\n")
        print(f"shipped {destination}")


if __name__ == "__main__":
    main()
