"""Tracing and checkpointing overhead at the workstation preset (not a test).

Alternates runs with tracing on/off and with checkpoints every chapter/never, and reports the
median wall times and their ratios. Targets: tracing within 2 %, checkpoints at most 3 %.

    .venv/bin/python benchmarks/overhead.py [--repeats 3] [--ranks 2]

Writes benchmarks/results/overhead.json.
"""

from __future__ import annotations

import argparse
import os
import tempfile

from _common import median, mpff_train, span_seconds, write_result


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--config", default="configs/workstation.toml")
    p.add_argument("--set", dest="sets", action="append", default=[])
    args = p.parse_args()
    variants = {
        "trace_off": ["run.trace=false", "run.report=false", "run.checkpoint_every=0"],
        "trace_on": ["run.trace=true", "run.report=false", "run.checkpoint_every=0"],
        "checkpoint_every_chapter": ["run.trace=true", "run.report=false", "run.checkpoint_every=1"],
    }
    times = {k: [] for k in variants}
    # the direct measure, free of run-to-run noise: time inside checkpoint spans over the wall
    # time, on the rank that spent the most
    ckpt_fraction, ckpt_seconds = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            for name, sets in variants.items():
                run = mpff_train(os.path.join(tmp, f"{name}-{r}"), config=args.config, ranks=args.ranks,
                                 sets=sets + args.sets)
                times[name].append(run["wall_time"])
                if name == "checkpoint_every_chapter":
                    spent = max(span_seconds(os.path.join(tmp, f"{name}-{r}"), ("checkpoint",)))
                    ckpt_seconds.append(spent)
                    ckpt_fraction.append(spent / run["wall_time"])
    med = {k: median(v) for k, v in times.items()}
    write_result("overhead", {
        "config": args.config, "extra_sets": args.sets, "ranks": args.ranks, "wall_times_s": times,
        "median_s": med,
        "tracing_overhead_fraction": med["trace_on"] / med["trace_off"] - 1.0,
        "checkpoint_overhead_fraction": med["checkpoint_every_chapter"] / med["trace_on"] - 1.0,
        "checkpoint_span_seconds": ckpt_seconds,
        "checkpoint_span_fraction_median": median(ckpt_fraction),
        "targets": {"tracing": "<= 0.02", "checkpoint": "<= 0.03"},
    })


if __name__ == "__main__":
    main()
