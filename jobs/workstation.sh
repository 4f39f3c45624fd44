#!/usr/bin/env bash
# Train on a workstation or laptop, from a fresh clone:
#
#   bash jobs/workstation.sh [extra mpff train arguments]
#
# 1. jobs/setup_env.sh creates/updates .venv (first time: a few minutes, torch is large);
# 2. mpiexec -n $MPFF_NP .venv/bin/python -m mpi4py -m mpff train \
#        --config $MPFF_CONFIG [--out $MPFF_OUT] "$@"
#    (a hangup, the terminal closing, stops the run as SIGTERM does: exit 75, --resume continues)
#
# Environment (defaults in brackets):
#   MPFF_NP       MPI ranks [2]; the schedule must suit it: sequential is 1 rank,
#                 single_layer needs ranks <= layers, all_layers/federated take any
#   MPFF_CONFIG   preset name (workstation, tiny, paper) or TOML file [workstation];
#                 tiny runs in seconds
#   MPFF_OUT      run directory [mpff's default: outputs/<preset>-<schedule>-n<ranks>-<time>]
#   MPFF_MPIEXEC  mpiexec to use [.venv/bin/mpiexec, the PyPI MPICH; else mpiexec on PATH]
#   MPIR_CVAR_ENABLE_HEAVY_YIELD [1]: MPICH ranks yield the CPU while waiting instead of
#                 spinning, which matters when there are more ranks than cores; set 0 to
#                 get MPICH's default busy-polling on a machine with cores to spare
#   MPFF_VENV, PYTHON  as in jobs/setup_env.sh
# Examples:
#   bash jobs/workstation.sh --set run.schedule=all_layers --set train.epochs=2
#   MPFF_NP=1 bash jobs/workstation.sh --set run.schedule=sequential
#   MPFF_CONFIG=tiny MPFF_OUT=outputs/smoke bash jobs/workstation.sh --force
# The run directory gets model.h5, run.json, trace/ and report/report.md; compare
# runs with `.venv/bin/python -m mpff report RUN_DIR RUN_DIR ...`.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${MPFF_VENV:-$root/.venv}"
np="${MPFF_NP:-2}"
config="${MPFF_CONFIG:-workstation}"

case "$np" in
  '' | *[!0-9]* | 0)
    echo "workstation.sh: MPFF_NP must be a positive number of ranks, not '$np'" >&2
    exit 2
    ;;
esac
if [ ! -f "$config" ] && [ -f "$root/$config" ]; then
  config="$root/$config" # MPFF_CONFIG=configs/tiny.toml from outside the repository
fi
preset="${config%.toml}"
if [ ! -f "$config" ] && [ ! -f "$root/mpff/presets/$preset.toml" ]; then
  names=()
  for f in "$root"/mpff/presets/*.toml; do names+=("$(basename "$f" .toml)"); done
  echo "workstation.sh: no preset or file '$config' (MPFF_CONFIG); presets: ${names[*]}" >&2
  exit 2
fi

bash "$root/jobs/setup_env.sh"

if [ -n "${MPFF_MPIEXEC:-}" ]; then
  mpiexec="$MPFF_MPIEXEC"
elif [ -x "$venv/bin/mpiexec" ]; then
  mpiexec="$venv/bin/mpiexec"
elif command -v mpiexec >/dev/null; then
  mpiexec="$(command -v mpiexec)"
else
  echo "workstation.sh: no mpiexec: neither $venv/bin/mpiexec (pip package mpich) nor one on PATH" >&2
  exit 2
fi

export MPIR_CVAR_ENABLE_HEAVY_YIELD="${MPIR_CVAR_ENABLE_HEAVY_YIELD:-1}"

args=(train --config "$config")
if [ -n "${MPFF_OUT:-}" ]; then
  args+=(--out "$MPFF_OUT")
fi

echo "workstation.sh: $mpiexec -n $np $venv/bin/python -m mpi4py -m mpff ${args[*]} $*" >&2
# A closing terminal sends SIGHUP, which Hydra's mpiexec does not handle: it would die and take
# the ranks down with SIGKILL, leaving run.json 'running'. So mpiexec ignores SIGHUP, and this
# script turns it (and a SIGTERM sent to this script) into a SIGTERM for mpiexec, which forwards
# it to every rank: the run stops as preempted (exit 75) and `--resume` continues it. Ctrl-C's
# SIGINT reaches mpiexec directly (same process group) and is not forwarded twice.
(
  trap '' HUP
  exec "$mpiexec" -n "$np" "$venv/bin/python" -m mpi4py -m mpff "${args[@]}" "$@"
) &
pid=$!
# shellcheck disable=SC2317  # called by the trap below
stop() { kill -TERM "$pid" 2>/dev/null || true; }
trap stop HUP TERM
trap : INT  # mpiexec has it too (the same process group) and stops the ranks; wait for it
# `wait` returns early when a trapped signal arrives; keep waiting for mpiexec (a child that
# has exited stays visible to kill -0 until wait has collected its status)
rc=0
while kill -0 "$pid" 2>/dev/null; do
  wait "$pid" && rc=0 || rc=$?
done
exit "$rc"
