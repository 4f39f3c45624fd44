"""Predicted against measured wall time (not a test): how far to trust `mpff predict`.

Part 1, 2 ranks on this machine. [784,1000,1000], full MNIST, E = S = 20, batch 64, Random
negatives, goodness classifier, one thread per rank. Measured, one after the other:

1. Sequential on 1 rank: the task times every prediction starts from;
2. a short All Layers calibration run on 2 ranks (E = S = 3): how much two ranks on this
   machine slow each other (the contention `mpff predict --contention auto` fits);
3. All Layers and Single Layer on 2 ranks, the runs to predict.

Then All Layers and Single Layer on 2 ranks are predicted from run 1 (contention from runs 1
and 2; messages at this machine's intra-node link, measured first with an mpi4py ping-pong),
with and without contention, and each prediction's error against the measured run is reported.

Part 2, the paper's configuration on 4 ranks. One chapter of configs/paper.toml
([784,2000,2000,2000,2000], adaptive negatives, goodness classifier; E = S = 1, one thread) is
measured; from it E = S = 100 (evaluation every 10 chapters) is predicted for Sequential, All
Layers on 4 ranks (negatives lag 3, as the paper's All Layers) and Single Layer on 4 ranks
(newest negatives, as the paper's Single Layer), a node per rank and 10 GbE between them (the
paper used sockets; 16 MB messages against tasks of tens of seconds make the link matter
little), beside the paper's 3.75x (All Layers) and 2.13x (Single Layer).

Writes benchmarks/results/predict.json (run directories kept under outputs/bench-predict/).

    .venv/bin/python benchmarks/predict.py            # ~15-20 minutes on 2 cores; nothing else running
    .venv/bin/python benchmarks/predict.py --quick    # a 1-minute smoke test (outputs/bench-predict-quick/)
    .venv/bin/python benchmarks/predict.py --skip-paper --epochs 6 --dims [784,500,500]   # a smaller look
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from _common import ROOT, VENV_BIN, mpff_train, write_result

sys.path.insert(0, ROOT)
from mpff import predict  # noqa: E402
from mpff.analysis.runs import load_run  # noqa: E402
from mpff.analysis.summary import training_phase  # noqa: E402
from mpff.predict import interconnect  # noqa: E402

PAPER_SPEEDUP = {"all_layers": 11191 / 2981, "single_layer": 11191 / 5255}  # Table 1, adaptive, goodness

PING_PONG = r"""
import json, time
import numpy as np
from mpi4py import MPI
comm = MPI.COMM_WORLD
rank = comm.Get_rank()
def pingpong(nbytes, repeats):
    buf = np.zeros(max(nbytes, 1), dtype=np.uint8)
    comm.Barrier()
    t0 = time.perf_counter()
    for _ in range(repeats):
        if rank == 0:
            comm.Send(buf, dest=1); comm.Recv(buf, source=1)
        else:
            comm.Recv(buf, source=0); comm.Send(buf, dest=0)
    return (time.perf_counter() - t0) / (2 * repeats)
pingpong(8, 100)
small = pingpong(8, 2000)
big_bytes = 4 << 20
big = pingpong(big_bytes, 20)
if rank == 0:
    print(json.dumps({"latency": small, "bandwidth": big_bytes / max(big - small, 1e-9),
                      "seconds_8B": small, "seconds_4MiB": big}))
"""


def measure_link() -> dict:
    """Latency (8-byte ping-pong) and bandwidth (4 MiB) between two ranks of this machine."""
    env = dict(os.environ, MPIR_CVAR_ENABLE_HEAVY_YIELD="1")
    proc = subprocess.run([os.path.join(VENV_BIN, "mpiexec"), "-n", "2", sys.executable, "-c", PING_PONG],
                          cwd=ROOT, env=env, text=True, capture_output=True, timeout=300, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measured(run_dir: str) -> dict:
    run = load_run(run_dir)
    return {"run": run_dir, "wall_seconds": run.wall, "training_seconds": training_phase(run).seconds,
            "wall_time_run_json": run.info.get("wall_time")}


def error(pred: predict.Prediction, meas: dict) -> dict:
    return {"predicted_wall_seconds": pred.wall, "predicted_training_seconds": pred.training,
            "wall_error": pred.wall / meas["wall_seconds"] - 1.0,
            "training_error": pred.training / meas["training_seconds"] - 1.0,
            "predicted_bubble": pred.bubble, "predicted_speedup": pred.speedup}


def part_two_ranks(args, keep: str, link: interconnect.Link) -> dict:
    E = 4 if args.quick else args.epochs
    dims = "[784,100,100]" if args.quick else args.dims
    data = ["data.train_subset=6000", "data.test_subset=1000"] if args.quick else \
        [f"data.train_subset={args.train_subset}", "data.test_subset=0"]
    base = [f"model.dims={dims}", "train.batch_size=64", "train.negatives=random",
            "train.classifier=goodness", "train.eval_every=0", "train.threads=1", "run.report=false",
            "train.lr=0.01", "run.checkpoint_every=0"] + data
    cases = [("sequential", 1, E), ("calibration_all_layers", 2, 3), ("all_layers", 2, E), ("single_layer", 2, E)]
    dirs = {}
    for name, ranks, chapters in cases:
        schedule = name.replace("calibration_", "")
        dirs[name] = os.path.join(keep, name)
        print(f"predict benchmark: measuring {name} ({ranks} rank(s), E = S = {chapters})", flush=True)
        mpff_train(dirs[name], config="configs/tiny.toml", ranks=ranks,
                   sets=base + [f"train.epochs={chapters}", f"train.chapters={chapters}", f"run.schedule={schedule}"])
    runs = [load_run(dirs["sequential"]), load_run(dirs["calibration_all_layers"])]
    network = predict.Network(inter=link, intra=link, ranks_per_node=2)
    out = {"config": base + [f"train.epochs={E}", f"train.chapters={E}"],
           "measured": {name: measured(d) for name, d in dirs.items()}, "predictions": {}}
    for label, contention in (("with_contention", "auto"), ("without_contention", "none")):
        outcome = predict.predict(runs, ranks=[2], schedules=["sequential", "all_layers", "single_layer"],
                                  network=network, contention=contention)
        out["contention" if contention == "auto" else "contention_not_applied"] = {
            "factor": outcome.contention.factor, "stderr": outcome.contention.stderr,
            "note": outcome.contention.note}
        preds = {(p.schedule, p.ranks): p for p in outcome.predictions}
        out["predictions"][label] = {name: error(preds[(name, ranks)], out["measured"][name])
                                     for name, ranks in (("sequential", 1), ("all_layers", 2), ("single_layer", 2))}
        out["assumptions_" + label] = outcome.assumptions
    return out


def part_paper(args, keep: str) -> dict:
    sets = ["train.epochs=1", "train.chapters=1", "run.schedule=sequential", "train.threads=1",
            "run.report=false", "run.checkpoint_every=0"]
    if args.quick:
        sets += ["model.dims=[784,200,200,200,200]", "data.train_subset=6000", "data.test_subset=1000"]
    run_dir = os.path.join(keep, "paper_one_chapter")
    print("predict benchmark: measuring one chapter of configs/paper.toml", flush=True)
    mpff_train(run_dir, config="configs/paper.toml", sets=sets)
    runs = [load_run(run_dir)]
    network = predict.Network(inter=interconnect.preset("eth10"), intra=interconnect.preset("shm"),
                              ranks_per_node=1)
    target = ["train.epochs=100", "train.chapters=100", "train.eval_every=10"]
    lagged = predict.predict(runs, ranks=[1, 2, 4], schedules=["sequential", "all_layers"], network=network,
                             contention="none", overrides=target, adaptive_lag="ranks-1")
    newest = predict.predict(runs, ranks=[2, 4], schedules=["sequential", "single_layer"], network=network,
                             contention="none", overrides=target + ["train.adaptive_mode=newest"])
    records = [p.record() for p in lagged.predictions] + [p.record() for p in newest.predictions
                                                          if p.schedule == "single_layer"]
    by = {(r["schedule"], r["ranks"]): r for r in records}
    return {"source": measured(run_dir), "config": sets, "predicted_config": target,
            "predictions": records,
            "all_layers_4": {"predicted_speedup": by[("all_layers", 4)]["speedup"],
                             "paper_speedup": PAPER_SPEEDUP["all_layers"]},
            "single_layer_4": {"predicted_speedup": by[("single_layer", 4)]["speedup"],
                               "paper_speedup": PAPER_SPEEDUP["single_layer"]},
            "sequential_predicted_wall_seconds": by[("sequential", 1)]["wall_seconds"],
            "paper_sequential_wall_seconds": 11191,
            "assumptions": lagged.assumptions + [a for a in newest.assumptions if a not in lagged.assumptions]}


def summary(result: dict) -> str:
    """The figures RESULTS.md quotes, as lines."""
    t = result["two_ranks"]
    lines = [f"contention: {t['contention']['note']}", "",
             "run | measured wall (s) | predicted wall (s), error | measured training (s) | predicted, error "
             "| without contention: wall error"]
    for name in ("sequential", "all_layers", "single_layer"):
        m, p = t["measured"][name], t["predictions"]["with_contention"][name]
        q = t["predictions"]["without_contention"][name]
        lines.append(f"{name} | {m['wall_seconds']:.1f} | {p['predicted_wall_seconds']:.1f}, "
                     f"{100 * p['wall_error']:+.1f} % | {m['training_seconds']:.1f} | "
                     f"{p['predicted_training_seconds']:.1f}, "
                     f"{100 * p['training_error']:+.1f} % | {100 * q['wall_error']:+.1f} %")
    if "paper_four_ranks" in result:
        pp = result["paper_four_ranks"]
        lines += ["", f"paper configuration, one chapter measured ({pp['source']['wall_seconds']:.0f} s): "
                  f"Sequential E = S = 100 predicted {pp['sequential_predicted_wall_seconds']:.0f} s "
                  f"(paper: {pp['paper_sequential_wall_seconds']} s on its hardware); "
                  f"All Layers 4 ranks {pp['all_layers_4']['predicted_speedup']:.2f}x "
                  f"(paper {pp['all_layers_4']['paper_speedup']:.2f}x); "
                  f"Single Layer 4 ranks {pp['single_layer_4']['predicted_speedup']:.2f}x "
                  f"(paper {pp['single_layer_4']['paper_speedup']:.2f}x)"]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test of the benchmark itself")
    p.add_argument("--keep", default=os.path.join(ROOT, "outputs", "bench-predict"),
                   help="where the run directories are kept")
    p.add_argument("--skip-paper", action="store_true", help="only part 1 (2 ranks on this machine)")
    p.add_argument("--epochs", type=int, default=20, help="part 1: E = S [%(default)s]")
    p.add_argument("--dims", default="[784,1000,1000]", help="part 1: model.dims [%(default)s]")
    p.add_argument("--train-subset", type=int, default=0, help="part 1: data.train_subset [%(default)s: all]")
    args = p.parse_args()
    custom = args.quick or args.epochs != 20 or args.dims != "[784,1000,1000]" or args.train_subset
    keep = args.keep + ("-quick" if args.quick else "-custom" if custom else "")
    raw = measure_link()
    link = interconnect.Link("measured", raw["latency"], raw["bandwidth"])
    print(f"predict benchmark: intra-node link {link.describe()}", flush=True)
    result = {"quick": args.quick, "link": raw, "two_ranks": part_two_ranks(args, keep, link)}
    if not args.skip_paper:
        result["paper_four_ranks"] = part_paper(args, keep)
    print(summary(result))
    if custom:
        # not the benchmark's configuration: kept beside the runs, out of results/
        path = os.path.join(keep, "predict.json")
        with open(path, "w") as fh:
            json.dump(result, fh, indent=2)
        print(f"wrote {path} (not the benchmark's configuration, so not in benchmarks/results/)")
    else:
        write_result("predict", result)


if __name__ == "__main__":
    main()
