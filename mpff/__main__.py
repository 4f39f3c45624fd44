"""``python -m mpff``; under MPI launch as ``python -m mpi4py -m mpff`` (see mpff.cli)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
