"""Where Single Layer's evaluations run: on the last rank (the paper's) or balanced (not a test).

The workstation preset (`configs/workstation.toml`: Single Layer on 2 ranks, `[784,500,500]`,
E = S = 12, an evaluation every 2 chapters), with `run.eval_placement = last` and `balanced`
alternating, `--rounds` times each, one invocation. For each run: wall time, the time every rank
spent evaluating and waiting (trace spans), and the accuracy of every chapter (the two
placements must agree to the last digit: the same evaluations of the same networks).

    .venv/bin/python benchmarks/eval_placement.py [--rounds 2] [--set SECTION.KEY=VALUE ...]

Writes benchmarks/results/eval_placement.json.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile

from _common import ROOT, median, mpff_train, span_seconds, write_result

PLACEMENTS = ("last", "balanced")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="SECTION.KEY=VALUE")
    args = p.parse_args()
    base = ["run.report=false", "run.checkpoint_every=0", "train.threads=1"] + args.sets
    runs = []
    for rnd in range(args.rounds):
        for placement in PLACEMENTS:
            with tempfile.TemporaryDirectory() as tmp:
                out = os.path.join(tmp, "run")
                run = mpff_train(out, config=os.path.join(ROOT, "configs", "workstation.toml"), ranks=2,
                                 sets=base + [f"run.eval_placement={placement}"])
                evals, waits = span_seconds(out, ("eval",)), span_seconds(out, ("wait",))
                with open(os.path.join(out, "run.json")) as fh:
                    acc = json.load(fh)["accuracy_per_chapter"]
            runs.append({"placement": placement, "round": rnd, "wall_time_s": run["wall_time"],
                         "eval_seconds_per_rank": evals, "wait_seconds_per_rank": waits,
                         "test_accuracy": run["test_accuracy"], "accuracy_per_chapter": acc})
            print(f"{placement} #{rnd}: wall {run['wall_time']:.1f} s, eval per rank "
                  f"{', '.join(f'{v:.1f}' for v in evals)} s, waiting {', '.join(f'{v:.1f}' for v in waits)} s, "
                  f"{run['test_accuracy']:.2%}", flush=True)
    summary = {}
    for placement in PLACEMENTS:
        mine = [r for r in runs if r["placement"] == placement]
        summary[placement] = {
            "wall_time_s": median([r["wall_time_s"] for r in mine]),
            "eval_seconds_per_rank": [median([r["eval_seconds_per_rank"][k] for r in mine]) for k in range(2)],
            "wait_seconds_per_rank": [median([r["wait_seconds_per_rank"][k] for r in mine]) for k in range(2)],
        }
    summary["speedup"] = summary["last"]["wall_time_s"] / summary["balanced"]["wall_time_s"]
    summary["same_accuracies"] = all(r["accuracy_per_chapter"] == runs[0]["accuracy_per_chapter"] for r in runs)
    write_result("eval_placement", {"config": ["configs/workstation.toml"] + base, "runs": runs,
                                    "summary": summary})


if __name__ == "__main__":
    main()
