"""The one reader of a run directory: run.json, the configuration and every rank's HDF5 trace.

Everything offline (``mpff report``, ``mpff predict``, ``mpff export``, the benchmarks) reads a
run through :func:`load_run`, which gives a :class:`Run`: its traces as arrays, its run.json, and
its configuration as a real :class:`mpff.config.Config`, rebuilt as the run ran (settings added
after a run was recorded take the value the run used, not today's default). Nothing else reads
a run's files or fills in a setting's default.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass, field
from typing import Any

import h5py
import numpy as np

from .. import trace as trace_mod
from ..config import Config, ConfigError, from_dict, tomllib
from .tables import one_line

__all__ = ["RankTrace", "Run", "as_it_ran", "config_of", "load_run", "read_trace", "trace_attrs", "unfinished"]


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
    config: dict            # the configuration as stored, with the settings it ran without filled in
    cfg: Config             # the same, validated: what the offline code reads settings from
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

    @property
    def is_backprop(self) -> bool:
        return self.cfg.train.algorithm == "backprop"

    def info_int(self, key: str) -> int | None:
        """A positive count run.json records (``n_train``, ``n_test``), else None."""
        value = self.info.get(key)
        return int(value) if isinstance(value, (int, np.integer)) and value > 0 else None


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
        raise ConfigError(f"trace file {path} is corrupt or truncated ({one_line(exc)}); the run's "
                          "model and other files do not depend on it") from None
    return rt


def trace_attrs(rt: RankTrace, keys: tuple[str, ...]) -> dict[str, Any]:
    """The attributes ``keys`` a rank's trace file has (numbers as Python numbers); the others,
    and every one of a file that cannot be opened, left out."""
    try:
        with h5py.File(rt.path, "r", locking=False) as fh:
            values = {k: fh.attrs[k] for k in keys if k in fh.attrs}
    except (OSError, ValueError, TypeError):
        return {}
    return {k: v.item() if isinstance(v, np.generic) else v for k, v in values.items()}


# ---------------------------------------------------------------- the run directory

def _check_run_dir(run_dir: str) -> None:
    trace_dir = os.path.join(run_dir, "trace")
    if os.path.exists(run_dir) and not os.path.isdir(run_dir):
        parent = os.path.dirname(run_dir) or "."
        inside = os.path.isfile(os.path.join(parent, "run.json")) or os.path.isdir(os.path.join(parent, "trace"))
        raise ConfigError(f"{run_dir} is a file, not a run directory; pass "
                          + (f"the run directory that holds it, {parent}" if inside else
                             "the --out directory of an 'mpff train' run"))
    if not os.path.isdir(run_dir):
        raise ConfigError(f"run directory {run_dir} does not exist; pass the --out directory of "
                          "an 'mpff train' run")
    if not (os.path.isfile(os.path.join(run_dir, "run.json")) or os.path.isdir(trace_dir)):
        raise ConfigError(f"{run_dir} is not an mpff run directory (it has neither run.json nor "
                          "trace/); pass the --out directory of an 'mpff train' run")


def _read_info(run_dir: str, notes: list[str]) -> dict:
    """run.json (empty when missing, with a note that the run did not finish)."""
    info_path = os.path.join(run_dir, "run.json")
    if not os.path.isfile(info_path):
        notes.append("no run.json: the run did not finish (or is still running).")
        return {}
    try:
        with open(info_path, encoding="utf-8") as fh:
            info = json.load(fh)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{info_path} is not readable JSON ({one_line(exc)}); "
                          "delete it to report from the traces alone") from None
    if not isinstance(info, dict):
        raise ConfigError(f"{info_path} does not hold a JSON object; delete it to report "
                          "from the traces alone")
    if info.get("status", "finished") != "finished":
        notes.append(f"run.json says status {info.get('status')!r}: the run did not finish.")
    return info


def _stand_in(path: str, rank: int, world_size: int, first: RankTrace) -> RankTrace:
    """A rank whose file is missing or damaged: no spans, the first readable rank's wall."""
    return RankTrace(path=path, rank=rank, world_size=world_size, host="?", device="?", status="damaged",
                     wall_start=first.wall_start, wall_end=first.wall_end, config=None,
                     kinds=first.kinds[:0], spans=first.spans[:0], scalars=first.scalars[:0],
                     scalar_names=first.scalar_names[:0])


def _read_ranks(run_dir: str, info: dict, notes: list[str]) -> list[RankTrace]:
    """Every rank's trace. A damaged or missing rank file leaves that rank out (shown idle, named
    in a note); the other ranks, the model and run.json are reported as they are."""
    trace_dir = os.path.join(run_dir, "trace")
    if not os.path.isdir(trace_dir):
        raise ConfigError(f"run {run_dir} has no trace/ directory (run.trace was false?); "
                          "rerun it with --set run.trace=true to get a report")
    files = [n for n in os.listdir(trace_dir) if n.startswith("rank") and n.endswith(".h5")]
    world_size = int(info.get("world_size") or 0) or len(files) or 1
    read: list[RankTrace | None] = []
    damaged: dict[int, str] = {}
    for r in range(world_size):
        try:
            read.append(read_trace(trace_mod.trace_path(run_dir, r)))
        except ConfigError as exc:
            read.append(None)
            damaged.setdefault(r, str(exc))
    good = [rt for rt in read if rt is not None]
    if not good:
        raise ConfigError(f"no readable trace in {trace_dir}: {next(iter(damaged.values()))}")
    first = good[0]
    if not info.get("world_size") and first.world_size:
        world_size = first.world_size
    ranks = []
    for r in range(world_size):
        rt = read[r] if r < len(read) else None
        if rt is None:
            path = trace_mod.trace_path(run_dir, r)
            why = damaged.get(r, f"trace file {path} is missing")
            notes.append(f"{why}. Rank {r} is left out: shown idle, its tasks missing from the modelled "
                         "bubble; the other ranks are reported as recorded.")
            rt = _stand_in(path, r, world_size, first)
        ranks.append(rt)
    _check_ranks(ranks, notes)
    return ranks


def _check_ranks(ranks: list[RankTrace], notes: list[str]) -> None:
    """Refuse a trace directory that mixes runs; note ranks that did not close as finished."""
    world_size = len(ranks)
    start = next(rt.wall_start for rt in ranks if rt.status != "damaged")
    for r, rt in enumerate(ranks):
        if rt.status == "damaged":
            continue
        if rt.rank != r or (rt.world_size and rt.world_size != world_size):
            raise ConfigError(f"trace file {rt.path} says rank {rt.rank} of {rt.world_size}, "
                              f"expected rank {r} of {world_size}; the trace directory mixes runs")
        if rt.status != "finished":
            notes.append(f"rank {r}'s trace has status {rt.status!r} (the rank was killed, failed or "
                         f"is still running): it is reported up to its last flush, "
                         f"t = {rt.wall_end - start:.1f} s.")


def _read_config(run_dir: str, ranks: list[RankTrace]) -> dict:
    """The configuration the traces recorded, else config.toml."""
    config = next(rt.config for rt in ranks if rt.status != "damaged")
    if config is not None:
        return config
    toml_path = os.path.join(run_dir, "config.toml")
    try:
        with open(toml_path, "rb") as fh:
            return tomllib.load(fh)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"run {run_dir} has no configuration in its traces and {toml_path} "
                          f"is unreadable ({one_line(exc)}); restore config.toml") from None


def load_run(run_dir: str) -> Run:
    """Read run.json, the configuration and every rank's trace of a run directory."""
    run_dir = os.path.normpath(run_dir)
    _check_run_dir(run_dir)
    notes: list[str] = []
    info = _read_info(run_dir, notes)
    ranks = _read_ranks(run_dir, info, notes)
    config = as_it_ran(_read_config(run_dir, ranks))
    try:
        cfg = config_of(config)
    except ConfigError as exc:
        raise ConfigError(f"run {run_dir} has a configuration this mpff cannot rebuild ({one_line(exc)}); "
                          "report it with the mpff version that made it") from None
    name = os.path.basename(os.path.abspath(run_dir))
    return Run(path=run_dir, name=name, config=config, cfg=cfg, info=info, ranks=ranks, notes=notes)


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


# ---------------------------------------------------------------- the configuration as it ran

#: settings added after runs were first recorded, and what a run recorded without them did
#: (so its task graph is rebuilt as it ran, not with today's defaults)
SETTINGS_BEFORE = {("run", "blocks"): "count", ("run", "inputs"): "recompute",
                   ("run", "eval_placement"): "last"}


def as_it_ran(config: dict) -> dict:
    """A copy of a stored configuration with the settings it was recorded without filled in as
    the run used them (:data:`SETTINGS_BEFORE`)."""
    if not isinstance(config, dict) or not isinstance(config.get("run", {}), dict):
        return config
    config = json.loads(json.dumps(config))
    for (section, key), value in SETTINGS_BEFORE.items():
        config.setdefault(section, {}).setdefault(key, value)
    return config


@functools.lru_cache(maxsize=256)
def _config_from_json(text: str) -> Config:
    return from_dict(json.loads(text))


def config_of(config: Config | dict) -> Config:
    """A stored configuration (nested dicts, as run.json and the traces keep it) as a validated
    Config, rebuilt as the run ran; a Config is returned as it is. Validation checks values
    only: the data need not be on this (login) node."""
    if isinstance(config, Config):
        return config
    if not isinstance(config, dict):
        raise ConfigError("the stored configuration is not a table of settings")
    return _config_from_json(json.dumps(as_it_ran(config), sort_keys=True))
