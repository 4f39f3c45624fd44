"""``mpff predict`` for backprop: data-parallel steps on N ranks from a one-rank run's steps.

A data-parallel step on N ranks (PyTorch DDP) is the forward and backward passes over the rank's
rows of the global batch, the gradients' all-reduce (per DDP bucket, started while the backward
pass is still running) and the optimizer step over all parameters. A one-rank backprop run
records per chapter how long its steps' forward passes, backward passes and optimizer steps took
(the ``bp_*_seconds`` trace scalars, :class:`mpff.backprop.StepClock`); from them, for N ranks:

- rows per rank: ``ceil(G / N)`` for strong scaling (global batch G = ``train.batch_size``;
  the largest slice bounds the step), ``train.batch_size`` for weak scaling (G = N times that);
  steps per epoch ``ceil(n_train / G)``;
- passes: the source's seconds per row times the rows (the optimizer step and the loop's own
  per-step time do not shrink);
- all-reduce: DDP's buckets (parameters in reverse order, the first bucket capped at 1 MiB,
  the others at 25 MiB, as DDP assigns them), each a ring all-reduce of ``2 (N - 1)`` messages
  of ``bytes / N`` over the slowest link of the ring (between nodes when the job has several),
  one bucket after the other, each started when the backward pass has made its gradients
  (backward time shared among layers by their products' FLOPs); what runs past the end of the
  backward pass is waited for;
- per chapter, the evaluation as measured (rank 0 evaluates while the others wait).

Speedup is against the same model on one rank. Used by :func:`mpff.predict.predictor.predict`
when the first run is a backprop run.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

from .. import layers
from ..analysis.runs import RankTrace, Run
from ..config import BP_SCHEDULES, ConfigError
from ..dataspec import DEFAULT_CLASSES
from ..halt import VOTE_EVERY
from ..plan import build_plan, count_tasks
from ..trace import STEP_PHASES
from .outcome import Outcome, Prediction, attach_measured, check_work
from .profile import Contention
from .target import Network, Target, make_target, pick

#: DDP's bucket caps (torch.distributed's _DEFAULT_FIRST_BUCKET_BYTES and bucket_cap_mb = 25).
FIRST_BUCKET_BYTES = 1024 * 1024
BUCKET_BYTES = 25 * 1024 * 1024


@dataclass
class BPProfile:
    """What a one-rank backprop run measured, per chapter (0-based)."""
    run: Run
    chapters: int
    epochs_per_chapter: int
    n_train: int
    n_test: int | None
    rows: int                       # rows per step of the source run (its batch)
    steps: dict[int, float]         # optimizer steps per chapter
    phases: dict[str, dict[int, float]]   # STEP_PHASES -> chapter -> seconds
    train: dict[int, float]         # train span per chapter
    eval: dict[int, float]          # eval span per chapter
    setup: float
    tail: float
    checkpoints: float

    def per_step(self, what: str) -> float:
        """Median over chapters of seconds per step of a phase, or of ``"other"``: the train
        span's time outside the timed phases (batch gathering, zero_grad, the loop)."""
        values = []
        for c, steps in self.steps.items():
            if steps <= 0:
                continue
            if what == "other":
                timed = sum(self.phases[p].get(c, 0.0) for p in STEP_PHASES)
                values.append(max(self.train.get(c, timed) - timed, 0.0) / steps)
            else:
                values.append(self.phases[what].get(c, 0.0) / steps)
        return statistics.median(values) if values else 0.0


def step_phases(rt: RankTrace) -> dict[int, dict[str, float]]:
    """A backprop rank's step timings per chapter, as its trace stores them (chapters 1-based):
    ``{chapter: {"steps": n, "forward": s, "backward": s, "optimizer": s}}`` (the ``bp_*``
    scalars of :class:`mpff.backprop.StepClock`)."""
    names = {"bp_steps": "steps", **{f"bp_{p}_seconds": p for p in STEP_PHASES}}
    out: dict[int, dict[str, float]] = {}
    for name, sc in zip(rt.scalar_names, rt.scalars):
        key = names.get(str(name))
        if key is not None:
            out.setdefault(int(sc["chapter"]), {})[key] = float(sc["value"])
    return out


def build_profile(run: Run, spans, n_train: int | None, n_test: int | None) -> BPProfile:
    """The step phases, evaluation, setup and tail of a one-rank backprop run."""
    cfg = run.cfg
    if run.world_size != 1:
        raise ConfigError(f"run {run.path} ran {run.world_size} ranks: predict backprop from a "
                          "one-rank run (its steps have no all-reduce in them); pass data-parallel "
                          "runs after it to compare the prediction with them")
    if not n_train:
        raise ConfigError(f"run {run.path} does not say how many training samples it had; "
                          "predict from a run of this version of mpff")
    rt = run.ranks[0]
    offset = min((int(c) for kind, c in zip(rt.kinds, rt.spans["chapter"]) if kind == "train" and c >= 0),
                 default=1)
    timings = {c - offset: values for c, values in step_phases(rt).items()}
    steps = {c: values["steps"] for c, values in timings.items() if "steps" in values}
    phases = {p: {c: values.get(p, 0.0) for c, values in timings.items()} for p in STEP_PHASES}
    if not steps:
        raise ConfigError(f"run {run.path} has no step timings (bp_steps in its trace): it was made "
                          "by an older mpff or without run.trace; run it again to predict from it")
    train: dict[int, float] = {}
    evals: dict[int, float] = {}
    for sp in spans[0]:
        if sp.kind == "train" and sp.chapter >= 0:
            train[sp.chapter] = train.get(sp.chapter, 0.0) + sp.seconds
        elif sp.kind == "eval" and sp.chapter >= 0:
            evals[sp.chapter] = evals.get(sp.chapter, 0.0) + sp.seconds
    setup_end = max((sp.end for sp in spans[0] if sp.kind == "setup"), default=run.wall_start)
    ends = [sp.end for sp in spans[0] if sp.kind in ("train", "eval", "io")]
    chapters = cfg.train.chapters
    return BPProfile(run=run, chapters=chapters,
                     epochs_per_chapter=max(cfg.train.epochs // max(chapters, 1), 1),
                     n_train=int(n_train), n_test=n_test, rows=cfg.train.batch_size,
                     steps=steps, phases=phases, train=train, eval=evals,
                     setup=max(setup_end - run.wall_start, 0.0),
                     tail=max(rt.wall_end - max(ends), 0.0) if ends else 0.0,
                     checkpoints=sum(sp.seconds for sp in spans[0] if sp.kind == "checkpoint"))


# ---------------------------------------------------------------- the model of a step

def classes_of(cfg) -> int:
    """The classes of the run's data set (the registry's facts, else the files': the default)."""
    return cfg.data.num_classes or DEFAULT_CLASSES


def mlp_layers(dims, num_classes: int = DEFAULT_CLASSES) -> list[tuple[int, int]]:
    """(inputs, outputs) of each Linear layer of the backprop MLP: ``model.dims``, then the
    data set's classes."""
    ext = (*[int(d) for d in dims], int(num_classes))
    return list(zip(ext[:-1], ext[1:], strict=True))


def layer_parameter_counts(dims, num_classes: int = DEFAULT_CLASSES) -> list[tuple[int, ...]]:
    """Elements of each parameter tensor of each Linear layer of the MLP, in
    ``model.parameters()`` order, as the layer spec (mpff.layers) lays them out."""
    linear = layers.get("linear")
    return [tuple(math.prod(t.shape) for t in linear.tensors(a, b)) for a, b in mlp_layers(dims, num_classes)]


def parameter_bytes(dims, num_classes: int = DEFAULT_CLASSES) -> list[int]:
    """Bytes of each parameter of the MLP, in ``model.parameters()`` order (fp32)."""
    return [4 * n for counts in layer_parameter_counts(dims, num_classes) for n in counts]


def ddp_buckets(dims, num_classes: int = DEFAULT_CLASSES) -> list[tuple[int, int]]:
    """DDP's gradient buckets of the MLP in the order they are all-reduced: (bytes, index of
    the earliest parameter in it). Parameters go into buckets in reverse order; a bucket is
    closed once it holds at least its cap (1 MiB for the first, 25 MiB after)."""
    sizes = parameter_bytes(dims, num_classes)
    buckets: list[tuple[int, int]] = []
    size, cap = 0, FIRST_BUCKET_BYTES
    for i in reversed(range(len(sizes))):
        size += sizes[i]
        if size >= cap:
            buckets.append((size, i))
            size, cap = 0, BUCKET_BYTES
    if size:
        buckets.append((size, 0))
    return buckets


def gradient_ready(dims, backward: float, num_classes: int = DEFAULT_CLASSES) -> list[float]:
    """Seconds into the backward pass at which each parameter's gradient is made, with the pass
    shared among layers by their products' FLOPs (the first layer computes no input gradient)."""
    work = [counts[0] * (1 if k == 0 else 2) for k, counts in enumerate(layer_parameter_counts(dims, num_classes))]
    total = float(sum(work))
    ready: list[float] = [0.0] * (2 * len(work))
    done = 0.0
    for k in reversed(range(len(work))):
        done += work[k] / total * backward
        ready[2 * k] = ready[2 * k + 1] = done
    return ready


def ring_allreduce_seconds(nbytes: int, ranks: int, link) -> float:
    """A ring all-reduce of ``nbytes`` on ``ranks``: 2 (N - 1) messages of nbytes / N each way."""
    if ranks <= 1:
        return 0.0
    return 2 * (ranks - 1) * link.seconds(int(math.ceil(nbytes / ranks)))


@dataclass
class Step:
    rows: int            # rows of the largest slice
    compute: float       # forward + backward + optimizer + the loop, seconds
    comm: float          # seconds the all-reduces take in all (overlapped or not)
    exposed: float       # seconds of them past the end of the backward pass (waited for)
    bytes_sent: float    # per rank

    @property
    def seconds(self) -> float:
        return self.compute + self.exposed


def model_step(profile: BPProfile, dims, rows: int, ranks: int, link, slowdown: float,
               num_classes: int = DEFAULT_CLASSES) -> Step:
    """One data-parallel step with ``rows`` rows on the slowest rank, ``ranks`` ranks."""
    per_row = rows / profile.rows
    forward = profile.per_step("forward") * per_row * slowdown
    backward = profile.per_step("backward") * per_row * slowdown
    fixed = (profile.per_step("optimizer") + profile.per_step("other")) * slowdown
    comm_end, comm, sent = 0.0, 0.0, 0.0
    if ranks > 1:
        ready = gradient_ready(dims, backward, num_classes)
        for nbytes, first in ddp_buckets(dims, num_classes):
            seconds = ring_allreduce_seconds(nbytes, ranks, link)
            comm_end = max(comm_end, ready[first]) + seconds
            comm += seconds
            sent += 2 * (ranks - 1) / ranks * nbytes
    exposed = max(comm_end - backward, 0.0)
    if ranks > 1:  # the halt vote: a 4-byte all-reduce before every VOTE_EVERY-th step, waited for
        vote = ring_allreduce_seconds(4, ranks, link) / VOTE_EVERY
        comm += vote
        exposed += vote
    return Step(rows, forward + backward + fixed, comm, exposed, sent)


# ---------------------------------------------------------------- a run on N ranks

def _link_of(network: Network, ranks: int):
    """The ring's slowest link: between nodes when the ranks span several, else within one."""
    return network.inter if network.nodes(ranks) > 1 else network.intra


def predict_ranks(profile: BPProfile, target: Target, ranks: int, network: Network,
                  contention: Contention) -> Prediction:
    """Sequential on one rank, data-parallel on ``ranks`` > 1 (speedup left for the caller)."""
    cfg = target.config
    schedule = "sequential" if ranks == 1 else "data_parallel"
    pred = Prediction(schedule, ranks, network.nodes(ranks))
    try:
        plan = build_plan(cfg.replace(run={"schedule": schedule}), ranks, n_train=target.n_train)
    except ConfigError as exc:
        pred.reason = str(exc)
        return pred
    b = cfg.train.batch_size
    weak = cfg.run.scaling == "weak" and ranks > 1
    global_batch = b * ranks if weak else b
    rows = b if weak else -(-global_batch // ranks)
    n_train = target.n_train or profile.n_train
    per_node = min(network.ranks_per_node, ranks)
    slowdown = 1.0 + contention.slowdown * (per_node - 1)
    step = model_step(profile, cfg.model.dims, rows, ranks, _link_of(network, ranks), slowdown, classes_of(cfg))
    steps = cfg.train.epochs_per_chapter * -(-n_train // global_batch)
    same = cfg.train.chapters == profile.chapters
    evals = [t.chapter for t in plan.tasks if t.kind == "eval"]
    eval_time = sum(pick(profile.eval, c, same) or 0.0 for c in evals)
    total_steps = steps * cfg.train.chapters
    pred.training = total_steps * step.seconds + eval_time
    pred.wall = profile.setup + pred.training + profile.tail
    work = ranks * total_steps * step.compute + eval_time
    pred.bubble = 1.0 - work / (ranks * pred.training) if pred.training > 0 else 0.0
    buckets = len(ddp_buckets(cfg.model.dims, classes_of(cfg)))
    pred.bytes_moved = int(round(ranks * step.bytes_sent * total_steps))
    pred.messages = ranks * 2 * (ranks - 1) * (buckets * total_steps + -(-total_steps // VOTE_EVERY)) \
        if ranks > 1 else 0
    pred.details = {"rows_per_rank": rows, "global_batch": global_batch, "steps": total_steps,
                    "step_seconds": step.seconds, "step_compute_seconds": step.compute,
                    "step_allreduce_seconds": step.comm, "step_allreduce_waited_seconds": step.exposed,
                    "buckets": buckets, "evaluation_seconds": eval_time}
    return pred


def _contention(contention: str | float) -> Contention:
    if contention == "auto":
        return Contention(0.0, "none", "not measured for backprop (a data-parallel run's steps "
                          "include its all-reduce); give --contention FACTOR for ranks that share a node")
    if contention == "none":
        return Contention(0.0, "none", "not applied (--contention none)")
    return Contention(float(contention) - 1.0, "given", f"given: a step's work takes "
                      f"{float(contention):g}x its time alone beside one other rank of its node")


def predict(runs: list[Run], spans, *, ranks, schedules, network, contention,
            overrides, n_sizes, progress=None) -> Outcome:
    """Sequential on one rank and data-parallel on every rank count of ``ranks`` > 1."""
    bad = [s for s in schedules if s not in BP_SCHEDULES]
    if bad:
        raise ConfigError(f"run {runs[0].path} is backprop: it predicts the schedules "
                          f"{', '.join(BP_SCHEDULES)}, not {', '.join(bad)} (pass --schedules "
                          f"{','.join(BP_SCHEDULES)}, or predict the FF schedules from an FF run)")
    for run in runs[1:]:
        if not run.is_backprop:
            raise ConfigError(f"run {run.path} is Forward-Forward and {runs[0].path} backprop: "
                              "predict each from its own runs")
    profile = build_profile(runs[0], spans[0], *n_sizes)
    used = _contention(contention)
    target = make_target(profile, overrides)
    counts = [n for n in ranks if n > 1] if "data_parallel" in schedules else []
    announce = check_work([("sequential on 1 rank", count_tasks(target.config, 1) + 1)]
                          + [(f"data_parallel on {n} ranks", count_tasks(target.config, n) + n) for n in counts],
                          progress)
    predictions = []
    announce("sequential on 1 rank")
    base = predict_ranks(profile, target, 1, network, used)
    for n in ([1] if "sequential" in schedules else []) + counts:
        if n > 1:
            announce(f"data_parallel on {n} ranks")
        pred = base if n == 1 else predict_ranks(profile, target, n, network, used)
        if pred.reason is None and base.reason is None:
            pred.against(base)
        # a measured run of the same scaling (report's problem settings leave run.scaling out)
        attach_measured(pred, target, [r for r in runs if n == 1 or r.cfg.run.scaling == target.config.run.scaling])
        predictions.append(pred)
    return Outcome(profile, target, network, used, predictions,
                   _assumptions(profile, target, network, used, predictions))


def _assumptions(profile: BPProfile, target: Target, network: Network, used: Contention,
                 predictions: list[Prediction]) -> list[str]:
    run, cfg = profile.run, target.config
    devices = ", ".join(sorted({rt.device for rt in run.ranks}))
    f, b = profile.per_step("forward"), profile.per_step("backward")
    o, x = profile.per_step("optimizer"), profile.per_step("other")
    buckets = ddp_buckets(cfg.model.dims, classes_of(cfg))
    out = [
        (f"Step times come from {run.name} (backprop, 1 rank, {devices}, "
         f"{run.cfg.train.threads} thread(s)): per step of {profile.rows} rows "
         f"forward {f * 1e3:.2f} ms, backward {b * 1e3:.2f} ms, optimizer {o * 1e3:.2f} ms, the "
         f"rest of the loop {x * 1e3:.2f} ms (medians over {len(profile.steps)} chapter(s)). Every "
         "predicted rank is as fast as that one: no straggler, no other job on the node."),
        ("The passes take the source's time per row times the rows of the largest slice; the "
         "optimizer step and the loop do not shrink. Optimistic for small slices: a product of "
         "few rows runs below the rate of one of many (and on a GPU a step of few rows is bound "
         "by kernel launches), so strong scaling to a few rows per rank will fall short of it."),
        (f"Gradients: {sum(s for s, _ in buckets) / 1e6:.1f} MB per step in {len(buckets)} DDP "
         "bucket(s), each a ring all-reduce (2 (N-1) messages of bytes/N) over the ring's slowest "
         f"link (between nodes {network.inter.describe()}; within a node {network.intra.describe()}; "
         f"{network.ranks_per_node} rank(s) per node), one bucket after the other, each started "
         "when the backward pass has made its gradients (the pass shared among layers by FLOPs); "
         "what runs past the pass is waited for. NCCL and gloo may pick tree or hierarchical "
         "algorithms instead; no congestion from other jobs."),
        (f"Scaling: {cfg.run.scaling} (global batch "
         + (f"{cfg.train.batch_size} split among the ranks" if cfg.run.scaling == "strong" else
            f"{cfg.train.batch_size} per rank, N times as many rows per step and N times fewer "
            "steps; the optimisation differs from the one-rank run's, so the accuracy may too")
         + "). Evaluation per chapter as measured, on rank 0 while the others wait; setup "
         f"({profile.setup:.2f} s) and the end of the run ({profile.tail:.2f} s) as measured."),
    ]
    if network.ranks_per_node > 1:
        out.append(f"Ranks sharing a node: {used.note}"
                   + (f"; a step's work runs {1 + used.slowdown:.2f}x slower per other rank of "
                      "its node." if used.slowdown > 0 else "."))
    else:
        out.append("Every rank has a node (and device) to itself: no contention between ranks.")
    if profile.checkpoints > 0.05:
        out.append(f"The run spent {profile.checkpoints:.1f} s writing checkpoints; checkpoints are "
                   "not part of the prediction.")
    return out
