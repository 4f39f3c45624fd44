#!/usr/bin/env bash
# The test command (README): bash tests/run.sh [pytest arguments]
#
# Creates/updates .venv (jobs/setup_env.sh), then runs
#   .venv/bin/python -m pytest -q tests "$@"
# MPFF_ENV=cuda runs the same suite in .venv-cuda instead: the CUDA build of torch
# with torchvision (constraints-cuda.txt), as on a cluster's login node.
# ("tests" is left out when an argument names a test file or directory, so
# `bash tests/run.sh tests/test_slurm.py -k sweep` runs just that).
# The SLURM tests (marker `slurm`) need a SLURM: `bash .ci/slurm.sh start` (root,
# apt-get) brings up a throw-away one; without it they skip, or fail under CI=true.
# Select them with `-m slurm`, leave them out with `-m "not slurm"`.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash jobs/setup_env.sh
default=(tests)
for arg in "$@"; do
  case "$arg" in
    -*) ;;
    *) if [ -e "${arg%%::*}" ]; then default=(); fi ;;
  esac
done
case "${MPFF_ENV:-lean}" in
  cuda) default_venv="$root/.venv-cuda" ;;
  *) default_venv="$root/.venv" ;;
esac
exec "${MPFF_VENV:-$default_venv}/bin/python" -m pytest -q ${default[@]+"${default[@]}"} "$@"
