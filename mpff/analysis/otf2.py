"""A run as an OTF2 archive (Vampir, Scalasca, Pipit), written with the Score-P ``otf2`` package.

``mpff export RUN_DIR --format otf2`` calls :func:`export_otf2`; the layout of the archive is
described in :mod:`mpff.analysis.export`.
"""

from __future__ import annotations

import heapq
import os
import shutil
from collections.abc import Callable

import numpy as np

from ..config import ConfigError
from .runs import RankTrace, Run
from .traces import COUNTERS, messages

OTF2_ARCHIVE = "traces"        # the archive's name: DIR/traces.otf2, DIR/traces.def, DIR/traces/
TIMER_RESOLUTION = 10**9       # OTF2 ticks per second: nanoseconds
OTF2_MISSING = ("OTF2 export needs the otf2 package: pip install 'mpff[otf2]' (PyPI has wheels for "
                "CPython 3.10 and 3.11 on x86-64 Linux; elsewhere load the site's Score-P/OTF2 Python "
                "module, or export from such an environment)")

#: Span kind -> (OTF2 region role name, paradigm name, description).
REGIONS = {
    "train": ("FUNCTION", "USER", "training one layer for the chapter's epochs"),
    "forward": ("FUNCTION", "USER", "pushing the data through the layers below the one trained"),
    "negatives": ("FUNCTION", "USER", "making adaptive negatives"),
    "head": ("FUNCTION", "USER", "training the softmax head"),
    "ship": ("FUNCTION", "USER", "computing a block's outputs for the next rank (run.inputs = ship)"),
    "send": ("POINT2POINT", "MPI", "packing and posting a nonblocking send (MPI_Isend)"),
    "recv": ("POINT2POINT", "MPI", "unpacking a received buffer (after MPI_Irecv completed)"),
    # data-parallel backprop (torch.distributed, not MPI): the all-reduce of a gradient bucket
    "allreduce": ("COLL_ALL2ALL", "USER", "all-reduce of a gradient bucket (torch.distributed)"),
    "wait": ("POINT2POINT", "MPI", "blocked on a buffer that has not arrived (the bubble)"),
    "eval": ("FUNCTION", "USER", "test-set evaluation"),
    "checkpoint": ("FILE_IO", "USER", "writing a checkpoint"),
    "io": ("FILE_IO", "USER", "writing the model"),
    "setup": ("FUNCTION", "USER", "start-up: model, optimizers, data on the device"),
}


def _disjoint(starts: np.ndarray, ends: np.ndarray, lo: float, hi: float) -> list[tuple[float, float, int]]:
    """(start, end, index) of the spans in time order, clipped to [lo, hi] and made not to
    overlap (an earlier span keeps the overlapping time), as OTF2 regions must nest."""
    out, until = [], lo
    for i in np.argsort(starts, kind="stable").tolist():
        s = min(max(float(starts[i]), until, lo), hi)
        e = min(max(float(ends[i]), s), hi)
        out.append((s, e, i))
        until = e
    return out


class _Definitions:
    """The archive's definitions: the system tree, a location per rank, MPI_COMM_WORLD, a region
    per span kind (made when first used), the chapter and layer attributes and the metrics."""

    def __init__(self, defs, run: Run, enums) -> None:
        self.defs, self.enums = defs, enums
        machine = defs.system_tree_node("machine")
        nodes = {}
        self.locations = []
        for rt in run.ranks:
            if rt.host not in nodes:
                nodes[rt.host] = defs.system_tree_node(rt.host, class_name="node", parent=machine)
            process = defs.location_group(f"rank {rt.rank}",
                                          location_group_type=enums.LocationGroupType.PROCESS,
                                          system_tree_parent=nodes[rt.host])
            self.locations.append(defs.location(f"rank {rt.rank} ({rt.device})",
                                                type=enums.LocationType.CPU_THREAD, group=process))
        # defined for the tools; the communicator refers to ranks in it
        defs.group("MPI_COMM_WORLD locations", group_type=enums.GroupType.COMM_LOCATIONS,
                   paradigm=enums.Paradigm.MPI, members=self.locations)
        self.world = defs.comm("MPI_COMM_WORLD", group=defs.group(
            "MPI_COMM_WORLD", group_type=enums.GroupType.COMM_GROUP, paradigm=enums.Paradigm.MPI,
            members=list(range(run.world_size))))
        self.rank_region = defs.region("rank", description="the rank's wall; its exclusive time is "
                                       "untraced (idle) time", region_role=enums.RegionRole.FUNCTION,
                                       paradigm=enums.Paradigm.USER)
        self.chapter = defs.attribute("chapter", description="chapter, 1-based; -1: none",
                                      type=enums.Type.INT32)
        self.layer = defs.attribute("layer", description="layer, 0-based; -1: none", type=enums.Type.INT32)
        self._regions: dict = {}
        self._metrics: dict = {}

    def region(self, kind: str):
        if kind not in self._regions:
            role, paradigm, what = REGIONS.get(kind, ("UNKNOWN", "USER", "unknown span kind"))
            self._regions[kind] = self.defs.region(kind, description=what,
                                                   region_role=getattr(self.enums.RegionRole, role),
                                                   paradigm=getattr(self.enums.Paradigm, paradigm))
        return self._regions[kind]

    def metric(self, name: str, layer: int):
        track, _, series = COUNTERS[name]
        label = f"{track} {series.format(layer=layer)}"
        if label not in self._metrics:
            e = self.enums
            unit = track[track.index("(") + 1:-1] if "(" in track else "1"
            self._metrics[label] = self.defs.metric(label, description=label, metric_type=e.MetricType.OTHER,
                                                    metric_mode=e.MetricMode.ABSOLUTE_POINT,
                                                    value_type=e.Type.DOUBLE, base=e.Base.DECIMAL,
                                                    exponent=0, unit=unit)
        return self._metrics[label]


class _Tags:
    """A message tag per paired send and receive (mpff's traces keep no MPI tags), and a fresh one
    for each send or receive without its partner."""

    def __init__(self, run: Run) -> None:
        pairs, _, _ = messages(run)
        self.tags = {("send", m.src, m.send): tag for tag, m in enumerate(pairs)}
        self.tags.update({("recv", m.dst, m.recv): tag for tag, m in enumerate(pairs)})
        self.unmatched = len(pairs)

    def of(self, kind: str, rank: int, index: int) -> int:
        tag = self.tags.get((kind, rank, index))
        if tag is None:
            tag, self.unmatched = self.unmatched, self.unmatched + 1
        return tag


def _rank_events(rt: RankTrace, d: _Definitions, tags: _Tags, ticks: Callable[[float], int]) -> list[tuple]:
    """A rank's events, (time, order, event), in time order: the rank region around its spans'
    regions, an MpiSend inside each send span and an MpiRecv at the end of each recv span, and
    its metrics slotted in by time."""
    lo, hi = rt.wall_start, max(rt.wall_end, rt.wall_start)
    records: list[tuple[int, int, tuple]] = [(ticks(lo), 0, ("enter", d.rank_region, None))]
    for start, end, i in _disjoint(rt.spans["start"], rt.spans["end"], lo, hi):
        span = rt.spans[i]
        kind = str(rt.kinds[i])
        attrs = {d.chapter: int(span["chapter"]), d.layer: int(span["layer"])}
        records.append((ticks(start), len(records), ("enter", d.region(kind), attrs)))
        if kind in ("send", "recv"):
            when = start if kind == "send" else end
            records.append((ticks(when), len(records), (kind, int(span["peer"]), tags.of(kind, rt.rank, i),
                                                        int(span["bytes"]))))
        records.append((ticks(end), len(records), ("leave", d.region(kind), None)))
    records.append((ticks(hi), len(records), ("leave", d.rank_region, None)))
    points = sorted((ticks(min(max(float(sc["time"]), lo), hi)), -1,
                     ("metric", d.metric(str(name), int(sc["layer"])),
                      float(sc["value"]) * COUNTERS[str(name)][1]))
                    for name, sc in zip(rt.scalar_names, rt.scalars) if str(name) in COUNTERS)
    # the spans' events are already in time order; metrics slot in by time
    return list(heapq.merge(records, points, key=lambda r: r[0]))


def _write_events(writer, events: list[tuple], world) -> None:
    for when, _, event in events:
        what = event[0]
        if what == "enter":
            writer.enter(when, event[1], attributes=event[2])
        elif what == "leave":
            writer.leave(when, event[1])
        elif what == "send":
            writer.mpi_send(when, event[1], world, event[2], event[3])
        elif what == "recv":
            writer.mpi_recv(when, event[1], world, event[2], event[3])
        else:
            writer.metric(when, event[1], event[2])


def _write_archive(otf2, enums, run: Run, staging: str) -> None:
    t0 = run.wall_start

    def ticks(seconds: float) -> int:
        return max(int(round((seconds - t0) * TIMER_RESOLUTION)), 0)

    with otf2.writer.open(staging, archive_name=OTF2_ARCHIVE, timer_resolution=TIMER_RESOLUTION) as trace:
        trace.description = f"mpff run {run.name}"
        trace.creator = "mpff export"
        d = _Definitions(trace.definitions, run, enums)
        tags = _Tags(run)
        for rt, location in zip(run.ranks, d.locations):
            _write_events(trace.event_writer_from_location(location), _rank_events(rt, d, tags, ticks), d.world)


def export_otf2(run: Run, out_dir: str) -> str:
    """Write the run as an OTF2 archive in ``out_dir``; returns the anchor file's path
    (``out_dir/traces.otf2``). Raises ConfigError when the otf2 package is missing."""
    try:
        import otf2
        import otf2.enums as enums
    except ImportError:
        raise ConfigError(OTF2_MISSING) from None
    out_dir = os.path.abspath(out_dir)
    if os.path.lexists(out_dir) and not os.path.isdir(out_dir):
        raise ConfigError(f"--out {out_dir} is a file; OTF2 export writes a directory")
    os.makedirs(os.path.dirname(out_dir), exist_ok=True)
    # OTF2 refuses to write into an existing archive: build it in a fresh folder beside the
    # destination (mkdir, not mkdtemp: the folder gets the umask's permissions), then move it
    staging = f"{out_dir}.tmp-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    os.mkdir(staging)
    try:
        _write_archive(otf2, enums, run, staging)
        _move_into_place(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return os.path.join(out_dir, OTF2_ARCHIVE + ".otf2")


def _move_into_place(staging: str, out_dir: str) -> None:
    """Replace out_dir by staging, keeping the old one until the new one is in place."""
    old = None
    if os.path.lexists(out_dir):
        old = f"{out_dir}.old-{os.getpid()}"
        os.replace(out_dir, old)
    os.replace(staging, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
