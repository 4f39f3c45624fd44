"""Does exchanging weights more often pay? Chapter length against accuracy, wall time, bubble and
bytes (issue 22, item 4), and `mpff predict` of the same on more ranks.

On 2 ranks, Single Layer and All Layers with Random negatives, `run.exchange = "weights"` (the
paper's), for chapters of 1 epoch, 1/10 epoch, 100, 10 and 1 batches (``train.chapter_batches``);
then from each 2-rank run `mpff predict` for 4, 8 and 16 ranks over InfiniBand HDR and 10 GbE.
Rows are kept in the JSON as they finish and skipped when present: an interrupted sweep goes on
where it stopped (``--fresh`` starts over).

    .venv/bin/python benchmarks/chapters.py                           # the issue's: full MNIST, E = 10 (hours here)
    .venv/bin/python benchmarks/chapters.py --train-subset 10000 --epochs 4 --out ...   # a smaller sweep

Writes benchmarks/results/chapters.json (or ``--out``). Time it alone on the machine.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile

from _common import RESULTS, ROOT, mpff_train

sys.path.insert(0, ROOT)
from mpff.analysis.report import analyze_run  # noqa: E402

SCHEDULES = ("single_layer", "all_layers")
NETWORKS = ("ib-hdr", "eth10")
PREDICT_RANKS = (4, 8, 16)


def lengths(n_train: int, batch: int) -> dict[str, int]:
    """Chapter lengths in batches, by name."""
    per_epoch = math.ceil(n_train / batch)
    return {"1 epoch": per_epoch, "1/10 epoch": math.ceil(per_epoch / 10), "100 batches": 100,
            "10 batches": 10, "1 batch": 1}


def predict(run_dir: str, schedule: str, network: str) -> list[dict]:
    cmd = [sys.executable, "-m", "mpff", "predict", run_dir, "--ranks", ",".join(map(str, PREDICT_RANKS)),
           "--schedules", schedule, "--network", network, "--json",
           "--out", tempfile.mkdtemp(prefix="mpff-predict-")]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        return [{"error": (proc.stderr or proc.stdout).strip().splitlines()[-1:]}]
    keep = ("ranks", "schedule", "possible", "reason", "training_seconds", "wall_seconds", "speedup",
            "training_speedup", "efficiency", "bubble", "bytes_moved", "messages")
    return [{k: p.get(k) for k in keep if k in p} for p in json.loads(proc.stdout)["predictions"]]


def one_row(args, name: str, k: int, schedule: str, work: str) -> dict:
    out = os.path.join(work, f"{schedule}-k{k}")
    chapters = math.ceil(args.epochs * math.ceil(args.n_train / 64) / k)  # as mpff.chapters derives it
    every = max(1, chapters // 10)  # about ten evaluations and checkpoints whatever the length
    sets = [f"model.dims={args.dims}", f"train.epochs={args.epochs}", f"train.chapter_batches={k}",
            "train.negatives=random", "train.classifier=goodness", "train.lr=0.01", "train.threads=1",
            f"train.eval_every={every}", f"run.checkpoint_every={every}",
            f"run.schedule={schedule}", "run.exchange=weights", "run.report=false",
            f"data.train_subset={args.train_subset}"]
    run = mpff_train(out, config="workstation", sets=sets, ranks=2)
    summary = analyze_run(out)
    row = {"length": name, "chapter_batches": k, "schedule": schedule, "chapters": chapters,
           "test_accuracy": run["test_accuracy"], "accuracy_per_chapter": run["accuracy_per_chapter"],
           "training_seconds": run["training_seconds"], "wall_seconds": run["wall_time"],
           "bubble_measured": summary.bubble_measured, "bubble_modelled": summary.bubble_modelled,
           "bytes_sent": sum(r["bytes_sent"] for r in run["ranks"]), "run_dir": out}
    row["predicted"] = {net: predict(out, schedule, net) for net in NETWORKS}
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--dims", default="[784,1000,1000,1000]")
    p.add_argument("--train-subset", type=int, default=0, help="0: the full 60,000")
    p.add_argument("--only", nargs="*", help="chapter lengths by name (default: all)")
    p.add_argument("--out", default=os.path.join(RESULTS, "chapters.json"))
    p.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "mpff-chapters"))
    p.add_argument("--fresh", action="store_true")
    args = p.parse_args()
    args.n_train = args.train_subset or 60000
    result = {"benchmark": "chapters", "epochs": args.epochs, "dims": args.dims, "n_train": args.n_train,
              "ranks": 2, "rows": []}
    if os.path.exists(args.out) and not args.fresh:
        with open(args.out) as fh:
            result = json.load(fh)
    done = {(r["chapter_batches"], r["schedule"]) for r in result["rows"]}
    for name, k in lengths(args.n_train, 64).items():
        if args.only and name not in args.only:
            continue
        for schedule in SCHEDULES:  # alternated within each length
            if (k, schedule) in done:
                continue
            row = one_row(args, name, k, schedule, args.work)
            result["rows"].append(row)
            with open(args.out + ".tmp", "w") as fh:
                json.dump(result, fh, indent=1)
            os.replace(args.out + ".tmp", args.out)
            print(f"{name:12s} {schedule:13s} S={row['chapters']:6d} acc {row['test_accuracy']:.4f} "
                  f"{row['training_seconds']:.1f} s, bubble {row['bubble_measured']:.3f}, "
                  f"{row['bytes_sent'] / 1e6:.1f} MB", flush=True)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
