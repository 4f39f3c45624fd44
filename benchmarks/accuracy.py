"""Accuracy benchmark (not a test): [784,1000,1000,1000], E=10, S=10, batch 64, Random negatives,
goodness classifier, one thread, the full MNIST. Writes benchmarks/results/accuracy.json.

    .venv/bin/python benchmarks/accuracy.py                 # one seed: about 4 minutes on one core
    .venv/bin/python benchmarks/accuracy.py --seeds 0 1 2   # the seed-to-seed spread

Reference: the paper authors' own FF code, same configuration, on this machine: 87.8 % test
accuracy at 38 s per epoch.
"""

from __future__ import annotations

import argparse
import os
import tempfile

from _common import median, mpff_train, span_seconds, write_result

REFERENCE = {"test_accuracy": 0.878, "seconds_per_epoch": 38.0}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--train-subset", type=int, default=0)
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="one run per seed (train.seed)")
    args = p.parse_args()
    E = args.epochs
    base = ["model.dims=[784,1000,1000,1000]", f"train.epochs={E}", f"train.chapters={E}",
            "train.batch_size=64", "train.lr=0.01", "train.negatives=random", "train.classifier=goodness",
            "train.threads=1", "train.eval_every=0", "run.schedule=sequential", "run.report=false",
            "data.test_subset=0", f"data.train_subset={args.train_subset}"]
    runs = []
    for seed in args.seeds:
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "run")
            run = mpff_train(out, config="configs/tiny.toml", sets=base + [f"train.seed={seed}"])
            train_s = span_seconds(out, ("train", "forward"))[0]
            eval_s = span_seconds(out, ("eval",))[0]
        runs.append({"seed": seed, "test_accuracy": run["test_accuracy"], "wall_time_s": run["wall_time"],
                     "seconds_per_epoch": run["wall_time"] / E, "training_seconds_per_epoch": train_s / E,
                     "final_eval_seconds": eval_s})
        print(f"seed {seed}: {run['test_accuracy']:.2%}, {run['wall_time'] / E:.1f} s/epoch", flush=True)
    acc = [r["test_accuracy"] for r in runs]
    per_epoch = median([r["seconds_per_epoch"] for r in runs])
    write_result("accuracy", {
        "config": base,
        "seeds": args.seeds,
        "test_accuracy": median(acc),
        "test_accuracy_min": min(acc),
        "test_accuracy_max": max(acc),
        "seconds_per_epoch": per_epoch,
        "runs": runs,
        "reference_authors_code": REFERENCE,
        "speed_vs_reference": REFERENCE["seconds_per_epoch"] / per_epoch,
    })


if __name__ == "__main__":
    main()
