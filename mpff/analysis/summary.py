"""What a run's traces say: time per category and rank, the bubble (measured and modelled), the
training phase, test accuracy per chapter, and which settings make two runs the same problem.

Definitions (also in ``docs/traces.md``), per rank with ``wall = wall_end - wall_start``:

- compute = train + forward + negatives + head spans; communication = send + recv;
  waiting = wait; evaluation = eval; other = checkpoint + io + setup spans (and unknown
  kinds) + the wall time covered by no span. The five add up to the wall.
- busy = compute + communication + evaluation + other spans; idle = waiting + uncovered time;
  bubble = idle / wall = 1 - busy / wall. Overall: 1 - sum(busy) / (N * run wall), where the
  run wall is max(wall_end) - min(wall_start) over the ranks.
- modelled bubble: the run's task graph (:mod:`mpff.plan`) simulated with the task times this
  run measured, 1 - sum(busy) / (N * makespan) (the simulator is handed in: ``mpff report``
  uses :func:`mpff.predict.simulate.simulate`).
- speedup = baseline run wall / run wall; parallel efficiency = speedup / N.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from .. import trace as trace_mod
from ..config import Config, ConfigError
from ..plan import pipeline_bubble
from .runs import RankTrace, Run, config_of, trace_attrs

CATEGORIES = ("compute", "communication", "waiting", "evaluation", "other")
KIND_CATEGORY = {
    "train": "compute", "forward": "compute", "negatives": "compute", "head": "compute", "ship": "compute",
    "send": "communication", "recv": "communication", "allreduce": "communication",
    "wait": "waiting",
    "eval": "evaluation",
    "checkpoint": "other", "io": "other", "setup": "other",
}
assert set(KIND_CATEGORY) == set(trace_mod.SPAN_KINDS)  # internal invariant: one category per kind

#: Task kinds of the task graph whose durations come from spans of the same kind.
MODEL_KINDS = ("head", "negatives", "eval")

#: simulate(cfg, world_size, durations) -> object with .makespan, .busy and .bubble
Simulator = Callable[[Config, int, dict], Any]


# ---------------------------------------------------------------- analysis

@dataclass
class RankSummary:
    rank: int
    host: str
    device: str
    wall: float
    seconds: dict[str, float]   # per category; adds up to wall
    uncovered: float            # wall time covered by no span (part of "other")
    clipped: float              # span time outside the wall or overlapping another span (dropped)
    busy: float
    idle: float
    bytes_sent: int
    bytes_received: int
    peak_host_mem: float | None
    peak_gpu_mem: float | None

    @property
    def bubble(self) -> float:
        return self.idle / self.wall if self.wall > 0 else 0.0

    def percent(self, category: str) -> float:
        return 100.0 * self.seconds[category] / self.wall if self.wall > 0 else 0.0


@dataclass
class RunSummary:
    run: Run
    ranks: list[RankSummary]
    wall: float
    bubble_measured: float
    bubble_modelled: float | None
    model_note: str
    accuracy_by_chapter: dict[int, float]   # 1-based chapter -> fraction
    final_accuracy: float | None
    notes: list[str]

    @property
    def name(self) -> str:
        return self.run.name

    @property
    def cfg(self) -> Config:
        return self.run.cfg

    @property
    def bytes_sent(self) -> int:
        return sum(r.bytes_sent for r in self.ranks)

    @property
    def bytes_received(self) -> int:
        return sum(r.bytes_received for r in self.ranks)

    @functools.cached_property
    def training(self) -> TrainingPhase:
        """The training phase, setup and the final model write apart (:func:`training_phase`)."""
        return training_phase(self.run)


def _disjoint_durations(start: np.ndarray, end: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Span durations clipped to [lo, hi] with overlaps removed (an earlier span keeps the
    overlapping time), so that they can never add up to more than the wall."""
    order = np.argsort(start, kind="stable")
    s = np.clip(start[order], lo, hi)
    e = np.clip(end[order], lo, hi)
    e = np.maximum(e, s)
    covered_until = np.maximum.accumulate(np.concatenate(([lo], e)))[:-1]
    s = np.maximum(s, covered_until)
    out = np.empty_like(s)
    out[order] = np.maximum(e - s, 0.0)
    return out


def peak_scalar(rt: RankTrace, name: str) -> float | None:
    values = rt.scalars["value"][rt.scalar_names == name]
    return float(values.max()) if values.size else None


def summarize_rank(rt: RankTrace) -> RankSummary:
    spans = rt.spans
    durations = _disjoint_durations(spans["start"], spans["end"], rt.wall_start, rt.wall_end)
    raw = float(np.maximum(spans["end"] - spans["start"], 0.0).sum())
    categories = np.array([KIND_CATEGORY.get(k, "other") for k in rt.kinds], dtype=object)
    seconds = {c: float(durations[categories == c].sum()) for c in CATEGORIES}
    wall = max(rt.wall, 0.0)
    uncovered = max(wall - sum(seconds.values()), 0.0)
    seconds["other"] += uncovered
    idle = seconds["waiting"] + uncovered
    # the rank's own count when it recorded one (data-parallel backprop: its gradient all-reduce,
    # as a ring sends it); else its send and receive spans
    counted = _float_attrs(rt, ("bytes_sent", "bytes_received"))
    return RankSummary(
        rank=rt.rank, host=rt.host, device=rt.device, wall=wall, seconds=seconds,
        uncovered=uncovered, clipped=raw - float(durations.sum()), busy=wall - idle, idle=idle,
        bytes_sent=int(counted.get("bytes_sent", spans["bytes"][rt.kinds == "send"].sum())),
        bytes_received=int(counted.get("bytes_received", spans["bytes"][rt.kinds == "recv"].sum())),
        peak_host_mem=peak_scalar(rt, "rss_peak_bytes") or peak_scalar(rt, "peak_host_mem"),
        peak_gpu_mem=peak_scalar(rt, "cuda_peak_bytes") or peak_scalar(rt, "peak_gpu_mem"),
    )


def accuracy_by_chapter(run: Run) -> dict[int, float]:
    """Test accuracy (fraction) per 1-based chapter, from whichever rank evaluated it (latest wins)."""
    found: dict[int, tuple[float, float]] = {}
    for rt in run.ranks:
        sel = rt.scalars[rt.scalar_names == "test_accuracy"]
        for chapter, t, value in zip(sel["chapter"], sel["time"], sel["value"]):
            if int(chapter) not in found or t >= found[int(chapter)][0]:
                found[int(chapter)] = (float(t), float(value))
    return {c: v for c, (_, v) in sorted(found.items())}


def task_durations(run: Run) -> dict[tuple[str, int, int], float]:
    """Measured task times for the task-graph model, keyed by 0-based chapter as the plan is.

    ("train", c, k) and ("forward", c, k): the train spans of chapter c, layer k, and the
    forward passes that made its inputs, on the rank that trained (c, k);
    ("head"|"negatives"|"eval", c, -1): that kind's spans of chapter c, on the rank with the
    most of it (a task runs on one rank).
    """
    per_rank: list[dict[tuple[str, int, int], float]] = []
    trained: dict[tuple[int, int], list[int]] = {}
    for rt in run.ranks:
        acc: dict[tuple[str, int, int], float] = {}
        # the one place where the traces' 1-based chapters become the plan's 0-based ones
        chapters = np.where(rt.spans["chapter"] > 0, rt.spans["chapter"] - 1, -1)
        for kind, c, k, start, end in zip(rt.kinds.tolist(), chapters.tolist(),
                                          rt.spans["layer"].tolist(), rt.spans["start"].tolist(),
                                          rt.spans["end"].tolist()):
            dur = max(end - start, 0.0)
            if kind in ("train", "forward") and c >= 0 and k >= 0:
                key = (kind, c, k)
                if kind == "train":
                    trained.setdefault((c, k), [])
                    if rt.rank not in trained[(c, k)]:
                        trained[(c, k)].append(rt.rank)
            elif kind in MODEL_KINDS and c >= 0:
                key = (kind, c, -1)
            elif kind == "ship" and c >= 0 and k >= 0:  # a layer's outputs for the next rank
                key = (kind, c, k)
            else:
                continue
            acc[key] = acc.get(key, 0.0) + dur
        per_rank.append(acc)
    durations: dict[tuple[str, int, int], float] = {}
    for (c, k), ranks in trained.items():
        durations[("train", c, k)] = max(per_rank[r].get(("train", c, k), 0.0) for r in ranks)
        if any(("forward", c, k) in per_rank[r] for r in ranks):
            durations[("forward", c, k)] = max(per_rank[r].get(("forward", c, k), 0.0) for r in ranks)
    for acc in per_rank:
        for key, value in acc.items():
            if key[0] not in ("train", "forward"):
                durations[key] = max(durations.get(key, 0.0), value)
    return durations


def modelled_bubble(run: Run, simulate: Simulator) -> tuple[float | None, str]:
    """Bubble the task graph predicts for this run's measured task times, and a note."""
    durations = task_durations(run)
    cfg = run.cfg
    num_layers, chapters = cfg.model.num_layers, cfg.train.chapters
    done = 0
    while done < chapters and all(("train", done, k) in durations for k in range(num_layers)):
        done += 1
    if done == 0:
        return None, "no chapter has a train span for every layer"
    note = ""
    try:
        if done < chapters:
            # a killed run: model the chapters it completed
            note = f"modelled over the {done} of {chapters} chapters the trace completes"
            if cfg.train.chapter_batches:
                # chapters of K batches: the plan derives their count from the data, so the later
                # chapters stay in the graph and take no time (nor the partly done one)
                durations = {key: v for key, v in durations.items() if key[1] < done}
            else:
                cfg = cfg.replace(train={"chapters": done, "epochs": done * (cfg.train.epochs // chapters)})
        result = simulate(cfg, run.world_size, durations)
    except ConfigError as exc:
        return None, f"the task graph cannot be built for this run: {exc}"
    if result.makespan <= 0:
        return None, "the measured task times are all zero"
    return float(result.bubble), note


def summarize_run(run: Run, simulate: Simulator) -> RunSummary:
    """What the run's traces say; its bubble modelled with ``simulate``."""
    ranks = [summarize_rank(rt) for rt in run.ranks]
    wall = run.wall
    # ranks that start late or stop early are idle for the rest of the run's wall
    total = run.world_size * wall
    bubble = 1.0 - sum(r.busy for r in ranks) / total if total > 0 else 0.0
    modelled, model_note = modelled_bubble(run, simulate)
    accuracy = accuracy_by_chapter(run)
    final = run.info.get("test_accuracy")
    if not isinstance(final, (int, float)) or isinstance(final, bool):
        final = accuracy[max(accuracy)] if accuracy else None
    notes = list(run.notes)
    for r in ranks:
        if r.clipped > 0.01 * max(r.wall, 1e-9):
            notes.append(f"rank {r.rank}: {r.clipped:.3f} s of spans lie outside its wall or overlap "
                         "other spans; they are not counted.")
    return RunSummary(run=run, ranks=ranks, wall=wall, bubble_measured=bubble,
                      bubble_modelled=modelled, model_note=model_note,
                      accuracy_by_chapter=accuracy,
                      final_accuracy=float(final) if final is not None else None, notes=notes)


def speedup(baseline: RunSummary, run: RunSummary) -> float | None:
    return baseline.wall / run.wall if run.wall > 0 else None


def efficiency(baseline: RunSummary, run: RunSummary) -> float | None:
    s = speedup(baseline, run)
    return s / run.run.world_size if s is not None else None


def analytic_bubble(s: RunSummary) -> float | None:
    """(L-1)/(S+L-1) for equal task times, where it applies (Single Layer with one layer per rank)."""
    num_layers = s.cfg.model.num_layers
    if s.cfg.run.schedule == "single_layer" and num_layers == s.run.world_size:
        return pipeline_bubble(s.cfg.train.chapters, num_layers)
    return None


# ---------------------------------------------------------------- training phase and problems

#: Span kinds of the training itself: the training phase ends with the last of them.
TRAINING_KINDS = ("train", "forward", "negatives", "head", "eval", "send", "recv")


@dataclass
class TrainingPhase:
    """The run's training, setup and the final model write apart: from the first rank's end of
    setup to the last rank's last training span (``train_start`` / ``train_end`` trace
    attributes where the run wrote them)."""
    start: float
    end: float
    seconds: float              # run.json training_seconds where recorded, else end - start
    setup_seconds: float        # from the first rank's start to the start of the phase
    busy: list[float]           # per rank, busy (not waiting) inside the phase
    bubble: float               # 1 - sum(busy) / (N * (end - start))


def _float_attrs(rt: RankTrace, keys: tuple[str, ...]) -> dict[str, float]:
    return {k: float(v) for k, v in trace_attrs(rt, keys).items()}


def training_phase(run: Run) -> TrainingPhase:
    starts, ends = [], []
    for rt in run.ranks:
        attrs = _float_attrs(rt, ("train_start", "train_end"))
        setup_ends = rt.spans["end"][rt.kinds == "setup"]
        start = attrs.get("train_start", float(setup_ends.max()) if setup_ends.size else rt.wall_start)
        work = rt.spans["end"][np.isin(rt.kinds, TRAINING_KINDS)]
        end = attrs.get("train_end", float(work.max()) if work.size else start)
        starts.append(start)
        ends.append(max(end, start))
    start, end = min(starts), max(ends)
    busy = []
    for rt in run.ranks:
        keep = rt.kinds != "wait"
        busy.append(float(_disjoint_durations(rt.spans["start"][keep], rt.spans["end"][keep], start, end).sum()))
    length = end - start
    recorded = run.info.get("training_seconds")
    seconds = float(recorded) if isinstance(recorded, (int, float)) and not isinstance(recorded, bool) else length
    bubble = 1.0 - sum(busy) / (run.world_size * length) if length > 0 else 0.0
    return TrainingPhase(start=start, end=end, seconds=seconds, setup_seconds=start - run.wall_start,
                         busy=busy, bubble=bubble)


#: Settings that make two runs the same problem (a baseline must match them all). Not in it:
#: the seed (runs differing only in it are grouped), resources (ranks, threads, device), the
#: schedule and what a schedule needs (adaptive_lag, adaptive_mode, exchange), run bookkeeping.
PROBLEM_SETTINGS = (
    ("model", "dims"), ("model", "threshold_coeff"), ("model", "goodness"), ("model", "norm_eps"),
    ("model", "label_position"), ("model", "neutral_value"),
    ("data", "dataset"), ("data", "path"), ("data", "train_subset"), ("data", "test_subset"),
    ("data", "shards"),
    ("train", "epochs"), ("train", "chapters"), ("train", "batch_size"), ("train", "lr"),
    ("train", "head_lr"), ("train", "cooldown_final"), ("train", "negatives"), ("train", "classifier"),
    ("train", "eval_every"), ("train", "algorithm"), ("train", "bp_lr"),
)


def problem_setting(config: Config | dict, section: str, key: str, world_size: int | None) -> Any:
    """A setting as it decides the problem: the data directory by its name, shards as resolved
    for the run's world size ("N" when it is not known)."""
    cfg = config_of(config)
    value = getattr(getattr(cfg, section), key)
    if isinstance(value, (list, tuple)):
        return list(value)
    if (section, key) == ("data", "path"):
        return os.path.basename(os.path.normpath(value)) if value else ""
    if (section, key) == ("data", "shards") and not value:
        return cfg.resolved_shards(world_size) if world_size else (
            "N" if cfg.run.schedule == "federated" else 1)
    return value


def problem_key(s: RunSummary) -> list:
    """The problem settings of a run, as they decide the problem (for grouping runs)."""
    return [problem_setting(s.cfg, section, key, None) for section, key in PROBLEM_SETTINGS]


def problem_differences(a: Config | dict, b: Config | dict, world_a: int | None = None,
                        world_b: int | None = None) -> list[str]:
    """The settings (``section.key``) in which two runs' configurations pose different problems."""
    return [f"{section}.{key}" for section, key in PROBLEM_SETTINGS
            if problem_setting(a, section, key, world_a) != problem_setting(b, section, key, world_b)]


def describe_differences(a: Config | dict, b: Config | dict, world_a: int | None = None,
                         world_b: int | None = None) -> str:
    """'model.dims ([784, 8] vs [784, 16]), train.negatives (fixed vs random)'."""
    parts = []
    for name in problem_differences(a, b, world_a, world_b):
        section, key = name.split(".")
        parts.append(f"{name} ({problem_setting(a, section, key, world_a)} vs "
                     f"{problem_setting(b, section, key, world_b)})")
    return ", ".join(parts)


def accuracy_timeline(s: RunSummary) -> list[tuple[float, float]]:
    """(training seconds, test accuracy) at each evaluated chapter, in order.

    Training seconds: from the start of the training phase to the end of that chapter's
    evaluation, less the evaluation time spent on the evaluating rank until then. In Sequential
    and data-parallel runs that is the training time exactly; in a pipeline, evaluation on one
    rank overlaps training on others, and only the evaluating rank's own evaluations are
    subtracted."""
    start = s.training.start
    out = []
    for rt in s.run.ranks:
        names = rt.scalar_names
        sel = rt.scalars[names == "test_accuracy"]
        evals = rt.kinds == "eval"
        ends, durs = rt.spans["end"][evals], rt.spans["end"][evals] - rt.spans["start"][evals]
        for t, value in zip(sel["time"].tolist(), sel["value"].tolist()):
            spent = float(durs[ends <= t + 1e-9].sum())
            out.append((max(t - start - spent, 0.0), float(value)))
    return sorted(out)

