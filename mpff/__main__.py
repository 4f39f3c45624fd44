"""``python -m mpff``; under MPI launch as ``python -m mpi4py -m mpff`` (see mpff.cli)."""

import os
import sys

from .cli import main


def _exit(code: int) -> None:
    """Exit every rank with ``code``.

    Under ``python -m mpi4py`` a non-zero SystemExit becomes MPI_Abort, which prints a line per
    rank; the ranks here already agree on the code (errors are combined collectively), so MPI is
    finalized and the process leaves directly. That also skips torch's interpreter teardown
    (seconds of CPU per rank); every file has been closed by then."""
    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized():
        sys.stdout.flush()
        sys.stderr.flush()
        mpi.Finalize()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    _exit(main())
