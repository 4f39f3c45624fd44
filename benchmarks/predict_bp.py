"""Predicted against measured data-parallel backprop (not a test): how far to trust `mpff predict`
on a backprop run.

Backprop `[784,1000,1000,1000]`, full MNIST, E = S = 2, batch 64, one thread per rank. Per round,
one after the other on this machine:

1. one rank alone (the source every prediction starts from);
2. two one-rank runs at once (how much two ranks sharing this machine's two cores slow each
   other's steps: the --contention factor, from the step phases of the runs' traces);
3. data-parallel on 2 ranks, strong scaling (global batch 64, 32 rows per rank);
4. data-parallel on 2 ranks, weak scaling (64 rows per rank, global batch 128).

Before the rounds, gloo's all-reduce on 2 ranks of this machine is timed (torch.distributed over
loopback TCP, as DDP uses it here) and fitted to the ring model's 2 latency + bytes / bandwidth.
Then 3 and 4 are predicted from 1 with that link, without and with the measured contention, and
each prediction's error in training time (evaluation included, setup apart) and wall time is
reported; medians over the rounds.

Writes benchmarks/results/predict_bp.json (run directories under outputs/bench-predict-bp/).

    .venv/bin/python benchmarks/predict_bp.py              # ~10 minutes on 2 cores; nothing else running
    .venv/bin/python benchmarks/predict_bp.py --quick      # a 1-minute smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading

from _common import ROOT, VENV_BIN, mpff_train, write_result

sys.path.insert(0, ROOT)
from mpff import predict  # noqa: E402
from mpff.analysis.runs import load_run  # noqa: E402
from mpff.analysis.summary import training_phase  # noqa: E402
from mpff.predict import interconnect  # noqa: E402
from mpff.predict.backprop import step_phases  # noqa: E402
from mpff.trace import STEP_PHASES  # noqa: E402

ALLREDUCE = r"""
import json, sys, time
import torch, torch.distributed as dist
from mpi4py import MPI
from mpff import ddp
from mpff.comm import Comm
torch.set_num_threads(1)
ddp.init_process_group(Comm(MPI.COMM_WORLD), torch.device("cpu"))
out = {}
for nbytes in (4, 1 << 20, 4 << 20, 16 << 20):
    x = torch.zeros(max(nbytes // 4, 1))
    times = []
    for i in range(25):
        dist.barrier()
        t0 = time.perf_counter()
        dist.all_reduce(x)
        times.append(time.perf_counter() - t0)
    out[nbytes] = sorted(times[5:])[len(times[5:]) // 2]
ddp.shutdown()
if MPI.COMM_WORLD.rank == 0:
    print(json.dumps(out))
"""


def measure_allreduce() -> dict:
    """gloo all-reduce on 2 ranks: seconds per size and the ring fit 2 (alpha + bytes/2 / beta)."""
    env = dict(os.environ, MPIR_CVAR_ENABLE_HEAVY_YIELD="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([os.path.join(VENV_BIN, "mpiexec"), "-n", "2", sys.executable, "-c", ALLREDUCE],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=True)
    times = {int(k): v for k, v in json.loads(proc.stdout.strip().splitlines()[-1]).items()}
    small, big = min(times), max(times)
    latency = times[small] / 2                      # 2 messages of (almost) nothing
    bandwidth = big / max(times[big] - times[small], 1e-9)   # 2 messages of big / 2 bytes each
    return {"seconds": {str(k): v for k, v in times.items()}, "latency": latency, "bandwidth": bandwidth}


def phases_per_step(run_dir: str) -> dict:
    """Rank 0's seconds per step of each phase and of the train span (medians over chapters)."""
    rt = load_run(run_dir).ranks[0]
    per = step_phases(rt)
    train = {int(sp["chapter"]): float(sp["end"] - sp["start"]) for kind, sp in zip(rt.kinds, rt.spans)
             if kind == "train"}
    out = {p: statistics.median(d[p] / d["steps"] for d in per.values()) for p in STEP_PHASES}
    out["train_span"] = statistics.median(train[c] / d["steps"] for c, d in per.items())
    allreduce = sorted(float(sp["end"] - sp["start"]) for kind, sp in zip(rt.kinds, rt.spans) if kind == "allreduce")
    if allreduce:
        out["allreduce_span_median"] = allreduce[len(allreduce) // 2]
    return out


def step_seconds(run_dir: str) -> float:
    """Seconds per step of the timed phases together (rank 0, medians over chapters)."""
    return sum(v for k, v in phases_per_step(run_dir).items() if k in STEP_PHASES)


def measured(run_dir: str) -> dict:
    run = load_run(run_dir)
    return {"run": run_dir, "wall_seconds": run.wall, "training_seconds": training_phase(run).seconds}


RUNS = ("alone", "pair_a", "pair_b", "strong", "weak")


def one_round(keep: str, sets: list[str]) -> dict:
    dirs = {name: os.path.join(keep, name) for name in RUNS}
    print("predict_bp benchmark: one rank alone", flush=True)
    mpff_train(dirs["alone"], config="configs/backprop.toml", sets=sets)
    print("predict_bp benchmark: two one-rank runs at once", flush=True)
    errors: list[BaseException] = []

    def run_pair(d):
        try:
            mpff_train(d, config="configs/backprop.toml", sets=sets)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
    threads = [threading.Thread(target=run_pair, args=(dirs[k],)) for k in ("pair_a", "pair_b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    for name, scaling in (("strong", "strong"), ("weak", "weak")):
        print(f"predict_bp benchmark: data-parallel on 2 ranks, {scaling} scaling", flush=True)
        mpff_train(dirs[name], config="configs/backprop.toml", ranks=2,
                   sets=sets + ["run.schedule=data_parallel", f"run.scaling={scaling}"])
    return {**read_round(keep), "reused": False}


def read_round(keep: str) -> dict:
    """A round's numbers from its runs in ``keep`` (``--reuse``: those an earlier invocation left)."""
    dirs = {name: os.path.join(keep, name) for name in RUNS}
    alone = step_seconds(dirs["alone"])
    pair = statistics.median(step_seconds(dirs[k]) for k in ("pair_a", "pair_b"))
    return {"dirs": dirs, "step_alone_seconds": alone, "step_pair_seconds": pair, "contention": pair / alone,
            "measured": {k: measured(dirs[k]) for k in ("alone", "strong", "weak")}, "reused": True}


def predictions(rnd: dict, link: interconnect.Link) -> dict:
    runs = [load_run(rnd["dirs"][k]) for k in ("alone", "strong", "weak")]
    out = {}
    network = predict.Network(inter=link, intra=link, ranks_per_node=2)
    for contention_label, contention in (("without_contention", "none"), ("with_contention", rnd["contention"])):
        for scaling in ("strong", "weak"):
            outcome = predict.predict(runs, ranks=[1, 2], network=network, contention=contention,
                                      overrides=[f"run.scaling={scaling}"])
            p = next(p for p in outcome.predictions if p.ranks == 2)
            meas = rnd["measured"][scaling]
            out[f"{scaling}_{contention_label}"] = {
                "predicted_training_seconds": p.training, "measured_training_seconds": meas["training_seconds"],
                "training_error": p.training / meas["training_seconds"] - 1.0,
                "predicted_wall_seconds": p.wall, "measured_wall_seconds": meas["wall_seconds"],
                "wall_error": p.wall / meas["wall_seconds"] - 1.0,
                "predicted_speedup": p.speedup, "details": p.details,
                "measured_run": p.measured_run,
                "measured_per_step": phases_per_step(rnd["dirs"][scaling])}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--dims", default="[784,1000,1000,1000]")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--reuse", action="store_true",
                    help="predict again from the runs an earlier invocation left (the all-reduce is timed again)")
    args = ap.parse_args()
    keep = os.path.join(ROOT, "outputs", "bench-predict-bp" + ("-quick" if args.quick else ""))
    dims = "[784,100,100]" if args.quick else args.dims
    E = 2 if args.quick else args.epochs
    sets = [f"model.dims={dims}", f"train.epochs={E}", f"train.chapters={E}", "train.batch_size=64",
            "train.threads=1", "run.report=false", "run.checkpoint_every=0"]
    if args.quick:
        sets += ["data.train_subset=6000", "data.test_subset=1000"]
    rounds = 1 if args.quick else args.rounds
    print("predict_bp benchmark: timing gloo's all-reduce on 2 ranks", flush=True)
    allreduce = measure_allreduce()
    link = interconnect.Link("gloo-loopback", allreduce["latency"], allreduce["bandwidth"],
                             "gloo all-reduce on 2 ranks of this machine, measured")
    results = []
    for r in range(rounds):
        rnd = read_round(os.path.join(keep, f"round{r}")) if args.reuse else \
            one_round(os.path.join(keep, f"round{r}"), sets)
        rnd["source_per_step"] = phases_per_step(rnd["dirs"]["alone"])
        rnd["predictions"] = predictions(rnd, link)
        results.append(rnd)
    keys = list(results[0]["predictions"])
    summary = {k: {"training_error_median": statistics.median(r["predictions"][k]["training_error"] for r in results),
                   "wall_error_median": statistics.median(r["predictions"][k]["wall_error"] for r in results),
                   "training_errors": [r["predictions"][k]["training_error"] for r in results]}
               for k in keys}
    result = {"config": sets, "allreduce": allreduce, "rounds": results,
              "contention_median": statistics.median(r["contention"] for r in results),
              "summary": summary, "cpu": _cpu()}
    write_result("predict_bp_quick" if args.quick else "predict_bp", result)


def _cpu() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            return next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
    except (OSError, StopIteration):
        return "unknown"


if __name__ == "__main__":
    main()
