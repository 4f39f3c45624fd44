"""Environment settings that must be in place before MPI starts (``from mpi4py import MPI``).

Two defects of the MPI stack mpff installs by default (the PyPI ``mpich`` wheel, whose
inter-node transport is UCX) are worked around here, each only where it bites and never over
a value the user set:

* UCX takes SIGHUP as its signal to print debug lines, hundreds a second, and keeps the rank
  running; SIGHUP is a stop for mpff (``mpff.halt.STOP_SIGNALS``), so ``UCX_DEBUG_SIGNO=0``.

* Under ``srun --mpi=pmi2`` on more than one node, MPICH's UCX netmod publishes a fixed 4 KiB
  address blob through PMI in segments of 511 bytes. The pmi2 plugin speaks PMI-1's text wire
  protocol to it and reads at most 1024 bytes per request line; a segment's hex text plus the
  ``cmd=put kvsname=... key=...-seg-i/9 value=`` prefix reaches ~1085 bytes whenever the blob's
  padding (uninitialised heap memory) does not compress, so the line is cut, slurmstepd logs
  ``mpi/pmi2: value not properly terminated in client request`` and MPI_Init fails with UCX's
  ``Destination is unreachable``: at random, depending on what the heap held. The OFI netmod of
  the same wheel (libfabric's tcp;ofi_rxm) publishes a 72-byte address in one line, so a
  multi-node pmi2 step with the PyPI mpich gets ``MPIR_CVAR_CH4_NETMOD=ofi``. Ranks on one node
  are unaffected (MPICH exchanges nothing through PMI there) and keep UCX; a site's own MPI
  (no PyPI ``mpich`` in this environment, or ``MPI4PY_LIBMPI`` naming another library) is not
  touched.
"""

from __future__ import annotations

import importlib.metadata
import os
from collections.abc import MutableMapping


def pypi_mpich() -> bool:
    """True where mpi4py would load the PyPI ``mpich`` wheel's library."""
    try:
        importlib.metadata.distribution("mpich")
    except importlib.metadata.PackageNotFoundError:
        return False
    return "MPI4PY_LIBMPI" not in os.environ


def multi_node_pmi2(env: MutableMapping[str, str]) -> bool:
    """True in a task that ``srun --mpi=pmi2`` started in a step spanning several nodes."""
    if env.get("SLURM_MPI_TYPE") != "pmi2" or "PMI_FD" not in env:
        return False
    try:
        return int(env.get("SLURM_STEP_NUM_NODES", "1")) > 1
    except ValueError:
        return False


def prepare(env: MutableMapping[str, str] | None = None, *, mpich: bool | None = None) -> dict[str, str]:
    """Set what MPI needs before it starts; returns the variables set here (name -> value)."""
    env = os.environ if env is None else env
    done: dict[str, str] = {}

    def default(name: str, value: str) -> None:
        if name not in env:
            env[name] = value
            done[name] = value

    default("UCX_DEBUG_SIGNO", "0")
    if multi_node_pmi2(env) and (pypi_mpich() if mpich is None else mpich):
        default("MPIR_CVAR_CH4_NETMOD", "ofi")
    return done
