"""``python -m mpff``; under MPI launch as ``python -m mpi4py -m mpff`` (see mpff.cli)."""

import os
import sys

from .cli import main


def _exit(code: int) -> None:
    """Exit every rank with ``code``. A non-zero SystemExit under ``python -m mpi4py`` becomes
    MPI_Abort, which prints a line per rank; the ranks here already agree on the code (errors are
    combined collectively), so finalize MPI and leave quietly instead."""
    mpi = sys.modules.get("mpi4py.MPI")
    if code and mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized():
        sys.stdout.flush()
        sys.stderr.flush()
        mpi.Finalize()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    _exit(main())
