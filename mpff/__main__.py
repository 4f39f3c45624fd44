"""``python -m mpff``; under MPI launch as ``python -m mpi4py -m mpff`` (see mpff.cli)."""

import ctypes
import os
import sys

from .cli import main


def _exit(code: int) -> None:
    """Exit every rank with ``code``.

    Under ``python -m mpi4py`` a non-zero SystemExit becomes MPI_Abort, which prints a line per
    rank; the ranks here already agree on the code (errors are combined collectively), so MPI is
    finalized and the process leaves directly, skipping the interpreter's teardown (seconds of CPU
    per rank with torch loaded); every file has been closed by then.

    It must leave through the C library's ``exit``, not ``os._exit``: MPICH sends its PMI
    "finalize" from a C ``atexit`` hook, and a process whose PMI socket closes without it counts
    as crashed -- Hydra then SIGKILLs the ranks still on their way out and mpiexec reports
    signal 9 for a job whose every rank exited cleanly."""
    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized():
        sys.stdout.flush()
        sys.stderr.flush()
        mpi.Finalize()
        try:
            libc_exit = ctypes.CDLL(None).exit
        except (OSError, AttributeError):  # pragma: no cover - no C library to call
            sys.exit(code)
        libc_exit.argtypes = [ctypes.c_int]
        libc_exit(code)
        os._exit(code)  # pragma: no cover - exit() does not return
    sys.exit(code)


if __name__ == "__main__":
    _exit(main())
