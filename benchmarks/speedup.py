"""Speedup of the PFF schedules on this machine (not a test).

[784,1000,1000], full MNIST, E = S = 20, batch 64, Random negatives, goodness classifier, one
thread per rank: Sequential on 1 rank, Single Layer and All Layers on 2 ranks, and Sequential
with 2 threads (the honest alternative for a user with 2 cores). Writes
benchmarks/results/speedup.json with wall time, speedup, test accuracy and waiting per rank.

    .venv/bin/python benchmarks/speedup.py            # ~10-15 minutes on 2 cores
    .venv/bin/python benchmarks/speedup.py --epochs 4 --train-subset 10000   # quick look
"""

from __future__ import annotations

import argparse
import os

from _common import ROOT, mpff_train, span_seconds, write_result


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--train-subset", type=int, default=0)
    p.add_argument("--keep", default=os.path.join(ROOT, "outputs", "bench-speedup"),
                   help="where the run directories are kept (their reports included)")
    args = p.parse_args()
    E = args.epochs
    base = ["model.dims=[784,1000,1000]", f"train.epochs={E}", f"train.chapters={E}", "train.batch_size=64",
            "train.lr=0.01", "train.negatives=random", "train.classifier=goodness", "train.eval_every=0",
            f"data.train_subset={args.train_subset}", "data.test_subset=0", "run.report=true",
            "run.checkpoint_every=0"]  # as measured before checkpoints were on by default
    cases = [
        ("sequential", 1, 1, "sequential"),
        ("single_layer", 2, 1, "single_layer"),
        ("all_layers", 2, 1, "all_layers"),
        ("sequential_2threads", 1, 2, "sequential"),
    ]
    rows = {}
    for name, ranks, threads, schedule in cases:
        out = os.path.join(args.keep, name)
        run = mpff_train(out, config="configs/tiny.toml", ranks=ranks,
                         sets=base + [f"train.threads={threads}", f"run.schedule={schedule}"])
        rows[name] = {
            "ranks": ranks, "threads_per_rank": threads, "wall_time_s": run["wall_time"],
            "test_accuracy": run["test_accuracy"],
            "wait_s_per_rank": span_seconds(out, ("wait",)),
            "compute_s_per_rank": span_seconds(out, ("train", "forward", "negatives", "head")),
            "forward_recompute_s_per_rank": span_seconds(out, ("forward",)),
            "bytes_sent_per_rank": [r["bytes_sent"] for r in run["ranks"]],
            "run_dir": out,
        }
    seq = rows["sequential"]["wall_time_s"]
    for r in rows.values():
        r["speedup_vs_sequential"] = seq / r["wall_time_s"]
    write_result("speedup", {
        "config": base, "cases": rows,
        "ideal_all_layers_speedup": 2 * E / (E + 1),
        "target_all_layers_speedup": 1.8,
    })


if __name__ == "__main__":
    main()
