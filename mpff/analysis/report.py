"""Offline report of one or more runs: HDF5 traces -> tables, pictures, trace-viewer JSON.

Needs no MPI and no GPU (it runs on a login node)::

    python -m mpff report outputs/tiny-single_layer
    python -m mpff report RUN_A RUN_B RUN_C --baseline RUN_SEQ --out outputs/comparison

One run: the report goes to ``RUN_DIR/report/`` (or ``--out DIR``): ``report.md``,
``timeline.png``, ``breakdown.png``, ``accuracy.png`` and ``trace.json`` (Chrome trace
events; open it in https://ui.perfetto.dev or chrome://tracing). Several runs: a
comparison shaped like the paper's Table 1 in ``report.md`` (speedup only against a baseline
of the same problem; runs that differ only in their seed grouped), the same as data in
``comparison.csv``, ``comparison-groups.csv`` and ``comparison.json``, plus ``scaling.png``
/ ``.pdf`` (speedup against ranks; ``--predict`` adds the prediction), ``comparison.png``
and ``accuracy.png``, written to ``--out DIR`` (default: ``comparison-report/`` beside the
first run; writing again replaces what the previous report wrote there), with each run's
own full report in a sub-folder named after the run. The tables are also printed to the
terminal. docs/predict.md describes the comparison and the prediction.

Definitions (also in ``docs/traces.md``), per rank with ``wall = wall_end - wall_start``:

- compute = train + forward + negatives + head spans; communication = send + recv;
  waiting = wait; evaluation = eval; other = checkpoint + io + setup spans (and unknown
  kinds) + the wall time covered by no span. The five add up to the wall.
- busy = compute + communication + evaluation + other spans; idle = waiting + uncovered time;
  bubble = idle / wall = 1 - busy / wall. Overall: 1 - sum(busy) / (N * run wall), where the
  run wall is max(wall_end) - min(wall_start) over the ranks.
- modelled bubble: the run's task graph (:mod:`mpff.plan`) list-scheduled with the task
  times this run measured, 1 - sum(busy) / (N * makespan).
- speedup = baseline run wall / run wall; parallel efficiency = speedup / N.
"""


from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from typing import TextIO

from ..config import Config, ConfigError
from ..plan import build_plan, pipeline_bubble
from ..predict.simulate import SimResult, simulate
from ..rundir import refuse_run_files
from . import figures as plots
from .compare import (
    DEFAULT_ACCURACIES,
    Pairing,
    comparison_table,
    cost_record,
    cost_table,
    group_records,
    group_table,
    pair_baselines,
    predict_runs,
    run_records,
    write_table_files,
)
from .runs import load_run
from .summary import CATEGORIES, RunSummary, Simulator, analytic_bubble, efficiency, speedup, summarize_run
from .tables import fmt_bytes, fmt_percent, fmt_ratio, fmt_seconds, md_table, one_line
from .traces import chrome_trace

__all__ = ["CATEGORIES", "analyze_run", "load_run", "main", "pipeline_bubble", "run_report"]


def plan_simulate(cfg: Config, world_size: int, durations: dict) -> SimResult:
    """The modelled bubble's simulator: the run's plan timed with its measured task times."""
    return simulate(build_plan(cfg, world_size), durations)


def analyze_run(run_dir: str, simulate: Simulator | None = None) -> RunSummary:
    """Read a run directory and summarize it (its bubble modelled with ``simulate``, by default
    :func:`plan_simulate`)."""
    return summarize_run(load_run(run_dir), simulate or plan_simulate)


# ---------------------------------------------------------------- the tables of one run

def summary_table(s: RunSummary, baseline: RunSummary | None, note: str = "") -> str:
    rows = [
        ["schedule", str(s.cfg.run.schedule)],
        ["negatives / classifier", f"{s.cfg.train.negatives} / {s.cfg.train.classifier}"],
        ["ranks", str(s.run.world_size)],
        ["layers (dims)", str(list(s.cfg.model.dims))],
        ["epochs / chapters", f"{s.cfg.train.epochs} / {s.cfg.train.chapters}"],
        ["wall time (s)", fmt_seconds(s.wall)],
        ["test accuracy", fmt_percent(s.final_accuracy, 2)],
        ["bubble, measured", fmt_percent(s.bubble_measured)],
        ["bubble, modelled from task times", fmt_percent(s.bubble_modelled)],
        ["bubble, equal task times (L-1)/(S+L-1)", fmt_percent(analytic_bubble(s))],
        ["bytes sent / received", f"{fmt_bytes(s.bytes_sent)} / {fmt_bytes(s.bytes_received)}"],
    ]
    if baseline is not None:
        rows += [
            ["baseline", f"{baseline.name} ({fmt_seconds(baseline.wall)} s, {baseline.run.world_size} rank(s))"
                         + (f" ({note})" if note else "")],
            ["speedup", fmt_ratio(speedup(baseline, s))],
            ["parallel efficiency", fmt_percent(efficiency(baseline, s))],
        ]
    return md_table(["", s.name], rows, numeric_from=2)


def breakdown_table(s: RunSummary) -> str:
    headers = ["rank", "wall (s)"] + [f"{c} (s, %)" for c in CATEGORIES] + ["untraced (s)"]
    rows = []
    for r in s.ranks:
        rows.append([f"{r.rank}", fmt_seconds(r.wall)]
                    + [f"{fmt_seconds(r.seconds[c])} ({r.percent(c):.1f} %)" for c in CATEGORIES]
                    + [fmt_seconds(r.uncovered)])
    return md_table(headers, rows)


def bubble_table(s: RunSummary) -> str:
    rows = [[f"{r.rank}", r.host, r.device, fmt_seconds(r.busy), fmt_seconds(r.idle), fmt_percent(r.bubble)]
            for r in s.ranks]
    rows.append(["all", "", "", fmt_seconds(sum(r.busy for r in s.ranks)),
                 fmt_seconds(s.run.world_size * s.wall - sum(r.busy for r in s.ranks)), fmt_percent(s.bubble_measured)])
    return md_table(["rank", "host", "device", "busy (s)", "idle (s)", "bubble"], rows, numeric_from=3)


def bytes_table(s: RunSummary) -> str:
    rows = [[f"{r.rank}", fmt_bytes(r.bytes_sent), fmt_bytes(r.bytes_received)] for r in s.ranks]
    rows.append(["total", fmt_bytes(s.bytes_sent), fmt_bytes(s.bytes_received)])
    return md_table(["rank", "sent", "received"], rows)


def memory_table(s: RunSummary) -> str:
    rows = [[f"{r.rank}", fmt_bytes(r.peak_host_mem), fmt_bytes(r.peak_gpu_mem)] for r in s.ranks]
    return md_table(["rank", "peak host memory", "peak GPU memory"], rows)


def accuracy_table(s: RunSummary) -> str:
    rows = [[f"{c}", fmt_percent(v, 2)] for c, v in s.accuracy_by_chapter.items()]
    return md_table(["chapter", "test accuracy"], rows)


# ---------------------------------------------------------------- writing

def run_markdown(s: RunSummary, baseline: RunSummary | None, note: str = "") -> str:
    parts = [f"# mpff report: {s.name}", "", f"Run directory: `{os.path.abspath(s.run.path)}`", ""]
    if s.notes:
        parts += ["Notes:", ""] + [f"- {n}" for n in s.notes] + [""]
    parts += ["## Summary", "", summary_table(s, baseline, note), ""]
    if s.model_note:
        parts += [f"Modelled bubble: {s.model_note}.", ""]
    parts += [
        "## Time per rank", "",
        ("Percent of each rank's wall (wall_end - wall_start). compute = train, forward, negatives, "
         "head; communication = send, recv; waiting = wait; evaluation = eval; other = checkpoint, "
         "io, setup and untraced time."), "",
        breakdown_table(s), "", "![time per rank](breakdown.png)", "",
        "## Bubble", "",
        ("Idle = waiting + untraced time; bubble = idle / wall. The overall row uses the run's wall "
         "(first start to last end) for every rank."), "",
        bubble_table(s), "",
        "## Bytes moved", "", bytes_table(s), "",
        "## Peak memory", "", memory_table(s), "",
        "## Timeline", "", "![timeline](timeline.png)", "",
        ("Open `trace.json` in https://ui.perfetto.dev or chrome://tracing for a zoomable timeline "
         "(arrows from each send to its receive, counter tracks for loss, accuracy and memory); "
         "`mpff export RUN_DIR --format otf2` writes an OTF2 archive for Vampir, Scalasca and "
         "Pipit. Every figure is also written as PDF beside its PNG."), "",
        "## Test accuracy per chapter", "", "Chapters are counted from 1.", "",
        "![accuracy](accuracy.png)", "",
        accuracy_table(s) if s.accuracy_by_chapter else "No test accuracy was recorded.", "",
    ]
    return "\n".join(parts)


def write_run_report(s: RunSummary, out: str, baseline: RunSummary | None, note: str = "", *,
                     with_figures: bool = True) -> None:
    """report.md, trace.json and (``with_figures``) the run's figures in ``out``."""
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "report.md"), "w", encoding="utf-8") as fh:
        fh.write(run_markdown(s, baseline, note))
    with open(os.path.join(out, "trace.json"), "w", encoding="utf-8") as fh:
        json.dump(chrome_trace(s.run), fh)
    if with_figures:
        plots.plot_timeline(s.run, os.path.join(out, "timeline.png"))
        plots.plot_breakdown(s, os.path.join(out, "breakdown.png"))
        plots.plot_accuracy([s], os.path.join(out, "accuracy.png"))


def _subdir_names(summaries: list[RunSummary]) -> list[str]:
    names: list[str] = []
    for s in summaries:
        name, i = s.name, 2
        while name in names:
            name, i = f"{s.name}-{i}", i + 1
        names.append(name)
    return names


#: Marks a comparison report folder and lists what the report wrote there (and may replace).
MANIFEST = ".mpff-report.json"


def _replace_contents(out: str, build: Callable[[str], None]) -> None:
    """Write a report into a fresh temporary folder beside ``out``, then move it into ``out`` in
    place of what the previous report there wrote (listed in its manifest). Nothing else in
    ``out`` is touched, and if writing fails the previous report stays whole."""
    out = os.path.abspath(out)
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.writing-", dir=parent)
    try:
        build(tmp)
        entries = sorted(os.listdir(tmp))
        os.makedirs(out, exist_ok=True)
        old: list[str] = []
        try:
            with open(os.path.join(out, MANIFEST), encoding="utf-8") as fh:
                old = [str(n) for n in json.load(fh).get("entries", []) if isinstance(n, str)]
        except (OSError, ValueError, AttributeError):
            old = []
        for name in set(old) | set(entries):  # a run's own files (a run named "checkpoints")
            refuse_run_files(os.path.join(out, name), "--out", whole=True)
        for name in entries:  # a folder of the same name that no report wrote is the user's
            path = os.path.join(out, name)
            if (os.path.isdir(path) and not os.path.islink(path) and name not in old
                    and not os.path.isfile(os.path.join(path, "report.md"))):
                raise ConfigError(f"{path} exists and is not part of an earlier mpff report; move it "
                                  "or choose another --out")
        for name in set(old) | set(entries):
            path = os.path.join(out, name)
            if os.sep in name or name in ("", ".", "..", MANIFEST):
                continue  # a manifest is trusted for names in the folder itself only
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            elif os.path.lexists(path):
                os.unlink(path)
        for name in entries:
            os.replace(os.path.join(tmp, name), os.path.join(out, name))
        with open(os.path.join(out, MANIFEST + ".tmp"), "w", encoding="utf-8") as fh:
            json.dump({"written_by": "mpff report", "entries": entries}, fh, indent=1)
        os.replace(os.path.join(out, MANIFEST + ".tmp"), os.path.join(out, MANIFEST))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _comparison_intro(summaries: list[RunSummary], subdirs: list[str], base: RunSummary | None,
                      flags: list[str]) -> list[str]:
    """The comparison's heading, its runs, and what its speedups and times are against."""
    lines = ["# mpff comparison report", "",
             "Runs: " + ", ".join(f"[{s.name}]({sub}/report.md)" for s, sub in zip(summaries, subdirs)), ""]
    if base is not None:
        lines += [(f"Speedup and efficiency against the baseline `{base.name}` "
                   f"({fmt_seconds(base.wall)} s, {base.run.world_size} rank(s)), which poses the same "
                   "problem as every run." if not any(flags) else
                   f"Speedup and efficiency against the baseline `{base.name}` "
                   f"({fmt_seconds(base.wall)} s, {base.run.world_size} rank(s)), given with --any-baseline: "
                   "for the runs of another problem (noted in the baseline column) they compare "
                   "different work."), ""]
    else:
        lines += [("Speedup and efficiency against the Sequential run of the same problem (model, "
                   "data, epochs, chapters, batch size, learning rates, negatives, classifier, "
                   "evaluation; the same seed where there is one), where one is listed."), ""]
    lines += [("Time = the whole run (first rank's start to last rank's end); setup = to the end of "
               "setup; training = the training phase (setup and the final model write apart), "
               "which training speedup and training bubble use. In a short run setup is much of "
               "the wall time, and busy setup time makes the whole-run bubble look smaller than "
               "the modelled one: compare the modelled bubble with the training bubble."), ""]
    return lines


def _comparison_body(table: str, notes: list[str], groups: list[dict], costs: list[dict],
                     predict: bool) -> list[str]:
    """The comparison table, the seed groups, the cost table and the figures' links."""
    lines = []
    if notes:
        lines += ["Notes:", ""] + [f"- {n}" for n in notes] + [""]
    lines += [table, ""]
    if predict:
        lines += ["Predicted time: the task graph of each run simulated with the task times of its "
                  "problem's Sequential run (`mpff predict`; method and limits in docs/predict.md).", ""]
    if any(len(g["runs"]) > 1 for g in groups):
        lines += ["## Runs that differ only in their seed", "",
                  "Mean ± sample standard deviation over the seeds (min and max in comparison-groups.csv).",
                  "", group_table(groups), ""]
    lines += ["## Training cost and time to accuracy", "",
              ("Training s/epoch: the training phase less evaluation, per epoch; s to X: training "
               "seconds (evaluation apart) until the first evaluated chapter at or above X test "
               "accuracy; peak memory: the largest resident set of a rank; sent: bytes every rank "
               "sent together (PFF: weights per chapter; data-parallel backprop: the gradient "
               "all-reduce, as a ring sends it)."), "", cost_table(costs), "",
              "![time to accuracy](time_to_accuracy.png)", ""]
    lines += ["Tables as data: [comparison.csv](comparison.csv), [comparison-groups.csv](comparison-groups.csv), "
              "[comparison.json](comparison.json).", "",
              "![speedup against ranks](scaling.png)", "", "![comparison](comparison.png)", "",
              "![accuracy](accuracy.png)", ""]
    return lines


def _comparison_figures(summaries: list[RunSummary], pairs: list[Pairing], curves: list[dict], out: str) -> None:
    plots.plot_comparison(summaries, os.path.join(out, "comparison.png"))
    plots.plot_scaling(summaries, pairs, os.path.join(out, "scaling.png"), curves)
    plots.plot_accuracy(summaries, os.path.join(out, "accuracy.png"))
    plots.plot_time_to_accuracy(summaries, os.path.join(out, "time_to_accuracy.png"))


def write_comparison(summaries: list[RunSummary], base: RunSummary | None, out: str, *,
                     predict: bool = False, accuracies: tuple[float, ...] = DEFAULT_ACCURACIES,
                     any_baseline: bool = False, with_figures: bool = True) -> list[str]:
    """The report of several runs in ``out``: report.md, comparison.csv / .json,
    comparison-groups.csv, comparison.png, scaling.png / .pdf, accuracy.png and a sub-folder
    per run (the figures only ``with_figures``); returns the blocks to print."""
    pairs = pair_baselines(summaries, base, any_baseline)
    flags = [p.note for p in pairs]
    subdirs = _subdir_names(summaries)
    predicted, curves, predict_notes = predict_runs(summaries) if predict else (None, [], [])
    table = comparison_table(summaries, [p.baseline for p in pairs], flags, predicted)
    groups = group_records(summaries, pairs)
    costs = [cost_record(s, accuracies) for s in summaries]
    notes = [f"{s.name}: {n}" for s in summaries for n in s.notes] + predict_notes
    lines = _comparison_intro(summaries, subdirs, base, flags) + _comparison_body(table, notes, groups, costs, predict)

    def build(tmp: str) -> None:
        for s, p, sub in zip(summaries, pairs, subdirs):
            write_run_report(s, os.path.join(tmp, sub), p.baseline, p.note if p.baseline else "",
                             with_figures=with_figures)
        with open(os.path.join(tmp, "report.md"), "w", encoding="utf-8") as fh:
            fh.write("\n".join(lines))
        write_table_files(tmp, run_records(summaries, pairs, subdirs, predicted), groups,
                          {"cost": costs, **({"predicted": curves} if predict else {})})
        if with_figures:
            _comparison_figures(summaries, pairs, curves, tmp)

    _replace_contents(out, build)
    grouped = any(len(g["runs"]) > 1 for g in groups)
    return (["\n".join(f"note: {n}" for n in notes), table] + ([group_table(groups)] if grouped else [])
            + [cost_table(costs)])


def default_out(run_dirs: list[str]) -> str:
    if len(run_dirs) == 1:
        return os.path.join(run_dirs[0], "report")
    return os.path.join(os.path.dirname(os.path.abspath(run_dirs[0])), "comparison-report")


def run_report(run_dirs: list[str] | str, baseline: str | None = None, out: str | None = None, *,
               simulate: Simulator | None = None, stream: TextIO | None = None,
               predict: bool = False, accuracies: tuple[float, ...] = DEFAULT_ACCURACIES,
               any_baseline: bool = False, figures: bool = True) -> str:
    """Analyse the runs, write the report, print its tables; returns the output directory.
    ``predict``: add the task-graph prediction to the comparison of several runs; ``figures``
    False: write no PNG or PDF (the tables, trace.json and the data files only)."""
    run_dirs = [run_dirs] if isinstance(run_dirs, str) else list(run_dirs)
    if not run_dirs:
        raise ConfigError("name at least one run directory to report")
    stream = stream if stream is not None else sys.stdout
    summaries = [analyze_run(d, simulate) for d in run_dirs]
    base = analyze_run(baseline, simulate) if baseline else None
    out = out or default_out(run_dirs)
    refuse_run_files(out, "--out")
    if os.path.lexists(out) and not os.path.isdir(out):
        raise ConfigError(f"--out {out} is a file; a report is a directory of files, choose another --out")
    try:
        if len(summaries) == 1:
            s = summaries[0]
            (pair,) = pair_baselines([s], base, any_baseline) if base is not None else [Pairing(None)]
            write_run_report(s, out, base, pair.note, with_figures=figures)
            text = ["\n".join(f"note: {n}" for n in s.notes), summary_table(s, base, pair.note),
                    breakdown_table(s), bubble_table(s)]
        else:
            text = write_comparison(summaries, base, out, predict=predict, accuracies=accuracies,
                                    any_baseline=any_baseline, with_figures=figures)
    except OSError as exc:
        raise ConfigError(f"cannot write the report to {out} ({one_line(exc)}); "
                          "choose another directory with --out") from None
    for block in text:
        if block:
            print(block + "\n", file=stream)
    print(f"report written to {os.path.join(out, 'report.md')}", file=stream)
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mpff report",
        description="Time breakdown, pipeline bubble, speedup, bytes, accuracy and timelines of "
                    "finished (or killed) runs, from their HDF5 traces. Needs no MPI.")
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories (mpff train --out)")
    parser.add_argument("--baseline", metavar="RUN_DIR",
                        help="run to measure speedup and parallel efficiency against (the same "
                             "problem: model, data, epochs, ...; see --any-baseline)")
    parser.add_argument("--any-baseline", action="store_true",
                        help="accept a --baseline of another problem (another network or data "
                             "size): its speedup then compares different work, and the report says so")
    parser.add_argument("--out", metavar="DIR",
                        help="output directory (default: RUN_DIR/report for one run, "
                             "comparison-report/ beside the first run for several)")
    parser.add_argument("--predict", action="store_true",
                        help="several runs: add each run's predicted time and the predicted speedup "
                             "curve, simulated from its problem's Sequential run (mpff predict)")
    parser.add_argument("--accuracies", default=",".join(f"{a:g}" for a in DEFAULT_ACCURACIES), metavar="A,B,...",
                        help="test accuracies (fractions) whose time to reach the cost table shows "
                             "(default %(default)s)")
    parser.add_argument("--no-figures", dest="figures", action="store_false",
                        help="write no figures (PNG, PDF): the tables, trace.json and the data files "
                             "only, faster (report.md still names the figures)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """``mpff report`` (argv excludes the word 'report'); returns the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse has printed usage or help
        return int(exc.code or 0)
    try:
        try:
            accuracies = tuple(float(a) for a in args.accuracies.split(","))
        except ValueError:
            raise ConfigError(f"--accuracies {args.accuracies!r} must be fractions such as 0.9,0.95") from None
        if not all(0 < a <= 1 for a in accuracies):
            raise ConfigError(f"--accuracies {args.accuracies!r}: give fractions between 0 and 1, e.g. 0.9,0.95")
        if args.any_baseline and not args.baseline:
            raise ConfigError("--any-baseline applies to a --baseline RUN_DIR; pass one, or leave "
                              "--any-baseline out")
        run_report(args.runs, baseline=args.baseline, out=args.out, predict=args.predict, accuracies=accuracies,
                   any_baseline=args.any_baseline, figures=args.figures)
    except ConfigError as exc:
        print(f"mpff report: error: {one_line(exc)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
