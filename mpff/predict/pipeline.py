"""The Forward-Forward schedules predicted: a plan's task times from a :class:`Profile`, and the
plan simulated (:func:`mpff.predict.simulate.simulate`) with them on a network."""

from __future__ import annotations

import statistics

from .. import layers
from ..config import ConfigError
from ..plan import Plan, Task, build_plan
from .outcome import Prediction
from .profile import ChapterSizes, Contention, Profile
from .simulate import simulate
from .target import Network, Target, pick


def layer_weights(dims, j: int, kind: str = layers.DEFAULT) -> int:
    """What a pass through FF layer j costs (its multiply-adds per sample, as the layer spec
    answers them), for scaling one layer's measured pass to another's."""
    return layers.get(kind).forward_macs(dims[j], dims[j + 1])


class _TaskTimes:
    """The profile's per-sample times scaled to one plan of the target: per chapter where the
    target has the source's chapters, else the median over them. A chapter's work is its
    samples (its shard's, or the rows of its K batches) times its passes over them (C epochs,
    or 1): a target of other chapter lengths scales by the ratio of those."""

    def __init__(self, profile: Profile, target: Target, plan: Plan, notes: set[str]) -> None:
        cfg = plan.cfg  # the chapters of train.chapter_batches derived for the target's data
        self.profile, self.target, self.plan, self.notes = profile, target, plan, notes
        self.same = plan.num_chapters == profile.chapters and cfg.train.chapter_batches == profile.chapter_batches
        self.sizes = ChapterSizes.of(cfg, target.n_train, plan.world_size)
        self.epochs = self.sizes.passes / profile.passes
        self.dims = cfg.model.dims
        self.by_layer: dict[int, dict[int, float]] = {}
        for (c, k), v in profile.train.items():
            self.by_layer.setdefault(k, {})[c] = v
        self.fwd_layer: dict[int, dict[int, float]] = {}
        for (c, j), values in profile.forward.items():
            self.fwd_layer.setdefault(j, {})[c] = statistics.fmean(values)

    def samples(self, chapter: int) -> float:
        """Samples chapter ``chapter`` trains on (each ``sizes.passes`` times)."""
        return self.sizes.samples(chapter)

    def reuses_outputs(self, chapter: int) -> bool:
        """Whether a rank keeps a layer's outputs on the chapter for its next layer: not when a
        chapter of K batches is longer than a slice (each slice is pushed from the input)."""
        g = self.plan.geometry
        if g is None or g.num_batches(chapter) <= g.slice_batches:
            return True
        self.notes.add(f"a chapter of more than train.slice_batches = {g.slice_batches} batches is "
                       "streamed slice by slice: each slice is pushed through every layer below the "
                       "one it trains, as Single Layer does, on every schedule")
        return False

    def forward(self, j: int, c: int) -> float:
        """Seconds per sample of the pass through layer j in chapter c."""
        v = pick(self.fwd_layer.get(j, {}), c, self.same)
        if v is not None:
            return v
        if not self.fwd_layer:
            self.notes.add("the run recorded no forward pass, so forward passes are not modelled")
            return 0.0
        # a layer the run never applied to data: scale a measured one by the arithmetic
        near = min(self.fwd_layer, key=lambda i: abs(i - j))
        self.notes.add(f"the forward pass through layer {j + 1} was never measured: estimated from layer "
                       f"{near + 1} by the ratio of their weights")
        return pick(self.fwd_layer[near], c, self.same) * layer_weights(self.dims, j) / layer_weights(self.dims, near)

    def own_work(self, t: Task) -> float | None:
        """Seconds of a task's own work (for a train task: the training alone); None for a kind
        the profile does not time."""
        profile, same, per_chapter = self.profile, self.same, self.profile.per_chapter
        if t.kind == "train":
            v = pick(self.by_layer.get(t.layer, {}), t.chapter, same)
            if v is None:
                raise ConfigError(f"run {profile.run.path} never trained layer {t.layer + 1}; "
                                  "predict from a run that trained every layer")
            return v * self.samples(t.chapter) * self.epochs
        if t.kind == "head":
            v = pick(per_chapter["head"], t.chapter, same)
            if v is None:
                self.notes.add("the run trained no softmax head: head tasks are not modelled")
                v = 0.0
            return v * self.samples(t.chapter) * self.epochs
        if t.kind == "negatives":
            made_for = t.chapter + 1 + self.plan.lag
            v = pick(per_chapter["negatives"], t.chapter, same)
            if v is None:
                # the same passes as an evaluation (every label overlaid), over a training shard
                v = pick(per_chapter["eval"], t.chapter, same) or 0.0
                self.notes.add("adaptive negatives were never made in the run: each is estimated as an "
                               "evaluation over the chapter's training samples instead of the test set")
            return v * self.samples(made_for)
        if t.kind == "eval":
            v = pick(per_chapter["eval"], t.chapter, same)
            return (v or 0.0) * float(self.target.n_test or 1)
        if t.kind == "final":
            return profile.final
        if t.kind == "ship":  # run.inputs = ship: layer k's pass over the chapter's data, right
            # after training it (its inputs are still cached, unless the chapter is run in slices:
            # then each slice is pushed again from the block's first layer), into the send buffer
            below = () if self.reuses_outputs(t.chapter) else range(self.plan.block_start(t.layer), t.layer)
            return sum(self.forward(j, t.chapter) for j in (*below, t.layer)) * self.samples(t.chapter)
        return None

    def before_training(self, rank: int, durations: dict) -> None:
        """A rank's work before each of its train tasks reads its own state, as
        ``("forward", c, k)``, and the warm-up of its first training of each layer."""
        profile, plan = self.profile, self.plan
        typical_prep = statistics.median(profile.prep.values()) if profile.prep else 0.0
        cache: tuple[int, int] | None = None   # (chapter, last layer applied), as the rank state keeps it
        prepared: set[int] = set()
        shards_used: set[int] = set()
        trained: set[int] = set()
        applied: set[int] = set()
        for t in plan.rank_tasks(rank):
            if t.kind != "train":
                continue
            c, k = t.chapter, t.layer
            n, shard = self.samples(c), self.sizes.shard(c)
            if k not in trained:  # this rank's first training of layer k
                trained.add(k)
                durations[("train", c, k)] += profile.warmup_train.get(k, 0.0) * shard
            work = 0.0
            if plan.data_shard(c) not in shards_used:
                shards_used.add(plan.data_shard(c))
                work += profile.first_use * shard
            if c not in prepared:
                prepared.add(c)
                prep = profile.prep.get(c) if self.same and c in profile.prep else typical_prep
                work += prep * n
            # shipped inputs: the passes start at the rank's block, from the received outputs
            first = plan.block_start(k) if plan.ship else 0
            start = cache[1] + 1 if cache is not None and cache[0] == c and first - 1 <= cache[1] < k else first
            if not self.reuses_outputs(c):
                start = first
            for j in range(start, k):
                work += self.forward(j, c) * n
                if j not in applied:
                    applied.add(j)
                    work += profile.warmup_forward.get(j, 0.0) * shard
            if k > start:
                cache = (c, k - 1)
            durations[("forward", c, k)] = work


def task_times(profile: Profile, target: Target, plan: Plan, notes: set[str]) -> dict:
    """{(kind, chapter, layer): seconds} of ``plan``'s tasks from the profile, for
    :func:`mpff.predict.simulate.simulate`. ``("forward", c, k)`` is all the work before
    train(c, k) reads its own state: the forward passes the rank has to do (the rank state
    reuses the outputs of the previous layer's pass when the same rank trained it in the same
    chapter, else it starts from the input) and, on a rank's first task of a chapter, the
    untraced preparation of its data."""
    times = _TaskTimes(profile, target, plan, notes)
    durations: dict[tuple[str, int, int], float] = {}
    for t in plan.tasks:
        seconds = times.own_work(t)
        if seconds is not None:
            durations[(t.kind, t.chapter, t.layer)] = seconds
    for rank in range(plan.world_size):
        times.before_training(rank, durations)
    return durations


def _linear(fit):
    return None if fit is None else (lambda n: fit[0] + fit[1] * n)


def predict_schedule(profile: Profile, target: Target, schedule: str, world_size: int, network: Network,
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
    sim = simulate(plan, durations, message_cost=network.message_seconds, pack_cost=_linear(profile.pack),
                   unpack_cost=_linear(profile.unpack), node_of=network.node_of(world_size),
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
