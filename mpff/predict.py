"""Predict a run on more ranks than this machine has: the task graph, simulated with measured task times.

Needs no MPI and no GPU::

    python -m mpff.predict RUN [RUN ...] --ranks 1,2,4,8,16          # (mpff predict ...)
    python -m mpff.predict outputs/seq --network ib-hdr --ranks-per-node 4 --json
    python -m mpff.predict outputs/seq outputs/al-2 --ranks-per-node 2 --contention auto

The task times (train, forward pass per layer applied, head, negatives, evaluation, per chapter)
come from the first RUN; any RUN that ran several ranks on one node measures how much ranks that
share a node slow each other (``--contention auto``). For every schedule and rank count the plan
(:mod:`mpff.plan`) is simulated with those times and a per-message cost ``latency + bytes /
bandwidth`` (named presets in :mod:`mpff.interconnect`): predicted wall time, training seconds,
speedup and efficiency against Sequential on one rank, bubble and bytes moved. The output states
what was assumed. Written to ``--out`` (default ``RUN/predict/``): ``prediction.md``,
``prediction.json`` and ``speedup.png`` / ``speedup.pdf``. Method and limits: ``docs/predict.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import h5py
import numpy as np

from . import interconnect, predict_bp
from . import report as report_mod
from .config import BP_SCHEDULES, SCHEDULES, Config, ConfigError, from_dict, parse_override
from .plan import Plan, Task, build_plan, count_tasks
from .rundir import refuse_run_files

#: Span kinds that are work of a task (what contention slows and the profile measures).
WORK_KINDS = ("train", "forward", "negatives", "head", "eval")
#: Settings that shape every task's time: a prediction cannot change them (--set refuses).
FIXED_SETTINGS = (("model", "dims"), ("train", "batch_size"), ("train", "classifier"),
                  ("train", "threads"), ("data", "dataset"), ("run", "device"))
FULL_SIZES = {"mnist": (60000, 10000), "cifar10": (50000, 10000)}
DEFAULT_RANKS = (1, 2, 4, 8, 16)
#: The most work one prediction may simulate, in tasks (a plan of T tasks on N ranks counts
#: T + N), all plans together. Building and simulating a plan took about 16,000 tasks a
#: second on one shared core here (997,000 tasks in 63 s, 128 MB; docs/predict.md), so this is
#: about a minute; past it the command refuses at once instead of running for minutes with
#: memory growing.
MAX_SIMULATED_TASKS = 1_000_000
#: Above this much work the command says what it is simulating, plan by plan, on stderr.
PROGRESS_TASKS = 100_000
DEFAULT_SCHEDULES = ("sequential", "single_layer", "all_layers")


# ---------------------------------------------------------------- reading a run

@dataclass
class Span:
    """One span of a run, chapters 0-based; ``others`` = mean number of other ranks of the same
    host busy during the span (what slowed it)."""
    rank: int
    kind: str
    chapter: int
    layer: int
    start: float
    end: float
    nbytes: int
    others: float = 0.0

    @property
    def seconds(self) -> float:
        return max(self.end - self.start, 0.0)


def _chapter_offset(run: report_mod.Run) -> int:
    """How far the traces' chapter numbers sit above 0-based ones. ``report.task_durations``
    keeps 0-based keys whatever the trace format writes (format 2 writes 1-based chapters)."""
    keys = [c for kind, c, _ in report_mod.task_durations(run) if kind == "train"]
    raw = [int(c) for rt in run.ranks for kind, c in zip(rt.kinds, rt.spans["chapter"])
           if kind == "train" and c >= 0]
    return (min(raw) - min(keys)) if keys and raw else 0


def read_spans(run: report_mod.Run) -> list[list[Span]]:
    """Every rank's spans in time order, 0-based chapters, with their contention exposure."""
    offset = _chapter_offset(run)
    per_rank: list[list[Span]] = []
    for rt in run.ranks:
        spans = [Span(rt.rank, str(kind), int(c) - offset if c >= 0 else -1, int(k), float(s),
                      float(e), int(b))
                 for kind, c, k, s, e, b in zip(rt.kinds, rt.spans["chapter"], rt.spans["layer"],
                                                rt.spans["start"], rt.spans["end"], rt.spans["bytes"])]
        spans.sort(key=lambda sp: (sp.start, sp.end))
        per_rank.append(spans)
    # busy = any span but a wait; per host, what the other ranks did during each span
    busy = [_busy_curve([sp for sp in spans if sp.kind != "wait"]) for spans in per_rank]
    hosts = [rt.host for rt in run.ranks]
    for r, spans in enumerate(per_rank):
        peers = [busy[q] for q in range(len(per_rank)) if q != r and hosts[q] == hosts[r]]
        if not peers:
            continue
        for sp in spans:
            if sp.end > sp.start:
                sp.others = sum(_busy_between(curve, sp.start, sp.end) for curve in peers) / (sp.end - sp.start)
    return per_rank


def _busy_curve(spans: list[Span]) -> tuple[np.ndarray, np.ndarray]:
    """Union of the spans as sorted disjoint intervals, with the busy time before each."""
    merged: list[list[float]] = []
    for sp in sorted(spans, key=lambda s: s.start):
        if merged and sp.start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], sp.end)
        else:
            merged.append([sp.start, sp.end])
    iv = np.array(merged, dtype=float).reshape(-1, 2)
    before = np.concatenate(([0.0], np.cumsum(iv[:, 1] - iv[:, 0])))
    return iv, before


def _busy_until(curve: tuple[np.ndarray, np.ndarray], t: float) -> float:
    iv, before = curve
    i = int(np.searchsorted(iv[:, 0], t, side="right"))  # intervals starting at or before t
    if i == 0:
        return 0.0
    return float(before[i - 1] + min(t, iv[i - 1, 1]) - iv[i - 1, 0])


def _busy_between(curve, a: float, b: float) -> float:
    return _busy_until(curve, b) - _busy_until(curve, a)


def _trace_attr(rt: report_mod.RankTrace, key: str) -> Any:
    try:
        with h5py.File(rt.path, "r", locking=False) as fh:
            value = fh.attrs.get(key)
    except OSError:
        return None
    return value.item() if isinstance(value, np.generic) else value


def dataset_sizes(config: dict, info: dict, attrs: dict | None = None) -> tuple[int | None, int | None]:
    """(training samples, test samples) of a run: run.json or the trace when they record it,
    else the data set's known size cut to data.train_subset / data.test_subset."""
    attrs = attrs or {}
    data = config.get("data", {})
    full = FULL_SIZES.get(data.get("dataset", "mnist"), (None, None))
    out = []
    for i, (key, subset) in enumerate((("n_train", "train_subset"), ("n_test", "test_subset"))):
        recorded = info.get(key, attrs.get(key))
        if isinstance(recorded, (int, np.integer)) and recorded > 0:
            out.append(int(recorded))
            continue
        sub = int(data.get(subset, 0) or 0)
        n = full[i]
        out.append(min(sub, n) if sub and n else (sub or n))
    return out[0], out[1]


def _shard_sizes(n: int | None, shards: int) -> list[float]:
    if n is None:
        return [1.0] * shards
    base, extra = divmod(n, shards)
    return [float(base + (1 if s < extra else 0)) for s in range(shards)]


# ---------------------------------------------------------------- contention

@dataclass
class Contention:
    """A rank's work runs ``1 + slowdown * m`` times slower while m other ranks of its node work."""
    slowdown: float
    source: str             # "measured" | "given" | "none"
    note: str
    spans: int = 0
    stderr: float | None = None

    @property
    def factor(self) -> float:
        """The slowdown with one other rank of the node busy (what --contention takes)."""
        return 1.0 + self.slowdown


def _signature(run: report_mod.Run) -> str:
    """Runs with equal signatures ran equal tasks (same sizes, same resources per rank)."""
    c = run.config
    t = c.get("train", {})
    n_train, n_test = dataset_sizes(c, run.info)
    epc = int(t.get("epochs", 1)) // max(int(t.get("chapters", 1)), 1)
    devices = sorted({rt.device.split(":")[0] for rt in run.ranks})
    return json.dumps([c.get("model", {}).get("dims"), t.get("batch_size"), epc, n_train, n_test,
                       c.get("data", {}).get("shards", 0) if c.get("run", {}).get("schedule") != "federated"
                       else run.world_size, t.get("classifier"), t.get("threads"), devices])


def measure_contention(runs: list[report_mod.Run], spans: list[list[list[Span]]]) -> Contention:
    """Fit log(seconds) = log(base of the task kind and layer) + log(1 + g * others) by least
    squares over the work spans of all runs (chapter 0, the warm-up, left out when there are
    others). Ranks alone (a 1-rank run, a rank whose neighbour waits) against ranks beside busy
    ones measure g; runs that never ran ranks side by side give nothing to measure."""
    keys, y, o = [], [], []
    for run, per_rank in zip(runs, spans):
        sig = _signature(run)
        chapters = {sp.chapter for r in per_rank for sp in r if sp.kind in WORK_KINDS}
        layers_applied = _forward_layers(per_rank)
        for r in per_rank:
            for sp in r:
                if sp.kind not in WORK_KINDS or sp.seconds < 1e-3 or sp.chapter < 0:
                    continue
                if sp.chapter == 0 and len(chapters) > 1:
                    continue
                layer = layers_applied.get(id(sp), sp.layer)
                keys.append((sig, sp.kind, layer))
                y.append(math.log(sp.seconds))
                o.append(sp.others)
    if not keys:
        return Contention(0.0, "none", "no work spans to measure contention from")
    codes = np.unique(np.array([json.dumps(k) for k in keys]), return_inverse=True)[1]
    y_arr, o_arr = np.array(y), np.array(o)
    count = np.bincount(codes)
    spread = float(((o_arr - (np.bincount(codes, o_arr) / count)[codes]) ** 2).sum())
    if spread < 1.0:
        return Contention(0.0, "none", "the runs never ran a task both alone and beside another busy "
                          "rank of its node, so contention cannot be measured from them", spans=len(y))

    def rss(g: float) -> float:
        z = y_arr - np.log1p(g * o_arr)
        return float(((z - (np.bincount(codes, z) / count)[codes]) ** 2).sum())

    grid = np.arange(-0.5, 4.0 + 1e-9, 0.005)
    best = float(grid[int(np.argmin([rss(g) for g in grid]))])
    fine = np.arange(best - 0.005, best + 0.005 + 1e-12, 0.0001)
    g = float(fine[int(np.argmin([rss(v) for v in fine]))])
    x = o_arr / (1.0 + g * o_arr)
    x_c = x - (np.bincount(codes, x) / count)[codes]
    dof = len(y) - len(count) - 1
    stderr = math.sqrt(rss(g) / dof / float((x_c ** 2).sum())) if dof > 0 else None
    measured = g
    g = max(g, 0.0)
    note = (f"measured from {len(y)} task spans of {len(runs)} run(s): a task took {1 + measured:.2f}x "
            f"its time alone while one other rank of its node was busy"
            + (f" (+/- {stderr:.2f})" if stderr is not None else ""))
    if measured < 0:
        note += "; no slowdown is measurable, so none is applied"
    return Contention(g, "measured", note, spans=len(y), stderr=stderr)


def _forward_layers(per_rank: list[list[Span]]) -> dict[int, int]:
    """id(forward span) -> the layer it applied. The engine records a forward pass under the
    layer whose inputs it makes (k), applying layers j..k-1 in order, so the i-th of n spans of
    (chapter, k) on a rank applied layer k - n + i."""
    out: dict[int, int] = {}
    for spans in per_rank:
        groups: dict[tuple[int, int], list[Span]] = {}
        for sp in spans:
            if sp.kind == "forward" and sp.chapter >= 0 and sp.layer > 0:
                groups.setdefault((sp.chapter, sp.layer), []).append(sp)
        for (_, k), group in groups.items():
            group.sort(key=lambda s: s.start)
            for i, sp in enumerate(group):
                out[id(sp)] = k - len(group) + i
    return out


# ---------------------------------------------------------------- the profile of one run

@dataclass
class Profile:
    """Task times of one run as if each rank had its node to itself, per sample where the work
    grows with the samples (so a prediction can change the data size or the epochs)."""
    run: report_mod.Run
    config: dict
    chapters: int
    epochs_per_chapter: int
    n_train: int | None
    n_test: int | None
    train: dict[tuple[int, int], float]            # (c, k) -> s per training sample (C epochs)
    forward: dict[tuple[int, int], list[float]]    # (c, layer applied) -> s per sample
    per_chapter: dict[str, dict[int, float]]       # head (per sample), negatives (per sample), eval (per test sample)
    prep: dict[int, float]                         # c -> s per sample before a from-scratch input pass
    warmup_train: dict[int, float]                 # layer -> extra s per sample of a rank's first training of it
    warmup_forward: dict[int, float]               # layer -> extra s per sample of a rank's first pass through it
    first_use: float                               # s per sample: a rank's first use of a shard
    final: float                                   # writing the model (s)
    setup: float                                   # from the first rank's start to the end of setup (s)
    tail: float                                    # from the end of the last task to the end of the run (s)
    checkpoints: float                             # seconds the run spent writing checkpoints (not predicted)
    pack: tuple[float, float] | None               # seconds = a + b * bytes, from send spans
    unpack: tuple[float, float] | None             # seconds = a + b * bytes, from recv spans


def build_profile(run: report_mod.Run, spans: list[list[Span]], contention: Contention,
                  message_spans: Iterable[list[list[Span]]] = ()) -> Profile:
    """The profile of ``run``; packing and unpacking are fitted over the send and recv spans of
    ``spans`` and ``message_spans`` (other runs' spans: a 1-rank run sends nothing)."""
    cfg = run.config
    t = cfg.get("train", {})
    if t.get("algorithm", "ff") == "backprop":
        raise ConfigError(f"run {run.path} is backprop: mpff predict models the Forward-Forward "
                          "schedules; predict from an FF run")
    chapters = int(t.get("chapters", 1))
    epc = int(t.get("epochs", chapters)) // max(chapters, 1)
    attrs = {k: _trace_attr(run.ranks[0], k) for k in ("n_train", "n_test")}
    n_train, n_test = dataset_sizes(cfg, run.info, attrs)
    shards = run.world_size if cfg.get("run", {}).get("schedule") == "federated" and not \
        cfg.get("data", {}).get("shards") else max(int(cfg.get("data", {}).get("shards", 0) or 1), 1)
    shard_n = _shard_sizes(n_train, shards)

    def samples(c: int) -> float:
        return shard_n[c % shards]

    def alone(sp: Span) -> float:
        return sp.seconds / (1.0 + contention.slowdown * sp.others)

    applied = _forward_layers(spans)
    train: dict[tuple[int, int], float] = {}
    forward: dict[tuple[int, int], list[float]] = {}
    # a rank's first training of a layer and first pass through it are slower (warm-up)
    first_train: set[tuple[int, int]] = set()
    first_forward: list[tuple[tuple[int, int], int]] = []    # ((chapter, layer applied), index)
    per_chapter: dict[str, dict[int, float]] = {"head": {}, "negatives": {}, "eval": {}}
    prep: dict[int, list[float]] = {}
    first_gaps: list[tuple[int, float]] = []
    final = 0.0
    lag = int(t.get("adaptive_lag", 0))
    for per_rank in spans:
        # Untraced time before the spans of a rank's first train task of a chapter: the chapter's
        # bookkeeping and the overlay of its negatives (and, the first time, the shard's setup).
        previous_end: float | None = None
        first_layer: dict[int, int] = {}
        lead: dict[int, float] = {}
        trained_here: set[int] = set()
        applied_here: set[int] = set()
        for sp in per_rank:
            gap = max(sp.start - previous_end, 0.0) if previous_end is not None else 0.0
            previous_end = sp.end if previous_end is None else max(previous_end, sp.end)
            if sp.kind in ("train", "forward", "wait") and sp.chapter >= 0 and sp.layer >= 0:
                if first_layer.setdefault(sp.chapter, sp.layer) == sp.layer:
                    lead[sp.chapter] = lead.get(sp.chapter, 0.0) + gap
            if sp.kind == "train" and sp.chapter >= 0:
                key = (sp.chapter, sp.layer)
                train[key] = train.get(key, 0.0) + alone(sp) / samples(sp.chapter)
                if sp.layer not in trained_here:
                    trained_here.add(sp.layer)
                    first_train.add(key)
            elif sp.kind == "forward" and sp.chapter >= 0 and id(sp) in applied:
                key = (sp.chapter, applied[id(sp)])
                forward.setdefault(key, []).append(alone(sp) / samples(sp.chapter))
                if key[1] not in applied_here:
                    applied_here.add(key[1])
                    first_forward.append((key, len(forward[key]) - 1))
            elif sp.kind in per_chapter and sp.chapter >= 0:
                if sp.kind == "eval":
                    n = float(n_test or 1)
                else:
                    n = samples(sp.chapter + (1 + lag if sp.kind == "negatives" else 0))
                table = per_chapter[sp.kind]
                table[sp.chapter] = table.get(sp.chapter, 0.0) + alone(sp) / n
            elif sp.kind == "io" and sp.chapter >= 0:
                final = max(final, sp.seconds)
        for i, c in enumerate(first_layer):  # chapters in the order this rank met them
            if i == 0:
                first_gaps.append((c, lead.get(c, 0.0)))
            else:
                prep.setdefault(c, []).append(lead.get(c, 0.0) / samples(c))
    # warm-up per layer: a rank's first task against the median of the others (the first ones
    # then keep only the typical time; a prediction adds the warm-up to every rank's first)
    warm_train: dict[int, float] = {}
    for k in {key[1] for key in train}:
        firsts = [v for key, v in train.items() if key[1] == k and key in first_train]
        others = [v for key, v in train.items() if key[1] == k and key not in first_train]
        warm_train[k] = max(statistics.median(firsts) - statistics.median(others), 0.0) if others and firsts else 0.0
        for key in first_train:
            if key[1] == k:
                train[key] -= warm_train[k]
    warm_forward: dict[int, float] = {}
    for j in {key[1] for key in forward}:
        marked = {(key, i) for key, i in first_forward if key[1] == j}
        firsts = [forward[key][i] for key, i in marked]
        others = [v for key, vs in forward.items() if key[1] == j for i, v in enumerate(vs) if (key, i) not in marked]
        warm_forward[j] = max(statistics.median(firsts) - statistics.median(others), 0.0) if others and firsts else 0.0
        for key, i in marked:
            forward[key][i] -= warm_forward[j]
    prep_med = {c: statistics.median(v) for c, v in prep.items() if v}
    typical_prep = statistics.median(prep_med.values()) if prep_med else 0.0
    first_use = (statistics.median(max(g / samples(c) - typical_prep, 0.0) for c, g in first_gaps)
                 if first_gaps else 0.0)

    setup_ends = [max((sp.end for sp in r if sp.kind == "setup"), default=None) for r in spans]
    setup_ends = [e for e in setup_ends if e is not None]
    setup = (statistics.median(setup_ends) - run.wall_start) if setup_ends else 0.0
    task_ends = [sp.end for r in spans for sp in r if sp.kind in WORK_KINDS + ("send", "recv", "io")]
    tail = max(max(rt.wall_end for rt in run.ranks) - max(task_ends), 0.0) if task_ends else 0.0

    every = list(spans) + [r for other in message_spans for r in other]
    if not train:
        raise ConfigError(f"run {run.path} has no train spans; predict from a run that trained "
                          "(with run.trace = true)")
    return Profile(run=run, config=cfg, chapters=chapters, epochs_per_chapter=max(epc, 1),
                   n_train=n_train, n_test=n_test, train=train, forward=forward,
                   per_chapter=per_chapter, prep=prep_med, warmup_train=warm_train,
                   warmup_forward=warm_forward, first_use=first_use, final=final,
                   checkpoints=sum(sp.seconds for r in spans for sp in r if sp.kind == "checkpoint"),
                   setup=max(setup, 0.0), tail=tail,
                   pack=_linear_fit([(sp.nbytes, alone(sp)) for r in every for sp in r if sp.kind == "send"]),
                   unpack=_linear_fit([(sp.nbytes, alone(sp)) for r in every for sp in r if sp.kind == "recv"]))


def _linear_fit(points: list[tuple[int, float]]) -> tuple[float, float] | None:
    """seconds = a + b * bytes through the points (least squares, a and b >= 0)."""
    points = [(float(n), s) for n, s in points if n > 0]
    if not points:
        return None
    x = np.array([p[0] for p in points])
    y = np.array([p[1] for p in points])
    if len(set(x.tolist())) < 2:
        return 0.0, float(y.sum() / x.sum())
    b, a = np.polyfit(x, y, 1)
    if a < 0 or b < 0:
        return 0.0, float(y.sum() / x.sum())
    return float(a), float(b)


# ---------------------------------------------------------------- the target run

@dataclass(frozen=True)
class Network:
    """Where ranks sit and what a message between two of them costs."""
    inter: interconnect.Link        # between nodes
    intra: interconnect.Link        # between ranks of one node
    ranks_per_node: int = 1

    def node_of(self, world_size: int) -> list[int]:
        return [r // self.ranks_per_node for r in range(world_size)]

    def nodes(self, world_size: int) -> int:
        return -(-world_size // self.ranks_per_node)

    def message_seconds(self, src: int, dst: int, nbytes: int) -> float:
        same = src // self.ranks_per_node == dst // self.ranks_per_node
        return (self.intra if same else self.inter).seconds(nbytes)


@dataclass
class Target:
    """The run to predict (before the schedule and the rank count are chosen)."""
    raw: dict              # its configuration as a run would store it
    config: Config         # the same, validated (data reduced to what shapes the plan)
    n_train: int | None
    n_test: int | None


def _sanitized(raw: dict) -> dict:
    """A copy of a run's configuration to edit (validation checks values only: the data need
    not be on this login node)."""
    return json.loads(json.dumps(raw))


def make_target(profile: Profile, overrides: Iterable[str] = ()) -> Target:
    raw = json.loads(json.dumps(profile.config))
    for text in overrides:
        section, key, value = parse_override(text)
        if not isinstance(raw.setdefault(section, {}), dict):
            raise ConfigError(f"[{section}] must be a table of settings")
        raw[section][key] = value
    for section, key in FIXED_SETTINGS:
        before, after = profile.config.get(section, {}).get(key), raw.get(section, {}).get(key)
        if before != after:
            raise ConfigError(f"--set {section}.{key}: the task times were measured with {before!r}, "
                              f"so a prediction for {after!r} would be a guess; predict from a run "
                              f"with {section}.{key} = {after!r}")
    try:
        cfg = from_dict(_sanitized(raw))
    except ConfigError as exc:
        raise ConfigError(f"the configuration to predict is not valid: {exc}") from None
    # the full data set's size, as the run measured it, cut to the target's subsets
    data_s, data_t = profile.config.get("data", {}), raw.get("data", {})
    sizes = []
    for measured, key in ((profile.n_train, "train_subset"), (profile.n_test, "test_subset")):
        full = measured if not data_s.get(key) else None
        if full is None:
            full = FULL_SIZES.get(data_s.get("dataset", "mnist"), (None, None))[key == "test_subset"]
        sub = int(data_t.get(key, 0) or 0)
        sizes.append(min(sub, full) if sub and full else (sub or full))
    return Target(raw=raw, config=cfg, n_train=sizes[0], n_test=sizes[1])


def _pick(table: dict[int, float], chapter: int, same_chapters: bool) -> float | None:
    """The measured value of the chapter when the run had the same chapters, else the median."""
    if not table:
        return None
    if same_chapters and chapter in table:
        return table[chapter]
    return statistics.median(table.values())


def task_times(profile: Profile, target: Target, plan: Plan, notes: set[str]) -> dict:
    """{(kind, chapter, layer): seconds} of ``plan``'s tasks from the profile, for
    :meth:`Plan.simulate`. ``("forward", c, k)`` is all the work before train(c, k) reads its
    own state: the forward passes the rank has to do (the engine reuses the outputs of the
    previous layer's pass when the same rank trained it in the same chapter, else it starts from
    the input) and, on a rank's first task of a chapter, the untraced preparation of its data."""
    cfg = target.config
    same = cfg.train.chapters == profile.chapters
    epochs = cfg.train.epochs_per_chapter / profile.epochs_per_chapter
    shard_n = _shard_sizes(target.n_train, plan.shards)
    dims = cfg.model.dims

    def samples(chapter: int) -> float:
        return shard_n[plan.data_shard(chapter)]

    by_layer: dict[int, dict[int, float]] = {}
    for (c, k), v in profile.train.items():
        by_layer.setdefault(k, {})[c] = v
    fwd_layer: dict[int, dict[int, float]] = {}
    for (c, j), values in profile.forward.items():
        fwd_layer.setdefault(j, {})[c] = statistics.fmean(values)

    def forward(j: int, c: int) -> float:
        v = _pick(fwd_layer.get(j, {}), c, same)
        if v is not None:
            return v
        if not fwd_layer:
            notes.add("the run recorded no forward pass, so forward passes are not modelled")
            return 0.0
        # a layer the run never applied to data: scale a measured one by the arithmetic
        near = min(fwd_layer, key=lambda i: abs(i - j))
        notes.add(f"the forward pass through layer {j + 1} was never measured: estimated from layer "
                  f"{near + 1} by the ratio of their weights")
        return _pick(fwd_layer[near], c, same) * (dims[j] * dims[j + 1]) / (dims[near] * dims[near + 1])

    durations: dict[tuple[str, int, int], float] = {}
    for t in plan.tasks:
        key = (t.kind, t.chapter, t.layer)
        if t.kind == "train":
            v = _pick(by_layer.get(t.layer, {}), t.chapter, same)
            if v is None:
                raise ConfigError(f"run {profile.run.path} never trained layer {t.layer + 1}; "
                                  "predict from a run that trained every layer")
            durations[key] = v * samples(t.chapter) * epochs
        elif t.kind == "head":
            v = _pick(profile.per_chapter["head"], t.chapter, same)
            if v is None:
                notes.add("the run trained no softmax head: head tasks are not modelled")
                v = 0.0
            durations[key] = v * samples(t.chapter) * epochs
        elif t.kind == "negatives":
            made_for = t.chapter + 1 + plan.lag
            v = _pick(profile.per_chapter["negatives"], t.chapter, same)
            if v is None:
                # the same passes as an evaluation (every label overlaid), over a training shard
                v = _pick(profile.per_chapter["eval"], t.chapter, same) or 0.0
                notes.add("adaptive negatives were never made in the run: each is estimated as an "
                          "evaluation over the chapter's training samples instead of the test set")
            durations[key] = v * samples(made_for)
        elif t.kind == "eval":
            v = _pick(profile.per_chapter["eval"], t.chapter, same)
            durations[key] = (v or 0.0) * float(target.n_test or 1)
        elif t.kind == "final":
            durations[key] = profile.final
        elif t.kind == "ship":  # run.inputs = ship: layer k's pass over the chapter's data, right
            # after training it (its inputs are still cached), into the send buffer
            durations[key] = forward(t.layer, t.chapter) * samples(t.chapter)
    typical_prep = statistics.median(profile.prep.values()) if profile.prep else 0.0
    for rank in range(plan.world_size):
        cache: tuple[int, int] | None = None   # (chapter, last layer applied), as Engine._inputs
        prepared: set[int] = set()
        shards_used: set[int] = set()
        trained: set[int] = set()
        applied: set[int] = set()
        for t in plan.rank_tasks(rank):
            if t.kind != "train":
                continue
            c, k = t.chapter, t.layer
            n = samples(c)
            if k not in trained:  # this rank's first training of layer k
                trained.add(k)
                durations[("train", c, k)] += profile.warmup_train.get(k, 0.0) * n
            work = 0.0
            if plan.data_shard(c) not in shards_used:
                shards_used.add(plan.data_shard(c))
                work += profile.first_use * n
            if c not in prepared:
                prepared.add(c)
                prep = profile.prep.get(c) if same and c in profile.prep else typical_prep
                work += prep * n
            # shipped inputs: the passes start at the rank's block, from the received outputs
            first = plan.block_start(k) if plan.ship else 0
            start = cache[1] + 1 if cache is not None and cache[0] == c and first - 1 <= cache[1] < k else first
            for j in range(start, k):
                work += forward(j, c) * n
                if j not in applied:
                    applied.add(j)
                    work += profile.warmup_forward.get(j, 0.0) * n
            if k > start:
                cache = (c, k - 1)
            durations[("forward", c, k)] = work
    return durations


# ---------------------------------------------------------------- predicting

@dataclass
class Prediction:
    schedule: str
    ranks: int
    nodes: int
    wall: float | None = None
    training: float | None = None
    speedup: float | None = None
    training_speedup: float | None = None
    bubble: float | None = None
    bytes_moved: int | None = None
    messages: int | None = None
    reason: str | None = None          # why this schedule cannot run on this many ranks
    measured_run: str | None = None
    measured_wall: float | None = None
    measured_training: float | None = None
    measured_unfinished: str | None = None  # why the measured run is not a finished one
    details: dict | None = None        # what the model of this prediction computed on the way

    @property
    def efficiency(self) -> float | None:
        return self.speedup / self.ranks if self.speedup is not None else None

    @property
    def error(self) -> float | None:
        """(predicted - measured) / measured wall time (None against a run that did not finish:
        its wall is not the time of the whole run)."""
        if self.wall is None or not self.measured_wall or self.measured_unfinished is not None:
            return None
        return self.wall / self.measured_wall - 1.0

    def record(self) -> dict:
        out = {
            "schedule": self.schedule, "ranks": self.ranks, "nodes": self.nodes,
            "possible": self.reason is None, "reason": self.reason,
            "wall_seconds": self.wall, "training_seconds": self.training,
            "speedup": self.speedup, "training_speedup": self.training_speedup,
            "efficiency": self.efficiency, "bubble": self.bubble,
            "bytes_moved": self.bytes_moved, "messages": self.messages,
        }
        if self.details is not None:
            out["details"] = self.details
        if self.measured_run is not None:
            out.update({"measured_run": self.measured_run, "measured_wall_seconds": self.measured_wall,
                        "measured_training_seconds": self.measured_training,
                        "measured_unfinished": self.measured_unfinished, "wall_error": self.error})
        return out


@dataclass
class Outcome:
    profile: Profile
    target: Target
    network: Network
    contention: Contention
    predictions: list[Prediction]
    assumptions: list[str]

    def to_json(self) -> dict:
        run = self.profile.run
        return {
            "source": {"run": run.path, "schedule": run.config.get("run", {}).get("schedule"),
                       "ranks": run.world_size, "hosts": sorted({rt.host for rt in run.ranks}),
                       "devices": sorted({rt.device for rt in run.ranks})},
            "config": self.target.raw,
            "network": {"inter": _link_json(self.network.inter), "intra": _link_json(self.network.intra),
                        "ranks_per_node": self.network.ranks_per_node},
            "contention": {"factor": self.contention.factor, "source": self.contention.source,
                           "note": self.contention.note, "stderr": self.contention.stderr},
            "predictions": [p.record() for p in self.predictions],
            "assumptions": self.assumptions,
        }


def _link_json(link: interconnect.Link) -> dict:
    return {"name": link.name, "latency_seconds": link.latency,
            "bandwidth_bytes_per_second": None if math.isinf(link.bandwidth) else link.bandwidth}


def simulate(profile: Profile, target: Target, schedule: str, world_size: int, network: Network,
             contention: Contention, notes: set[str]) -> Prediction:
    """One schedule on ``world_size`` ranks (speedup left for the caller)."""
    pred = Prediction(schedule, world_size, network.nodes(world_size))
    run = {"schedule": schedule}
    if schedule != "single_layer":  # run.inputs = ship is Single Layer's: the others recompute
        run["inputs"] = "recompute"
    cfg = target.config.replace(run=run)
    try:
        plan = build_plan(cfg, world_size, n_train=target.n_train)
    except ConfigError as exc:
        pred.reason = str(exc)
        return pred
    durations = task_times(profile, target, plan, notes)

    def linear(fit):
        return None if fit is None else (lambda n: fit[0] + fit[1] * n)

    sim = plan.simulate(durations, message_cost=network.message_seconds, pack_cost=linear(profile.pack),
                        unpack_cost=linear(profile.unpack), node_of=network.node_of(world_size),
                        contention=contention.slowdown)
    final = Task("final", plan.num_chapters - 1)
    pred.training = max((f for t, f in sim.finish.items() if t.kind != "final"), default=0.0)
    # Setup as measured, not slowed by contention: in 2-rank runs here it took 2.1-2.7 s against
    # 2.3 s for one rank alone (importing, allocating: not the arithmetic that ranks contend for)
    pred.wall = profile.setup + sim.makespan + profile.tail
    work = sum(sim.busy) - durations.get(("final", final.chapter, final.layer), 0.0)
    pred.bubble = 1.0 - work / (world_size * pred.training) if pred.training > 0 else 0.0
    pred.bytes_moved, pred.messages = sim.bytes_moved, sim.messages
    return pred


def predict(runs: list[report_mod.Run], *, ranks: Iterable[int] = DEFAULT_RANKS,
            schedules: Iterable[str] | None = None, network: Network | None = None,
            contention: str | float = "auto", overrides: Iterable[str] = (),
            adaptive_lag: str = "config", progress: Callable[[str], None] | None = None) -> Outcome:
    """Predict every schedule on every rank count from the first run's task times (``schedules``
    None: Sequential, Single Layer and All Layers from an FF run, Sequential and data-parallel
    from a backprop run, :mod:`mpff.predict_bp`). More work than :data:`MAX_SIMULATED_TASKS`
    is refused (ConfigError); above :data:`PROGRESS_TASKS` each plan is announced to
    ``progress`` before it is simulated."""
    if not runs:
        raise ConfigError("name at least one run directory to predict from")
    network = network or Network(interconnect.preset("ib-hdr"), interconnect.preset("shm"), 1)
    ranks = sorted(set(int(n) for n in ranks))
    if not ranks or ranks[0] < 1:
        raise ConfigError("--ranks needs positive rank counts, e.g. 1,2,4,8")
    schedules_given = schedules
    schedules = list(dict.fromkeys(DEFAULT_SCHEDULES if schedules is None else schedules))
    for s in schedules:
        if s not in SCHEDULES:
            raise ConfigError(f"unknown schedule {s!r}; choose from {', '.join(SCHEDULES)}")
    spans = [read_spans(run) for run in runs]
    if predict_bp.is_backprop(runs[0]):
        attrs = {k: _trace_attr(runs[0].ranks[0], k) for k in ("n_train", "n_test")}
        every = schedules_given is None or set(schedules) == set(SCHEDULES)  # none given, or 'all'
        return predict_bp.predict(runs, spans, ranks=ranks,
                                  schedules=BP_SCHEDULES if every else schedules,
                                  network=network, contention=contention, overrides=overrides,
                                  n_sizes=dataset_sizes(runs[0].config, runs[0].info, attrs),
                                  progress=progress)
    if any(predict_bp.is_backprop(run) for run in runs[1:]):
        raise ConfigError(f"run {next(r.path for r in runs[1:] if predict_bp.is_backprop(r))} is "
                          f"backprop and {runs[0].path} Forward-Forward: predict each from its own runs")
    if set(schedules) == set(SCHEDULES):  # 'all' from an FF run: every FF schedule
        schedules = [s for s in schedules if s not in BP_SCHEDULES or s == "sequential"]
    measured = measure_contention(runs, spans)
    if contention == "auto":
        used = measured
    elif contention == "none":
        used = Contention(0.0, "none", "not applied (--contention none)")
    else:
        factor = float(contention)
        used = Contention(factor - 1.0, "given", f"given: a task takes {factor:g}x its time alone while "
                          "one other rank of its node is busy")
    profile = build_profile(runs[0], spans[0], used, spans[1:])
    target = make_target(profile, overrides)
    notes: set[str] = set()
    plans = []  # (what, work) of every plan this prediction simulates, the baselines included
    shards_seen: set[int] = set()
    for schedule in schedules:
        for n in ([1] if schedule == "sequential" else [n for n in ranks if n > 1]):
            if schedule == "single_layer" and n > target.config.model.num_layers:
                continue  # refused before any task is made
            cfg = target.config.replace(run={"schedule": schedule})
            plans.append((f"{schedule} on {n} rank(s)", count_tasks(cfg, n) + n))
            if cfg.resolved_shards(n) not in shards_seen:
                shards_seen.add(cfg.resolved_shards(n))
                plans.append((f"the sequential baseline with {cfg.resolved_shards(n)} shard(s)",
                              count_tasks(cfg.replace(run={"schedule": "sequential"}), 1) + 1))
    report_progress = check_work(plans, progress)

    predictions: list[Prediction] = []
    baselines: dict[int, Prediction] = {}

    def baseline(shards: int) -> Prediction:
        if shards not in baselines:
            t = target
            if shards != target.config.resolved_shards(1):
                t = Target(target.raw, target.config.replace(data={"shards": shards}), target.n_train,
                           target.n_test)
            report_progress(f"the sequential baseline with {shards} shard(s)")
            baselines[shards] = simulate(profile, t, "sequential", 1, network, used, notes)
        return baselines[shards]

    for schedule in schedules:
        # on one rank every schedule is Sequential's plan: that row is the baseline
        for n in ([1] if schedule == "sequential" else [n for n in ranks if n > 1]):
            t = target
            if adaptive_lag == "ranks-1" and schedule != "sequential" and target.config.train.negatives == "adaptive":
                t = Target(target.raw, target.config.replace(train={"adaptive_lag": n - 1}),
                           target.n_train, target.n_test)
            report_progress(f"{schedule} on {n} rank(s)")
            pred = simulate(profile, t, schedule, n, network, used, notes)
            if pred.reason is None:
                base = baseline(t.config.replace(run={"schedule": schedule}).resolved_shards(n))
                if base.reason is None:
                    pred.speedup = base.wall / pred.wall if pred.wall else None
                    pred.training_speedup = base.training / pred.training if pred.training else None
            _attach_measured(pred, t, runs)
            predictions.append(pred)
    assumptions = _assumptions(profile, target, network, used, measured, contention, schedules,
                               adaptive_lag, sorted(notes))
    return Outcome(profile, target, network, used, predictions, assumptions)


def check_work(plans: list[tuple[str, int]], progress: Callable[[str], None] | None = None
               ) -> Callable[[str], None]:
    """Refuse a prediction whose plans ((what, tasks + ranks) each) add up to more than
    :data:`MAX_SIMULATED_TASKS`; returns what to call before each plan is simulated (it tells
    ``progress`` when the work is large enough for a user to wonder, else nothing)."""
    total = sum(work for _, work in plans)
    if total > MAX_SIMULATED_TASKS:
        what, work = max(plans, key=lambda p: p[1])
        raise ConfigError(
            f"this prediction would simulate {total:,} tasks in {len(plans)} plan(s) (the largest, "
            f"{what}, {work:,}), more than the limit of {MAX_SIMULATED_TASKS:,} (about a minute); "
            "predict fewer rank counts (--ranks), fewer schedules (--schedules) or fewer chapters "
            "(--set train.chapters=N)")
    if progress is None or total <= PROGRESS_TASKS:
        return lambda what: None
    done = [0]
    counted = {what for what, _ in plans}

    def announce(what: str) -> None:
        if what in counted:  # a plan refused before it is built is not announced
            done[0] += 1
            progress(f"simulating {what} (plan {done[0]} of {len(plans)}, {total:,} tasks in all)")
    return announce


def _attach_measured(pred: Prediction, target: Target, runs: list[report_mod.Run]) -> None:
    """A given run of this schedule, rank count and problem: its measured wall and training time
    (a finished run before one that did not finish, which gets no error: see
    ``Prediction.measured_unfinished``)."""
    matching = [run for run in runs
                if run.config.get("run", {}).get("schedule") == pred.schedule and run.world_size == pred.ranks
                and not report_mod.problem_differences(target.raw, run.config)
                and run.config.get("train", {}).get("threads") == target.raw.get("train", {}).get("threads")]
    matching.sort(key=lambda run: report_mod.unfinished(run) is not None)
    for run in matching[:1]:
        pred.measured_run = run.path
        pred.measured_wall = run.wall
        pred.measured_training = report_mod.training_phase(run).seconds
        why = report_mod.unfinished(run)
        pred.measured_unfinished = None if why is None else f"{run.name} did not finish: {why}"


def _assumptions(profile: Profile, target: Target, network: Network, used: Contention,
                 measured: Contention, requested: str | float, schedules: list[str],
                 adaptive_lag: str, notes: list[str]) -> list[str]:
    run = profile.run
    cfg = target.config
    devices = ", ".join(sorted({rt.device for rt in run.ranks}))
    out = [
        (f"Task times come from {run.name} ({run.config.get('run', {}).get('schedule')}, "
         f"{run.world_size} rank(s), {devices}, {run.config.get('train', {}).get('threads')} thread(s) "
         f"per rank): per task and chapter"
         + ("" if cfg.train.chapters == profile.chapters else
            f"; it ran {profile.chapters} chapter(s), so every chapter of the {cfg.train.chapters} "
            "predicted takes the median of the measured ones")
         + ". Every predicted rank is taken to be as fast as that run's ranks (same device, threads "
           "and software): no straggler, no failure, no other job on the node."),
        ("Work grows linearly with the samples of a chapter's shard and, for training, with the "
         "epochs per chapter; forward passes are measured per layer applied: "
         + ("Single Layer ships each block's inputs (run.inputs = ship): a rank applies the "
            "layers of its block only, and the rank before it makes one more pass, through its "
            "block's last layer, to send; " if cfg.run.inputs == "ship" else
            "Single Layer recomputes layers 1..k-1 on every rank each chapter, ")
         + "Sequential and All Layers reuse the previous layer's outputs."
         + (f" A rank's first training of a layer and first pass through it took {warm:.1f} s "
            "longer in all than later ones (warm-up); every predicted rank pays that once."
            if (warm := _warmup_seconds(profile)) > 0.05 else "")
         + (" The run measured one chapter, so its warm-up counts in every predicted chapter: a "
            "little pessimistic." if profile.chapters == 1 and cfg.train.chapters > 1 else "")),
        (f"Messages: latency + bytes / bandwidth each, between nodes {network.inter.describe()}, "
         f"within a node {network.intra.describe()}; {network.ranks_per_node} rank(s) per node. "
         "Messages never share a link (no congestion) and progress while both ranks compute."
         + (" Packing and unpacking cost the ranks what the runs' send and recv spans took "
            f"({_fit_text(profile.pack)} and {_fit_text(profile.unpack)})." if profile.pack or profile.unpack
            else " Packing and unpacking are not modelled: no run sent messages to measure them by "
                 "(pass a multi-rank run to include them).")),
    ]
    if (why := report_mod.unfinished(run)) is not None:
        out.append(f"The source run did not finish ({why}): the task times are those of the "
                   "chapters it ran, its setup and end as far as it got.")
    if network.ranks_per_node > 1:
        if used.slowdown > 0:
            out.append(f"Ranks sharing a node slow each other: {used.note}; a rank's work runs "
                       f"1 + {used.slowdown:.2f} x (other busy ranks of its node) times slower.")
        else:
            why = used.note if requested != "auto" else measured.note
            out.append(f"Ranks sharing a node are assumed NOT to slow each other ({why}). On a CPU "
                       "node they do (memory bandwidth, caches): measure it by passing a run with "
                       "several ranks on one node, or give --contention FACTOR.")
    else:
        out.append("Every rank has a node (and device) to itself: no contention between ranks"
                   + (f" (the runs measured {measured.factor:.2f}x for ranks sharing a node)"
                      if measured.source == "measured" and measured.slowdown > 0 else "") + ".")
    out.append(f"Setup ({profile.setup:.2f} s from the first rank's start to the end of its setup) "
               f"and the end of the run ({profile.tail:.2f} s after the last task) are taken as "
               "measured, not simulated.")
    if profile.checkpoints > 0:
        out.append(f"The run spent {profile.checkpoints:.1f} s writing checkpoints; checkpoints are "
                   "not part of the prediction.")
    if "federated" in schedules:
        out.append("Federated speedup is against Sequential with data.shards = N (its counterpart "
                   "on the same shards), not against Sequential on the whole data.")
    if adaptive_lag == "ranks-1" and cfg.train.negatives == "adaptive":
        out.append("Adaptive negatives use lag N-1 on N ranks (each rank the negatives it made N "
                   "chapters earlier, as the paper's All Layers).")
    elif (cfg.train.negatives == "adaptive" and cfg.train.adaptive_lag == 0 and cfg.train.adaptive_mode == "lag"
          and set(schedules) - {"sequential"}):
        out.append("Adaptive negatives with train.adaptive_lag = 0 make every chapter wait for the "
                   "previous one's negatives, which leaves All Layers no pipeline; the paper uses "
                   "lag N-1 (--adaptive-lag ranks-1).")
    out += [n[0].upper() + n[1:] + "." for n in notes]
    return out


def _warmup_seconds(profile: Profile) -> float:
    """The source's warm-up of one rank that trains every layer, in seconds."""
    n = _shard_sizes(profile.n_train, 1)[0]
    return (sum(profile.warmup_train.values()) + sum(profile.warmup_forward.values())) * n


def _fit_text(fit: tuple[float, float] | None) -> str:
    if fit is None:
        return "not measured"
    a, b = fit
    return f"{a * 1e6:.0f} µs + bytes / {1 / b / 1e9:.2f} GB/s" if b > 0 else f"{a * 1e6:.0f} µs"


# ---------------------------------------------------------------- output

def _num(x: float | None, fmt: str) -> str:
    return "–" if x is None else format(x, fmt)


def prediction_table(outcome: Outcome) -> str:
    headers = ["schedule", "ranks", "nodes", "wall (s)", "training (s)", "speedup", "efficiency",
               "bubble", "bytes moved", "measured wall (s)", "error"]
    rows = []
    for p in outcome.predictions:
        if p.reason is not None:
            rows.append([p.schedule, str(p.ranks), str(p.nodes), f"not possible: {p.reason}"]
                        + [""] * (len(headers) - 4))
            continue
        rows.append([p.schedule, str(p.ranks), str(p.nodes), _num(p.wall, ",.1f"), _num(p.training, ",.1f"),
                     _num(p.speedup, ".2f"), report_mod._pct(p.efficiency), report_mod._pct(p.bubble),
                     report_mod._bytes(p.bytes_moved), _num(p.measured_wall, ",.1f"),
                     f"– ({p.measured_unfinished})" if p.measured_unfinished else
                     "–" if p.error is None else f"{100 * p.error:+.1f} %"])
    return report_mod._table(headers, rows, numeric_from=1)


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
        raise ConfigError(f"cannot write the prediction to {out} ({report_mod._one_line(exc)}); "
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
        runs = [report_mod.load_run(d) for d in args.runs]
        outcome = predict(runs, ranks=_rank_list(args.ranks), schedules=schedules, network=network,
                          contention=contention, overrides=args.overrides, adaptive_lag=args.adaptive_lag,
                          progress=lambda line: print(f"mpff predict: {line}", file=sys.stderr, flush=True))
        write_outputs(outcome, out)
    except ConfigError as exc:
        print(f"mpff predict: error: {report_mod._one_line(exc)}", file=sys.stderr)
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
