"""What a prediction is for: the run to predict (the source run's configuration with the user's
``--set`` changes, and its data sizes) and the network its ranks sit on."""

from __future__ import annotations

import json
import statistics
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from ..config import Config, ConfigError, from_dict, parse_override
from . import interconnect
from .profile import full_sizes

#: Settings that shape every task's time: a prediction cannot change them (--set refuses).
FIXED_SETTINGS = (("model", "dims"), ("train", "batch_size"), ("train", "classifier"),
                  ("train", "threads"), ("data", "dataset"), ("run", "device"))


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


def default_network() -> Network:
    return Network(interconnect.preset("ib-hdr"), interconnect.preset("shm"), 1)


@dataclass
class Target:
    """The run to predict (before the schedule and the rank count are chosen)."""
    raw: dict              # its configuration as a run would store it
    config: Config         # the same, validated
    n_train: int | None
    n_test: int | None

    def with_config(self, config: Config) -> Target:
        return Target(self.raw, config, self.n_train, self.n_test)

    def chapters(self, world_size: int = 1) -> int:
        """Its chapters on ``world_size`` ranks: train.chapters, or for chapters of
        train.chapter_batches the count they make of its training samples."""
        n = self.n_train or self.config.data.train_samples
        return self.config.with_chapters(n, world_size).train.chapters


def _as_stored(value: Any) -> Any:
    """A Config value as a stored configuration (and --set) writes it: tuples as lists."""
    return list(value) if isinstance(value, tuple) else value


def make_target(profile, overrides: Iterable[str] = ()) -> Target:
    """The source run of ``profile`` (FF or backprop) changed by ``overrides`` (``--set``)."""
    source = profile.run.cfg
    raw = json.loads(json.dumps(profile.run.config))  # a copy to edit
    changed: dict[tuple[str, str], Any] = {}
    for text in overrides:
        section, key, value = parse_override(text)
        if not isinstance(raw.setdefault(section, {}), dict):
            raise ConfigError(f"[{section}] must be a table of settings")
        raw[section][key] = changed[(section, key)] = value
    for section, key in FIXED_SETTINGS:
        before = _as_stored(getattr(getattr(source, section), key))
        after = changed.get((section, key), before)
        if before != after:
            raise ConfigError(f"--set {section}.{key}: the task times were measured with {before!r}, "
                              f"so a prediction for {after!r} would be a guess; predict from a run "
                              f"with {section}.{key} = {after!r}")
    try:  # validation checks values only: the data need not be on this login node
        cfg = from_dict(json.loads(json.dumps(raw)))
    except ConfigError as exc:
        raise ConfigError(f"the configuration to predict is not valid: {exc}") from None
    # the full data set's size, as the run measured it, cut to the target's subsets
    sizes = []
    for i, (measured, subset, wanted) in enumerate(((profile.n_train, source.data.train_subset, cfg.data.train_subset),
                                                    (profile.n_test, source.data.test_subset, cfg.data.test_subset))):
        full = measured if not subset else None
        if full is None:
            full = full_sizes(source)[i]
        sub = int(wanted or 0)
        sizes.append(min(sub, full) if sub and full else (sub or full))
    return Target(raw=raw, config=cfg, n_train=sizes[0], n_test=sizes[1])


def pick(table: dict[int, float], chapter: int, same_chapters: bool) -> float | None:
    """The measured value of the chapter when the run had the same chapters, else the median."""
    if not table:
        return None
    if same_chapters and chapter in table:
        return table[chapter]
    return statistics.median(table.values())
