"""Speedup of the PFF schedules on this machine (not a test).

[784,1000,1000], full MNIST, E = S = 20, batch 64, Random negatives, goodness classifier, one
thread per rank: Sequential on 1 rank, Single Layer (recomputing its inputs, and with shipped
inputs, run.inputs = ship) and All Layers on 2 ranks, and Sequential with 2 threads (the honest
alternative for a user with 2 cores). Writes benchmarks/results/speedup.json with wall time,
speedup, test accuracy, waiting per rank, and how much slower each train task ran in a 2-rank
run than alone (the two ranks share the machine).

    .venv/bin/python benchmarks/speedup.py            # ~10-15 minutes on 2 cores
    .venv/bin/python benchmarks/speedup.py --epochs 4 --train-subset 10000   # quick look
"""

from __future__ import annotations

import argparse
import os

from _common import ROOT, median, mpff_train, span_seconds, write_result


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--train-subset", type=int, default=0)
    p.add_argument("--keep", default=os.path.join(ROOT, "outputs", "bench-speedup"),
                   help="where the run directories are kept (their reports included)")
    p.add_argument("--only", nargs="*", default=[], help="run only these cases (and sequential)")
    args = p.parse_args()
    E = args.epochs
    base = ["model.dims=[784,1000,1000]", f"train.epochs={E}", f"train.chapters={E}", "train.batch_size=64",
            "train.lr=0.01", "train.negatives=random", "train.classifier=goodness", "train.eval_every=0",
            f"data.train_subset={args.train_subset}", "data.test_subset=0", "run.report=true",
            "run.checkpoint_every=0"]  # as measured before checkpoints were on by default
    cases = [
        ("sequential", 1, 1, "sequential", []),
        ("single_layer", 2, 1, "single_layer", []),
        ("single_layer_ship", 2, 1, "single_layer", ["run.inputs=ship"]),
        ("all_layers", 2, 1, "all_layers", []),
        ("sequential_2threads", 1, 2, "sequential", []),
    ]
    if args.only:
        cases = [c for c in cases if c[0] == "sequential" or c[0] in args.only]
    rows = {}
    for name, ranks, threads, schedule, extra in cases:
        out = os.path.join(args.keep, name)
        run = mpff_train(out, config="configs/tiny.toml", ranks=ranks,
                         sets=base + [f"train.threads={threads}", f"run.schedule={schedule}"] + extra)
        rows[name] = {
            "ranks": ranks, "threads_per_rank": threads, "wall_time_s": run["wall_time"],
            "test_accuracy": run["test_accuracy"],
            "wait_s_per_rank": span_seconds(out, ("wait",)),
            "compute_s_per_rank": span_seconds(out, ("train", "forward", "negatives", "head")),
            "forward_recompute_s_per_rank": span_seconds(out, ("forward",)),
            "ship_s_per_rank": span_seconds(out, ("ship",)),
            "bytes_sent_per_rank": [r["bytes_sent"] for r in run["ranks"]],
            "run_dir": out,
        }
    seq = rows["sequential"]["wall_time_s"]
    for r in rows.values():
        r["speedup_vs_sequential"] = seq / r["wall_time_s"]
    # ranks sharing the machine slow each other: each train(c, k) in a 2-rank run against the
    # same task in the 1-rank run (median ratio over the tasks)
    from mpff.analysis.runs import load_run
    from mpff.analysis.summary import task_durations
    alone = task_durations(load_run(rows["sequential"]["run_dir"]))
    for r in rows.values():
        if r["ranks"] > 1:
            mine = task_durations(load_run(r["run_dir"]))
            ratios = [mine[k] / alone[k] for k in mine if k[0] == "train" and alone.get(k)]
            r["train_task_time_vs_1_rank"] = median(ratios) if ratios else None
    # a partial run (--only) does not replace the full one
    write_result("speedup" if not args.only else "speedup_" + "_".join(args.only), {
        "config": base, "cases": rows,
        "ideal_all_layers_speedup": 2 * E / (E + 1),
        "target_all_layers_speedup": 1.8,
    })


if __name__ == "__main__":
    main()
