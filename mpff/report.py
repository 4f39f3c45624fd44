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
import functools
import json
import math
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, TextIO

import h5py
import numpy as np

from . import trace as trace_mod
from .config import Config, ConfigError, from_dict, tomllib
from .plan import build_plan, pipeline_bubble
from .rundir import refuse_run_files

__all__ = ["CATEGORIES", "analyze_run", "load_run", "main", "pipeline_bubble", "run_report"]

CATEGORIES = ("compute", "communication", "waiting", "evaluation", "other")
KIND_CATEGORY = {
    "train": "compute", "forward": "compute", "negatives": "compute", "head": "compute", "ship": "compute",
    "send": "communication", "recv": "communication", "allreduce": "communication",
    "wait": "waiting",
    "eval": "evaluation",
    "checkpoint": "other", "io": "other", "setup": "other",
}
assert set(KIND_CATEGORY) == set(trace_mod.SPAN_KINDS)  # internal invariant: one category per kind

CATEGORY_COLORS = {"compute": "#1f77b4", "communication": "#ff7f0e", "waiting": "#d62728",
                   "evaluation": "#9467bd", "other": "#7f7f7f"}
KIND_COLORS = {"train": "#1f77b4", "forward": "#6baed6", "negatives": "#2ca02c", "head": "#98df8a",
               "ship": "#17becf", "send": "#ff7f0e", "recv": "#ffbb78", "allreduce": "#e6550d",
               "wait": "#d62728", "eval": "#9467bd", "checkpoint": "#7f7f7f", "io": "#bcbd22",
               "setup": "#c7c7c7"}
OTHER_KIND_COLOR = "#444444"

#: Task kinds of the task graph whose durations come from spans of the same kind.
MODEL_KINDS = ("head", "negatives", "eval")

#: simulate(cfg, world_size, durations) -> object with .makespan, .busy and .bubble
Simulator = Callable[[Config, int, dict], Any]


def plan_simulate(cfg: Config, world_size: int, durations: dict) -> Any:
    return build_plan(cfg, world_size).simulate(durations)


# ---------------------------------------------------------------- reading

@dataclass
class RankTrace:
    """One rank's trace file, as read."""
    path: str
    rank: int
    world_size: int
    host: str
    device: str
    status: str
    wall_start: float
    wall_end: float
    config: dict | None
    kinds: np.ndarray       # str, one per span
    spans: np.ndarray       # SPAN_FIELDS: chapter (1-based, -1 none), layer, start, end, bytes, peer
    scalars: np.ndarray     # SCALAR_FIELDS: chapter (1-based, -1 none), layer, time, value
    scalar_names: np.ndarray

    @property
    def wall(self) -> float:
        return self.wall_end - self.wall_start


@dataclass
class Run:
    path: str
    name: str
    config: dict            # Config.to_dict() of the run, as stored
    info: dict              # run.json (empty when missing)
    ranks: list[RankTrace]
    notes: list[str] = field(default_factory=list)

    @property
    def world_size(self) -> int:
        return len(self.ranks)

    @property
    def wall_start(self) -> float:
        return min(r.wall_start for r in self.ranks)

    @property
    def wall(self) -> float:
        return max(r.wall_end for r in self.ranks) - self.wall_start


def _attr_str(attrs: h5py.AttributeManager, key: str, default: str = "") -> str:
    value = attrs.get(key, default)
    return value.decode() if isinstance(value, bytes) else str(value)


#: What the report keeps of a trace's records: the numbers (kinds and names apart, as str).
SPAN_FIELDS = np.dtype([("chapter", "<i4"), ("layer", "<i4"), ("start", "<f8"), ("end", "<f8"),
                        ("bytes", "<i8"), ("peer", "<i4")])
SCALAR_FIELDS = np.dtype([("chapter", "<i4"), ("layer", "<i4"), ("time", "<f8"), ("value", "<f8")])


def _numbers(records: np.ndarray, dtype: np.dtype, version: int) -> np.ndarray:
    """The numeric fields of a trace's records, chapters 1-based whatever the file version."""
    out = np.empty(records.shape, dtype=dtype)
    for name in dtype.names:
        out[name] = records[name]
    if version < 2:  # version 1 stored 0-based chapters
        out["chapter"] = np.where(out["chapter"] >= 0, out["chapter"] + 1, -1)
    return out


def _texts(column: np.ndarray) -> np.ndarray:
    """A string field as str: NUL-padded bytes (version 1) or variable-length UTF-8 (version 2)."""
    return np.array([v.decode() if isinstance(v, bytes) else str(v) for v in column.tolist()],
                    dtype=object).astype(str) if column.size else np.array([], dtype=str)


def read_trace(path: str) -> RankTrace:
    """Read one rank file (format version 1 or 2); anything unreadable is a ConfigError naming it.

    Chapters come back 1-based, as the report shows them, from either version."""
    if not os.path.isfile(path):
        raise ConfigError(f"trace file {path} is missing; the run did not finish writing its traces, "
                          "so rerun it (or report another run)")
    try:
        with h5py.File(path, "r", locking=False) as fh:  # readable while the run writes it
            attrs = fh.attrs
            if _attr_str(attrs, "format") != trace_mod.FORMAT:
                raise ConfigError(f"{path} is not an mpff trace (attribute format is not "
                                  f"{trace_mod.FORMAT!r}); point the report at a run directory")
            version = int(attrs.get("format_version", 0))
            if version > trace_mod.FORMAT_VERSION:
                raise ConfigError(f"{path} has trace format version {version}, newer than this mpff "
                                  f"reads ({trace_mod.FORMAT_VERSION}); upgrade mpff")
            config_text = attrs.get("config")
            spans = fh["spans"][()]
            scalars = fh["scalars"][()]
            rt = RankTrace(
                path=path, rank=int(attrs["rank"]), world_size=int(attrs.get("world_size", 0)),
                host=_attr_str(attrs, "host", "?"), device=_attr_str(attrs, "device", "?"),
                status=_attr_str(attrs, "status", "?"),
                wall_start=float(attrs["wall_start"]), wall_end=float(attrs["wall_end"]),
                config=json.loads(config_text) if config_text is not None else None,
                kinds=_texts(spans["kind"]), spans=_numbers(spans, SPAN_FIELDS, version),
                scalars=_numbers(scalars, SCALAR_FIELDS, version),
                scalar_names=_texts(scalars["name"]),
            )
    except ConfigError:
        raise
    except (OSError, KeyError, ValueError, TypeError) as exc:
        # h5py raises OSError for garbage and for truncated files ("truncated file: eof = ...")
        raise ConfigError(f"trace file {path} is corrupt or truncated ({_one_line(exc)}); the run's "
                          "model and other files do not depend on it") from None
    return rt


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def load_run(run_dir: str) -> Run:
    """Read run.json, the configuration and every rank's trace of a run directory."""
    run_dir = os.path.normpath(run_dir)
    trace_dir = os.path.join(run_dir, "trace")
    info_path = os.path.join(run_dir, "run.json")
    if os.path.exists(run_dir) and not os.path.isdir(run_dir):
        parent = os.path.dirname(run_dir) or "."
        inside = os.path.isfile(os.path.join(parent, "run.json")) or os.path.isdir(os.path.join(parent, "trace"))
        raise ConfigError(f"{run_dir} is a file, not a run directory; pass "
                          + (f"the run directory that holds it, {parent}" if inside else
                             "the --out directory of an 'mpff train' run"))
    if not os.path.isdir(run_dir):
        raise ConfigError(f"run directory {run_dir} does not exist; pass the --out directory of "
                          "an 'mpff train' run")
    if not (os.path.isfile(info_path) or os.path.isdir(trace_dir)):
        raise ConfigError(f"{run_dir} is not an mpff run directory (it has neither run.json nor "
                          "trace/); pass the --out directory of an 'mpff train' run")
    notes: list[str] = []
    info: dict = {}
    if os.path.isfile(info_path):
        try:
            with open(info_path, encoding="utf-8") as fh:
                info = json.load(fh)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{info_path} is not readable JSON ({_one_line(exc)}); "
                              "delete it to report from the traces alone") from None
        if not isinstance(info, dict):
            raise ConfigError(f"{info_path} does not hold a JSON object; delete it to report "
                              "from the traces alone")
        if info.get("status", "finished") != "finished":
            notes.append(f"run.json says status {info.get('status')!r}: the run did not finish.")
    else:
        notes.append("no run.json: the run did not finish (or is still running).")
    if not os.path.isdir(trace_dir):
        raise ConfigError(f"run {run_dir} has no trace/ directory (run.trace was false?); "
                          "rerun it with --set run.trace=true to get a report")

    # A damaged or missing rank file leaves that rank out (shown idle, named in a note); the
    # other ranks, the model and run.json are reported as they are.
    files = [n for n in os.listdir(trace_dir) if n.startswith("rank") and n.endswith(".h5")]
    world_size = int(info.get("world_size") or 0) or len(files) or 1
    read: list[RankTrace | None] = []
    damaged: list[tuple[int, str]] = []
    for r in range(world_size):
        try:
            read.append(read_trace(trace_mod.trace_path(run_dir, r)))
        except ConfigError as exc:
            read.append(None)
            damaged.append((r, str(exc)))
    good = [rt for rt in read if rt is not None]
    if not good:
        raise ConfigError(f"no readable trace in {trace_dir}: {damaged[0][1]}")
    first = good[0]
    if not info.get("world_size") and first.world_size:
        world_size = first.world_size
    ranks = []
    for r in range(world_size):
        rt = read[r] if r < len(read) else None
        if rt is None:
            why = next((w for d, w in damaged if d == r), f"trace file {trace_mod.trace_path(run_dir, r)} is missing")
            notes.append(f"{why}. Rank {r} is left out: shown idle, its tasks missing from the modelled "
                         "bubble; the other ranks are reported as recorded.")
            rt = RankTrace(path=trace_mod.trace_path(run_dir, r), rank=r, world_size=world_size, host="?",
                           device="?", status="damaged", wall_start=first.wall_start, wall_end=first.wall_end,
                           config=None, kinds=first.kinds[:0], spans=first.spans[:0],
                           scalars=first.scalars[:0], scalar_names=first.scalar_names[:0])
        ranks.append(rt)
    for r, rt in enumerate(ranks):
        if rt.status == "damaged":
            continue
        if rt.rank != r or (rt.world_size and rt.world_size != world_size):
            raise ConfigError(f"trace file {rt.path} says rank {rt.rank} of {rt.world_size}, "
                              f"expected rank {r} of {world_size}; the trace directory mixes runs")
        if rt.status != "finished":
            notes.append(f"rank {r}'s trace has status {rt.status!r} (the rank was killed, failed or "
                         f"is still running): it is reported up to its last flush, "
                         f"t = {rt.wall_end - first.wall_start:.1f} s.")

    config = first.config
    if config is None:
        toml_path = os.path.join(run_dir, "config.toml")
        try:
            with open(toml_path, "rb") as fh:
                config = tomllib.load(fh)
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"run {run_dir} has no configuration in its traces and {toml_path} "
                              f"is unreadable ({_one_line(exc)}); restore config.toml") from None
    name = os.path.basename(os.path.abspath(run_dir))
    return Run(path=run_dir, name=name, config=_as_it_ran(config), info=info, ranks=ranks, notes=notes)


def unfinished(run: Run) -> str | None:
    """Why ``run`` is not a finished run, or None: its run.json status (still running, stopped,
    failed), a missing run.json, or a rank whose trace did not close as finished."""
    if not run.info:
        return "it has no run.json (still running, or killed)"
    status = run.info.get("status", "finished")
    if status != "finished":
        return f"run.json says status {status!r}"
    for rt in run.ranks:
        if rt.status != "finished":
            return f"rank {rt.rank}'s trace has status {rt.status!r}"
    return None


#: settings added after runs were first recorded, and what a run recorded without them did
#: (so its task graph is rebuilt as it ran, not with today's defaults)
SETTINGS_BEFORE = {("run", "blocks"): "count", ("run", "inputs"): "recompute",
                   ("run", "eval_placement"): "last"}


def _as_it_ran(config: dict) -> dict:
    if not isinstance(config, dict) or not isinstance(config.get("run", {}), dict):
        return config
    config = json.loads(json.dumps(config))
    for (section, key), value in SETTINGS_BEFORE.items():
        config.setdefault(section, {}).setdefault(key, value)
    return config


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

    def setting(self, section: str, key: str, default: Any = "?") -> Any:
        return self.run.config.get(section, {}).get(key, default)

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


def _peak(rt: RankTrace, name: str) -> float | None:
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
    counted = _rank_attrs(rt, ("bytes_sent", "bytes_received"))
    return RankSummary(
        rank=rt.rank, host=rt.host, device=rt.device, wall=wall, seconds=seconds,
        uncovered=uncovered, clipped=raw - float(durations.sum()), busy=wall - idle, idle=idle,
        bytes_sent=int(counted.get("bytes_sent", spans["bytes"][rt.kinds == "send"].sum())),
        bytes_received=int(counted.get("bytes_received", spans["bytes"][rt.kinds == "recv"].sum())),
        peak_host_mem=_peak(rt, "rss_peak_bytes") or _peak(rt, "peak_host_mem"),
        peak_gpu_mem=_peak(rt, "cuda_peak_bytes") or _peak(rt, "peak_gpu_mem"),
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
    try:
        num_layers = len(run.config["model"]["dims"]) - 1
        chapters = int(run.config["train"]["chapters"])
        epochs_per_chapter = int(run.config["train"]["epochs"]) // chapters
    except (KeyError, TypeError, ValueError):
        return None, "the run's configuration lacks model.dims or train.chapters"
    done = 0
    while done < chapters and all(("train", done, k) in durations for k in range(num_layers)):
        done += 1
    if done == 0:
        return None, "no chapter has a train span for every layer"
    note = ""
    config = json.loads(json.dumps(run.config))  # a copy to edit
    if done < chapters:
        # a killed run: model the chapters it completed
        config["train"]["chapters"] = done
        config["train"]["epochs"] = done * epochs_per_chapter
        note = f"modelled over the {done} of {chapters} chapters the trace completes"
    try:  # validation checks values only: the data need not be on this (login) node
        cfg = from_dict(config)
        result = simulate(cfg, run.world_size, durations)
    except ConfigError as exc:
        return None, f"the task graph cannot be built for this run: {exc}"
    if result.makespan <= 0:
        return None, "the measured task times are all zero"
    return float(result.bubble), note


def analyze_run(run_dir: str, simulate: Simulator | None = None) -> RunSummary:
    run = load_run(run_dir)
    ranks = [summarize_rank(rt) for rt in run.ranks]
    wall = run.wall
    # ranks that start late or stop early are idle for the rest of the run's wall
    total = run.world_size * wall
    bubble = 1.0 - sum(r.busy for r in ranks) / total if total > 0 else 0.0
    modelled, model_note = modelled_bubble(run, simulate or plan_simulate)
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
    num_layers = len(s.setting("model", "dims", [0, 0])) - 1
    if s.setting("run", "schedule") == "single_layer" and num_layers == s.run.world_size:
        return pipeline_bubble(int(s.setting("train", "chapters", 1)), num_layers)
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


def _rank_attrs(rt: RankTrace, keys: tuple[str, ...]) -> dict[str, float]:
    try:
        with h5py.File(rt.path, "r", locking=False) as fh:
            return {k: float(fh.attrs[k]) for k in keys if k in fh.attrs}
    except (OSError, ValueError, TypeError):
        return {}


def training_phase(run: Run) -> TrainingPhase:
    starts, ends = [], []
    for rt in run.ranks:
        attrs = _rank_attrs(rt, ("train_start", "train_end"))
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


@functools.lru_cache(maxsize=1)
def _defaults() -> dict:
    return Config().to_dict()


def _setting(config: dict, section: str, key: str, world_size: int | None) -> Any:
    """A setting as it decides the problem: defaults filled in (older runs store fewer keys), the
    data directory by its name, shards as resolved for the run's world size."""
    value = config.get(section, {}).get(key, _defaults()[section][key])
    if isinstance(value, (list, tuple)):
        return list(value)
    if (section, key) == ("data", "path"):
        return os.path.basename(os.path.normpath(value)) if value else ""
    if (section, key) == ("data", "shards") and not value:
        federated = config.get("run", {}).get("schedule") == "federated"
        return (world_size or "N") if federated else 1
    return value


def problem_differences(a: dict, b: dict, world_a: int | None = None,
                        world_b: int | None = None) -> list[str]:
    """The settings (``section.key``) in which two runs' configurations pose different problems."""
    return [f"{section}.{key}" for section, key in PROBLEM_SETTINGS
            if _setting(a, section, key, world_a) != _setting(b, section, key, world_b)]


def describe_differences(a: dict, b: dict, world_a: int | None = None, world_b: int | None = None) -> str:
    """'model.dims ([784, 8] vs [784, 16]), train.negatives (fixed vs random)'."""
    parts = []
    for name in problem_differences(a, b, world_a, world_b):
        section, key = name.split(".")
        parts.append(f"{name} ({_setting(a, section, key, world_a)} vs {_setting(b, section, key, world_b)})")
    return ", ".join(parts)


# ---------------------------------------------------------------- formatting

def _table(headers: list[str], rows: Iterable[list[str]], numeric_from: int = 1) -> str:
    rows = list(rows)
    align = ["---" if i < numeric_from else "---:" for i in range(len(headers))]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _sec(x: float | None) -> str:
    return "–" if x is None else f"{x:,.2f}"


def _pct(x: float | None, digits: int = 1) -> str:
    return "–" if x is None or math.isnan(x) else f"{100.0 * x:.{digits}f} %"


def _bytes(n: float | None) -> str:
    if n is None:
        return "–"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    raise AssertionError  # pragma: no cover


def _ratio(x: float | None) -> str:
    return "–" if x is None else f"{x:.2f}"


def summary_table(s: RunSummary, baseline: RunSummary | None, note: str = "") -> str:
    rows = [
        ["schedule", str(s.setting("run", "schedule"))],
        ["negatives / classifier", f"{s.setting('train', 'negatives')} / {s.setting('train', 'classifier')}"],
        ["ranks", str(s.run.world_size)],
        ["layers (dims)", str(s.setting("model", "dims"))],
        ["epochs / chapters", f"{s.setting('train', 'epochs')} / {s.setting('train', 'chapters')}"],
        ["wall time (s)", _sec(s.wall)],
        ["test accuracy", _pct(s.final_accuracy, 2)],
        ["bubble, measured", _pct(s.bubble_measured)],
        ["bubble, modelled from task times", _pct(s.bubble_modelled)],
        ["bubble, equal task times (L-1)/(S+L-1)", _pct(analytic_bubble(s))],
        ["bytes sent / received", f"{_bytes(s.bytes_sent)} / {_bytes(s.bytes_received)}"],
    ]
    if baseline is not None:
        rows += [
            ["baseline", f"{baseline.name} ({_sec(baseline.wall)} s, {baseline.run.world_size} rank(s))"
                         + (f" ({note})" if note else "")],
            ["speedup", _ratio(speedup(baseline, s))],
            ["parallel efficiency", _pct(efficiency(baseline, s))],
        ]
    return _table(["", s.name], rows, numeric_from=2)


def breakdown_table(s: RunSummary) -> str:
    headers = ["rank", "wall (s)"] + [f"{c} (s, %)" for c in CATEGORIES] + ["untraced (s)"]
    rows = []
    for r in s.ranks:
        rows.append([f"{r.rank}", _sec(r.wall)]
                    + [f"{_sec(r.seconds[c])} ({r.percent(c):.1f} %)" for c in CATEGORIES]
                    + [_sec(r.uncovered)])
    return _table(headers, rows)


def bubble_table(s: RunSummary) -> str:
    rows = [[f"{r.rank}", r.host, r.device, _sec(r.busy), _sec(r.idle), _pct(r.bubble)] for r in s.ranks]
    rows.append(["all", "", "", _sec(sum(r.busy for r in s.ranks)),
                 _sec(s.run.world_size * s.wall - sum(r.busy for r in s.ranks)), _pct(s.bubble_measured)])
    return _table(["rank", "host", "device", "busy (s)", "idle (s)", "bubble"], rows, numeric_from=3)


def bytes_table(s: RunSummary) -> str:
    rows = [[f"{r.rank}", _bytes(r.bytes_sent), _bytes(r.bytes_received)] for r in s.ranks]
    rows.append(["total", _bytes(s.bytes_sent), _bytes(s.bytes_received)])
    return _table(["rank", "sent", "received"], rows)


def memory_table(s: RunSummary) -> str:
    rows = [[f"{r.rank}", _bytes(r.peak_host_mem), _bytes(r.peak_gpu_mem)] for r in s.ranks]
    return _table(["rank", "peak host memory", "peak GPU memory"], rows)


def accuracy_table(s: RunSummary) -> str:
    rows = [[f"{c}", _pct(v, 2)] for c, v in s.accuracy_by_chapter.items()]
    return _table(["chapter", "test accuracy"], rows)


@dataclass
class Pairing:
    """A run's baseline for speedup (None: none of the same problem) and a note for the table."""
    baseline: RunSummary | None
    note: str = ""


def _seed(s: RunSummary) -> Any:
    return s.setting("train", "seed", 0)


def comparison_rows(summaries: list[RunSummary], baselines: list[RunSummary | None],
                    notes: list[str] | None = None, predicted: list[float | None] | None = None
                    ) -> list[list[str]]:
    rows = []
    for i, (s, b) in enumerate(zip(summaries, baselines)):
        tp = s.training
        bp = s.setting("train", "algorithm", "ff") == "backprop"
        row = [
            s.name, str(s.setting("run", "schedule")),
            "(backprop)" if bp else str(s.setting("train", "negatives")),
            "argmax" if bp else str(s.setting("train", "classifier")), str(s.run.world_size), _sec(s.wall),
            _pct(s.final_accuracy, 2),
            _ratio(speedup(b, s)) if b else "–", _pct(efficiency(b, s)) if b else "–",
            _pct(s.bubble_measured), _pct(s.bubble_modelled),
            _sec(tp.setup_seconds), _sec(tp.seconds), _ratio(training_speedup(b, s)) if b else "–",
            _pct(tp.bubble), str(_seed(s)),
            (b.name if b else "–") + (f" ({notes[i]})" if notes and notes[i] else ""),
        ]
        if predicted is not None:
            row.append(_sec(predicted[i]))
        rows.append(row)
    return rows


COMPARISON_HEADERS = ["run", "schedule", "negatives", "classifier", "ranks", "time (s)", "accuracy",
                      "speedup", "efficiency", "bubble measured", "bubble modelled",
                      "setup (s)", "training (s)", "training speedup", "training bubble", "seed",
                      "baseline"]


def comparison_table(summaries: list[RunSummary], baselines: list[RunSummary | None],
                     notes: list[str] | None = None, predicted: list[float | None] | None = None) -> str:
    headers = COMPARISON_HEADERS + (["predicted time (s)"] if predicted is not None else [])
    return _table(headers, comparison_rows(summaries, baselines, notes, predicted), numeric_from=5)


def training_speedup(baseline: RunSummary, run: RunSummary) -> float | None:
    """Baseline training seconds / run training seconds (setup and the final write apart)."""
    t = run.training.seconds
    return baseline.training.seconds / t if t > 0 else None


def _same_problem(a: RunSummary, b: RunSummary) -> bool:
    return not problem_differences(a.run.config, b.run.config, a.run.world_size, b.run.world_size)


def pair_baselines(summaries: list[RunSummary], baseline: RunSummary | None,
                   any_problem: bool = False) -> list[Pairing]:
    """--baseline for every row, refused (ConfigError) where it is another problem unless
    ``any_problem`` (``--any-baseline``: then the row's note says what differs); without it,
    the Sequential run of the same problem (the same seed and threads if there is one; a
    finished one before one that did not finish), as the paper's Table 1, and where there is
    none a note on the closest Sequential run."""
    if baseline is not None:
        pairs = []
        for s in summaries:
            diff = describe_differences(baseline.run.config, s.run.config, baseline.run.world_size,
                                        s.run.world_size)
            if diff and not any_problem:
                raise ConfigError(
                    f"baseline {baseline.name} is not the same problem as run {s.name}: they differ "
                    f"in {diff}; pass a baseline of the same problem, leave --baseline out to pair "
                    "each run with the Sequential run of its own problem, or pass --any-baseline "
                    "to compare them anyway")
            pairs.append(Pairing(baseline, f"another problem: differs in {diff}" if diff else ""))
        return pairs
    sequential = [s for s in summaries if s.setting("run", "schedule") == "sequential"]
    pairs = []
    for s in summaries:
        same = [b for b in sequential if _same_problem(b, s)]
        if same:
            same.sort(key=lambda b: (unfinished(b.run) is not None, _seed(b) != _seed(s),
                                     b.setting("train", "threads") != s.setting("train", "threads")))
            pairs.append(Pairing(same[0]))
            continue
        note = "no Sequential run of the same problem"
        if sequential:
            closest = min(sequential, key=lambda b: len(problem_differences(
                b.run.config, s.run.config, b.run.world_size, s.run.world_size)))
            note += (f"; {closest.name} differs in " + ", ".join(problem_differences(
                closest.run.config, s.run.config, closest.run.world_size, s.run.world_size)))
        pairs.append(Pairing(None, note))
    return pairs


def pick_baselines(summaries: list[RunSummary], baseline: RunSummary | None,
                   any_problem: bool = False) -> list[RunSummary | None]:
    """The baseline of every run (see :func:`pair_baselines`)."""
    return [p.baseline for p in pair_baselines(summaries, baseline, any_problem)]


# ----- runs that differ only in their seed

def _group_key(s: RunSummary) -> str:
    config = json.loads(json.dumps(s.run.config))
    config.pop("name", None)
    config.get("train", {}).pop("seed", None)
    return json.dumps([config, s.run.world_size], sort_keys=True)


def seed_groups(summaries: list[RunSummary]) -> list[list[int]]:
    """Indices of the runs whose configurations differ only in train.seed (and their names)."""
    groups: dict[str, list[int]] = {}
    for i, s in enumerate(summaries):
        groups.setdefault(_group_key(s), []).append(i)
    return list(groups.values())


def _stats(values: list[float | None]) -> dict[str, float | int | None]:
    """mean, sample std (n >= 2), min, max and n of the values that exist."""
    v = [float(x) for x in values if x is not None and not math.isnan(x)]
    if not v:
        return {"n": 0, "mean": None, "std": None, "min": None, "max": None}
    return {"n": len(v), "mean": float(np.mean(v)), "std": float(np.std(v, ddof=1)) if len(v) > 1 else None,
            "min": min(v), "max": max(v)}


def _group_name(members: list[RunSummary]) -> str:
    first = members[0]
    seed_text = f"seed{_seed(first)}"
    if len(members) > 1 and seed_text in first.name:
        return first.name.replace(seed_text, "seed*")
    return first.name if len(members) == 1 else f"{first.name} (+{len(members) - 1} seeds)"


GROUP_FIELDS = ("wall_seconds", "training_seconds", "speedup", "training_speedup", "accuracy",
                "bubble_measured", "bubble_training")


def group_records(summaries: list[RunSummary], pairs: list[Pairing]) -> list[dict]:
    """One record per seed group: its settings and mean / std / min / max of each figure."""
    records = []
    for idx in seed_groups(summaries):
        members = [summaries[i] for i in idx]
        per_run = [_run_figures(summaries[i], pairs[i].baseline) for i in idx]
        s = members[0]
        rec = {"group": _group_name(members), "runs": [m.name for m in members],
               "seeds": [_seed(m) for m in members], "schedule": s.setting("run", "schedule"),
               "negatives": s.setting("train", "negatives"), "classifier": s.setting("train", "classifier"),
               "ranks": s.run.world_size, "threads": s.setting("train", "threads")}
        for name in GROUP_FIELDS:
            rec[name] = _stats([f[name] for f in per_run])
        records.append(rec)
    return records


def _run_figures(s: RunSummary, b: RunSummary | None) -> dict[str, float | None]:
    return {"wall_seconds": s.wall, "training_seconds": s.training.seconds,
            "speedup": speedup(b, s) if b else None,
            "training_speedup": training_speedup(b, s) if b else None,
            "accuracy": s.final_accuracy, "bubble_measured": s.bubble_measured,
            "bubble_training": s.training.bubble}


def _mean_std(st: dict, fmt: Callable[[float | None], str]) -> str:
    if st["mean"] is None:
        return "–"
    return fmt(st["mean"]) + (f" ± {fmt(st['std'])}" if st["std"] is not None else "")


def group_table(records: list[dict]) -> str:
    headers = ["runs (seeds)", "schedule", "negatives", "classifier", "ranks", "n", "time (s)",
               "training (s)", "speedup", "training speedup", "accuracy", "training bubble"]
    rows = [[r["group"], str(r["schedule"]), str(r["negatives"]), str(r["classifier"]), str(r["ranks"]),
             str(len(r["runs"])), _mean_std(r["wall_seconds"], _sec), _mean_std(r["training_seconds"], _sec),
             _mean_std(r["speedup"], _ratio), _mean_std(r["training_speedup"], _ratio),
             _mean_std(r["accuracy"], lambda x: _pct(x, 2)), _mean_std(r["bubble_training"], _pct)]
            for r in records]
    return _table(headers, rows, numeric_from=4)


def run_records(summaries: list[RunSummary], pairs: list[Pairing], subdirs: list[str],
                predicted: list[float | None] | None = None) -> list[dict]:
    """The comparison table as data: one record per run, plain numbers (seconds, fractions)."""
    groups = {i: n for n, idx in enumerate(seed_groups(summaries)) for i in idx}
    out = []
    for i, (s, p) in enumerate(zip(summaries, pairs)):
        b = p.baseline
        rec = {"run": s.name, "report": f"{subdirs[i]}/report.md", "path": os.path.abspath(s.run.path),
               "schedule": s.setting("run", "schedule"), "negatives": s.setting("train", "negatives"),
               "classifier": s.setting("train", "classifier"), "ranks": s.run.world_size,
               "threads": s.setting("train", "threads"), "seed": _seed(s), "seed_group": groups[i],
               "setup_seconds": s.training.setup_seconds, **_run_figures(s, b),
               "efficiency": efficiency(b, s) if b else None,
               "bubble_modelled": s.bubble_modelled, "bytes_sent": s.bytes_sent,
               "baseline": b.name if b else None, "baseline_note": p.note or None}
        if predicted is not None:
            rec["predicted_wall_seconds"] = predicted[i]
        out.append(rec)
    return out


def write_table_files(out: str, runs: list[dict], groups: list[dict], extra: dict | None = None) -> None:
    """comparison.csv (one row per run), comparison-groups.csv (per seed group: mean, std, min,
    max of each figure) and comparison.json (both, and anything in ``extra``)."""
    import csv
    with open(os.path.join(out, "comparison.csv"), "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(runs[0]))
        writer.writeheader()
        writer.writerows(runs)
    flat = []
    for g in groups:
        row = {k: v for k, v in g.items() if k not in GROUP_FIELDS}
        row["runs"], row["seeds"] = " ".join(row["runs"]), " ".join(map(str, row["seeds"]))
        for name in GROUP_FIELDS:
            for stat, value in g[name].items():
                if stat != "n":
                    row[f"{name}_{stat}"] = value
        flat.append(row)
    with open(os.path.join(out, "comparison-groups.csv"), "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(flat[0]))
        writer.writeheader()
        writer.writerows(flat)
    with open(os.path.join(out, "comparison.json"), "w", encoding="utf-8") as fh:
        json.dump({"runs": runs, "seed_groups": groups, **(extra or {})}, fh, indent=2)
        fh.write("\n")


# ----- predicted against measured

def predict_runs(summaries: list[RunSummary]) -> tuple[list[float | None], list[dict], list[str]]:
    """``report --predict``: per problem, predict every run's schedule and rank count from the
    problem's Sequential run (else its run with the fewest ranks), with contention measured from
    the problem's runs, ranks per node as the runs had them, and messages within a node at the
    shared-memory preset. Returns the predicted wall per run, curve records and notes."""
    from . import interconnect
    from . import predict as predict_mod
    predicted: list[float | None] = [None] * len(summaries)
    curves: list[dict] = []
    notes: list[str] = []
    problems: dict[str, list[int]] = {}
    for i, s in enumerate(summaries):
        key = json.dumps([_setting(s.run.config, sec, k, None) for sec, k in PROBLEM_SETTINGS]
                         + [s.setting("train", "threads")], default=str)
        problems.setdefault(key, []).append(i)
    for idx in problems.values():
        members = [summaries[i] for i in idx]
        source = min(members, key=lambda m: (unfinished(m.run) is not None,  # its times are partial
                                             m.setting("run", "schedule") != "sequential",
                                             m.run.world_size, _seed(m) != 0))
        per_host = max(max(sum(1 for rt in m.run.ranks if rt.host == h) for h in {rt.host for rt in m.run.ranks})
                       for m in members)
        network = predict_mod.Network(interconnect.preset("ib-hdr"), interconnect.preset("shm"), per_host)
        runs = [source.run] + [m.run for m in members if m is not source]
        schedules = sorted({m.setting("run", "schedule") for m in members} | {"sequential"},
                           key=lambda x: x != "sequential")
        ranks = sorted({m.run.world_size for m in members} | {1})
        # backprop: strong and weak scaling are predicted apart (the one-rank source is both's)
        scalings = sorted({m.setting("run", "scaling", "strong") for m in members if m.run.world_size > 1}
                          or {"strong"})
        for scaling in scalings:
            overrides = [f"run.scaling={scaling}"] if source.setting("train", "algorithm") == "backprop" else []
            try:
                outcome = predict_mod.predict(runs, ranks=ranks, schedules=schedules, network=network,
                                              contention="auto", overrides=overrides)
            except ConfigError as exc:
                notes.append(f"no prediction for the runs of {source.name}: {_one_line(exc)}")
                break
            by_key = {(p.schedule, p.ranks): p for p in outcome.predictions}
            for i in idx:
                if summaries[i].run.world_size > 1 and summaries[i].setting("run", "scaling", "strong") != scaling:
                    continue
                p = by_key.get((summaries[i].setting("run", "schedule"), summaries[i].run.world_size))
                # the run's own seed and lag may differ from the source's; the time does not depend on the seed
                predicted[i] = p.wall if p is not None else None
            for p in outcome.predictions:
                if p.reason is None and (p.ranks > 1 or scaling == scalings[0]):
                    curves.append({"source": source.name, "negatives": source.setting("train", "negatives"),
                                   "classifier": source.setting("train", "classifier"),
                                   **({"scaling": scaling} if overrides else {}), **p.record()})
            notes.append(f"predicted from {source.name}" + (f" ({scaling} scaling)" if overrides else "")
                         + ": " + outcome.contention.note)
    return predicted, curves, notes


def plot_scaling(summaries: list[RunSummary], pairs: list[Pairing], path: str,
                 curves: list[dict] | None = None) -> None:
    """Speedup against ranks per schedule (and negatives / classifier): mean over seeds with the
    spread (min to max) as error bars; predicted curves dashed when given. PNG and PDF."""
    fig = _figure(7, 4.5)
    ax = fig.add_subplot()
    series: dict[tuple, dict[int, list[float]]] = {}
    for s, p in zip(summaries, pairs):
        sp = speedup(p.baseline, s) if p.baseline else None
        if sp is None:
            continue
        key = (s.setting("run", "schedule"), s.setting("train", "negatives"), s.setting("train", "classifier"))
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
    _title(fig, "speedup against ranks" + (" (error bars: min to max over seeds)"
                                           if any(len(v) > 1 for p in series.values() for v in p.values()) else ""))
    save_figure(fig, path)


# ---------------------------------------------------------------- pictures and trace.json

#: Every figure is written twice: PNG at this resolution, and a vector PDF beside it for papers.
FIGURE_DPI = 200
UNTRACED_COLOR = "#e8e8e8"   # wall time no span covers (idle), hatched in every figure
UNTRACED_HATCH = "////"


def _figure(width: float, height: float):
    # Figure without pyplot: no global backend state, PNG and PDF through Agg
    from matplotlib.figure import Figure
    return Figure(figsize=(width, height), layout="constrained")


TITLE_SIZE = 11.0  # points


def _title(fig, text: str) -> None:
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
    fig = _figure(12, 1.4 + 0.7 * n)
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
    _title(fig, f"{run.name}: timeline")
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
    fig = _figure(max(6.0, 1.1 * len(s.ranks) + 4.0), 4.2)
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
    ax.set_xticks(x, [f"rank {r.rank}\n{_pct(r.bubble)} bubble" for r in s.ranks])
    ax.set_ylabel("seconds")
    _title(fig, f"{s.name}: time per rank")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    return fig


def plot_accuracy(summaries: list[RunSummary], path: str) -> None:
    save_figure(accuracy_figure(summaries), path)


def accuracy_figure(summaries: list[RunSummary]):
    """Test accuracy per (1-based) chapter, one line per run."""
    from matplotlib.ticker import MaxNLocator
    fig = _figure(7, 4)
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
    _title(fig, "test accuracy per chapter")
    return fig


# ---------------------------------------------------------------- FF against backprop: cost

#: test accuracies whose time to reach the cost table reports (fractions)
DEFAULT_ACCURACIES = (0.90, 0.95, 0.98)


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


def cost_record(s: RunSummary, accuracies: tuple[float, ...] = DEFAULT_ACCURACIES) -> dict:
    """The figures of the FF/PFF/BP comparison for one run (SPEC section 4)."""
    epochs = int(s.setting("train", "epochs", 0) or 0)
    eval_seconds = max((float((rt.spans["end"] - rt.spans["start"])[rt.kinds == "eval"].sum())
                        for rt in s.run.ranks), default=0.0)
    train_seconds = max(s.training.seconds - eval_seconds, 0.0)
    timeline = accuracy_timeline(s)
    to_reach = {}
    for a in accuracies:
        hit = next((t for t, v in timeline if v >= a), None)
        to_reach[f"{100 * a:g}%"] = hit
    peaks = [r.get("memory", {}).get("rss_peak_bytes") for r in s.run.info.get("ranks", [])
             if isinstance(r, dict)]
    peaks = [p for p in peaks if isinstance(p, (int, float))] or [
        p for p in (_peak(rt, "rss_peak_bytes") or _peak(rt, "peak_host_mem") for rt in s.run.ranks) if p]
    return {"run": s.name, "algorithm": s.setting("train", "algorithm", "ff"),
            "schedule": s.setting("run", "schedule"), "ranks": s.run.world_size,
            "training_seconds_per_epoch": train_seconds / epochs if epochs else None,
            "evaluation_seconds": eval_seconds, "seconds_to_accuracy": to_reach,
            "peak_rss_bytes": max(peaks) if peaks else None,
            "bytes_sent_per_epoch": s.bytes_sent / epochs if epochs else None,
            "final_accuracy": s.final_accuracy}


def cost_table(records: list[dict]) -> str:
    thresholds = list(records[0]["seconds_to_accuracy"]) if records else []
    headers = (["run", "algorithm", "schedule", "ranks", "training s/epoch"]
               + [f"s to {t}" for t in thresholds]
               + ["peak memory / rank", "sent / epoch", "final accuracy"])
    rows = [[r["run"], r["algorithm"], str(r["schedule"]), str(r["ranks"]), _sec(r["training_seconds_per_epoch"])]
            + [_sec(r["seconds_to_accuracy"][t]) if r["seconds_to_accuracy"][t] is not None else "not reached"
               for t in thresholds]
            + [_bytes(r["peak_rss_bytes"]), _bytes(r["bytes_sent_per_epoch"]), _pct(r["final_accuracy"], 2)]
            for r in records]
    return _table(headers, rows, numeric_from=3)


def plot_time_to_accuracy(summaries: list[RunSummary], path: str) -> None:
    """Test accuracy against training seconds (evaluation apart), a line per run."""
    fig = _figure(7, 4)
    ax = fig.add_subplot()
    plotted = False
    for s in summaries:
        timeline = accuracy_timeline(s)
        if timeline:
            ax.plot([t for t, _ in timeline], [100 * v for _, v in timeline], marker=".",
                    label=f"{s.name} ({s.setting('train', 'algorithm', 'ff')}, {s.setting('run', 'schedule')}, "
                          f"{s.run.world_size} rank{'s' if s.run.world_size > 1 else ''})")
            plotted = True
    if plotted:
        ax.set_xlabel("training seconds (evaluation apart)")
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    else:
        ax.text(0.5, 0.5, "no test accuracy recorded", ha="center", va="center", transform=ax.transAxes)
    _title(fig, "time to accuracy")
    save_figure(fig, path)


def plot_comparison(summaries: list[RunSummary], path: str) -> None:
    fig = _figure(max(7, 1.3 * len(summaries) + 3), 6)
    ax_time, ax_bubble = fig.subplots(2, 1, sharex=True)
    x = np.arange(len(summaries))
    setup = np.array([s.training.setup_seconds for s in summaries])
    training = np.array([s.training.end - s.training.start for s in summaries])
    rest = np.array([s.wall for s in summaries]) - setup - training
    ax_time.bar(x, setup, color="#c7c7c7", label="setup")
    ax_time.bar(x, training, bottom=setup, color="#1f77b4", label="training")
    ax_time.bar(x, np.maximum(rest, 0.0), bottom=setup + training, color="#bcbd22", label="after training")
    ax_time.set_ylabel("wall time (s)")
    _title(fig, "runs compared")
    ax_time.legend(fontsize=8)
    measured = [100 * s.bubble_measured for s in summaries]
    in_training = [100 * s.training.bubble for s in summaries]
    modelled = [100 * s.bubble_modelled if s.bubble_modelled is not None else 0.0 for s in summaries]
    ax_bubble.bar(x - 0.27, measured, width=0.27, color="#d62728", label="measured, whole run")
    ax_bubble.bar(x, in_training, width=0.27, color="#ff7f0e", label="measured, training phase")
    ax_bubble.bar(x + 0.27, modelled, width=0.27, color="#ff9896", label="modelled")
    ax_bubble.set_ylabel("bubble (%)")
    ax_bubble.legend(fontsize=8)
    ax_bubble.set_xticks(x, [f"{s.name}\n{s.setting('run', 'schedule')}, N={s.run.world_size}"
                             for s in summaries], fontsize=8)
    save_figure(fig, path)


@dataclass(frozen=True)
class Message:
    """One buffer that went from rank ``src`` to rank ``dst``: the indices of its send span
    (in ``run.ranks[src].spans``) and of its recv span (in ``run.ranks[dst].spans``)."""
    src: int
    send: int
    dst: int
    recv: int
    chapter: int    # 1-based, -1: none
    layer: int      # the buffer's index (-1: the head or the negatives)
    nbytes: int


def messages(run: Run) -> tuple[list[Message], int, int]:
    """Pair every send span with its recv span; returns (pairs, unmatched sends, unmatched recvs).

    A send span on rank r with peer p is the recv span on rank p with peer r that has the
    same chapter, layer and bytes (the engine labels both with the buffer's chapter and index).
    Where several match -- the head and the negatives of one chapter are both layer -1, and
    could have the same size -- they pair in time order, as MPI delivers messages between two
    ranks. A send without a recv is a buffer the receiver never unpacked (a killed run, or
    adaptive negatives in 'newest' mode that a newer set overtook)."""
    def grouped(kind: str) -> dict[tuple, list[tuple[float, int]]]:
        out: dict[tuple, list[tuple[float, int]]] = {}
        for rt in run.ranks:
            for i in np.flatnonzero(rt.kinds == kind):
                sp = rt.spans[i]
                here, there = rt.rank, int(sp["peer"])
                src, dst = (here, there) if kind == "send" else (there, here)
                key = (src, dst, int(sp["chapter"]), int(sp["layer"]), int(sp["bytes"]))
                out.setdefault(key, []).append((float(sp["start"]), int(i)))
        return out

    sends, recvs = grouped("send"), grouped("recv")
    pairs: list[Message] = []
    for key, sent in sends.items():
        received = sorted(recvs.get(key, []))
        for (_, i), (_, j) in zip(sorted(sent), received):
            pairs.append(Message(key[0], i, key[1], j, key[2], key[3], key[4]))
    n_send = sum(len(v) for v in sends.values())
    n_recv = sum(len(v) for v in recvs.values())
    return pairs, n_send - len(pairs), n_recv - len(pairs)


#: Counter tracks of trace.json: scalar name -> (track name, scale, series label).
COUNTERS = {
    "loss": ("FF loss", 1.0, "layer {layer}"),
    "head_loss": ("head loss", 1.0, "head"),
    "test_accuracy": ("test accuracy (%)", 100.0, "accuracy"),
    "negatives_changed": ("negatives changed (%)", 100.0, "changed"),
    "host_mem": ("host memory (MiB)", 1 / 2**20, "resident"),
    "peak_host_mem": ("host memory (MiB)", 1 / 2**20, "peak"),
    "peak_gpu_mem": ("GPU memory (MiB)", 1 / 2**20, "peak allocated"),
}


def _us(seconds: float) -> float:
    return round(seconds * 1e6, 3)


def chrome_trace(run: Run) -> dict:
    """Chrome trace event JSON (Perfetto, chrome://tracing): one process per rank with one named
    thread, spans as complete ("X") events in µs, a flow arrow from each send to its receive
    ("s"/"f" events bound to the two slices), and counter tracks ("C") for the losses, the test
    accuracy and memory."""
    t0 = run.wall_start
    events: list[dict] = []
    for rt in run.ranks:
        pid = rt.rank
        events.append({"name": "process_name", "ph": "M", "pid": pid, "tid": 0,
                       "args": {"name": f"rank {rt.rank} ({rt.host}, {rt.device})"}})
        events.append({"name": "process_sort_index", "ph": "M", "pid": pid, "tid": 0,
                       "args": {"sort_index": rt.rank}})
        events.append({"name": "thread_name", "ph": "M", "pid": pid, "tid": 0,
                       "args": {"name": f"rank {rt.rank} tasks"}})
        for kind, span in zip(rt.kinds, rt.spans):
            chapter, layer = int(span["chapter"]), int(span["layer"])
            name = kind + (f" c{chapter}" if chapter >= 0 else "") + (f" L{layer}" if layer >= 0 else "")
            events.append({
                "name": name, "cat": KIND_CATEGORY.get(kind, "other"), "ph": "X",
                "ts": _us(float(span["start"]) - t0),
                "dur": _us(max(float(span["end"] - span["start"]), 0.0)),
                "pid": pid, "tid": 0,
                "args": {"chapter": chapter, "layer": layer, "bytes": int(span["bytes"]),
                         "peer": int(span["peer"])},
            })
        for name, span in zip(rt.scalar_names, rt.scalars):
            if name not in COUNTERS:
                continue
            track, scale, series = COUNTERS[name]
            events.append({"name": track, "ph": "C", "pid": pid, "tid": 0,
                           "ts": _us(float(span["time"]) - t0),
                           "args": {series.format(layer=int(span["layer"])): float(span["value"]) * scale}})
    pairs, _, _ = messages(run)
    for flow_id, m in enumerate(pairs):
        # each end sits in the middle of its slice and binds to it ("bp": "e": enclosing slice)
        for ph, rank, index in (("s", m.src, m.send), ("f", m.dst, m.recv)):
            span = run.ranks[rank].spans[index]
            middle = (float(span["start"]) + max(float(span["end"]), float(span["start"]))) / 2
            events.append({"name": "message", "cat": "message", "ph": ph, "id": flow_id, "bp": "e",
                           "pid": rank, "tid": 0, "ts": _us(middle - t0)})
    return {"traceEvents": events, "displayTimeUnit": "ms",
            "otherData": {"run": run.name, "time_base": "microseconds since the first rank's wall_start",
                          "chapters": "1-based", "layers": "0-based (model.h5 layers/<k>)"}}


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


def write_run_report(s: RunSummary, out: str, baseline: RunSummary | None, note: str = "") -> None:
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "report.md"), "w", encoding="utf-8") as fh:
        fh.write(run_markdown(s, baseline, note))
    with open(os.path.join(out, "trace.json"), "w", encoding="utf-8") as fh:
        json.dump(chrome_trace(s.run), fh)
    plot_timeline(s.run, os.path.join(out, "timeline.png"))
    plot_breakdown(s, os.path.join(out, "breakdown.png"))
    plot_accuracy([s], os.path.join(out, "accuracy.png"))


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


def write_comparison(summaries: list[RunSummary], base: RunSummary | None, out: str, *,
                     predict: bool = False, accuracies: tuple[float, ...] = DEFAULT_ACCURACIES,
                     any_baseline: bool = False) -> list[str]:
    """The report of several runs in ``out``: report.md, comparison.csv / .json,
    comparison-groups.csv, comparison.png, scaling.png / .pdf, accuracy.png and a sub-folder
    per run; returns the blocks to print."""
    pairs = pair_baselines(summaries, base, any_baseline)
    baselines = [p.baseline for p in pairs]
    flags = [p.note for p in pairs]
    subdirs = _subdir_names(summaries)
    predicted, curves, predict_notes = predict_runs(summaries) if predict else (None, [], [])
    table = comparison_table(summaries, baselines, flags, predicted)
    groups = group_records(summaries, pairs)
    grouped = any(len(g["runs"]) > 1 for g in groups)
    lines = ["# mpff comparison report", "",
             "Runs: " + ", ".join(f"[{s.name}]({sub}/report.md)" for s, sub in zip(summaries, subdirs)), ""]
    if base is not None:
        lines += [(f"Speedup and efficiency against the baseline `{base.name}` "
                   f"({_sec(base.wall)} s, {base.run.world_size} rank(s)), which poses the same "
                   "problem as every run." if not any(flags) else
                   f"Speedup and efficiency against the baseline `{base.name}` "
                   f"({_sec(base.wall)} s, {base.run.world_size} rank(s)), given with --any-baseline: "
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
    notes = [f"{s.name}: {n}" for s in summaries for n in s.notes] + predict_notes
    if notes:
        lines += ["Notes:", ""] + [f"- {n}" for n in notes] + [""]
    lines += [table, ""]
    if grouped:
        lines += ["## Runs that differ only in their seed", "",
                  "Mean ± sample standard deviation over the seeds (min and max in comparison-groups.csv).",
                  "", group_table(groups), ""]
    costs = [cost_record(s, accuracies) for s in summaries]
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
    if predict:
        lines.insert(lines.index(table) + 2, "Predicted time: the task graph of each run simulated with "
                     "the task times of its problem's Sequential run (`mpff predict`; method and limits "
                     "in docs/predict.md).")
        lines.insert(lines.index(table) + 3, "")

    def build(tmp: str) -> None:
        for s, p, sub in zip(summaries, pairs, subdirs):
            write_run_report(s, os.path.join(tmp, sub), p.baseline, p.note if p.baseline else "")
        with open(os.path.join(tmp, "report.md"), "w", encoding="utf-8") as fh:
            fh.write("\n".join(lines))
        write_table_files(tmp, run_records(summaries, pairs, subdirs, predicted), groups,
                          {"cost": costs, **({"predicted": curves} if predict else {})})
        plot_comparison(summaries, os.path.join(tmp, "comparison.png"))
        plot_scaling(summaries, pairs, os.path.join(tmp, "scaling.png"), curves)
        plot_accuracy(summaries, os.path.join(tmp, "accuracy.png"))
        plot_time_to_accuracy(summaries, os.path.join(tmp, "time_to_accuracy.png"))

    _replace_contents(out, build)
    return (["\n".join(f"note: {n}" for n in notes), table] + ([group_table(groups)] if grouped else [])
            + [cost_table(costs)])


def default_out(run_dirs: list[str]) -> str:
    if len(run_dirs) == 1:
        return os.path.join(run_dirs[0], "report")
    return os.path.join(os.path.dirname(os.path.abspath(run_dirs[0])), "comparison-report")


def run_report(run_dirs: list[str] | str, baseline: str | None = None, out: str | None = None, *,
               simulate: Simulator | None = None, stream: TextIO | None = None,
               predict: bool = False, accuracies: tuple[float, ...] = DEFAULT_ACCURACIES,
               any_baseline: bool = False) -> str:
    """Analyse the runs, write the report, print its tables; returns the output directory.
    ``predict``: add the task-graph prediction to the comparison of several runs."""
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
            write_run_report(s, out, base, pair.note)
            text = ["\n".join(f"note: {n}" for n in s.notes), summary_table(s, base, pair.note),
                    breakdown_table(s), bubble_table(s)]
        else:
            text = write_comparison(summaries, base, out, predict=predict, accuracies=accuracies,
                                    any_baseline=any_baseline)
    except OSError as exc:
        raise ConfigError(f"cannot write the report to {out} ({_one_line(exc)}); "
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
                   any_baseline=args.any_baseline)
    except ConfigError as exc:
        print(f"mpff report: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
