"""Sequential FF with Adaptive negatives and the softmax head, against the machine's limit (not a test).

The configuration the speed issue names and no other benchmark covers: `[784,1000,1000,1000]`,
E = S = 10, batch 64, Adaptive negatives (lag 0), softmax classifier, one thread, full MNIST,
Sequential. Each chapter trains the layers, then trains the head on the features of the
training set (the classifier layers' outputs on neutral-label inputs) and chooses the next
chapter's negatives by scoring that set through the head: the same features with the same
weights, which mpff now computes once (`FFState._do_head` keeps them for `_do_negatives`).

    .venv/bin/python benchmarks/softmax_adaptive.py [--before REV] [--repeats 1]

`--before REV` runs the same configuration with the code at git revision REV (a temporary
worktree) alternately with this checkout, so the two are measured in one invocation; their
accuracies must agree to the last digit (the change is bit-identical).

The floor: the run's GEMM flops at the single-thread GEMM rate measured here (precision.py's
gemm_rate): training (precision.epoch_flop) plus, per chapter, one pass of the n training
samples through the network for the features (2 n in out per layer) and the head's epochs
(forward and both gradients of n x 2000 @ 2000 x 10: 6 n 2000 10 an epoch).
Writes benchmarks/results/softmax_adaptive.json.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import tempfile

from _common import ROOT, median, mpff_train, span_seconds, write_result
from precision import BATCH, DIMS, N, cpu_flags, epoch_flop, gemm_rate

KINDS = ("train", "forward", "head", "negatives", "eval")


def floor_flop(epochs: int, chapters: int, n: int) -> dict:
    head_in = sum(DIMS[2:]) if len(DIMS) > 2 else DIMS[-1]  # the classifier layers: all but the first
    train = epoch_flop(epochs // chapters) * epochs * n / N
    features = chapters * sum(2 * n * DIMS[k] * DIMS[k + 1] for k in range(len(DIMS) - 1))
    head = epochs * 6 * n * head_in * 10
    return {"train": train, "features": features, "head": head, "total": train + features + head}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--before", help="git revision to measure alternately with this checkout")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--train-subset", type=int, default=0)
    args = p.parse_args()
    E = args.epochs
    n = args.train_subset or N
    rate = gemm_rate("fp32")
    flop = floor_flop(E, E, n)
    base = [f"model.dims=[{','.join(map(str, DIMS))}]", f"train.epochs={E}", f"train.chapters={E}",
            f"train.batch_size={BATCH}", "train.lr=0.01", "train.negatives=adaptive", "train.adaptive_lag=0",
            "train.classifier=softmax", "train.threads=1", "train.eval_every=0", "run.schedule=sequential",
            "run.report=false", "run.checkpoint_every=0", "data.test_subset=0",
            f"data.train_subset={args.train_subset}"]
    codes = {"this": ROOT}
    tmp_tree = None
    if args.before:
        tmp_tree = tempfile.mkdtemp(prefix="mpff-before-")
        subprocess.run(["git", "-C", ROOT, "worktree", "add", "--detach", tmp_tree, args.before],
                       check=True, capture_output=True)
        codes = {"before": tmp_tree, "this": ROOT}
    runs = []
    try:
        for rep in range(args.repeats):
            for label, root in codes.items():
                with tempfile.TemporaryDirectory() as tmp:
                    out = os.path.join(tmp, "run")
                    run = mpff_train(out, config=os.path.join(ROOT, "configs/tiny.toml"), sets=base, root=root)
                    spans = {k: span_seconds(out, (k,))[0] for k in KINDS}
                runs.append({"code": label, "repeat": rep, "test_accuracy": run["test_accuracy"],
                             "wall_time_s": run["wall_time"], "span_seconds": spans})
                print(f"{label} #{rep}: {run['test_accuracy']:.2%}, wall {run['wall_time']:.1f} s, "
                      + ", ".join(f"{k} {v:.1f} s" for k, v in spans.items()), flush=True)
    finally:
        if tmp_tree:
            subprocess.run(["git", "-C", ROOT, "worktree", "remove", "--force", tmp_tree], capture_output=True)
    summary = {}
    for label in codes:
        mine = [r for r in runs if r["code"] == label]
        busy = median([sum(r["span_seconds"].values()) for r in mine])
        summary[label] = {
            "wall_time_s": median([r["wall_time_s"] for r in mine]),
            "busy_seconds": busy,
            "span_seconds": {k: median([r["span_seconds"][k] for r in mine]) for k in KINDS},
            "test_accuracy": median([r["test_accuracy"] for r in mine]),
            "floor_seconds": flop["total"] / rate,
            "ratio_to_floor": busy / (flop["total"] / rate),
        }
    if "before" in summary:
        summary["speedup"] = summary["before"]["wall_time_s"] / summary["this"]["wall_time_s"]
        summary["same_accuracy"] = all(r["test_accuracy"] == runs[0]["test_accuracy"] for r in runs)
    write_result("softmax_adaptive", {"config": base, "before": args.before, "cpu_flags": cpu_flags(),
                                      "gemm_rate_flops": rate, "floor_flop": flop, "runs": runs,
                                      "summary": summary})


if __name__ == "__main__":
    main()
