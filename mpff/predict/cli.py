"""Predict a run on more ranks than this machine has: the task graph, simulated with measured task times.

Needs no MPI and no GPU::

    python -m mpff predict RUN [RUN ...] --ranks 1,2,4,8,16          # (python -m mpff.predict ...)
    python -m mpff predict outputs/seq --network ib-hdr --ranks-per-node 4 --json
    python -m mpff predict outputs/seq outputs/al-2 --ranks-per-node 2 --contention auto

The task times (train, forward pass per layer applied, head, negatives, evaluation, per chapter)
come from the first RUN; any RUN that ran several ranks on one node measures how much ranks that
share a node slow each other (``--contention auto``). For every schedule and rank count the plan
(:mod:`mpff.plan`) is simulated (:mod:`mpff.predict.simulate`) with those times and a per-message
cost ``latency + bytes / bandwidth`` (named presets in :mod:`mpff.predict.interconnect`): predicted
wall time, training seconds,
speedup and efficiency against Sequential on one rank, bubble and bytes moved. The output states
what was assumed. Written to ``--out`` (default ``RUN/predict/``): ``prediction.md``,
``prediction.json`` and ``speedup.png`` / ``speedup.pdf``. Method and limits: ``docs/predict.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

from ..analysis.runs import load_run
from ..analysis.tables import fmt_bytes, fmt_number, fmt_percent, md_table, one_line
from ..config import BP_SCHEDULES, SCHEDULES, ConfigError
from ..rundir import refuse_run_files
from . import interconnect
from .outcome import Outcome
from .predictor import DEFAULT_RANKS, DEFAULT_SCHEDULES, predict
from .target import Network

# ---------------------------------------------------------------- output

def prediction_table(outcome: Outcome) -> str:
    headers = ["schedule", "ranks", "nodes", "wall (s)", "training (s)", "speedup", "efficiency",
               "bubble", "bytes moved", "measured wall (s)", "error"]
    rows = []
    for p in outcome.predictions:
        if p.reason is not None:
            rows.append([p.schedule, str(p.ranks), str(p.nodes), f"not possible: {p.reason}"]
                        + [""] * (len(headers) - 4))
            continue
        rows.append([p.schedule, str(p.ranks), str(p.nodes), fmt_number(p.wall, ",.1f"), fmt_number(p.training, ",.1f"),
                     fmt_number(p.speedup, ".2f"), fmt_percent(p.efficiency), fmt_percent(p.bubble),
                     fmt_bytes(p.bytes_moved), fmt_number(p.measured_wall, ",.1f"),
                     f"– ({p.measured_unfinished})" if p.measured_unfinished else
                     "–" if p.error is None else f"{100 * p.error:+.1f} %"])
    return md_table(headers, rows, numeric_from=1)


def markdown(outcome: Outcome) -> str:
    lines = ["# mpff prediction", "",
             f"From the task times of `{os.path.abspath(outcome.profile.run.path)}`. Speedup and "
             "efficiency are against Sequential on one rank, predicted the same way.", "",
             prediction_table(outcome), "", "![speedup](speedup.png)", "",
             "## Assumptions and limits", ""]
    lines += [f"- {a}" for a in outcome.assumptions]
    return "\n".join(lines) + "\n"


def plot_speedup(outcome: Outcome, path_png: str) -> None:
    from matplotlib.figure import Figure
    fig = Figure(figsize=(6.5, 4.5), layout="constrained")
    ax = fig.add_subplot()
    most = 1
    for schedule in dict.fromkeys(p.schedule for p in outcome.predictions):
        pts = [p for p in outcome.predictions if p.schedule == schedule and p.speedup is not None]
        if not pts:
            continue
        most = max(most, max(p.ranks for p in pts))
        xs, ys = [p.ranks for p in pts], [p.speedup for p in pts]
        if xs[0] > 1:  # start every curve at the baseline
            xs, ys = [1] + xs, [1.0] + ys
        line, = ax.plot(xs, ys, marker="o", label=f"{schedule}, predicted")
        meas = [p for p in pts if p.measured_wall and p.measured_unfinished is None]
        base = next((b for b in outcome.predictions if b.schedule == "sequential" and b.ranks == 1), None)
        if meas and base is not None and base.measured_wall and base.measured_unfinished is None:
            ax.plot([p.ranks for p in meas], [base.measured_wall / p.measured_wall for p in meas],
                    linestyle="none", marker="x", markersize=9, color=line.get_color(),
                    label=f"{schedule}, measured")
    ax.plot([1, most], [1, most], linestyle="--", color="#999999", label="ideal")
    ax.set_xscale("log", base=2)
    ticks = [2 ** i for i in range(int(math.log2(most)) + 2) if 2 ** i <= max(most, 1) * 1.01]
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.set_xlabel("ranks")
    ax.set_ylabel("speedup over Sequential on 1 rank")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("predicted speedup" + (f" ({outcome.network.inter.name} between nodes, "
                                         f"{outcome.network.ranks_per_node} rank(s) per node)"),
                 fontsize=10)
    fig.savefig(path_png, dpi=110)
    fig.savefig(os.path.splitext(path_png)[0] + ".pdf")


def write_outputs(outcome: Outcome, out: str) -> None:
    """prediction.md, prediction.json, speedup.png and speedup.pdf in ``out`` (each replaced whole)."""
    refuse_run_files(out, "--out")
    try:
        os.makedirs(out, exist_ok=True)
        for name, text in (("prediction.md", markdown(outcome)),
                           ("prediction.json", json.dumps(outcome.to_json(), indent=2) + "\n")):
            tmp = os.path.join(out, f".{name}.tmp")
            with open(tmp, "w", encoding="utf-8") as fh:
                fh.write(text)
            os.replace(tmp, os.path.join(out, name))
        plot_speedup(outcome, os.path.join(out, "speedup.png"))
    except OSError as exc:
        raise ConfigError(f"cannot write the prediction to {out} ({one_line(exc)}); "
                          "choose another directory with --out") from None


# ---------------------------------------------------------------- command line

def _rank_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise ConfigError(f"--ranks {text!r} must list positive rank counts, e.g. 1,2,4,8,16")
    return values


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("runs", nargs="+", metavar="RUN_DIR",
                   help="runs to predict from: the first gives the task times, every run with "
                        "several ranks on one node helps measure contention")
    p.add_argument("--ranks", default=",".join(map(str, DEFAULT_RANKS)),
                   help="rank counts to predict, comma-separated [%(default)s]")
    p.add_argument("--schedules",
                   help=f"schedules, comma-separated, or 'all', of {', '.join(SCHEDULES)} "
                        f"[{','.join(DEFAULT_SCHEDULES)} from an FF run, "
                        f"{','.join(BP_SCHEDULES)} from a backprop run]")
    p.add_argument("--network", default="ib-hdr",
                   help=f"link between nodes, a preset: {', '.join(interconnect.PRESETS)} [%(default)s]")
    p.add_argument("--latency", help="seconds per message between nodes (overrides the preset), e.g. 2us")
    p.add_argument("--bandwidth", help="bytes per second between nodes (overrides the preset), "
                                       "e.g. 12.5GB/s or 100Gb/s")
    p.add_argument("--intra", default="shm", help="link between ranks of one node, a preset [%(default)s]")
    p.add_argument("--intra-latency", help="seconds per message within a node (overrides --intra)")
    p.add_argument("--intra-bandwidth", help="bytes per second within a node (overrides --intra)")
    p.add_argument("--ranks-per-node", type=int, default=1,
                   help="ranks that share a node [1: a node, and a device, per rank]")
    p.add_argument("--contention", default="auto",
                   help="how ranks of one node slow each other: 'auto' (measured from the runs), "
                        "'none', or FACTOR (a task takes FACTOR x its time alone while one other "
                        "rank of its node works, e.g. 1.3) [%(default)s]")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="change the run to predict, e.g. train.epochs=100 train.chapters=100 "
                        "(not the network, batch size, classifier, threads or device: the task "
                        "times depend on them)")
    p.add_argument("--adaptive-lag", choices=("config", "ranks-1"), default="config",
                   help="adaptive negatives: keep the run's train.adaptive_lag, or use N-1 on N "
                        "ranks as the paper's All Layers [%(default)s]")
    p.add_argument("--out", metavar="DIR", help="output directory [RUN_DIR/predict of the first run]")
    p.add_argument("--json", action="store_true", help="print the prediction as JSON instead of the table")


def _link(preset_name: str, latency: str | None, bandwidth: str | None, what: str) -> interconnect.Link:
    link = interconnect.preset(preset_name)
    if latency is None and bandwidth is None:
        return link
    return interconnect.Link(
        f"{preset_name} (given)" if latency is None or bandwidth is None else "given",
        interconnect.parse_seconds(latency, f"--{what}latency") if latency is not None else link.latency,
        interconnect.parse_bandwidth(bandwidth, f"--{what}bandwidth") if bandwidth is not None else link.bandwidth)


def main(argv: list[str] | None = None) -> int:
    """``mpff predict`` (argv excludes the word 'predict'); returns the exit code."""
    parser = argparse.ArgumentParser(
        prog="mpff predict",
        description="Predict wall time, speedup, bubble and bytes moved of every schedule on more "
                    "ranks, from the task times a run measured. Needs no MPI.")
    add_arguments(parser)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse has printed usage or help
        return int(exc.code or 0)
    try:
        if args.ranks_per_node < 1:
            raise ConfigError("--ranks-per-node must be at least 1")
        contention: str | float = args.contention
        if contention not in ("auto", "none"):
            try:
                contention = float(contention)
            except ValueError:
                contention = -1.0
            if not contention >= 1.0:
                raise ConfigError(f"--contention {args.contention!r} must be auto, none or a factor "
                                  ">= 1 (e.g. 1.3: 30 % slower beside one busy rank)")
        schedules = None if args.schedules is None else SCHEDULES if args.schedules == "all" else \
            [s for s in args.schedules.split(",") if s]
        network = Network(_link(args.network, args.latency, args.bandwidth, ""),
                          _link(args.intra, args.intra_latency, args.intra_bandwidth, "intra-"),
                          args.ranks_per_node)
        out = args.out or os.path.join(args.runs[0], "predict")
        if os.path.lexists(out) and not os.path.isdir(out):  # before minutes of simulating
            raise ConfigError(f"--out {out} is a file; the prediction is a directory of files, "
                              "choose another --out")
        runs = [load_run(d) for d in args.runs]
        outcome = predict(runs, ranks=_rank_list(args.ranks), schedules=schedules, network=network,
                          contention=contention, overrides=args.overrides, adaptive_lag=args.adaptive_lag,
                          progress=lambda line: print(f"mpff predict: {line}", file=sys.stderr, flush=True))
        write_outputs(outcome, out)
    except ConfigError as exc:
        print(f"mpff predict: error: {one_line(exc)}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(outcome.to_json(), indent=2))
    else:
        print(prediction_table(outcome) + "\n")
        print("Assumptions and limits:")
        for a in outcome.assumptions:
            print(f"- {a}")
        print(f"\nprediction written to {os.path.join(out, 'prediction.md')}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
