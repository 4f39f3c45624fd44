"""Algorithms by name (``train.algorithm``): the rank state that runs one, and its schedules.

The executor drives any rank state (``prepare``, ``run``, ``pack``, ``load``, ``holds``,
``checkpoint``, ``restore``); ``mpff train`` also asks the state's class for what differs between
algorithms, so :mod:`mpff.train` names none of them:

- ``create(setup, tracer, watch)`` (classmethod): the state of this rank, after any collective
  set-up it needs (backprop's torch.distributed for data-parallel runs);
- ``memory_figure(cfg, n_train, world_size)`` (staticmethod): the analytic memory of one rank;
- ``summary(cfg, world_size)`` (classmethod): the banner's words for the run, and
  ``classified_by(cfg)``: how the final accuracy was measured;
- ``save(path, setup)``: the model file; ``traffic()``: bytes it moved itself (backprop's DDP);
  ``close()``: let go of what must go before the process group does.

Built-ins are named as ``"module:Class"`` and imported when a run needs them, so the
configuration checks algorithm names and schedules without torch. A new algorithm registers
from any module: ``algorithms.register(Algorithm(name="mine", state=MyState, schedules=(...)))``.
"""

from __future__ import annotations

from dataclasses import dataclass

from .registry import Registry, load_attr


@dataclass(frozen=True, kw_only=True)
class Algorithm:
    name: str
    state: str | type
    """The rank state class, or a ``"module:Class"`` naming it."""
    schedules: tuple[str, ...]
    """The values of run.schedule it runs (the first is its one-rank schedule)."""

    def state_class(self) -> type:
        return load_attr(self.state) if isinstance(self.state, str) else self.state


ALGORITHMS: Registry[Algorithm] = Registry("algorithm")


def register(algorithm: Algorithm, *, replace: bool = False) -> Algorithm:
    return ALGORITHMS.register(algorithm.name, algorithm, replace=replace)


def get(name: str) -> Algorithm:
    return ALGORITHMS.get(name)


def names() -> tuple[str, ...]:
    return ALGORITHMS.names()


def state_class(name: str) -> type:
    """The rank state class of algorithm ``name``."""
    return get(name).state_class()


register(Algorithm(name="ff", state="mpff.ffstate:FFState",
                   schedules=("sequential", "single_layer", "all_layers", "federated")))
register(Algorithm(name="backprop", state="mpff.backprop:BPState", schedules=("sequential", "data_parallel")))
