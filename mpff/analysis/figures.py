"""The report's pictures: timeline, time per rank, accuracy, speedup against ranks, time to
accuracy and the comparison of several runs. Every figure is a PNG and a PDF beside it.

matplotlib is imported inside the functions: reading and analysing runs does not need it.
"""

from __future__ import annotations

import math
import os

import numpy as np

from .. import trace as trace_mod
from .compare import Pairing
from .runs import Run
from .summary import CATEGORIES, RunSummary, accuracy_timeline, speedup
from .tables import fmt_percent

CATEGORY_COLORS = {"compute": "#1f77b4", "communication": "#ff7f0e", "waiting": "#d62728",
                   "evaluation": "#9467bd", "other": "#7f7f7f"}
KIND_COLORS = {"train": "#1f77b4", "forward": "#6baed6", "negatives": "#2ca02c", "head": "#98df8a",
               "ship": "#17becf", "send": "#ff7f0e", "recv": "#ffbb78", "allreduce": "#e6550d",
               "wait": "#d62728", "eval": "#9467bd", "checkpoint": "#7f7f7f", "io": "#bcbd22",
               "setup": "#c7c7c7"}
OTHER_KIND_COLOR = "#444444"

FIGURE_DPI = 200
UNTRACED_COLOR = "#e8e8e8"   # wall time no span covers (idle), hatched in every figure
UNTRACED_HATCH = "////"


def new_figure(width: float, height: float):
    # Figure without pyplot: no global backend state, PNG and PDF through Agg
    from matplotlib.figure import Figure
    return Figure(figsize=(width, height), layout="constrained")


TITLE_SIZE = 11.0  # points


def title(fig, text: str) -> None:
    """The figure's title, wrapped (at spaces, hyphens, underscores, or anywhere in the last
    resort) to the figure's width, so that a long run name is never cut off."""
    import textwrap

    from matplotlib.font_manager import FontProperties
    from matplotlib.textpath import TextToPath
    font, measure = FontProperties(size=TITLE_SIZE), TextToPath()
    available = 0.94 * fig.get_figwidth() * 72.0  # points

    def width(line: str) -> float:
        return measure.get_text_width_height_descent(line, font, ismath=False)[0]

    breakable = text.replace("_", "_\x00 ")  # a break is allowed after "_" (marked, removed below)
    lines = [text]
    for chars in range(len(breakable), 4, -1):
        lines = [line.replace("\x00 ", "").replace("\x00", "") for line in
                 textwrap.wrap(breakable, chars, break_on_hyphens=True)]
        if max(width(line) for line in lines) <= available:
            break
    fig.suptitle("\n".join(lines), fontsize=TITLE_SIZE)


def save_figure(fig, path: str) -> list[str]:
    """Write ``path`` (a .png name) at FIGURE_DPI and the same figure as PDF beside it;
    returns both paths. Fonts are embedded as TrueType (Type 42), which journals accept."""
    from matplotlib import rc_context
    root, _ = os.path.splitext(path)
    paths = [root + ".png", root + ".pdf"]
    with rc_context({"pdf.fonttype": 42, "ps.fonttype": 42}):
        fig.savefig(paths[0], dpi=FIGURE_DPI)
        fig.savefig(paths[1])
    return paths


def _spaced(xs: list[float], min_gap: float) -> list[bool]:
    """Which of the sorted positions xs to label so that labels are at least min_gap apart."""
    keep, last = [], -math.inf
    for x in xs:
        keep.append(x - last >= min_gap)
        if keep[-1]:
            last = x
    return keep


def plot_timeline(run: Run, path: str) -> None:
    save_figure(timeline_figure(run), path)


def timeline_figure(run: Run):
    """One row per rank: spans coloured by kind over the untraced (idle) wall, chapter ticks."""
    from matplotlib.patches import Patch
    n = run.world_size
    fig = new_figure(12, 1.4 + 0.7 * n)
    ax = fig.add_subplot()
    t0 = run.wall_start
    wall = max(run.wall, 1e-9)
    used: set[str] = set()
    for rt in run.ranks:
        y = n - 1 - rt.rank
        # the rank's wall underneath: what no span covers shows as untraced (idle) time
        ax.broken_barh([(rt.wall_start - t0, rt.wall)], (y - 0.35, 0.7), facecolors=UNTRACED_COLOR,
                       edgecolors="#b0b0b0", hatch=UNTRACED_HATCH, linewidth=0.4)
        for kind in dict.fromkeys(rt.kinds):
            sel = rt.spans[rt.kinds == kind]
            bars = list(zip(sel["start"] - t0, np.maximum(sel["end"] - sel["start"], 0.0)))
            ax.broken_barh(bars, (y - 0.35, 0.7), facecolors=KIND_COLORS.get(kind, OTHER_KIND_COLOR),
                           linewidth=0)
            used.add(kind)
        # chapter boundaries: where this rank starts its work of each chapter (1-based)
        chapter_spans = rt.spans[rt.spans["chapter"] >= 1]
        starts: dict[int, float] = {}
        for c, s in zip(chapter_spans["chapter"], chapter_spans["start"]):
            starts[int(c)] = min(starts.get(int(c), math.inf), float(s))
        ordered = sorted(starts.items(), key=lambda item: item[1])
        # a label "c100" is about 0.25 inch wide at 6.5 pt; the axes are about 10 inches
        labelled = _spaced([s - t0 for _, s in ordered], 0.03 * wall)
        for (c, s), label in zip(ordered, labelled):
            ax.vlines(s - t0, y - 0.45, y + 0.45, colors="black", linewidth=0.5)
            if label:
                ax.text(s - t0, y + 0.41, f"c{c}", fontsize=6.5, va="bottom", ha="left")
    ax.set_yticks(range(n), [f"rank {n - 1 - i}" for i in range(n)])
    ax.set_ylim(-0.6, n - 0.1)
    ax.set_xlim(0, wall)
    ax.set_xlabel("time since the first rank started (s); a tick c<N> marks where a rank begins "
                  "chapter N (1 = first)")
    title(fig, f"{run.name}: timeline")
    kinds = [k for k in trace_mod.SPAN_KINDS if k in used] + sorted(used - set(trace_mod.SPAN_KINDS))
    handles = [Patch(color=KIND_COLORS.get(k, OTHER_KIND_COLOR), label=k) for k in kinds]
    handles.append(Patch(facecolor=UNTRACED_COLOR, edgecolor="#b0b0b0", hatch=UNTRACED_HATCH,
                         label="untraced (idle)"))
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    return fig


def plot_breakdown(s: RunSummary, path: str) -> None:
    save_figure(breakdown_figure(s), path)


def breakdown_figure(s: RunSummary):
    """One stacked bar per rank: the five categories, the untraced part of "other" apart."""
    fig = new_figure(max(6.0, 1.1 * len(s.ranks) + 4.0), 4.2)
    ax = fig.add_subplot()
    x = np.arange(len(s.ranks))
    bottom = np.zeros(len(s.ranks))
    for c in CATEGORIES:
        values = np.array([r.seconds[c] for r in s.ranks])
        if c == "other":  # show the untraced part of "other" apart: it counts as idle
            untraced = np.array([r.uncovered for r in s.ranks])
            ax.bar(x, values - untraced, bottom=bottom, color=CATEGORY_COLORS[c], label="other (spans)")
            ax.bar(x, untraced, bottom=bottom + values - untraced, color=UNTRACED_COLOR,
                   hatch=UNTRACED_HATCH, edgecolor="#b0b0b0", linewidth=0, label="untraced (idle)")
        else:
            ax.bar(x, values, bottom=bottom, color=CATEGORY_COLORS[c], label=c)
        bottom += values
    ax.set_xticks(x, [f"rank {r.rank}\n{fmt_percent(r.bubble)} bubble" for r in s.ranks])
    ax.set_ylabel("seconds")
    title(fig, f"{s.name}: time per rank")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    return fig


def plot_accuracy(summaries: list[RunSummary], path: str) -> None:
    save_figure(accuracy_figure(summaries), path)


def accuracy_figure(summaries: list[RunSummary]):
    """Test accuracy per (1-based) chapter, one line per run."""
    from matplotlib.ticker import MaxNLocator
    fig = new_figure(7, 4)
    ax = fig.add_subplot()
    plotted = False
    for s in summaries:
        if s.accuracy_by_chapter:
            chapters = list(s.accuracy_by_chapter)
            ax.plot(chapters, [100.0 * v for v in s.accuracy_by_chapter.values()], marker=".", label=s.name)
            plotted = True
    if plotted:
        ax.set_xlabel("chapter (1 = first)")
        ax.set_ylabel("test accuracy (%)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
        ax.grid(alpha=0.3)
        if len(summaries) > 1:
            ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no test accuracy recorded", ha="center", va="center", transform=ax.transAxes)
    title(fig, "test accuracy per chapter")
    return fig


def plot_scaling(summaries: list[RunSummary], pairs: list[Pairing], path: str,
                 curves: list[dict] | None = None) -> None:
    """Speedup against ranks per schedule (and negatives / classifier): mean over seeds with the
    spread (min to max) as error bars; predicted curves dashed when given. PNG and PDF."""
    fig = new_figure(7, 4.5)
    ax = fig.add_subplot()
    series: dict[tuple, dict[int, list[float]]] = {}
    for s, p in zip(summaries, pairs):
        sp = speedup(p.baseline, s) if p.baseline else None
        if sp is None:
            continue
        key = (s.cfg.run.schedule, s.cfg.train.negatives, s.cfg.train.classifier)
        series.setdefault(key, {}).setdefault(s.run.world_size, []).append(sp)
    most = 1
    colors: dict[str, str] = {}
    for key, points in sorted(series.items()):
        ranks = sorted(points)
        most = max(most, ranks[-1])
        mean = [float(np.mean(points[n])) for n in ranks]
        err = [[m - min(points[n]) for m, n in zip(mean, ranks)], [max(points[n]) - m for m, n in zip(mean, ranks)]]
        line = ax.errorbar(ranks, mean, yerr=err, marker="o", capsize=3, label=f"{', '.join(map(str, key))}, measured")
        colors.setdefault(key[0], line[0].get_color())
    for schedule, scaling in dict.fromkeys((c["schedule"], c.get("scaling")) for c in curves or []):
        pts = sorted((c["ranks"], c["speedup"]) for c in curves
                     if c["schedule"] == schedule and c.get("scaling") == scaling and c["speedup"])
        if pts:
            most = max(most, pts[-1][0])
            ax.plot(*zip(*pts), linestyle="--" if scaling != "weak" else "-.", marker=".",
                    color=colors.get(schedule),
                    label=f"{schedule}{f' ({scaling})' if scaling else ''}, predicted")
    ax.plot([1, most], [1, most], linestyle=":", color="#999999", label="ideal")
    ax.set_xscale("log", base=2)
    ticks = [2 ** i for i in range(int(math.log2(most)) + 2) if 2 ** i <= max(most, 1) * 1.01]
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.set_xlabel("ranks")
    ax.set_ylabel("speedup over the Sequential run")
    ax.grid(alpha=0.3)
    if series or curves:
        ax.legend(fontsize=7)
    else:
        ax.text(0.5, 0.5, "no run has a Sequential baseline of its problem", ha="center", va="center",
                transform=ax.transAxes)
    title(fig, "speedup against ranks" + (" (error bars: min to max over seeds)"
                                           if any(len(v) > 1 for p in series.values() for v in p.values()) else ""))
    save_figure(fig, path)


def plot_time_to_accuracy(summaries: list[RunSummary], path: str) -> None:
    """Test accuracy against training seconds (evaluation apart), a line per run."""
    fig = new_figure(7, 4)
    ax = fig.add_subplot()
    plotted = False
    for s in summaries:
        timeline = accuracy_timeline(s)
        if timeline:
            ax.plot([t for t, _ in timeline], [100 * v for _, v in timeline], marker=".",
                    label=f"{s.name} ({s.cfg.train.algorithm}, {s.cfg.run.schedule}, "
                          f"{s.run.world_size} rank{'s' if s.run.world_size > 1 else ''})")
            plotted = True
    if plotted:
        ax.set_xlabel("training seconds (evaluation apart)")
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    else:
        ax.text(0.5, 0.5, "no test accuracy recorded", ha="center", va="center", transform=ax.transAxes)
    title(fig, "time to accuracy")
    save_figure(fig, path)


def plot_comparison(summaries: list[RunSummary], path: str) -> None:
    fig = new_figure(max(7, 1.3 * len(summaries) + 3), 6)
    ax_time, ax_bubble = fig.subplots(2, 1, sharex=True)
    x = np.arange(len(summaries))
    setup = np.array([s.training.setup_seconds for s in summaries])
    training = np.array([s.training.end - s.training.start for s in summaries])
    rest = np.array([s.wall for s in summaries]) - setup - training
    ax_time.bar(x, setup, color="#c7c7c7", label="setup")
    ax_time.bar(x, training, bottom=setup, color="#1f77b4", label="training")
    ax_time.bar(x, np.maximum(rest, 0.0), bottom=setup + training, color="#bcbd22", label="after training")
    ax_time.set_ylabel("wall time (s)")
    title(fig, "runs compared")
    ax_time.legend(fontsize=8)
    measured = [100 * s.bubble_measured for s in summaries]
    in_training = [100 * s.training.bubble for s in summaries]
    modelled = [100 * s.bubble_modelled if s.bubble_modelled is not None else 0.0 for s in summaries]
    ax_bubble.bar(x - 0.27, measured, width=0.27, color="#d62728", label="measured, whole run")
    ax_bubble.bar(x, in_training, width=0.27, color="#ff7f0e", label="measured, training phase")
    ax_bubble.bar(x + 0.27, modelled, width=0.27, color="#ff9896", label="modelled")
    ax_bubble.set_ylabel("bubble (%)")
    ax_bubble.legend(fontsize=8)
    ax_bubble.set_xticks(x, [f"{s.name}\n{s.cfg.run.schedule}, N={s.run.world_size}"
                             for s in summaries], fontsize=8)
    save_figure(fig, path)


