"""Export a run's traces for the tools HPC users already analyse MPI traces with.

Needs no MPI and no GPU::

    python -m mpff export RUN_DIR --format otf2   [--out DIR]    # Vampir, Scalasca, Pipit
    python -m mpff export RUN_DIR --format chrome [--out FILE]   # Perfetto, chrome://tracing

(``python -m mpff.export ...`` does the same.) Both read the run's ``trace/rank*.h5`` files
(format version 1 or 2) through :func:`mpff.report.load_run`.

**OTF2** (default ``RUN_DIR/otf2/traces.otf2``, written with the Score-P ``otf2`` package:
``pip install 'mpff[otf2]'``): one process (location group) and one location per rank under
its host in the system tree; one region per span kind (``train``, ``forward``, ``send``, ...)
entered and left at the span's start and end, inside a ``rank`` region spanning the rank's
wall (its exclusive time is the untraced, idle time); an ``MpiSend`` event inside each
``send`` span and an ``MpiRecv`` event at the end of each ``recv`` span, on an
``MPI_COMM_WORLD`` communicator, with the peer rank and the message size in bytes. A send and
its receive are paired as :func:`mpff.report.messages` says, and the pair gets its own message
tag (mpff's traces do not keep MPI tags), so a viewer matches each send exactly to its
receive. Chapters (1-based) and layers ride along as the ``chapter`` and ``layer`` attributes
of every ``Enter`` event; losses, test accuracy and memory are metrics. Times are
nanoseconds since the first rank started.

**Chrome trace** (default ``RUN_DIR/trace.json``): the same JSON the report writes to
``report/trace.json`` (:func:`mpff.report.chrome_trace`), with flow arrows from each send to
its receive and counter tracks.

Output is built beside its destination and moved into place only when complete, so a failed
export never leaves half an archive over a good one. User errors (not a run, no otf2 package)
are one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import heapq
import json
import os
import shutil
import sys

import numpy as np

from .config import ConfigError
from .report import COUNTERS, Run, chrome_trace, load_run, messages
from .rundir import refuse_run_files

FORMATS = ("otf2", "chrome")
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


def default_out(run_dir: str, fmt: str) -> str:
    return os.path.join(run_dir, "otf2" if fmt == "otf2" else "trace.json")


# ---------------------------------------------------------------- Chrome trace JSON

def export_chrome(run: Run, path: str) -> str:
    """Write the run's Chrome trace event JSON to ``path`` (atomically); returns the path."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"  # open() creates it as the umask says
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(chrome_trace(run), fh)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


# ---------------------------------------------------------------- OTF2

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


def export_otf2(run: Run, out_dir: str) -> str:
    """Write the run as an OTF2 archive in ``out_dir``; returns the anchor file's path
    (``out_dir/traces.otf2``). Raises ConfigError when the otf2 package is missing."""
    try:
        import otf2
        from otf2.enums import (
            Base,
            GroupType,
            LocationGroupType,
            LocationType,
            MetricMode,
            MetricType,
            Paradigm,
            RegionRole,
            Type,
        )
    except ImportError:
        raise ConfigError(OTF2_MISSING) from None

    t0 = run.wall_start

    def ticks(seconds: float) -> int:
        return max(int(round((seconds - t0) * TIMER_RESOLUTION)), 0)

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
        with otf2.writer.open(staging, archive_name=OTF2_ARCHIVE,
                              timer_resolution=TIMER_RESOLUTION) as trace:
            trace.description = f"mpff run {run.name}"
            trace.creator = "mpff export"
            defs = trace.definitions
            machine = defs.system_tree_node("machine")
            nodes = {}
            locations = []
            for rt in run.ranks:
                if rt.host not in nodes:
                    nodes[rt.host] = defs.system_tree_node(rt.host, class_name="node", parent=machine)
                process = defs.location_group(f"rank {rt.rank}",
                                              location_group_type=LocationGroupType.PROCESS,
                                              system_tree_parent=nodes[rt.host])
                locations.append(defs.location(f"rank {rt.rank} ({rt.device})",
                                               type=LocationType.CPU_THREAD, group=process))
            mpi_locations = defs.group("MPI_COMM_WORLD locations", group_type=GroupType.COMM_LOCATIONS,
                                       paradigm=Paradigm.MPI, members=locations)
            world = defs.comm("MPI_COMM_WORLD", group=defs.group(
                "MPI_COMM_WORLD", group_type=GroupType.COMM_GROUP, paradigm=Paradigm.MPI,
                members=list(range(run.world_size))))
            del mpi_locations  # defined for the tools; the communicator refers to ranks in it
            rank_region = defs.region("rank", description="the rank's wall; its exclusive time is "
                                      "untraced (idle) time", region_role=RegionRole.FUNCTION,
                                      paradigm=Paradigm.USER)
            regions = {}

            def region(kind: str):
                if kind not in regions:
                    role, paradigm, what = REGIONS.get(kind, ("UNKNOWN", "USER", "unknown span kind"))
                    regions[kind] = defs.region(kind, description=what,
                                                region_role=getattr(RegionRole, role),
                                                paradigm=getattr(Paradigm, paradigm))
                return regions[kind]

            chapter_attr = defs.attribute("chapter", description="chapter, 1-based; -1: none",
                                          type=Type.INT32)
            layer_attr = defs.attribute("layer", description="layer, 0-based; -1: none", type=Type.INT32)
            metrics = {}

            def metric(name: str, layer: int):
                track, _, series = COUNTERS[name]
                label = f"{track} {series.format(layer=layer)}"
                if label not in metrics:
                    unit = track[track.index("(") + 1:-1] if "(" in track else "1"
                    metrics[label] = defs.metric(label, description=label, metric_type=MetricType.OTHER,
                                                 metric_mode=MetricMode.ABSOLUTE_POINT,
                                                 value_type=Type.DOUBLE, base=Base.DECIMAL, exponent=0,
                                                 unit=unit)
                return metrics[label]

            pairs, _, _ = messages(run)
            send_tag = {(m.src, m.send): tag for tag, m in enumerate(pairs)}
            recv_tag = {(m.dst, m.recv): tag for tag, m in enumerate(pairs)}
            unmatched = len(pairs)  # the next free tag for a send or recv without its partner

            for rt, location in zip(run.ranks, locations):
                lo, hi = rt.wall_start, max(rt.wall_end, rt.wall_start)
                records: list[tuple[int, int, tuple]] = []  # (time, order, event), in time order
                order = 0
                records.append((ticks(lo), order, ("enter", rank_region, None)))
                for start, end, i in _disjoint(rt.spans["start"], rt.spans["end"], lo, hi):
                    span = rt.spans[i]
                    kind = str(rt.kinds[i])
                    attrs = {chapter_attr: int(span["chapter"]), layer_attr: int(span["layer"])}
                    order += 1
                    records.append((ticks(start), order, ("enter", region(kind), attrs)))
                    if kind in ("send", "recv"):
                        tags = send_tag if kind == "send" else recv_tag
                        tag = tags.get((rt.rank, i))
                        if tag is None:
                            tag, unmatched = unmatched, unmatched + 1
                        when = start if kind == "send" else end
                        order += 1
                        records.append((ticks(when), order, (kind, int(span["peer"]), tag,
                                                             int(span["bytes"]))))
                    order += 1
                    records.append((ticks(end), order, ("leave", region(kind), None)))
                order += 1
                records.append((ticks(hi), order, ("leave", rank_region, None)))
                points = sorted((ticks(min(max(float(sc["time"]), lo), hi)), -1,
                                 ("metric", metric(str(name), int(sc["layer"])),
                                  float(sc["value"]) * COUNTERS[str(name)][1]))
                                for name, sc in zip(rt.scalar_names, rt.scalars) if str(name) in COUNTERS)
                writer = trace.event_writer_from_location(location)
                # the spans' events are already in time order; metrics slot in by time
                for when, _, event in heapq.merge(records, points, key=lambda r: r[0]):
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


# ---------------------------------------------------------------- command line

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", metavar="RUN_DIR", help="run directory (mpff train --out)")
    p.add_argument("--format", required=True, choices=FORMATS,
                   help="otf2: an OTF2 archive for Vampir, Scalasca and Pipit (needs "
                        "pip install 'mpff[otf2]'); chrome: Chrome trace JSON for Perfetto")
    p.add_argument("--out", metavar="PATH",
                   help="where to write: a directory for otf2 (default RUN_DIR/otf2, anchor file "
                        "traces.otf2 in it), a file for chrome (default RUN_DIR/trace.json)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mpff export",
        description="Export a run's HDF5 traces as an OTF2 archive (Vampir, Scalasca, Pipit) or "
                    "Chrome trace JSON (Perfetto). Needs no MPI.")
    add_arguments(parser)
    return parser


def run_export(args: argparse.Namespace) -> str:
    """Export as ``args`` say (run, format, out); returns what to open. Raises ConfigError."""
    run = load_run(args.run)
    out = args.out or default_out(args.run, args.format)
    refuse_run_files(out, "--out", whole=True)  # the export replaces what --out names
    try:
        if args.format == "otf2":
            return export_otf2(run, out)
        return export_chrome(run, out)
    except OSError as exc:
        raise ConfigError(f"cannot write {out} ({' '.join(str(exc).split())}); "
                          "choose another place with --out") from None


def main(argv: list[str] | None = None) -> int:
    """``mpff export`` (argv excludes the word 'export'); returns the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse has printed usage (exit 2) or help (exit 0)
        return int(exc.code or 0)
    try:
        path = run_export(args)
    except ConfigError as exc:
        print(f"mpff export: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    print(f"mpff export: wrote {path}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
