"""Stop latency (not a test): seconds from a stop signal to the job's exit, sent while a rank is
inside a task with a large number of epochs (one chapter of 2000 epochs), on 1 and 2 ranks.

    .venv/bin/python benchmarks/stop_latency.py [--repeats 3]

Each run is started, the signal is sent 2 s after rank 0's trace appears (training has begun),
and the time until the launcher (python, or mpiexec for 2 ranks) exits is measured; the exit
code must be 75 and run.json must say "preempted". Writes benchmarks/results/stop_latency.json.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

from _common import ROOT, VENV_BIN, median, write_result

SETTINGS = ["model.dims=[784,256,256]", "data.train_subset=10000", "data.test_subset=1000",
            "train.epochs=2000", "train.chapters=1", "run.report=false"]


def one(out: str, ranks: int, sig: int, schedule: str) -> float:
    cmd = [sys.executable, "-m", "mpi4py", "-m", "mpff", "train", "--config", "tiny", "--out", out, "-q"]
    for s in SETTINGS + [f"run.schedule={schedule}"]:
        cmd += ["--set", s]
    if ranks > 1:
        cmd = [os.path.join(VENV_BIN, "mpiexec"), "-n", str(ranks)] + cmd
    env = dict(os.environ, MPIR_CVAR_ENABLE_HEAVY_YIELD="1")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    trace = os.path.join(out, "trace", "rank0000.h5")
    while not os.path.exists(trace):
        if proc.poll() is not None:
            raise RuntimeError(f"the run ended before training began: {proc.stderr.read()}")
        time.sleep(0.02)
    time.sleep(2.0)
    t0 = time.perf_counter()
    proc.send_signal(sig)
    proc.wait(timeout=120)
    seconds = time.perf_counter() - t0
    with open(os.path.join(out, "run.json")) as fh:
        status = json.load(fh)["status"]
    if proc.returncode != 75 or status != "preempted":
        raise RuntimeError(f"exit {proc.returncode}, status {status}: {proc.stderr.read()}")
    return seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    cases = [("sequential, SIGTERM", 1, signal.SIGTERM, "sequential"),
             ("sequential, SIGINT (Ctrl-C)", 1, signal.SIGINT, "sequential"),
             ("all_layers on 2 ranks, SIGTERM to mpiexec", 2, signal.SIGTERM, "all_layers"),
             ("single_layer on 2 ranks, SIGUSR1 to mpiexec", 2, signal.SIGUSR1, "single_layer")]
    rows = {}
    for name, ranks, sig, schedule in cases:
        times = []
        for _ in range(args.repeats):
            with tempfile.TemporaryDirectory() as tmp:
                times.append(one(os.path.join(tmp, "run"), ranks, sig, schedule))
        rows[name] = {"ranks": ranks, "signal": int(sig), "seconds": times, "median_s": median(times),
                      "max_s": max(times)}
        print(f"{name}: median {median(times):.2f} s, max {max(times):.2f} s", flush=True)
    write_result("stop_latency", {"settings": SETTINGS, "cases": rows, "target_s": 10.0})


if __name__ == "__main__":
    main()
