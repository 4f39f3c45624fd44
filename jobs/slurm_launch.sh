#!/usr/bin/env bash
# The body shared by jobs/slurm_single_node.sbatch, jobs/slurm_multi_node.sbatch and
# the array tasks of jobs/paper_sweep.sh: start `mpff train` on every task of the
# current SLURM allocation, one MPI rank per task.
#
#   srun --mpi=$MPFF_SRUN_MPI $MPFF_PYTHON -m mpi4py -m mpff train \
#        --config $MPFF_CONFIG --out $MPFF_OUT [--resume|--force] "$@"
#
# Not meant to be called by hand: it expects to run inside a SLURM batch job, in
# the repository (the sbatch scripts cd to $SLURM_SUBMIT_DIR first).
#
# Environment (all optional):
#   MPFF_CONFIG       preset (default configs/paper.toml)
#   MPFF_OUT          run directory (default outputs/slurm-<jobid>, next to the
#                     log outputs/slurm-<jobid>.out; arrays: <arrayjob>_<task>)
#   MPFF_PYTHON       interpreter with mpff and mpi4py (default .venv/bin/python if
#                     present, else python3 on PATH, e.g. from `module load`/conda)
#   MPFF_LAUNCHER     srun (default) or mpiexec, for sites whose MPI cannot be
#                     started by srun: then `mpiexec -n $SLURM_NTASKS` is used, and
#                     the site's mpiexec finds the allocation itself (Open MPI and
#                     MPICH/Hydra both read SLURM's environment).
#   MPFF_SRUN_MPI     srun's --mpi plugin (default pmi2: works with MPICH, Intel MPI
#                     and the PyPI mpich; use pmix for Open MPI >= 5 / PMIx sites;
#                     `srun --mpi=list` shows what the site offers)
#   MPFF_SRUN_ARGS    extra srun arguments, word-split (e.g. "--cpu-bind=cores")
#   MPFF_REQUEUE      1 (default): on the preemption/time-limit warning signal
#                     (USR1, from #SBATCH --signal=B:USR1@120) requeue the job; it
#                     restarts with --resume if the run has checkpoints
#                     (run.checkpoint_every > 0), otherwise from scratch (--force)
#   MPFF_MAX_REQUEUE  give up requeueing after this many restarts (default 3)
#   MPFF_ARRAY_RUNS / MPFF_ARRAY_DIR   set by jobs/paper_sweep.sh: a ';'-separated
#                     list "NAME k=v k=v;NAME k=v ..."; array task i trains entry i
#                     into $MPFF_ARRAY_DIR/NAME with those --set overrides
# Extra arguments are passed to `mpff train` (e.g. --set train.epochs=10).
set -uo pipefail

say() { echo "mpff-slurm: $*"; }
die() {
  echo "mpff-slurm: error: $*" >&2
  exit 2
}

[ -n "${SLURM_JOB_ID:-}" ] || die "not inside a SLURM job; submit with sbatch (see docs/cluster.md)"
if [ ! -f mpff/__init__.py ] || [ ! -d jobs ]; then
  die "run from the repository root (submit with sbatch from there; now in $(pwd))"
fi

config="${MPFF_CONFIG:-configs/paper.toml}"
job="${SLURM_JOB_ID}"
if [ -n "${SLURM_ARRAY_JOB_ID:-}" ] && [ -n "${SLURM_ARRAY_TASK_ID:-}" ]; then
  job="${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}"
fi
out="${MPFF_OUT:-outputs/slurm-$job}"

sets=()
if [ -n "${MPFF_ARRAY_RUNS:-}" ]; then
  [ -n "${SLURM_ARRAY_TASK_ID:-}" ] || die "MPFF_ARRAY_RUNS is set but this is not an array job"
  IFS=';' read -r -a runs <<<"$MPFF_ARRAY_RUNS"
  entry="${runs[$SLURM_ARRAY_TASK_ID]:-}"
  [ -n "$entry" ] || die "no entry $SLURM_ARRAY_TASK_ID in MPFF_ARRAY_RUNS (${#runs[@]} entries)"
  read -r -a words <<<"$entry"
  out="${MPFF_ARRAY_DIR:?MPFF_ARRAY_DIR must be set with MPFF_ARRAY_RUNS}/${words[0]}"
  for kv in "${words[@]:1}"; do sets+=(--set "$kv"); done
fi

if [ -n "${MPFF_PYTHON:-}" ]; then
  python="$MPFF_PYTHON"
elif [ -x .venv/bin/python ]; then
  python=.venv/bin/python
else
  python=python3
fi

# Restarted (requeued after preemption, a node failure or our own USR1 trap):
# continue from the newest checkpoint if there is one, else start the run over.
mode=()
restarts="${SLURM_RESTART_COUNT:-0}"
case " $* " in
  *" --resume "* | *" --force "*) ;; # the user decides
  *)
    if [ "$restarts" -gt 0 ] && [ -f "$out/run.json" ]; then
      if [ -d "$out/checkpoints" ] && [ -n "$(ls -A "$out/checkpoints" 2>/dev/null)" ]; then
        mode=(--resume)
      else
        mode=(--force)
      fi
    fi
    ;;
esac

# One thread per CPU that SLURM gave the task (torch would otherwise use all cores
# of the node in every rank). An explicit --set train.threads=N wins (comes later).
threads=()
if [ -n "${SLURM_CPUS_PER_TASK:-}" ]; then
  threads=(--set "train.threads=$SLURM_CPUS_PER_TASK")
fi

# (${a[@]+"${a[@]}"}: empty arrays are fine under set -u on old bash too)
train=("$python" -m mpi4py -m mpff train --config "$config" ${threads[@]+"${threads[@]}"}
  ${sets[@]+"${sets[@]}"} --out "$out" ${mode[@]+"${mode[@]}"} "$@")

launcher="${MPFF_LAUNCHER:-srun}"
case "$launcher" in
  srun)
    read -r -a extra <<<"${MPFF_SRUN_ARGS:-}"
    cmd=(srun --mpi="${MPFF_SRUN_MPI:-pmi2}" --kill-on-bad-exit=1 ${extra[@]+"${extra[@]}"} "${train[@]}")
    ;;
  mpiexec)
    cmd=("${MPFF_MPIEXEC:-mpiexec}" -n "${SLURM_NTASKS:?}" "${train[@]}")
    ;;
  *) die "MPFF_LAUNCHER must be srun or mpiexec, not '$launcher'" ;;
esac

say "job $job on ${SLURM_JOB_NUM_NODES:-?} node(s) [${SLURM_JOB_NODELIST:-?}], ${SLURM_NTASKS:-?} task(s), GPUs ${SLURM_GPUS_PER_TASK:-${SLURM_GPUS_ON_NODE:-none}} per task, restart $restarts"
say "run directory $out"
say "$(printf '%q ' "${cmd[@]}")"

requeued=0
# shellcheck disable=SC2317  # called by the trap below
on_warning() {
  say "USR1: the job is about to reach its time limit or be preempted"
  if [ "${MPFF_REQUEUE:-1}" = 1 ] && [ "$restarts" -lt "${MPFF_MAX_REQUEUE:-3}" ]; then
    say "requeueing job ${SLURM_JOB_ID} (restart $((restarts + 1)) will continue in $out)"
    if scontrol requeue "$SLURM_JOB_ID"; then
      requeued=1
    else
      say "scontrol requeue failed; the run continues until SLURM stops it"
    fi
  else
    say "not requeueing (MPFF_REQUEUE=${MPFF_REQUEUE:-1}, restart $restarts of ${MPFF_MAX_REQUEUE:-3})"
  fi
}
trap on_warning USR1

start=$SECONDS
"${cmd[@]}" &
pid=$!
# `wait` returns early when a trapped signal arrives; keep waiting for the step.
while :; do
  wait "$pid"
  rc=$?
  kill -0 "$pid" 2>/dev/null || break
done
if [ "$requeued" = 1 ]; then
  say "requeued; this attempt ends here (exit $rc after $((SECONDS - start)) s)"
  exit 0
fi
say "mpff train exited with $rc after $((SECONDS - start)) s"
exit "$rc"
