"""Sequential speed against the machine's limit, in fp32 and bf16 (not a test).

The accuracy benchmark's configuration (`[784,1000,1000,1000]`, E = S = 10, batch 64, Random
negatives, goodness classifier, one thread, full MNIST), Sequential, for each precision and
seed; and, in the same invocation, the single-thread GEMM rate at the shapes one training step
uses, which gives the arithmetic floor of an epoch: its GEMM flops at that rate.

    .venv/bin/python benchmarks/precision.py [--seeds 0 1 2] [--precisions fp32 bf16]
    .venv/bin/python benchmarks/precision.py --device cuda --dims 784 2000 2000 2000 2000 \
        --precisions fp32 tf32 bf16 --seeds 0 --epochs 2     # a GPU, the paper's width

Per epoch of one layer of in x out on n samples (2n rows: positives and negatives), a step of
batch B does a forward product (2B x in) @ (in x out) and the weight gradient (out x 2B) @
(2B x in): 8 n in out flop an epoch. Each chapter also pushes the 2n rows through the layers
below the one trained (2 x 2n x in x out per layer applied). Training seconds are the run's
train and forward spans (evaluation, set-up and the model write apart).
Writes benchmarks/results/precision.json (precision_cuda.json with --device cuda).
"""

from __future__ import annotations

import argparse
import os
import re
import tempfile
import time

import torch
from _common import median, mpff_train, span_seconds, write_result

DIMS = (784, 1000, 1000, 1000)
BATCH = 64
N = 60000


def cpu_flags() -> list[str]:
    try:
        with open("/proc/cpuinfo") as fh:
            flags = next(line for line in fh if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return []
    return sorted(f for f in flags if re.fullmatch(r"avx512_bf16|amx_bf16|amx_tile|avx512f|avx2|amx_fp16", f))


def gemm_rate(precision: str, device: torch.device | str = "cpu", repeats: int = 60) -> float:
    """Flop/s of the products one training step of the network does (on the CPU one thread),
    fp32 tensors through mpff's own product (mpff.ff.linear) at the matmul precision mpff
    trains with (mpff.ff.matmul_precision)."""
    from mpff.ff import linear, matmul_precision
    device = torch.device(device)
    torch.set_num_threads(1)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    total_flop, total_s = 0.0, 0.0
    with matmul_precision(precision, device):
        for k in range(len(DIMS) - 1):
            a = torch.randn(2 * BATCH, DIMS[k], device=device)
            w = torch.randn(DIMS[k + 1], DIMS[k], device=device)
            g = torch.randn(2 * BATCH, DIMS[k + 1], device=device)
            for _ in range(5):  # warm-up
                linear(a, w)
                linear(g.T, a.T)
            sync()
            t0 = time.perf_counter()
            for _ in range(repeats):
                linear(a, w)        # forward: a @ w.T
                linear(g.T, a.T)    # weight gradient: g.T @ a
            sync()
            total_s += time.perf_counter() - t0
            total_flop += repeats * 2 * (2 * 2 * BATCH * DIMS[k] * DIMS[k + 1])
    return total_flop / total_s


def epoch_flop(epochs_per_chapter: int = 1) -> float:
    """GEMM flops of one epoch: training every layer, plus the per-chapter forward passes."""
    train = sum(8 * N * DIMS[k] * DIMS[k + 1] for k in range(len(DIMS) - 1))
    # chapter c: layer k's inputs = the 2N rows through layers 0..k-1 (cached one layer to the next)
    forward = sum(2 * 2 * N * DIMS[k] * DIMS[k + 1] for k in range(len(DIMS) - 2))
    return train + forward / epochs_per_chapter


def main() -> None:
    global DIMS, BATCH
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--train-subset", type=int, default=0)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--dims", type=int, nargs="+", default=list(DIMS))
    p.add_argument("--batch", type=int, default=BATCH)
    args = p.parse_args()
    DIMS, BATCH = tuple(args.dims), args.batch
    E = args.epochs
    n = args.train_subset or N
    device = torch.device(args.device)
    rates = {p: gemm_rate(p, device) for p in args.precisions}
    flop = epoch_flop() * n / N
    base = [f"model.dims=[{','.join(map(str, DIMS))}]", f"train.epochs={E}", f"train.chapters={E}",
            f"train.batch_size={BATCH}", "train.lr=0.01", "train.negatives=random", "train.classifier=goodness",
            "train.threads=1", "train.eval_every=0", "run.schedule=sequential", "run.report=false",
            "run.checkpoint_every=0", "data.test_subset=0", f"data.train_subset={args.train_subset}",
            f"run.device={args.device}"]
    runs = []
    for seed in args.seeds:  # precisions alternate within a seed: drift hits both alike
        for precision in args.precisions:
            with tempfile.TemporaryDirectory() as tmp:
                out = os.path.join(tmp, "run")
                run = mpff_train(out, config="configs/tiny.toml",
                                 sets=base + [f"train.seed={seed}", f"train.precision={precision}"])
                train_s = span_seconds(out, ("train", "forward"))[0]
            runs.append({"seed": seed, "precision": precision, "test_accuracy": run["test_accuracy"],
                         "training_seconds_per_epoch": train_s / E, "wall_time_s": run["wall_time"]})
            print(f"{precision} seed {seed}: {run['test_accuracy']:.2%}, {train_s / E:.2f} s/epoch of training",
                  flush=True)
    summary = {}
    for precision in args.precisions:
        mine = [r for r in runs if r["precision"] == precision]
        per_epoch = median([r["training_seconds_per_epoch"] for r in mine])
        floor = flop / rates[precision]
        summary[precision] = {
            "training_seconds_per_epoch": per_epoch,
            "test_accuracy": median([r["test_accuracy"] for r in mine]),
            "test_accuracy_min": min(r["test_accuracy"] for r in mine),
            "test_accuracy_max": max(r["test_accuracy"] for r in mine),
            "gemm_rate_flops": rates[precision], "floor_seconds_per_epoch": floor,
            "ratio_to_floor": per_epoch / floor}
    for low in ("bf16", "tf32"):
        if "fp32" in summary and low in summary:
            summary[f"{low}_speedup"] = (summary["fp32"]["training_seconds_per_epoch"]
                                         / summary[low]["training_seconds_per_epoch"])
    machine = {"cpu_flags": cpu_flags()}
    if device.type == "cuda":
        machine.update(gpu=torch.cuda.get_device_name(device), torch_cuda=torch.version.cuda)
    write_result("precision" if device.type == "cpu" else "precision_cuda",
                 {"config": base, **machine, "epoch_gemm_flop": flop,
                  "runs": runs, "summary": summary})


if __name__ == "__main__":
    main()
