#!/usr/bin/env bash
# Site set-up for the SLURM jobs: copy to jobs/site_setup.sh (or point MPFF_SETUP at
# a copy elsewhere) and adapt. jobs/slurm_launch.sh sources it inside every job, before
# it looks for python or starts the ranks; srun passes the environment it leaves on to
# every rank. It must not exit: a failing command here fails the job (exit 2).
#
# Examples; use your site's module names (`module avail`, `module spider`):

# Modules: the compiler, MPI and CUDA that mpi4py and torch were built against.
if command -v module >/dev/null 2>&1; then
  module load gcc openmpi cuda
fi

# A conda environment instead of the repository's .venv:
#   source "$HOME/miniforge3/etc/profile.d/conda.sh" && conda activate mpff
#   export MPFF_PYTHON="$CONDA_PREFIX/bin/python"

# Open MPI 5 / PMIx sites start ranks with srun --mpi=pmix:
#   export MPFF_SRUN_MPI=pmix

# One torch thread per allocated CPU is the default; pin threads to cores for timing runs:
#   export MPFF_SRUN_ARGS="--cpu-bind=cores"
