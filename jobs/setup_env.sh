#!/usr/bin/env bash
# Create (once) the project's virtual environment in .venv and install mpff into it.
# Extras: mpi (MPICH), test (pytest, ruff), otf2 (OTF2 export; installs nothing
# where PyPI has no otf2 wheel, see setup.py). Idempotent and quick the second
# time: it reinstalls only when setup.py or constraints.txt changed. Override
# the interpreter with PYTHON=..., the location with MPFF_VENV=...
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${MPFF_VENV:-$root/.venv}"
python="${PYTHON:-python3}"
stamp="$venv/.mpff-installed"
want="$(cat "$root/setup.py" "$root/constraints.txt" | sha256sum | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x "$venv/bin/python" ]; then
  exit 0
fi
if [ ! -x "$venv/bin/python" ]; then
  echo "mpff: creating virtual environment in $venv" >&2
  "$python" -m venv "$venv"
fi
echo "mpff: installing mpff and its dependencies (first run only; torch is large)" >&2
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
  -c "$root/constraints.txt" -e "${root}[mpi,test,otf2]"
echo "$want" > "$stamp"
