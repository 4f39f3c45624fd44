"""Where a run came from, for run.json: command line, code version, libraries, SLURM job.

``provenance(argv)`` returns a JSON-ready dict; ``mpff train`` stores it in run.json (the
training code adds the start and end time and the hosts of all ranks). It never raises for
a missing piece: what cannot be found is ``None`` (no git, not a git checkout, not under
SLURM). Print it for the current process with ``python -m mpff.provenance``.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import subprocess
import sys
from typing import Any

#: SLURM's environment variables kept in run.json (only those set), by the name they get there.
SLURM_VARIABLES = {
    "job_id": "SLURM_JOB_ID",
    "array_job_id": "SLURM_ARRAY_JOB_ID",
    "array_task_id": "SLURM_ARRAY_TASK_ID",
    "restart_count": "SLURM_RESTART_COUNT",
    "job_name": "SLURM_JOB_NAME",
    "cluster": "SLURM_CLUSTER_NAME",
    "partition": "SLURM_JOB_PARTITION",
    "nodelist": "SLURM_JOB_NODELIST",
    "num_nodes": "SLURM_JOB_NUM_NODES",
    "ntasks": "SLURM_NTASKS",
    "cpus_per_task": "SLURM_CPUS_PER_TASK",
    "gpus_per_task": "SLURM_GPUS_PER_TASK",
    "submit_dir": "SLURM_SUBMIT_DIR",
}
#: Other environment variables that change how a run behaves or performs.
ENVIRONMENT = ("OMP_NUM_THREADS", "CUDA_VISIBLE_DEVICES", "MPIR_CVAR_ENABLE_HEAVY_YIELD",
               "MPIR_CVAR_CH4_NETMOD", "MPFF_SETUP", "MPFF_CONFIG")
GIT_TIMEOUT = 2.0  # seconds; a slow network file system must not delay the start of a run


def _git(repo: str, *args: str) -> str | None:
    try:
        proc = subprocess.run(["git", "-C", repo, *args], capture_output=True, text=True,
                              timeout=GIT_TIMEOUT, check=False)
    except (OSError, subprocess.SubprocessError):  # no git, or too slow
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None


def git_commit() -> tuple[str | None, bool | None]:
    """(commit, has uncommitted changes) of the mpff checkout this package runs from, or
    (None, None) when it is not one (an installed wheel, a copy, no git)."""
    package = os.path.dirname(os.path.abspath(__file__))
    checkout = os.path.dirname(package)
    top = _git(checkout, "rev-parse", "--show-toplevel")
    # only mpff's own checkout: a virtualenv inside some other repository does not count
    if top is None or os.path.realpath(top) != os.path.realpath(checkout):
        return None, None
    commit = _git(checkout, "rev-parse", "HEAD")
    if commit is None:
        return None, None
    status = _git(checkout, "status", "--porcelain", "--untracked-files=no")
    return commit, (bool(status) if status is not None else None)


def library_versions() -> dict[str, str | None]:
    """Python, torch (and its CUDA), numpy, h5py/HDF5, mpi4py and the MPI library's own version
    (the latter only when MPI is already in use: this function does not initialise it)."""
    from . import __version__
    out: dict[str, str | None] = {"mpff": __version__, "python": platform.python_version(),
                                  "python_implementation": platform.python_implementation()}
    for name in ("torch", "numpy", "h5py", "mpi4py"):
        try:
            module = __import__(name)
        except ImportError:
            out[name] = None
            continue
        out[name] = str(getattr(module, "__version__", None))
    if out["torch"] is not None:
        import torch
        out["torch_cuda"] = torch.version.cuda
    if out["h5py"] is not None:
        import h5py
        out["hdf5"] = h5py.version.hdf5_version
    mpi = sys.modules.get("mpi4py.MPI")
    out["mpi_library"] = None
    if mpi is not None:
        try:
            out["mpi_library"] = mpi.Get_library_version().strip().splitlines()[0]
            out["mpi_standard"] = "{}.{}".format(*mpi.Get_version())
        except Exception:  # pragma: no cover - a broken MPI must not fail the run's bookkeeping
            pass
    return out


#: The libraries whose versions the model file, the traces and run.json's "versions" record, in
#: this order (the full record, :func:`library_versions`, goes into run.json's provenance).
RECORDED = ("mpff", "torch", "numpy", "h5py", "python", "mpi4py")


def versions() -> dict[str, str]:
    """The short version record: :func:`library_versions` of :data:`RECORDED`, those installed."""
    full = library_versions()
    return {name: full[name] for name in RECORDED if full.get(name) is not None}


def slurm() -> dict[str, str] | None:
    """The SLURM job this process runs in (job id, array job and task, restart count, nodes,
    ...), or None outside SLURM."""
    if "SLURM_JOB_ID" not in os.environ:
        return None
    return {key: os.environ[var] for key, var in SLURM_VARIABLES.items() if var in os.environ}


def provenance(argv: list[str]) -> dict[str, Any]:
    """Everything run.json records about where a run came from; ``argv`` are the arguments
    after the program (``sys.argv[1:]`` of ``python -m mpff``)."""
    commit, dirty = git_commit()
    versions = library_versions()
    return {
        "command_line": shlex.join(["python", "-m", "mpff", *argv]),
        "argv": list(argv),
        "executable": sys.executable,
        "cwd": os.getcwd(),
        "mpff_version": versions["mpff"],
        "git_commit": commit,
        "git_dirty": dirty,
        "versions": versions,
        "slurm": slurm(),
        "environment": {k: os.environ[k] for k in ENVIRONMENT if k in os.environ},
    }


if __name__ == "__main__":  # pragma: no cover
    print(json.dumps(provenance(sys.argv[1:]), indent=2))
