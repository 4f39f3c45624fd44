"""``mpff predict``'s core: every schedule on every rank count from the first run's task times
(FF: :mod:`.pipeline`; backprop: :mod:`.backprop`), with speedups against Sequential on one rank
and what was assumed."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from ..analysis.runs import Run, unfinished
from ..config import BP_SCHEDULES, SCHEDULES, ConfigError
from ..plan import count_tasks
from . import backprop
from .outcome import Outcome, Prediction, attach_measured, check_work
from .pipeline import predict_schedule
from .profile import (
    ChapterSizes,
    Contention,
    Profile,
    build_profile,
    measure_contention,
    read_spans,
    run_sizes,
    shard_samples,
)
from .target import Network, Target, default_network, make_target

DEFAULT_RANKS = (1, 2, 4, 8, 16)
DEFAULT_SCHEDULES = ("sequential", "single_layer", "all_layers")


def _checked(ranks: Iterable[int], schedules: Iterable[str] | None) -> tuple[list[int], list[str]]:
    ranks = sorted(set(int(n) for n in ranks))
    if not ranks or ranks[0] < 1:
        raise ConfigError("--ranks needs positive rank counts, e.g. 1,2,4,8")
    schedules = list(dict.fromkeys(DEFAULT_SCHEDULES if schedules is None else schedules))
    for s in schedules:
        if s not in SCHEDULES:
            raise ConfigError(f"unknown schedule {s!r}; choose from {', '.join(SCHEDULES)}")
    return ranks, schedules


def _contention(requested: str | float, measured: Contention) -> Contention:
    if requested == "auto":
        return measured
    if requested == "none":
        return Contention(0.0, "none", "not applied (--contention none)")
    factor = float(requested)
    return Contention(factor - 1.0, "given", f"given: a task takes {factor:g}x its time alone while "
                      "one other rank of its node is busy")


def _rank_counts(schedule: str, ranks: list[int]) -> list[int]:
    """On one rank every schedule is Sequential's plan: that row is the baseline."""
    return [1] if schedule == "sequential" else [n for n in ranks if n > 1]


def _planned_work(target: Target, schedules: list[str], ranks: list[int]) -> list[tuple[str, int]]:
    """(what, work) of every plan this prediction simulates, the baselines included."""
    plans = []
    shards_seen: set[int] = set()
    for schedule in schedules:
        for n in _rank_counts(schedule, ranks):
            if schedule == "single_layer" and n > target.config.model.num_layers:
                continue  # refused before any task is made
            cfg = target.config.replace(run={"schedule": schedule})
            plans.append((f"{schedule} on {n} rank(s)", count_tasks(cfg, n) + n))
            if cfg.resolved_shards(n) not in shards_seen:
                shards_seen.add(cfg.resolved_shards(n))
                plans.append((f"the sequential baseline with {cfg.resolved_shards(n)} shard(s)",
                              count_tasks(cfg.replace(run={"schedule": "sequential"}), 1) + 1))
    return plans


def _predict_ff(runs: list[Run], profile: Profile, target: Target, schedules: list[str], ranks: list[int],
                network: Network, used: Contention, adaptive_lag: str, announce: Callable[[str], None],
                notes: set[str]) -> list[Prediction]:
    """Every FF schedule on every rank count, with speedups against Sequential on one rank
    (Federated's against Sequential on the same shards)."""
    baselines: dict[int, Prediction] = {}

    def baseline(shards: int) -> Prediction:
        if shards not in baselines:
            t = target
            if shards != target.config.resolved_shards(1):
                t = target.with_config(target.config.replace(data={"shards": shards}))
            announce(f"the sequential baseline with {shards} shard(s)")
            baselines[shards] = predict_schedule(profile, t, "sequential", 1, network, used, notes)
        return baselines[shards]

    predictions: list[Prediction] = []
    for schedule in schedules:
        for n in _rank_counts(schedule, ranks):
            t = target
            if adaptive_lag == "ranks-1" and schedule != "sequential" and target.config.train.negatives == "adaptive":
                t = target.with_config(target.config.replace(train={"adaptive_lag": n - 1}))
            announce(f"{schedule} on {n} rank(s)")
            pred = predict_schedule(profile, t, schedule, n, network, used, notes)
            if pred.reason is None:
                base = baseline(t.config.replace(run={"schedule": schedule}).resolved_shards(n))
                if base.reason is None:
                    pred.against(base)
            attach_measured(pred, t, runs)
            predictions.append(pred)
    return predictions


def predict(runs: list[Run], *, ranks: Iterable[int] = DEFAULT_RANKS,
            schedules: Iterable[str] | None = None, network: Network | None = None,
            contention: str | float = "auto", overrides: Iterable[str] = (),
            adaptive_lag: str = "config", progress: Callable[[str], None] | None = None) -> Outcome:
    """Predict every schedule on every rank count from the first run's task times (``schedules``
    None: Sequential, Single Layer and All Layers from an FF run, Sequential and data-parallel
    from a backprop run, :mod:`mpff.predict.backprop`). More work than
    :data:`mpff.predict.outcome.MAX_SIMULATED_TASKS` is refused (ConfigError); above
    :data:`~mpff.predict.outcome.PROGRESS_TASKS` each plan is announced to ``progress`` before
    it is simulated."""
    if not runs:
        raise ConfigError("name at least one run directory to predict from")
    network = network or default_network()
    schedules_given = schedules
    ranks, schedules = _checked(ranks, schedules)
    spans = [read_spans(run) for run in runs]
    if runs[0].is_backprop:
        every = schedules_given is None or set(schedules) == set(SCHEDULES)  # none given, or 'all'
        return backprop.predict(runs, spans, ranks=ranks, schedules=BP_SCHEDULES if every else schedules,
                                network=network, contention=contention, overrides=overrides,
                                n_sizes=run_sizes(runs[0]), progress=progress)
    if any(run.is_backprop for run in runs[1:]):
        raise ConfigError(f"run {next(r.path for r in runs[1:] if r.is_backprop)} is "
                          f"backprop and {runs[0].path} Forward-Forward: predict each from its own runs")
    if set(schedules) == set(SCHEDULES):  # 'all' from an FF run: every FF schedule
        schedules = [s for s in schedules if s not in BP_SCHEDULES or s == "sequential"]
    measured = measure_contention(runs, spans)
    used = _contention(contention, measured)
    profile = build_profile(runs[0], spans[0], used, spans[1:])
    target = make_target(profile, overrides)
    announce = check_work(_planned_work(target, schedules, ranks), progress)
    notes: set[str] = set()
    predictions = _predict_ff(runs, profile, target, schedules, ranks, network, used, adaptive_lag,
                              announce, notes)
    assumptions = _assumptions(profile, target, network, used, measured, contention, schedules,
                               adaptive_lag, sorted(notes))
    return Outcome(profile, target, network, used, predictions, assumptions)


def _assumptions(profile: Profile, target: Target, network: Network, used: Contention,
                 measured: Contention, requested: str | float, schedules: list[str],
                 adaptive_lag: str, notes: list[str]) -> list[str]:
    run = profile.run
    cfg = target.config
    chapters = target.chapters()  # those train.chapter_batches derives, on one rank
    same = chapters == profile.chapters and cfg.train.chapter_batches == profile.chapter_batches
    devices = ", ".join(sorted({rt.device for rt in run.ranks}))
    out = [
        (f"Task times come from {run.name} ({run.cfg.run.schedule}, "
         f"{run.world_size} rank(s), {devices}, {run.cfg.train.threads} thread(s) "
         f"per rank): per task and chapter"
         + ("" if same else
            f"; it ran {profile.chapters} chapter(s), so every chapter of the {chapters} "
            "predicted takes the median of the measured ones")
         + ". Every predicted rank is taken to be as fast as that run's ranks (same device, threads "
           "and software): no straggler, no failure, no other job on the node."),
        ("Work grows linearly with the samples of a chapter (its shard's, or the rows of its "
         "batches for chapters of train.chapter_batches) and, for training, with its passes over "
         "them (the epochs of a chapter of epochs); forward passes are measured per layer applied: "
         + ("Single Layer ships each block's inputs (run.inputs = ship): a rank applies the "
            "layers of its block only, and the rank before it makes one more pass, through its "
            "block's last layer, to send; " if cfg.run.inputs == "ship" else
            "Single Layer recomputes layers 1..k-1 on every rank each chapter, ")
         + "Sequential and All Layers reuse the previous layer's outputs."
         + (f" A rank's first training of a layer and first pass through it took {warm:.1f} s "
            "longer in all than later ones (warm-up); every predicted rank pays that once."
            if (warm := _warmup_seconds(profile)) > 0.05 else "")
         + (" The run measured one chapter, so its warm-up counts in every predicted chapter: a "
            "little pessimistic." if profile.chapters == 1 and chapters > 1 else "")),
        (f"Messages: latency + bytes / bandwidth each, between nodes {network.inter.describe()}, "
         f"within a node {network.intra.describe()}; {network.ranks_per_node} rank(s) per node. "
         "Messages never share a link (no congestion) and progress while both ranks compute."
         + (" Packing and unpacking cost the ranks what the runs' send and recv spans took "
            f"({_fit_text(profile.pack)} and {_fit_text(profile.unpack)})." if profile.pack or profile.unpack
            else " Packing and unpacking are not modelled: no run sent messages to measure them by "
                 "(pass a multi-rank run to include them).")),
    ]
    if (lengths := _chapter_lengths(profile, target, chapters)) is not None:
        out.append(lengths)
    if (why := unfinished(run)) is not None:
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


def _describe_chapters(count: int, sizes: ChapterSizes, batches: int) -> str:
    if not batches:
        return f"{count} chapter(s) of {sizes.passes:g} epoch(s)"
    return (f"{count} chapter(s) of {batches} batch(es) (about {sizes.typical():,.0f} samples, "
            f"{sizes.epochs():.3g} epoch(s))")


def _chapter_lengths(profile: Profile, target: Target, chapters: int) -> str | None:
    """What the chapters of train.chapter_batches (the source's or the target's) change: the
    work of a chapter scales with its samples, what is per chapter stays per chapter."""
    batches = target.config.train.chapter_batches
    if profile.sizes is None or not (batches or profile.chapter_batches):
        return None
    sizes = ChapterSizes.of(target.config, target.n_train, 1)
    measured = profile.sizes.typical() * profile.sizes.passes
    ratio = sizes.typical() * sizes.passes / measured if measured > 0 else 1.0
    text = (f"Chapters: the source ran {_describe_chapters(profile.chapters, profile.sizes, profile.chapter_batches)}"
            f", the prediction has {_describe_chapters(chapters, sizes, batches)}. Training, forward "
            "passes, the head and negatives scale with the samples a chapter passes"
            + (f" ({ratio:.3g}x the measured per chapter)" if abs(ratio - 1.0) > 1e-9 else "")
            + "; messages (the weights after every chapter), evaluations and the bookkeeping of a "
              "task stay per chapter, so more chapters send more messages. A rank's warm-up and "
              "first use of its data scale with its shard, not with its chapters.")
    if ratio < 1.0 - 1e-9:
        text += (" A task's fixed costs (starting it, the untraced gathering of each slice's rows, "
                 "synchronising the device, the first batch) were measured inside the longer "
                 "chapters and are scaled down with the samples: they do not shrink, so for chapters "
                 "this short the prediction is optimistic; measure a run with chapters of about this "
                 "length to include them.")
    elif ratio > 1.0 + 1e-9:
        text += (" A task's fixed costs (starting it, gathering each slice's rows, synchronising "
                 "the device) were measured inside the shorter chapters and are scaled up with the "
                 "samples: the prediction is a little pessimistic.")
    return text


def _warmup_seconds(profile: Profile) -> float:
    """The source's warm-up of one rank that trains every layer, in seconds."""
    n = shard_samples(profile.n_train, 1)[0]
    return (sum(profile.warmup_train.values()) + sum(profile.warmup_forward.values())) * n


def _fit_text(fit: tuple[float, float] | None) -> str:
    if fit is None:
        return "not measured"
    a, b = fit
    return f"{a * 1e6:.0f} µs + bytes / {1 / b / 1e9:.2f} GB/s" if b > 0 else f"{a * 1e6:.0f} µs"
