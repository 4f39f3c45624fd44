"""Command line: ``python -m mpff {train,report,predict,export,settings,data,info}``.

    mpiexec -n 2 python -m mpi4py -m mpff train --config configs/workstation.toml [--set k=v] [--out DIR]
    python -m mpff report RUN_DIR [RUN_DIR ...] [--baseline RUN_DIR]
    python -m mpff predict RUN_DIR [RUN_DIR ...] --ranks 1,2,4,8,16
    python -m mpff data download FashionMNIST --path DIR
    mpiexec -n 2 python -m mpi4py -m mpff info

A registry of subcommands, each ``fn(comm, args)`` as in mpi4py's own ``bench.py``: the
communicator is made once, here at the entry point (``COMM_WORLD``), and handed in, so tests can
run a command on ``COMM_SELF`` or a ``Dup()``. Commands that need no MPI (``report``) get
``None`` and never initialise MPI. User errors print one line (rank 0 only) and every rank
exits with the same code, 2.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys

from .config import ConfigError


def cmd_train(comm, args: argparse.Namespace) -> int:
    from .train import run

    return run(comm, args)


def cmd_report(comm, argv: list[str]) -> int:  # noqa: ARG001 (no MPI: runs on a login node)
    from .analysis import report

    return int(report.main(argv) or 0)


def cmd_predict(comm, argv: list[str]) -> int:  # noqa: ARG001 (no MPI: runs on a login node)
    from .predict import cli as predict_cli

    return int(predict_cli.main(argv) or 0)


def cmd_export(comm, argv: list[str]) -> int:  # noqa: ARG001 (no MPI)
    from .analysis import export

    return int(export.main(argv) or 0)


def cmd_settings(comm, argv: list[str]) -> int:  # noqa: ARG001 (no MPI)
    from . import settings

    return int(settings.main(argv) or 0)


def cmd_data(comm, argv: list[str]) -> int:  # noqa: ARG001 (no MPI: runs on a login node)
    from . import tvdata

    return int(tvdata.main(argv) or 0)


def cmd_info(comm, args: argparse.Namespace) -> int:  # noqa: ARG001
    import torch

    from .comm import Comm, mpi_info
    from .provenance import library_versions

    comm = Comm(comm)
    local_rank, local_size = comm.node_local_rank()
    if torch.cuda.is_available():
        n = torch.cuda.device_count()
        device = f"cuda:{local_rank % n} ({torch.cuda.get_device_name(local_rank % n)})"
    else:
        device = "cpu"
    info = mpi_info()
    rows = comm.gather((comm.rank, info["host"], local_rank, device))
    if comm.rank == 0:
        v = library_versions()
        print(f"mpff {v['mpff']}")
        print(f"python {v['python']}, torch {v['torch']}, numpy {v['numpy']}, "
              f"h5py {v['h5py']} (HDF5 {v['hdf5']}), mpi4py {v['mpi4py']}")
        print(f"MPI: {info['mpi_library']} (standard {info['mpi_standard']})")
        print(f"CUDA available: {torch.cuda.is_available()}, GPUs visible: {torch.cuda.device_count()}, "
              f"torch threads: {torch.get_num_threads()}")
        print(f"world size: {comm.size}")
        for rank, host, lr, dev in rows:
            print(f"  rank {rank}: host {host}, node-local rank {lr}, device {dev}")
    comm.free()
    return 0


class UsageError(Exception):
    """A command-line mistake; printed once (rank 0) as one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse would print usage on every rank and exit
        raise UsageError(f"{message} (see {self.prog} --help)")


def _rank() -> int:
    """This process's MPI rank, without initialising MPI when it is not already in use."""
    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is not None and mpi.Is_initialized():
        return mpi.COMM_WORLD.Get_rank()
    for var in ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "SLURM_PROCID"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 0


def train_epilog() -> str:
    from .halt import EXIT_CODES
    from .settings import TRAIN_EPILOG
    codes = "\n".join(f"  {code:>3}  {text}" for code, text in EXIT_CODES.items())
    return f"{TRAIN_EPILOG}\n\nexit codes (the same on every rank; docs/faults.md):\n{codes}"


def build_parser() -> argparse.ArgumentParser:
    from .train import add_arguments

    parser = _Parser(prog="mpff", description="Pipeline Forward-Forward training over MPI")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    p = sub.add_parser("train", help="train a network (launch under mpiexec/srun via python -m mpi4py)",
                       epilog=train_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    sub.add_parser("report", help="timing and bubble report of finished runs (no MPI needed)", add_help=False)
    sub.add_parser("predict", help="predict time and speedup on more ranks from a run (no MPI needed)",
                   add_help=False)
    sub.add_parser("export", help="a run's traces as OTF2 (Vampir, Scalasca, Pipit) or Chrome JSON (no MPI)",
                   add_help=False)
    sub.add_parser("settings", help="every setting with its type, default and meaning", add_help=False)
    sub.add_parser("data", help="download a data set through torchvision: data download NAME --path DIR",
                   add_help=False)
    sub.add_parser("info", help="versions, devices and world size")
    return parser


class PipeSafe:
    """A stream that outlives its reader (``mpff train ... | head -1``): at the first broken pipe
    the file descriptor is pointed at /dev/null, as Python's documentation on SIGPIPE advises,
    and later writes are dropped. The run goes on and ends as it would have (its results are in
    the run directory); without this, the next progress line raised BrokenPipeError mid-run."""

    def __init__(self, stream) -> None:
        self._stream = stream
        self.broken = False

    def write(self, text: str) -> int:
        if not self.broken:
            try:
                return self._stream.write(text)
            except BrokenPipeError:
                self._drop()
        return len(text)

    def flush(self) -> None:
        if not self.broken:
            try:
                self._stream.flush()
            except BrokenPipeError:
                self._drop()

    def _drop(self) -> None:
        self.broken = True
        try:  # the stream's buffered bytes, and the interpreter's last flush, go to /dev/null
            devnull = os.open(os.devnull, os.O_WRONLY)
            try:
                os.dup2(devnull, self._stream.fileno())
            finally:
                os.close(devnull)
        except (OSError, ValueError, AttributeError, io.UnsupportedOperation):
            pass

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


@contextlib.contextmanager
def pipe_safe_output():
    """sys.stdout and sys.stderr as :class:`PipeSafe` streams while a command runs."""
    saved = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = PipeSafe(sys.stdout), PipeSafe(sys.stderr)
    try:
        yield
    finally:
        sys.stdout, sys.stderr = saved


#: name -> (command, whether it runs under MPI); commands that parse their own arguments get argv
COMMANDS = {"train": (cmd_train, True), "info": (cmd_info, True)}
RAW_COMMANDS = {"report": cmd_report, "predict": cmd_predict, "export": cmd_export, "settings": cmd_settings,
                "data": cmd_data}


def main(argv: list[str] | None = None, comm=None) -> int:
    """Parse ``argv`` and run the command on ``comm`` (default: the job's COMM_WORLD)."""
    with pipe_safe_output():
        return _main(argv, comm)


def _main(argv: list[str] | None, comm) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] and argv[0] in RAW_COMMANDS:
        return RAW_COMMANDS[argv[0]](None, argv[1:])  # parses its own arguments, needs no MPI
    if argv[:1] == ["train"]:
        from .halt import install_signal_handlers
        install_signal_handlers()  # before torch and MPI load: a stop during start-up is a stop (75)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except UsageError as exc:
        if _rank() == 0:
            command = argv[0] if argv and argv[0] in COMMANDS else ""
            print(f"mpff{' ' + command if command else ''}: error: {exc}", file=sys.stderr)
        return 2
    args.argv = argv  # the command line, for run.json's provenance
    fn, needs_mpi = COMMANDS[args.command]
    if needs_mpi and comm is None:
        from .mpienv import prepare
        prepare()  # before MPI starts: UCX's SIGHUP, the PyPI mpich's netmod across nodes
        from .comm import world
        comm = world()
    try:
        return fn(comm, args)
    except ConfigError as exc:  # user errors raised outside the collective validation
        print(f"mpff {args.command}: error: {exc}", file=sys.stderr)
        return 2
