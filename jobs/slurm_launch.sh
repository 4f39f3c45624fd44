#!/usr/bin/env bash
# The body shared by jobs/slurm_single_node.sbatch, jobs/slurm_multi_node.sbatch and
# the array tasks of jobs/paper_sweep.sh: start `mpff train` on every task of the
# current SLURM allocation, one MPI rank per task.
#
#   srun --mpi=$MPFF_SRUN_MPI $MPFF_PYTHON -m mpi4py -m mpff train \
#        --config $MPFF_CONFIG --set run.checkpoint_every=$MPFF_CHECKPOINT_EVERY \
#        --out $MPFF_OUT [--resume|--force] "$@"
#
# Not meant to be called by hand: it expects to run inside a SLURM batch job, in
# the repository (the sbatch scripts cd to $SLURM_SUBMIT_DIR first).
#
# Environment (all optional):
#   MPFF_SETUP        a bash file sourced inside the job, on the first node, before
#                     anything else: module loads, `conda activate`, site variables
#                     (default jobs/site_setup.sh if it exists; copy
#                     jobs/site_setup.example.sh there). MPFF_SETUP= sources nothing.
#                     srun passes the environment it leaves on to every rank.
#   MPFF_CONFIG       preset: a name (paper, workstation, tiny) or a TOML file
#                     (default configs/paper.toml)
#   MPFF_OUT          run directory (default outputs/slurm-<jobid>, next to the
#                     log outputs/slurm-<jobid>.out; arrays: <arrayjob>_<task>)
#   MPFF_PYTHON       interpreter with mpff and mpi4py (default .venv/bin/python if
#                     present, else python3 on PATH, e.g. from MPFF_SETUP's
#                     `module load`/conda)
#   MPFF_LAUNCHER     srun (default) or mpiexec, for sites whose MPI cannot be
#                     started by srun: then `mpiexec -n $SLURM_NTASKS` is used, and
#                     the site's mpiexec finds the allocation itself (Open MPI and
#                     MPICH/Hydra both read SLURM's environment)
#   MPFF_MPIEXEC      the mpiexec for MPFF_LAUNCHER=mpiexec (default: on PATH)
#   MPFF_SRUN_MPI     srun's --mpi plugin (default pmi2: works with MPICH, Intel MPI
#                     and the PyPI mpich; use pmix for Open MPI >= 5 / PMIx sites;
#                     `srun --mpi=list` shows what the site offers)
#   MPFF_SRUN_ARGS    extra srun arguments, word-split (e.g. "--cpu-bind=cores")
#   MPFF_CHECKPOINT_EVERY  checkpoint every N chapters (default 1; empty: leave
#                     the preset's run.checkpoint_every alone). A later
#                     --set run.checkpoint_every=N argument wins.
#   MPFF_REQUEUE      1 (default): when the time-limit/preemption warning arrives
#                     (USR1 from #SBATCH --signal=B:USR1@120) forward it to the
#                     ranks, which checkpoint and stop (exit 75), then requeue the
#                     job; the next attempt continues the same run directory with
#                     --resume (or starts it over if there was no checkpoint yet)
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

# The site's set-up first, so that the python, mpiexec and libraries it provides are
# the ones found below. Sourced with `set -u` off: module and conda scripts read unset
# variables.
setup="${MPFF_SETUP-jobs/site_setup.sh}"
if [ -n "$setup" ]; then
  if [ -f "$setup" ]; then
    say "sourcing $setup"
    set +u
    # shellcheck source=/dev/null
    source "$setup"
    status=$?
    set -u
    [ "$status" = 0 ] || die "the set-up file $setup failed (exit $status)"
  elif [ -n "${MPFF_SETUP:-}" ]; then
    die "MPFF_SETUP=$setup: no such file"
  fi
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

# One torch thread per CPU that SLURM gave the task (torch would otherwise use all
# cores of the node in every rank). Checkpoints so that a requeued job resumes.
# Explicit --set arguments come later and win.
pre=()
if [ -n "${SLURM_CPUS_PER_TASK:-}" ]; then
  pre+=(--set "train.threads=$SLURM_CPUS_PER_TASK")
fi
if [ -n "${MPFF_CHECKPOINT_EVERY-1}" ]; then
  pre+=(--set "run.checkpoint_every=${MPFF_CHECKPOINT_EVERY-1}")
fi

# Restarted (requeued after our own USR1 handling, a node failure or preemption):
# continue from the newest checkpoint if there is one, else start the run over.
restarts="${SLURM_RESTART_COUNT:-0}"
mode=()
case " $* " in
  *" --resume "* | *" --force "*) ;; # the user decides
  *)
    if [ "$restarts" -gt 0 ] && [ -f "$out/run.json" ]; then
      # The earlier attempt is gone (SLURM ended it before requeueing): its lock
      # is stale even if it was held on another node.
      rm -f "$out/.lock"
      if [ -n "$(ls -A "$out/checkpoints" 2>/dev/null)" ]; then
        mode=(--resume)
      else
        mode=(--force)
      fi
    fi
    ;;
esac

build() { # build the command line into cmd=() for the given --resume/--force mode
  # (${a[@]+"${a[@]}"}: empty arrays are fine under set -u on old bash too)
  local train=("$python" -m mpi4py -m mpff train --config "$config" ${pre[@]+"${pre[@]}"}
    ${sets[@]+"${sets[@]}"} --out "$out" "$@" ${args[@]+"${args[@]}"})
  case "${MPFF_LAUNCHER:-srun}" in
    srun)
      local extra=()
      read -r -a extra <<<"${MPFF_SRUN_ARGS:-}"
      cmd=(srun --mpi="${MPFF_SRUN_MPI:-pmi2}" --kill-on-bad-exit=1 ${extra[@]+"${extra[@]}"} "${train[@]}")
      ;;
    mpiexec)
      cmd=("${MPFF_MPIEXEC:-mpiexec}" -n "${SLURM_NTASKS:?}" "${train[@]}")
      ;;
    *) die "MPFF_LAUNCHER must be srun or mpiexec, not '${MPFF_LAUNCHER}'" ;;
  esac
}
args=("$@")
cmd=()
build ${mode[@]+"${mode[@]}"}

warned=0
pid=
# shellcheck disable=SC2317  # called by the trap below
on_warning() {
  warned=1
  say "USR1 at $(date +%T): time limit or preemption is near; asking the ranks to checkpoint and stop"
  [ -z "$pid" ] || kill -USR1 "$pid" 2>/dev/null || true
}
trap on_warning USR1

run_step() {
  say "$(printf '%q ' "${cmd[@]}")"
  "${cmd[@]}" &
  pid=$!
  # `wait` returns early when a trapped signal arrives; keep waiting for the step.
  while :; do
    wait "$pid"
    rc=$?
    kill -0 "$pid" 2>/dev/null || break
  done
  pid=
}

say "job $job on ${SLURM_JOB_NUM_NODES:-?} node(s) [${SLURM_JOB_NODELIST:-?}], ${SLURM_NTASKS:-?} task(s), GPUs per task: ${SLURM_GPUS_PER_TASK:-none}, restart $restarts"
say "run directory $out"
start=$SECONDS
rc=0
run_step
if [ "$rc" = 2 ] && [ "${mode[*]:-}" = --resume ] && [ "$warned" = 0 ]; then
  say "could not resume (exit 2); starting the run over"
  build --force
  run_step
fi
say "mpff train exited with $rc after $((SECONDS - start)) s"

if [ "$warned" = 1 ] && [ "$rc" != 0 ]; then
  if [ "${MPFF_REQUEUE:-1}" = 1 ] && [ "$restarts" -lt "${MPFF_MAX_REQUEUE:-3}" ]; then
    say "requeueing job ${SLURM_JOB_ID}; restart $((restarts + 1)) continues in $out"
    if scontrol requeue "$SLURM_JOB_ID"; then
      exit 0
    fi
    say "scontrol requeue failed; resume by hand: MPFF_OUT=$out sbatch ... --resume"
  else
    say "not requeueing (MPFF_REQUEUE=${MPFF_REQUEUE:-1}, restart $restarts of at most ${MPFF_MAX_REQUEUE:-3}); resume by hand: MPFF_OUT=$out sbatch ... --resume"
  fi
fi
exit "$rc"
