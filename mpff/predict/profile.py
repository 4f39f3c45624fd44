"""The profile of a measured run: every task's time as if its rank had the node to itself, per
sample where the work grows with the samples, and how much ranks that share a node slow each
other (contention). ``mpff predict`` builds one from the source run and times any plan with it.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np

from ..analysis.runs import Run, trace_attrs
from ..analysis.summary import task_durations
from ..chapters import Chapters
from ..config import Config, ConfigError, shard_sizes

#: Span kinds that are work of a task (what contention slows and the profile measures).
WORK_KINDS = ("train", "forward", "negatives", "head", "eval")


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


def _chapter_offset(run: Run) -> int:
    """How far the traces' chapter numbers sit above 0-based ones. ``task_durations`` keeps
    0-based keys whatever the trace format writes (format 2 writes 1-based chapters)."""
    keys = [c for kind, c, _ in task_durations(run) if kind == "train"]
    raw = [int(c) for rt in run.ranks for kind, c in zip(rt.kinds, rt.spans["chapter"])
           if kind == "train" and c >= 0]
    return (min(raw) - min(keys)) if keys and raw else 0


def read_spans(run: Run) -> list[list[Span]]:
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


# ---------------------------------------------------------------- data sizes

#: The training and test samples of the data sets whose size is known without reading them.
#: The one statement of those sizes in the offline code (a data-set registry will answer them).
def full_sizes(cfg: Config) -> tuple[int | None, int | None]:
    """(training samples, test samples) of the whole data set ``cfg`` names, where known (the
    data-set registry, mpff.dataspec)."""
    facts = cfg.data.facts
    return facts.train_size, facts.test_size


def dataset_sizes(cfg: Config, info: dict, attrs: dict | None = None) -> tuple[int | None, int | None]:
    """(training samples, test samples) of a run: run.json or the trace when they record it,
    else the data set's known size cut to data.train_subset / data.test_subset."""
    attrs = attrs or {}
    full = full_sizes(cfg)
    out = []
    for i, (key, subset) in enumerate((("n_train", cfg.data.train_subset), ("n_test", cfg.data.test_subset))):
        recorded = info.get(key, attrs.get(key))
        if isinstance(recorded, (int, np.integer)) and recorded > 0:
            out.append(int(recorded))
            continue
        sub = int(subset or 0)
        n = full[i]
        out.append(min(sub, n) if sub and n else (sub or n))
    return out[0], out[1]


def run_sizes(run: Run) -> tuple[int | None, int | None]:
    """(training samples, test samples) the run had (:func:`dataset_sizes`, with rank 0's trace)."""
    return dataset_sizes(run.cfg, run.info, trace_attrs(run.ranks[0], ("n_train", "n_test")))


def shard_samples(n: int | None, shards: int) -> list[float]:
    """Samples per shard as floats (:func:`mpff.config.shard_sizes`); 1 each when n is unknown."""
    if n is None:
        return [1.0] * shards
    return [float(x) for x in shard_sizes(n, shards)]


@dataclass(frozen=True)
class ChapterSizes:
    """How much data each chapter of a run trains on: what task times are measured and predicted
    per. A chapter of whole epochs (train.chapter_batches = 0) goes ``passes`` = C times over
    its shard's samples; a chapter of K batches (:mod:`mpff.chapters`) once over the rows of its
    batches (``passes`` = 1; a sample drawn in two of its epochs counts twice)."""
    shard_n: tuple[float, ...]
    geometry: Chapters | None
    passes: float

    @classmethod
    def of(cls, cfg: Config, n_train: int | None, world_size: int) -> ChapterSizes:
        """The chapters of ``cfg`` on ``world_size`` ranks and ``n_train`` training samples (the
        configured count when unknown; with neither, 1 sample a shard: times per chapter)."""
        shards = cfg.resolved_shards(world_size)
        if not cfg.train.chapter_batches:
            return cls(tuple(shard_samples(n_train, shards)), None, float(cfg.train.epochs_per_chapter))
        n = n_train or cfg.data.train_samples
        geometry = cfg.chapter_geometry(n, world_size) if n else None
        return cls(tuple(shard_samples(n, shards)), geometry, 1.0)

    def shard(self, chapter: int) -> float:
        """Samples of the chapter's shard (the data a rank holds for it)."""
        return self.shard_n[chapter % len(self.shard_n)]

    def samples(self, chapter: int) -> float:
        """Samples the chapter trains on, each ``passes`` times: its shard, or its batches' rows
        (at least 1: a chapter past the last has none)."""
        if self.geometry is None:
            return self.shard(chapter)
        return float(max(self.geometry.rows(chapter), 1))

    def slice_samples(self, chapter: int, run: int) -> float:
        """Samples of the ``run``-th slice of the chapter's data (counted on past the last slice:
        a ship task's passes follow its train task's); the chapter's for chapters of epochs."""
        if self.geometry is None:
            return self.shard(chapter)
        slices = self.geometry.slices(chapter)
        if not slices:
            return 1.0
        return float(max(sum(b.rows for b in slices[run % len(slices)]), 1))

    def epochs(self) -> float:
        """The mean chapter length in epochs of a shard: C, or that of the chapters of K batches."""
        return self.geometry.mean_epochs() if self.geometry is not None else self.passes

    def typical(self) -> float:
        """Samples of a typical chapter, each ``passes`` times (the median over the first shard's)."""
        if self.geometry is None:
            return statistics.median(self.shard_n)
        g = self.geometry
        return float(statistics.median(max(g.rows(c), 1) for c in range(0, g.num_chapters, g.shards)))


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


def _signature(run: Run) -> str:
    """Runs with equal signatures ran equal tasks (same sizes, same resources per rank)."""
    cfg = run.cfg
    n_train, n_test = dataset_sizes(cfg, run.info)
    # a chapter's length: C epochs, or K batches (cut into slices of slice_batches)
    epc = [cfg.train.epochs_per_chapter, cfg.train.chapter_batches, cfg.train.slice_batches] \
        if cfg.train.chapter_batches else cfg.train.epochs_per_chapter
    devices = sorted({rt.device.split(":")[0] for rt in run.ranks})
    return json.dumps([list(cfg.model.dims), cfg.train.batch_size, epc, n_train, n_test,
                       cfg.resolved_shards(run.world_size), cfg.train.classifier, cfg.train.threads, devices])


def _contention_samples(runs: list[Run], spans: list[list[list[Span]]]) -> tuple[list, list[float], list[float]]:
    """(task key, log seconds, busy others) of every work span of the runs (chapter 0, the
    warm-up, left out when there are others)."""
    keys, y, o = [], [], []
    for run, per_rank in zip(runs, spans):
        sig = _signature(run)
        chapters = {sp.chapter for r in per_rank for sp in r if sp.kind in WORK_KINDS}
        layers_applied = forward_layers(per_rank)
        for r in per_rank:
            for sp in r:
                if sp.kind not in WORK_KINDS or sp.seconds < 1e-3 or sp.chapter < 0:
                    continue
                if sp.chapter == 0 and len(chapters) > 1:
                    continue
                keys.append((sig, sp.kind, layers_applied.get(id(sp), sp.layer)))
                y.append(math.log(sp.seconds))
                o.append(sp.others)
    return keys, y, o


def measure_contention(runs: list[Run], spans: list[list[list[Span]]]) -> Contention:
    """Fit log(seconds) = log(base of the task kind and layer) + log(1 + g * others) by least
    squares over the work spans of all runs. Ranks alone (a 1-rank run, a rank whose neighbour
    waits) against ranks beside busy ones measure g; runs that never ran ranks side by side
    give nothing to measure."""
    keys, y, o = _contention_samples(runs, spans)
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


def forward_layers(per_rank: list[list[Span]]) -> dict[int, int]:
    """id(forward span) -> the layer it applied. The executor records a forward pass under the
    layer whose inputs it makes (k), applying layers j..k-1 in order, so the i-th of n
    consecutive spans of (chapter, k) on a rank applied layer k - n + i. A chapter of K batches
    run in slices makes such a run of passes per slice (each ended by the slice's train or ship
    span of (chapter, k))."""
    return {key: layer for key, (layer, _) in forward_passes(per_rank).items()}


def forward_passes(per_rank: list[list[Span]]) -> dict[int, tuple[int, int]]:
    """id(forward span) -> (the layer it applied, which run of passes of its (chapter, k) on its
    rank it belongs to: the slice, for a chapter of K batches run in slices; a ship task's
    passes after the train task's runs continue the count)."""
    out: dict[int, tuple[int, int]] = {}
    for spans in per_rank:
        groups: dict[tuple[int, int], list[Span]] = {}
        runs: dict[tuple[int, int], int] = {}
        for sp in spans:
            key = (sp.chapter, sp.layer)
            if sp.kind == "forward" and sp.chapter >= 0 and sp.layer > 0:
                groups.setdefault(key, []).append(sp)
            elif sp.kind in ("train", "ship") and key in groups:  # the slice's passes are done
                _close_passes(groups.pop(key), runs, out)
        for group in groups.values():
            _close_passes(group, runs, out)
    return out


def _close_passes(group: list[Span], runs: dict[tuple[int, int], int], out: dict[int, tuple[int, int]]) -> None:
    """One run of consecutive passes of (chapter, k): the i-th of n applied layer k - n + i."""
    key = (group[0].chapter, group[0].layer)
    runs[key] = runs.get(key, -1) + 1
    for i, sp in enumerate(group):
        out[id(sp)] = (sp.layer - len(group) + i, runs[key])


# ---------------------------------------------------------------- the profile of one run

@dataclass
class Profile:
    """Task times of one run as if each rank had its node to itself, per sample where the work
    grows with the samples (so a prediction can change the data size or the epochs)."""
    run: Run
    chapters: int
    #: a chapter's length in epochs: C, or the mean of the chapters of K batches (a fraction)
    epochs_per_chapter: float
    n_train: int | None
    n_test: int | None
    # "per sample" below: per sample of the chapter (ChapterSizes.samples: its shard's, or
    # the rows of its K batches), for the chapter's passes over it (C, or 1 for K batches)
    train: dict[tuple[int, int], float]            # (c, k) -> s per sample of the chapter
    forward: dict[tuple[int, int], list[float]]    # (c, layer applied) -> s per sample passed
    per_chapter: dict[str, dict[int, float]]       # head (per sample), negatives (per sample), eval (per test sample)
    prep: dict[int, float]                         # c -> s per sample before a from-scratch input pass
    warmup_train: dict[int, float]                 # layer -> extra s per shard sample: a rank's first training of it
    warmup_forward: dict[int, float]               # layer -> extra s per shard sample: a rank's first pass through it
    first_use: float                               # s per sample of the shard: a rank's first use of it
    final: float                                   # writing the model (s)
    setup: float                                   # from the first rank's start to the end of setup (s)
    tail: float                                    # from the end of the last task to the end of the run (s)
    checkpoints: float                             # seconds the run spent writing checkpoints (not predicted)
    pack: tuple[float, float] | None               # seconds = a + b * bytes, from send spans
    unpack: tuple[float, float] | None             # seconds = a + b * bytes, from recv spans
    #: the source's chapters: what the per-sample times above are per
    sizes: ChapterSizes | None = None
    #: train.chapter_batches of the source (0: chapters of whole epochs)
    chapter_batches: int = 0

    @property
    def passes(self) -> float:
        """How often a chapter of the source went over each of its samples: C, or 1 (K batches)."""
        return self.sizes.passes if self.sizes is not None else self.epochs_per_chapter


@dataclass
class _Tally:
    """What the spans of every rank add up to, before the warm-up is taken apart."""
    train: dict[tuple[int, int], float] = field(default_factory=dict)
    forward: dict[tuple[int, int], list[float]] = field(default_factory=dict)
    # a rank's first training of a layer and first pass through it are slower (warm-up)
    first_train: set[tuple[int, int]] = field(default_factory=set)
    first_forward: list[tuple[tuple[int, int], int]] = field(default_factory=list)  # ((c, layer applied), index)
    per_chapter: dict[str, dict[int, float]] = field(
        default_factory=lambda: {"head": {}, "negatives": {}, "eval": {}})
    prep: dict[int, list[float]] = field(default_factory=dict)
    first_gaps: list[tuple[int, float]] = field(default_factory=list)
    final: float = 0.0


def _tally_rank(per_rank: list[Span], tally: _Tally, applied: dict[int, tuple[int, int]], sizes: ChapterSizes,
                alone: Callable[[Span], float], n_test: int | None, lag: int) -> None:
    """Add one rank's spans to the tally. Untraced time before the spans of a rank's first train
    task of a chapter is the chapter's bookkeeping and the overlay of its negatives (and, the
    first time, the shard's setup). A forward pass is timed per sample it passed: those of its
    slice, for a chapter of K batches run in slices."""
    samples = sizes.samples
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
            tally.train[key] = tally.train.get(key, 0.0) + alone(sp) / samples(sp.chapter)
            if sp.layer not in trained_here:
                trained_here.add(sp.layer)
                tally.first_train.add(key)
        elif sp.kind == "forward" and sp.chapter >= 0 and id(sp) in applied:
            layer, run = applied[id(sp)]
            key = (sp.chapter, layer)
            tally.forward.setdefault(key, []).append(alone(sp) / sizes.slice_samples(sp.chapter, run))
            if key[1] not in applied_here:
                applied_here.add(key[1])
                tally.first_forward.append((key, len(tally.forward[key]) - 1))
        elif sp.kind in tally.per_chapter and sp.chapter >= 0:
            if sp.kind == "eval":
                n = float(n_test or 1)
            else:
                n = samples(sp.chapter + (1 + lag if sp.kind == "negatives" else 0))
            table = tally.per_chapter[sp.kind]
            table[sp.chapter] = table.get(sp.chapter, 0.0) + alone(sp) / n
        elif sp.kind == "io" and sp.chapter >= 0:
            tally.final = max(tally.final, sp.seconds)
    for i, c in enumerate(first_layer):  # chapters in the order this rank met them
        if i == 0:
            tally.first_gaps.append((c, lead.get(c, 0.0)))
        else:
            tally.prep.setdefault(c, []).append(lead.get(c, 0.0) / samples(c))


def _warmup(firsts: list[float], others: list[float]) -> float:
    return max(statistics.median(firsts) - statistics.median(others), 0.0) if others and firsts else 0.0


def _take_warmup_apart(tally: _Tally) -> tuple[dict[int, float], dict[int, float]]:
    """Warm-up per layer: a rank's first task against the median of the others. The first ones
    then keep only the typical time; a prediction adds the warm-up to every rank's first."""
    train, forward = tally.train, tally.forward
    warm_train: dict[int, float] = {}
    for k in {key[1] for key in train}:
        warm_train[k] = _warmup([v for key, v in train.items() if key[1] == k and key in tally.first_train],
                                [v for key, v in train.items() if key[1] == k and key not in tally.first_train])
        for key in tally.first_train:
            if key[1] == k:
                train[key] -= warm_train[k]
    warm_forward: dict[int, float] = {}
    for j in {key[1] for key in forward}:
        marked = {(key, i) for key, i in tally.first_forward if key[1] == j}
        others = [v for key, vs in forward.items() if key[1] == j for i, v in enumerate(vs) if (key, i) not in marked]
        warm_forward[j] = _warmup([forward[key][i] for key, i in marked], others)
        for key, i in marked:
            forward[key][i] -= warm_forward[j]
    return warm_train, warm_forward


def _preparation(tally: _Tally, sizes: ChapterSizes) -> tuple[dict[int, float], float]:
    """(median preparation per chapter, s per sample of the chapter; a rank's first use of a
    shard beyond it, s per sample of the shard)."""
    prep_med = {c: statistics.median(v) for c, v in tally.prep.items() if v}
    typical_prep = statistics.median(prep_med.values()) if prep_med else 0.0
    first_use = (statistics.median(max(g - typical_prep * sizes.samples(c), 0.0) / sizes.shard(c)
                                   for c, g in tally.first_gaps)
                 if tally.first_gaps else 0.0)
    return prep_med, first_use


def _per_shard_sample(warmup: dict[int, float], sizes: ChapterSizes) -> dict[int, float]:
    """Warm-up per sample of the chapter -> per sample of the shard: a rank's first tasks are
    slower by what its data's size makes them, not by the length of its chapters."""
    if sizes.geometry is None:  # a chapter's samples are its shard's
        return warmup
    ratio = sizes.typical() / statistics.fmean(sizes.shard_n)
    return {k: v * ratio for k, v in warmup.items()}


def _setup_and_tail(run: Run, spans: list[list[Span]]) -> tuple[float, float]:
    """Seconds to the end of setup (median over ranks) and after the last task."""
    setup_ends = [max((sp.end for sp in r if sp.kind == "setup"), default=None) for r in spans]
    setup_ends = [e for e in setup_ends if e is not None]
    setup = (statistics.median(setup_ends) - run.wall_start) if setup_ends else 0.0
    task_ends = [sp.end for r in spans for sp in r if sp.kind in WORK_KINDS + ("send", "recv", "io")]
    tail = max(max(rt.wall_end for rt in run.ranks) - max(task_ends), 0.0) if task_ends else 0.0
    return max(setup, 0.0), tail


def build_profile(run: Run, spans: list[list[Span]], contention: Contention,
                  message_spans: Iterable[list[list[Span]]] = ()) -> Profile:
    """The profile of ``run``; packing and unpacking are fitted over the send and recv spans of
    ``spans`` and ``message_spans`` (other runs' spans: a 1-rank run sends nothing)."""
    cfg = run.cfg
    if cfg.train.algorithm == "backprop":
        raise ConfigError(f"run {run.path} is backprop: mpff predict models the Forward-Forward "
                          "schedules; predict from an FF run")
    n_train, n_test = run_sizes(run)
    # chapters of K batches: their count as the run derived it (config.toml has it)
    chapters = cfg.with_chapters(n_train, run.world_size).train.chapters
    sizes = ChapterSizes.of(cfg, n_train, run.world_size)

    def alone(sp: Span) -> float:
        return sp.seconds / (1.0 + contention.slowdown * sp.others)

    applied = forward_passes(spans)
    tally = _Tally()
    for per_rank in spans:
        _tally_rank(per_rank, tally, applied, sizes, alone, n_test, cfg.train.adaptive_lag)
    warm_train, warm_forward = (_per_shard_sample(w, sizes) for w in _take_warmup_apart(tally))
    prep, first_use = _preparation(tally, sizes)
    setup, tail = _setup_and_tail(run, spans)
    every = list(spans) + [r for other in message_spans for r in other]
    if not tally.train:
        raise ConfigError(f"run {run.path} has no train spans; predict from a run that trained "
                          "(with run.trace = true)")
    return Profile(run=run, chapters=chapters, epochs_per_chapter=sizes.epochs(),
                   n_train=n_train, n_test=n_test, train=tally.train, forward=tally.forward,
                   per_chapter=tally.per_chapter, prep=prep, warmup_train=warm_train,
                   warmup_forward=warm_forward, first_use=first_use, final=tally.final,
                   checkpoints=sum(sp.seconds for r in spans for sp in r if sp.kind == "checkpoint"),
                   setup=setup, tail=tail,
                   pack=_linear_fit([(sp.nbytes, alone(sp)) for r in every for sp in r if sp.kind == "send"]),
                   unpack=_linear_fit([(sp.nbytes, alone(sp)) for r in every for sp in r if sp.kind == "recv"]),
                   sizes=sizes, chapter_batches=cfg.train.chapter_batches)


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
