"""What a prediction gives: a :class:`Prediction` per schedule and rank count (with the measured
run of the same schedule, ranks and problem beside it where one was given), the
:class:`Outcome` of them all, and the limit on how much work one prediction may simulate."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..analysis.runs import Run, unfinished
from ..analysis.summary import problem_differences, training_phase
from ..config import ConfigError
from . import interconnect
from .profile import Contention
from .target import Network, Target

#: The most work one prediction may simulate, in tasks (a plan of T tasks on N ranks counts
#: T + N), all plans together. Building and simulating a plan took about 16,000 tasks a
#: second on one shared core here (997,000 tasks in 63 s, 128 MB; docs/predict.md), so this is
#: about a minute; past it the command refuses at once instead of running for minutes with
#: memory growing.
MAX_SIMULATED_TASKS = 1_000_000
#: Above this much work the command says what it is simulating, plan by plan, on stderr.
PROGRESS_TASKS = 100_000


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

    def against(self, base: Prediction) -> None:
        """Speedups against the baseline ``base``."""
        self.speedup = base.wall / self.wall if self.wall else None
        self.training_speedup = base.training / self.training if self.training else None

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
    profile: Any               # profile.Profile (FF) or backprop.BPProfile
    target: Target
    network: Network
    contention: Contention
    predictions: list[Prediction]
    assumptions: list[str]

    def to_json(self) -> dict:
        run = self.profile.run
        return {
            "source": {"run": run.path, "schedule": run.cfg.run.schedule,
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


def attach_measured(pred: Prediction, target: Target, runs: list[Run]) -> None:
    """A given run of this schedule, rank count and problem: its measured wall and training time
    (a finished run before one that did not finish, which gets no error: see
    ``Prediction.measured_unfinished``)."""
    matching = [run for run in runs
                if run.cfg.run.schedule == pred.schedule and run.world_size == pred.ranks
                and not problem_differences(target.config, run.cfg)
                and run.cfg.train.threads == target.config.train.threads]
    matching.sort(key=lambda run: unfinished(run) is not None)
    for run in matching[:1]:
        pred.measured_run = run.path
        pred.measured_wall = run.wall
        pred.measured_training = training_phase(run).seconds
        why = unfinished(run)
        pred.measured_unfinished = None if why is None else f"{run.name} did not finish: {why}"


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
