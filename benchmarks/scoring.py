"""Goodness scoring (evaluation and Adaptive negatives) with the first layer's product shared by
the ten labels, against ten overlaid passes (not a test).

The goodness classifier, and Adaptive negatives with it, push every sample through the whole
network once per label. The ten overlaid inputs differ only in which label column holds the 1
and share their norm, so `FFNet.goodness_scores` computes the first layer's product once and adds
the label's weight column per label. This times it against the definition (ten overlay passes,
written out below), on the MNIST test set (10,000 samples), one thread, alternating, and checks
that both give the same predictions.

    .venv/bin/python benchmarks/scoring.py [--rounds 3]

Writes benchmarks/results/scoring.json.
"""

from __future__ import annotations

import argparse
import time

import torch
from _common import median, write_result

from mpff.config import Config
from mpff.data import load_dataset
from mpff.model import NUM_CLASSES, FFNet, overlay

WIDTHS = {"[784,1000,1000,1000]": (784, 1000, 1000, 1000), "[784,2000,2000,2000,2000] (the paper's)":
          (784, 2000, 2000, 2000, 2000)}


@torch.no_grad()
def ten_passes(net: FFNet, x: torch.Tensor) -> torch.Tensor:
    """The definition: each label overlaid, the whole network applied (the code before)."""
    scores = torch.empty(x.shape[0], NUM_CLASSES)
    for i in range(0, x.shape[0], 4096):
        xc = x[i:i + 4096]
        for label in range(NUM_CLASSES):
            acts = net.activations(overlay(xc, torch.full((xc.shape[0],), label), net.label_position))
            scores[i:i + 4096, label] = sum(net.layers[k].goodness(acts[k]) for k in net.classifier_layers)
    return scores


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    x = torch.from_numpy(load_dataset(Config().data).x_test)
    out = {}
    for name, dims in WIDTHS.items():
        net = FFNet(dims, seed=0)
        times = {"ten_passes": [], "shared_first_product": []}
        for _ in range(args.rounds):
            for kind, fn in (("ten_passes", ten_passes), ("shared_first_product", FFNet.goodness_scores)):
                t0 = time.perf_counter()
                scores = fn(net, x)
                times[kind].append(time.perf_counter() - t0)
                if kind == "ten_passes":
                    ref = scores
        rel = float((scores - ref).abs().max() / ref.abs().max())
        same = float((scores.argmax(1) == ref.argmax(1)).float().mean())
        out[name] = {"seconds": times, "median_seconds": {k: median(v) for k, v in times.items()},
                     "speedup": median(times["ten_passes"]) / median(times["shared_first_product"]),
                     "max_relative_difference": rel, "same_prediction_fraction": same}
        print(f"{name}: {median(times['ten_passes']):.2f} s -> {median(times['shared_first_product']):.2f} s "
              f"({out[name]['speedup']:.2f}x), max relative difference {rel:.1e}, same predictions {same:.2%}",
              flush=True)
    write_result("scoring", {"samples": int(x.shape[0]), "threads": 1, "rounds": args.rounds, "widths": out})


if __name__ == "__main__":
    main()
