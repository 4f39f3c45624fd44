"""The tiny preset's budget: `mpff train --config tiny` from start to exit in at most 15 s (not a test).

The smoke-test preset promises a run of seconds. Its budget is held here, in a benchmark, and
not in the test suite (tests/test_outputs.py checks that it learns): CPU time depends on the
machine and on what else runs beside it (the suite's other tests on two cores took it from
12.8 s to 15.7 s of CPU on 2026-12-04). Run it with nothing else running: each round starts
a fresh process from a directory outside the clone, as the test does, with checkpoints and the
report on; median and spread of --rounds rounds.

    .venv/bin/python benchmarks/tiny_preset.py          # about a minute

Writes benchmarks/results/tiny_preset.json; exits 1 when the median CPU time is over budget.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

from _common import write_result

BUDGET_SECONDS = 15.0


def one_round() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    with tempfile.TemporaryDirectory() as tmp:
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "mpff", "train", "--config", "tiny", "--out", "run",
                               "--set", "run.checkpoint_every=1"], cwd=tmp, env=env, capture_output=True,
                              text=True, timeout=300)
        wall = time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if proc.returncode != 0:
            raise RuntimeError(proc.stderr[-2000:])
        with open(os.path.join(tmp, "run", "run.json")) as fh:
            info = json.load(fh)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"cpu_seconds": cpu, "wall_seconds": wall, "test_accuracy": info["test_accuracy"],
            "training_seconds": info["training_seconds"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    rounds = [one_round() for _ in range(args.rounds)]
    cpu = [r["cpu_seconds"] for r in rounds]
    wall = [r["wall_seconds"] for r in rounds]
    result = {"command": " ".join(sys.argv), "budget_seconds": BUDGET_SECONDS, "rounds": rounds,
              "median_cpu_seconds": statistics.median(cpu), "cpu_spread": [min(cpu), max(cpu)],
              "median_wall_seconds": statistics.median(wall), "wall_spread": [min(wall), max(wall)],
              "within_budget": statistics.median(cpu) <= BUDGET_SECONDS}
    write_result("tiny_preset", result)
    return 0 if result["within_budget"] else 1


if __name__ == "__main__":
    sys.exit(main())
