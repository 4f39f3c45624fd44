"""Export a run's traces for the tools HPC users already analyse MPI traces with.

Needs no MPI and no GPU::

    python -m mpff export RUN_DIR --format otf2   [--out DIR]    # Vampir, Scalasca, Pipit
    python -m mpff export RUN_DIR --format chrome [--out FILE]   # Perfetto, chrome://tracing

(``python -m mpff.analysis.export ...`` does the same.) Both read the run's ``trace/rank*.h5`` files
(format version 1 or 2) through :func:`mpff.analysis.runs.load_run`.

**OTF2** (default ``RUN_DIR/otf2/traces.otf2``, written by :mod:`mpff.analysis.otf2` with the Score-P ``otf2`` package:
``pip install 'mpff[otf2]'``): one process (location group) and one location per rank under
its host in the system tree; one region per span kind (``train``, ``forward``, ``send``, ...)
entered and left at the span's start and end, inside a ``rank`` region spanning the rank's
wall (its exclusive time is the untraced, idle time); an ``MpiSend`` event inside each
``send`` span and an ``MpiRecv`` event at the end of each ``recv`` span, on an
``MPI_COMM_WORLD`` communicator, with the peer rank and the message size in bytes. A send and
its receive are paired as :func:`mpff.analysis.traces.messages` says, and the pair gets its own message
tag (mpff's traces do not keep MPI tags), so a viewer matches each send exactly to its
receive. Chapters (1-based) and layers ride along as the ``chapter`` and ``layer`` attributes
of every ``Enter`` event; losses, test accuracy and memory are metrics. Times are
nanoseconds since the first rank started.

**Chrome trace** (default ``RUN_DIR/trace.json``): the same JSON the report writes to
``report/trace.json`` (:func:`mpff.analysis.traces.chrome_trace`), with flow arrows from each send to
its receive and counter tracks.

Output is built beside its destination and moved into place only when complete, so a failed
export never leaves half an archive over a good one. User errors (not a run, no otf2 package)
are one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from ..config import ConfigError
from ..rundir import refuse_run_files
from .otf2 import export_otf2
from .runs import Run, load_run
from .tables import one_line
from .traces import chrome_trace

FORMATS = ("otf2", "chrome")


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
        raise ConfigError(f"cannot write {out} ({one_line(exc)}); "
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
        print(f"mpff export: error: {one_line(exc)}", file=sys.stderr)
        return 2
    print(f"mpff export: wrote {path}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
