"""Step overhead (not a test): mpff's per-epoch time for one FF layer against a bare PyTorch loop
doing the same arithmetic (same shapes, thread count, batch), on MNIST-shaped data.

    .venv/bin/python benchmarks/step_overhead.py [--samples 60000] [--width 2000] [--repeats 3]

The bare loop is what one writes from the paper: per batch, gather positives and negatives,
normalise, one linear + ReLU, goodness, softplus loss, backward, Adam. It runs twice: with the
same (fused) Adam as mpff — the overhead comparison, same arithmetic — and with torch's default
Adam, the loop people usually write. mpff's loop is mpff.ff.train_epochs plus its
once-per-chapter normalisation. Runs alternate; medians.
Writes benchmarks/results/step_overhead.json.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from _common import median, write_result


def bare_epoch(x_pos, x_neg, weight, bias, opt, batch, theta, seed):
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(x_pos.shape[0], generator=g)
    for i in range(0, x_pos.shape[0], batch):
        idx = perm[i:i + batch]
        xb = torch.cat([x_pos[idx], x_neg[idx]])
        xb = xb / (xb.norm(dim=1, keepdim=True) + 1e-4)
        h = F.relu(F.linear(xb, weight, bias))
        gg = h.pow(2).mean(dim=1)
        b = idx.shape[0]
        loss = F.softplus(torch.cat([theta - gg[:b], gg[b:] - theta])).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--samples", type=int, default=60000)
    p.add_argument("--width", type=int, default=2000)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # as mpff train does, for both loops
    from mpff.ff import FFLayer, train_epochs

    g = torch.Generator().manual_seed(0)
    x_pos = torch.randn(args.samples, 784, generator=g)
    x_neg = torch.randn(args.samples, 784, generator=g)
    mpff_layer = FFLayer(784, args.width, seed=1)
    mpff_opt = mpff_layer.make_optimizer(0.01)
    from mpff.ff import make_adam

    bare_w = torch.nn.Parameter(mpff_layer.weight.detach().clone())
    bare_b = torch.nn.Parameter(mpff_layer.bias.detach().clone())
    bare_opt = make_adam([bare_w, bare_b], 0.01)  # the same optimizer as mpff
    dflt_w = torch.nn.Parameter(mpff_layer.weight.detach().clone())
    dflt_b = torch.nn.Parameter(mpff_layer.bias.detach().clone())
    dflt_opt = torch.optim.Adam([dflt_w, dflt_b], lr=0.01)  # torch's default Adam
    theta = 0.01 * args.width

    def run_mpff(seed):
        xn_pos, xn_neg = mpff_layer.normalize_all(x_pos), mpff_layer.normalize_all(x_neg)
        train_epochs(mpff_layer, mpff_opt, xn_pos, xn_neg, batch_size=64, lrs=[0.01], seeds=[seed])

    def run_bare(seed):
        bare_epoch(x_pos, x_neg, bare_w, bare_b, bare_opt, 64, theta, seed)

    def run_default(seed):
        bare_epoch(x_pos, x_neg, dflt_w, dflt_b, dflt_opt, 64, theta, seed)

    runs = (("mpff", run_mpff), ("bare", run_bare), ("bare_default_adam", run_default))
    for _, fn in runs:
        fn(99)  # warm-up: lazy imports, allocator, Adam state
    times = {name: [] for name, _ in runs}
    for r in range(args.repeats):
        for name, fn in runs:
            t0 = time.perf_counter()
            fn(r)
            times[name].append(time.perf_counter() - t0)
    m, b = median(times["mpff"]), median(times["bare"])
    write_result("step_overhead", {
        "samples": args.samples, "layer": [784, args.width], "batch_size": 64, "threads": args.threads,
        "seconds_per_epoch": times, "median_mpff_s": m, "median_bare_s": b,
        "median_bare_default_adam_s": median(times["bare_default_adam"]),
        "overhead_fraction": m / b - 1.0, "target": "<= 0.05",
        "speedup_vs_bare_default_adam": median(times["bare_default_adam"]) / m,
    })


if __name__ == "__main__":
    main()
