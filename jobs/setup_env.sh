#!/usr/bin/env bash
# Create (once) the project's virtual environment in .venv and install mpff into it.
# Extras: mpi (MPICH), test (pytest, ruff), otf2 (OTF2 export; installs nothing
# where PyPI has no otf2 wheel, see setup.py). Idempotent and quick the second
# time: it reinstalls only when setup.py or the constraints changed. Override
# the interpreter with PYTHON=..., the location with MPFF_VENV=...
#
# MPFF_ENV picks the environment:
#   lean (default)  CPU torch 2.13.0 (constraints.txt), no torchvision; in .venv
#   cuda            the CUDA build of torch 2.14.1 with torchvision 0.29.1
#                   (constraints-cuda.txt, extra [vision]; 5.5 GB); in .venv-cuda
#                   It runs on a CPU-only machine too: what a cluster's login node has.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
case "${MPFF_ENV:-lean}" in
  lean) constraints="$root/constraints.txt"; extras="mpi,test,otf2"; default_venv="$root/.venv" ;;
  cuda) constraints="$root/constraints-cuda.txt"; extras="mpi,test,otf2,vision"; default_venv="$root/.venv-cuda" ;;
  *) echo "mpff: MPFF_ENV must be lean or cuda, not '${MPFF_ENV}'" >&2; exit 2 ;;
esac
venv="${MPFF_VENV:-$default_venv}"
python="${PYTHON:-python3}"
stamp="$venv/.mpff-installed"
want="$(cat "$root/setup.py" "$constraints" | sha256sum | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x "$venv/bin/python" ]; then
  exit 0
fi
if [ ! -x "$venv/bin/python" ]; then
  echo "mpff: creating virtual environment in $venv" >&2
  "$python" -m venv "$venv"
fi
echo "mpff: installing mpff and its dependencies (first run only; torch is large)" >&2
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
  -c "$constraints" -e "${root}[${extras}]"
echo "$want" > "$stamp"
